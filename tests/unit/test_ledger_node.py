"""A node sealing and committing its periods to an in-process chain (py-evm)."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

from daisee_node.config import load_config
from daisee_node.conformity import leaf_entry
from daisee_node.daemon import Node
from daisee_node.ledger import merkle
from daisee_node.ledger.keys import keystore_address, load_account, new_keystore
from daisee_node.ledger.outbox import period_leaves
from tests.conftest import sim_sensors, write_config


def ledger_config(tmp_path: Path, **chain: Any) -> Path:
    data = tmp_path / "data"
    new_keystore(data / "node-key.json", data / "node-key.pass")
    return write_config(
        tmp_path / "node.toml",
        {
            "node": {
                "id": "l1",
                "data_dir": str(data),
                "time_speed": 200,
                "time_start": "2026-06-21T10:00:00Z",
            },
            "store": {"flush_interval_s": 0.05},
            "sensors": sim_sensors(1.0),
            "chain": {
                "rpc_url": "embedded",
                "period_s": 60,
                "seal_delay_s": 10,
                "submit_interval_s": 0.2,
                "confirmations": 2,
                "import_channel": "grid.import_wh",
                "export_channel": "pv.energy_wh",  # production stands in for export here
                **chain,
            },
        },
    )


async def until(predicate, timeout: float = 30.0) -> None:
    async def poll() -> None:
        while not await predicate():
            await asyncio.sleep(0.05)

    await asyncio.wait_for(poll(), timeout)


async def start_node(tmp_path: Path) -> tuple[Node, asyncio.Task[int]]:
    """An in-process node with the embedded chain, started."""
    path = ledger_config(tmp_path)
    node = Node(load_config(path), config_path=path)
    task = asyncio.create_task(node.run())
    await asyncio.wait_for(node.started.wait(), 10)
    return node, task


async def test_periods_are_sealed_committed_confirmed_and_provable(tmp_path: Path) -> None:
    node, task = await start_node(tmp_path)
    svc = node.ledger
    assert svc is not None
    assert svc.address == keystore_address(tmp_path / "data/node-key.json")

    async def confirmed() -> bool:
        return (await svc.outbox.summary(svc.address))["confirmed_seq"] >= 3

    await until(confirmed)
    ledger = svc.ledger
    assert ledger is not None
    # Head and balance read at one block: the node keeps committing meanwhile.
    block = ledger.w3.eth.block_number
    head = ledger.head(svc.address, block)
    assert head.registered and head.seq >= 3

    db = sqlite3.connect(tmp_path / "data/node.db")
    account = load_account(tmp_path / "data/node-key.json", tmp_path / "data/node-key.pass")
    secret = merkle.salt_secret(bytes(account.key))
    node_bytes = bytes.fromhex(svc.address[2:])
    total_export = 0
    prev = b"\0" * 32
    for seq in range(1, 4):
        entry = await svc.outbox.get(svc.address, seq)
        assert entry is not None and entry.state == "confirmed"
        c = entry.commitment
        assert c.prev_hash == prev and c.t1 - c.t0 <= 60_000 and c.t1 % 60_000 == 0
        prev = c.struct_hash()
        rows = db.execute(
            "SELECT r.t_ms, c.name, r.value, r.quality FROM readings r JOIN channels c "
            "ON c.id = r.channel_id WHERE r.t_ms >= ? AND r.t_ms < ?",
            (c.t0, c.t1),
        ).fetchall()
        # the root covers exactly the period's readings, as stored, and its conformity report,
        # each leaf salted with the node's secret: the plain leaves do not give it
        report = await svc.outbox.report(svc.address, seq)
        assert report is not None
        extra = leaf_entry(c.t1, report.digest)
        assert c.count == len(rows) > 0
        leaves = period_leaves(node_bytes, rows, extra=extra)
        packed = merkle.salt_packed(b"".join(leaves), secret)
        salted = [packed[i : i + 32] for i in range(0, len(packed), 32)]
        assert merkle.root(salted) == c.root != merkle.root(leaves)
        total_export += c.export_wh

        # and one reading of it proves against the chain, its salt first; a tampered one does
        # not, nor one without its salt
        ordered = sorted(rows, key=lambda r: (r[0], merkle.channel_id(r[1])))
        t, name, value, q = ordered[len(ordered) // 2]
        reading = (merkle.channel_id(name), t, merkle.value_micro(value), q)
        leaf = merkle.reading_leaf(node_bytes, *reading)
        i = leaves.index(leaf)
        proof = [merkle.leaf_salt(secret, leaf), *merkle.proof(merkle.levels(salted), i)]
        assert entry.tx_hash is not None
        batch_proof = ledger.batch_proof(entry.tx_hash, c.struct_hash())
        assert ledger.verify_reading(c, batch_proof, reading, proof)
        forged = (reading[0], t, reading[2] + 1, q)
        assert not ledger.verify_reading(c, batch_proof, forged, proof)
        assert not ledger.verify_reading(c, batch_proof, reading, proof[1:])
        # what the proof shows of the neighbour is its salted leaf, never its plain one
        neighbour = leaves[i ^ 1] if (i ^ 1) < len(leaves) else None
        assert neighbour is None or neighbour not in proof

    # credits follow the committed export: a coin per 1000 Wh, 18 decimals
    for seq in range(4, head.seq + 1):
        entry = await svc.outbox.get(svc.address, seq)
        assert entry is not None
        total_export += entry.commitment.export_wh
    balance = ledger.credit().functions.balanceOf(svc.address).call(block_identifier=block)
    assert total_export > 0  # a sunny June morning exports
    assert balance == total_export * 10**15

    # the ledger's state (the MQTT `ledger` topic, Home Assistant's credit balance) follows it
    async def state_shows_the_balance() -> bool:
        shown = (await svc.state())["credit_balance"]
        on_chain = ledger.credit().functions.balanceOf(svc.address).call() / 10**18
        return shown is not None and shown > 0 and shown == on_chain

    await until(state_shows_the_balance)
    node.request_stop()
    assert await asyncio.wait_for(task, 8) == 0


async def test_a_batch_mined_between_receipt_and_nonce_lookups_counts_as_mined(
    tmp_path: Path,
) -> None:
    """The nonce moving on while no receipt was seen must not write the batch off as dropped."""
    node, task = await start_node(tmp_path)
    svc = node.ledger
    assert svc is not None
    await asyncio.wait_for(svc._connected.wait(), 10)
    submitter = svc.submitter
    assert submitter is not None
    real_receipt = submitter._receipt
    looked_up: set[bytes] = set()

    def late_receipt(tx_hash: bytes) -> Any:
        # The first lookup of each transaction misses it, as if its block arrived just after.
        if tx_hash not in looked_up:
            looked_up.add(tx_hash)
            return None
        return real_receipt(tx_hash)

    submitter._receipt = late_receipt  # type: ignore[method-assign]

    async def two_confirmed() -> bool:
        return (await svc.outbox.summary(svc.address))["confirmed_seq"] >= 2

    await until(two_confirmed)
    states = [s for (s,) in await node.store.query("SELECT state FROM ledger_txs ORDER BY id")]
    # every batch was first missed, yet each one that was followed up is recorded as mined
    assert looked_up and states.count("mined") >= 1
    assert set(states) <= {"mined", "sent"}
    node.request_stop()
    assert await asyncio.wait_for(task, 8) == 0


async def test_a_key_that_cannot_be_decrypted_stops_the_ledger_not_the_node(
    tmp_path: Path,
) -> None:
    path = ledger_config(tmp_path)
    (tmp_path / "data" / "node-key.pass").write_text("not the password\n")
    node = Node(load_config(path), config_path=path)
    assert node.ledger is not None and node.ledger.key_error is None
    task = asyncio.create_task(node.run())
    await asyncio.wait_for(node.started.wait(), 10)  # the key is decrypted after READY
    ledger = node.ledger

    async def key_refused() -> bool:
        return ledger.key_error is not None

    await until(key_refused)
    assert "cannot decrypt" in str(ledger.key_error)
    written = node.store.stats.written

    async def still_sampling() -> bool:
        return node.store.stats.written > written + 20

    await until(still_sampling)
    node.request_stop()
    assert await asyncio.wait_for(task, 8) == 0
    conn = sqlite3.connect(tmp_path / "data" / "node.db")
    counters = dict(conn.execute("SELECT name, value FROM counters").fetchall())
    events = conn.execute("SELECT reason FROM events WHERE kind = 'ledger'").fetchall()
    conn.close()
    assert counters.get("ledger.key_errors") == 1
    assert counters.get("task.ledger.sealer.crashes") is None  # waited, never crash-looped
    assert any("cannot decrypt" in reason for (reason,) in events)


def test_a_missing_key_or_an_open_password_file_still_stops_the_start(tmp_path: Path) -> None:
    import pytest

    from daisee_node.ledger.keys import KeyStoreError

    path = ledger_config(tmp_path)
    (tmp_path / "data" / "node-key.pass").chmod(0o644)
    with pytest.raises(KeyStoreError, match="open to others"):
        Node(load_config(path), config_path=path)
    (tmp_path / "data" / "node-key.pass").chmod(0o600)
    (tmp_path / "data" / "node-key.json").unlink()
    with pytest.raises(KeyStoreError, match="keys new"):
        Node(load_config(path), config_path=path)


async def test_a_node_that_relies_on_relays_shares_its_oldest_unconfirmed_again(
    tmp_path: Path,
) -> None:
    # A relay that was not listening when seq 1 was shared would otherwise wait for it forever:
    # the ledger accepts a node's commitments only in order.
    path = ledger_config(tmp_path, submit=False)
    node = Node(load_config(path), config_path=path)
    assert node.ledger is not None
    shared: list[int] = []
    node.ledger.on_sealed.append(lambda c, sig: shared.append(c.seq))
    task = asyncio.create_task(node.run())

    async def several_sealed() -> bool:
        return max(shared, default=0) >= 8

    await until(several_sealed, timeout=60)
    node.request_stop()
    assert await asyncio.wait_for(task, 8) == 0
    assert shared.count(1) >= 2, shared  # shared when sealed, and again with the next ones
    assert sorted(set(shared)) == list(range(1, max(shared) + 1))
