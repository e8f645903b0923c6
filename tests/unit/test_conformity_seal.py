"""Sealing with conformity reports, on a real store: the report's digest is one more leaf of the
signed root, the readings' leaves keep their order, the report is stored with the commitment,
and `conformity` shows it, checks it against the root and notices a report changed since."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account

from daisee_node import cli
from daisee_node.conformity import (
    REPORT_CHANNEL_ID,
    ConformitySpec,
    canonical,
    digest,
    leaf_entry,
    report_leaf,
)
from daisee_node.ledger import merkle
from daisee_node.ledger.keys import new_keystore
from daisee_node.ledger.outbox import Outbox, Sealer, period_leaves
from daisee_node.readings import Channel, Reading
from daisee_node.store import Retention, Store
from tests.conftest import write_config
from tests.support.clocks import FixedClock

PERIOD_MS = 60_000
T0 = 1_781_000_000_000 // PERIOD_MS * PERIOD_MS
SPEC = ConformitySpec(intervals_ms={"grid": 1000})
CHAIN = (1, "0x" + "11" * 20)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    """Two minutes of a meter read every second; a wall-clock step noticed in the first."""
    s = Store(
        tmp_path / "data" / "node.db",
        clock=FixedClock(T0 + 2 * PERIOD_MS + 20_000),
        retention=Retention(flush_interval_s=0.01, maintenance_interval_s=3600),
    )
    s.declare([Channel("grid.power_w", "W"), Channel("grid.import_wh", "Wh", "total_increasing")])
    await s.open()
    writer = asyncio.create_task(s.run())
    for k in range(120):
        t = T0 + k * 1000
        s.put_many([Reading("grid.power_w", t, 100.0 + k % 9), Reading("grid.import_wh", t, k)])
    # at the period's last ms too, so the report's leaf sits among readings of its time
    s.put_many([Reading("grid.power_w", T0 + PERIOD_MS - 1, 5.0)])
    s.put_event(T0 + 30_000, "clock", "wall", None, None, "stepped +4.000 s")
    s.add_counter("ledger.late_readings", 2)
    await s.flush()
    yield s
    s.stop()
    await writer
    await s.close()


def sealer_for(store: Store, account: Any = None, spec: ConformitySpec | None = SPEC) -> Sealer:
    return Sealer(
        store,
        Outbox(store),
        account or Account.create(),
        period_s=PERIOD_MS // 1000,
        delay_s=10,
        import_channel="grid.import_wh",
        export_channel=None,
        rules_hash=b"\0" * 32,
        clock=store.clock,
        conformity=spec,
    )


def period_rows(path: Path, t0: int, t1: int) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(
            "SELECT r.t_ms, c.name, r.value, r.quality FROM readings r JOIN channels c "
            "ON c.id = r.channel_id WHERE r.t_ms >= ? AND r.t_ms < ?",
            (t0, t1),
        ).fetchall()
    finally:
        conn.close()


async def test_the_report_is_a_leaf_of_the_signed_root_and_the_readings_keep_theirs(
    store: Store,
) -> None:
    sealer = sealer_for(store)
    sealed = await sealer.seal_due(*CHAIN)
    assert [c.seq for c, _ in sealed] == [1, 2]
    node = bytes.fromhex(sealer.node[2:])
    for c, _ in sealed:
        stored = await sealer.outbox.report(sealer.node, c.seq)
        assert stored is not None and (stored.t0, stored.t1) == (c.t0, c.t1)
        report = stored.report()
        assert canonical(report).decode() == stored.body and digest(report) == stored.digest
        rows = period_rows(store.path, c.t0, c.t1)
        # count: the readings; the tree: the readings' leaves in their order, and the report's
        assert c.count == len(rows) == report["readings"]
        readings_only = period_leaves(node, rows)
        leaves = period_leaves(node, rows, extra=leaf_entry(c.t1, stored.digest))
        mine = report_leaf(node, c.t1, stored.digest)
        assert [x for x in leaves if x != mine] == readings_only
        assert len(leaves) == len(rows) + 1
        keyed = sorted(
            [(t, merkle.channel_id(n)) for t, n, _, _ in rows] + [(c.t1 - 1, REPORT_CHANNEL_ID)]
        )
        assert leaves.index(mine) == keyed.index((c.t1 - 1, REPORT_CHANNEL_ID))
        assert merkle.root(leaves) == c.root != merkle.root(readings_only)
        proof = merkle.proof(merkle.levels(leaves), leaves.index(mine))
        assert merkle.verify(proof, c.root, mine)
    first = (await sealer.outbox.report(sealer.node, 1)).report()  # type: ignore[union-attr]
    second = (await sealer.outbox.report(sealer.node, 2)).report()  # type: ignore[union-attr]
    # the step noticed in the first period is reported there, and not again
    assert first["checks"]["clock_steps"]["count"] == 1 and not first["passed"]
    assert second["checks"]["clock_steps"]["count"] == 0
    # late arrivals count from the report before: none before the first report to compare with
    assert second["cursor"]["late_total"] == first["cursor"]["late_total"] == 2
    assert second["checks"]["late_readings"]["count"] == 0
    assert second["passed"], second["reasons"]


async def test_without_a_spec_the_tree_holds_the_readings_alone(store: Store) -> None:
    sealer = sealer_for(store, spec=None)
    (c, _), _ = await sealer.seal_due(*CHAIN)
    node = bytes.fromhex(sealer.node[2:])
    assert c.root == merkle.root(period_leaves(node, period_rows(store.path, c.t0, c.t1)))
    assert await sealer.outbox.report(sealer.node, 1) is None


async def test_a_resealed_period_gets_a_new_report(store: Store) -> None:
    sealer = sealer_for(store)
    await sealer.seal_due(*CHAIN)
    assert await sealer.outbox.drop_own_after(1) == 1
    assert await sealer.outbox.report(sealer.node, 2) is None
    assert await sealer.outbox.report(sealer.node, 1) is not None
    store.add_counter("ledger.late_readings", 3)  # three stamped in sealed periods arrived
    store.put(Reading("grid.power_w", T0 + 3 * PERIOD_MS, 1.0))  # (counters go with readings)
    [(c, _)] = await sealer.seal_due(*CHAIN)
    again = await sealer.outbox.report(sealer.node, 2)
    assert again is not None and c.seq == 2
    assert again.report()["checks"]["late_readings"]["findings"] == [{"arrived_late": 3}]


async def test_the_same_readings_seal_to_the_same_report_and_root(store: Store) -> None:
    account = Account.create()
    one = sealer_for(store, account)
    sealed = await one.seal_due(*CHAIN)
    await one.outbox.drop_own_after(0)
    resealed = await sealer_for(store, account).seal_due(*CHAIN)
    assert [c.root for c, _ in sealed] == [c.root for c, _ in resealed]


# -- the command ---------------------------------------------------------------------------------


async def test_the_command_shows_the_signed_report_and_notices_a_changed_one(
    store: Store, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    address = new_keystore(data / "node-key.json", data / "node-key.pass")
    config = write_config(
        tmp_path / "node.toml",
        {
            "node": {"id": "c1", "data_dir": str(data)},
            "chain": {
                "rpc_url": "http://127.0.0.1:9",
                "ledger_address": "0x" + "22" * 20,
                "period_s": 60,
            },
        },
    )
    sealer = sealer_for(store, node_account(data))
    assert sealer.node == address
    await sealer.seal_due(*CHAIN)
    await store.flush()

    def run(*args: str) -> tuple[int, str]:
        code = cli.main(["conformity", "-c", str(config), *args])
        out, err = capsys.readouterr()
        return code, out + err

    code, text = await asyncio.to_thread(run, "--period", "seq:2")
    assert code == 0, text
    assert "verdict         PASS" in text and "signed          yes" in text
    code, text = await asyncio.to_thread(run, "--period", str(T0 + 5_000))
    assert code == 1  # the first period saw the clock step
    assert "verdict         FAIL" in text and "clock_steps: 1 finding(s)" in text
    code, out = await asyncio.to_thread(run, "--json")
    shown = json.loads(out)
    assert shown["seq"] == 2 and shown["signed"] and shown["report_matches_digest"]
    assert shown["digest"] == "0x" + digest(shown["report"]).hex()

    # a report changed in the database is no longer the one the root holds
    stored = await sealer.outbox.report(sealer.node, 1)
    assert stored is not None
    forged = stored.report() | {"passed": True, "reasons": []}
    async with store.transaction() as db:
        await db.execute(
            "UPDATE conformity_reports SET body = ? WHERE seq = 1", (canonical(forged).decode(),)
        )
    code, out = await asyncio.to_thread(run, "--period", "seq:1", "--json")
    shown = json.loads(out)
    assert code == 1 and not shown["report_matches_digest"] and not shown["signed"]
    async with store.transaction() as db:  # and a digest changed to match it breaks the root
        await db.execute(
            "UPDATE conformity_reports SET digest = ? WHERE seq = 1", (digest(forged),)
        )
    code, out = await asyncio.to_thread(run, "--period", "seq:1", "--json")
    shown = json.loads(out)
    assert code == 1 and shown["report_matches_digest"] and not shown["signed"]
    assert "no longer matches commitment 1" in shown["signed_check"]
    code, text = await asyncio.to_thread(run, "--period", "seq:9")
    assert code == 1 and "no sealed period seq 9" in text


def node_account(data: Path) -> Any:
    from daisee_node.ledger.keys import load_account

    return load_account(data / "node-key.json", data / "node-key.pass")


async def test_a_check_that_breaks_does_not_stop_sealing(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    from daisee_node import conformity

    def broken(*args: object, **kwargs: object) -> None:
        raise ZeroDivisionError("a bug in a check")

    monkeypatch.setattr(conformity.PeriodCheck, "_measured", broken)
    sealer = sealer_for(store)
    sealed = await sealer.seal_due(*CHAIN)
    assert [c.seq for c, _ in sealed] == [1, 2]  # every period sealed, in order
    stored = await sealer.outbox.report(sealer.node, 1)
    assert stored is not None and not stored.passed
    report = stored.report()
    assert report["error"] == "ZeroDivisionError" and report["readings"] == sealed[0][0].count
    assert digest(report) == stored.digest
    node = bytes.fromhex(sealer.node[2:])
    rows = period_rows(store.path, T0, T0 + PERIOD_MS)
    leaves = period_leaves(node, rows, extra=leaf_entry(T0 + PERIOD_MS, stored.digest))
    assert merkle.root(leaves) == sealed[0][0].root
