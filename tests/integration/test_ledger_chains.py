"""Daemons committing to real chain nodes: anvil (shared by three nodes, stopped and restarted,
reorganised) and a one-signer Clique chain from @ethereumjs/client (PoA headers)."""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account

from daisee_node.ledger import chain as chainlib
from daisee_node.ledger.keys import keystore_address, new_keystore
from tests.conftest import db_rows, run_cli, sim_sensors, wait_for, write_config
from tests.support.chains import AnvilLedger, Clique

pytestmark = pytest.mark.slow


AnvilChain = AnvilLedger


@pytest.fixture
def anvil_chain(tmp_path: Path) -> Iterator[Callable[..., AnvilChain]]:
    """Start anvil (block time in s, 0: a block per transaction); stopped after the test."""
    started: list[AnvilChain] = []

    def start(block_time_s: int = 1) -> AnvilChain:
        started.append(AnvilChain(tmp_path, block_time_s))
        return started[-1]

    yield start
    for chain in started:
        chain.anvil.stop()


def node_config(
    tmp_path: Path,
    node_id: str,
    rpc_url: str,
    ledger: str,
    *,
    broker: Any = None,
    speed: float = 60,
    sample_s: float = 1.0,
    **chain: Any,
) -> Path:
    data = tmp_path / node_id
    sections: dict[str, Any] = {
        "node": {"id": node_id, "data_dir": str(data), "time_speed": speed},
        "store": {"flush_interval_s": 0.05},
        "sensors": sim_sensors(sample_s),
        "chain": {
            "rpc_url": rpc_url,
            "ledger_address": ledger,
            "period_s": 60,  # a second of real time at x60
            "seal_delay_s": 5,
            "submit_interval_s": 0.5,
            "confirmations": 2,
            "retry_max_s": 1,
            "export_channel": "grid.export_wh",
            **chain,
        },
    }
    if broker is not None:
        sections["mqtt"] = {
            "host": broker.host,
            "port": broker.port,
            "username": "node",
            "password_file": str(broker.password_file("node")),
            "discovery": False,
        }
    new_keystore(data / "node-key.json", data / "node-key.pass")
    return write_config(tmp_path / f"{node_id}.toml", sections)


def retained(broker: Any, topic: str) -> str | None:
    """The retained message on `topic`, read as a read-only client would."""
    result = subprocess.run(
        [
            "mosquitto_sub",
            "-h",
            broker.host,
            "-p",
            str(broker.port),
            "-u",
            "viewer",
            "-P",
            broker.password_file("viewer").read_text().strip(),
            "-t",
            topic,
            "-C",
            "1",
            "-W",
            "2",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    return result.stdout.strip() or None


def address_of(config: Path) -> str:
    return keystore_address(config.parent / config.stem / "node-key.json")


def committed_logs(ledger: chainlib.Ledger, node: str) -> list[tuple[int, str]]:
    logs = ledger.contract.events.Committed().get_logs(
        argument_filters={"node": node}, from_block=0
    )
    return [(ev["args"]["seq"], ev["transactionHash"].hex()) for ev in logs]


def outbox(config: Path, sql: str) -> list[tuple[Any, ...]]:
    return db_rows(config.parent / config.stem / "node.db", sql)


def sealed_seq(config: Path) -> int:
    rows = outbox(config, "SELECT max(seq) FROM commitments WHERE own = 1")
    return rows[0][0] or 0 if rows else 0


def test_three_nodes_share_anvil_relay_each_other_and_ride_out_a_chain_restart(
    tmp_path, daemon, broker, anvil_chain
):
    chain = anvil_chain()
    anvil, ledger = chain.anvil, chain.ledger
    configs = {
        "a": node_config(tmp_path, "a", anvil.url, ledger.address, broker=broker, relay_peers=True),
        "b": node_config(tmp_path, "b", anvil.url, ledger.address, broker=broker, relay_peers=True),
        # c has no gas money: it signs and publishes, a and b submit for it
        "c": node_config(tmp_path, "c", anvil.url, ledger.address, broker=broker, submit=False),
    }
    addresses = {name: address_of(cfg) for name, cfg in configs.items()}
    for name, address in addresses.items():
        chain.enrol(address, funded=name != "c")
    procs = {name: daemon(cfg) for name, cfg in configs.items()}

    def on_chain(name: str) -> int:
        return chain.ledger.head(addresses[name]).seq

    wait_for(lambda: all(on_chain(n) >= 3 for n in configs), timeout=90)
    # the ledger's state is on MQTT for the house to see (retained)
    state = wait_for(
        lambda: json.loads(retained(broker, "daisee/a/ledger") or "{}").get("confirmed_seq"),
        timeout=30,
    )
    assert state >= 1

    # The chain goes away for a while: periods keep being sealed, nothing is lost.
    anvil.stop()
    before = {n: sealed_seq(cfg) for n, cfg in configs.items()}
    wait_for(
        lambda: all(sealed_seq(cfg) >= before[n] + 3 for n, cfg in configs.items()), timeout=60
    )
    # and node a restarts meanwhile (a restart never commits a period twice)
    procs["a"].signal(signal.SIGTERM)
    assert procs["a"].wait(15)[0] == 0
    procs["a"] = daemon(configs["a"])
    chain.restart()  # same port, state loaded from its dump
    w3, ledger = chain.w3, chain.ledger
    target = {n: sealed_seq(cfg) for n, cfg in configs.items()}
    wait_for(lambda: all(on_chain(n) >= target[n] for n in configs), timeout=120)
    for p in procs.values():
        p.signal(signal.SIGTERM)
    for p in procs.values():
        assert p.wait(15)[0] == 0
    # a batch sent just before the stop may be mined a block later: read once nothing is pending
    wait_for(
        lambda: all(
            w3.eth.get_transaction_count(addresses[n], "pending")
            == w3.eth.get_transaction_count(addresses[n])
            for n in ("a", "b")
        ),
        timeout=30,
    )

    for name, address in addresses.items():
        logs = committed_logs(ledger, address)
        seqs = [seq for seq, _ in logs]
        # every period, in order, exactly once
        assert seqs == list(range(1, len(seqs) + 1)), (name, seqs)
        assert len(seqs) >= target[name]
        refused = ledger.contract.events.Rejected().get_logs(
            argument_filters={"node": address}, from_block=0
        )
        assert [ev["args"]["reason"] for ev in refused if ev["args"]["reason"] != 3] == []
    # c's commitments went on chain in a's and b's transactions
    senders = set()
    for _, tx in committed_logs(ledger, addresses["c"]):
        senders.add(w3.eth.get_transaction("0x" + tx.removeprefix("0x"))["from"])
    assert senders and senders <= {addresses["a"], addresses["b"]}
    assert w3.eth.get_balance(addresses["c"]) == 0
    # the energy credits match the committed export totals (head and balance of one block)
    block = w3.eth.block_number
    for name, address in addresses.items():
        seq = ledger.head(address, block).seq
        rows = outbox(configs[name], f"SELECT body FROM commitments WHERE own = 1 AND seq <= {seq}")
        exported = sum(json.loads(b)["export_wh"] for (b,) in rows)
        balance = ledger.credit().functions.balanceOf(address).call(block_identifier=block)
        assert balance == exported * 10**15


def test_a_reorg_that_drops_a_commitment_gets_it_resubmitted(tmp_path, daemon, anvil_chain):
    chain = anvil_chain()
    anvil, w3, ledger = chain.anvil, chain.w3, chain.ledger
    cfg = node_config(
        tmp_path, "r", anvil.url, ledger.address, confirmations=6, period_s=600
    )  # a period every 10 s: one commitment at a time
    node = address_of(cfg)
    chain.enrol(node)
    proc = daemon(cfg)

    included = wait_for(
        lambda: outbox(
            cfg, "SELECT seq, block_number, block_hash FROM commitments WHERE state = 'included'"
        ),
        timeout=60,
    )
    seq, block, old_hash = included[0]
    for _ in range(3):
        # A block mined between reading the head and the reorg leaves the commitment in place:
        # then the reorg is made again, deeper (its replacement blocks carry no transactions).
        depth = w3.eth.block_number - block + 1
        anvil.call("anvil_reorg", [depth, []])
        if ledger.head(node).seq < seq:
            break
    assert ledger.head(node).seq < seq

    wait_for(
        lambda: outbox(cfg, f"SELECT 1 FROM commitments WHERE seq = {seq} AND state = 'confirmed'"),
        timeout=60,
    )
    (new_hash,) = outbox(cfg, f"SELECT block_hash FROM commitments WHERE seq = {seq}")[0]
    assert new_hash != old_hash
    assert ledger.head(node).seq >= seq
    reorged = outbox(cfg, "SELECT value FROM counters WHERE name = 'ledger.reorged'")
    assert reorged and reorged[0][0] >= 1
    assert [s for s, _ in committed_logs(ledger, node)].count(seq) == 1
    proc.signal(signal.SIGTERM)
    assert proc.wait(15)[0] == 0


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = run_cli(*args, timeout=180)
    if check and result.returncode != 0:
        raise AssertionError(f"daisee-node {' '.join(args)}: {result.stdout} {result.stderr}")
    return result


def test_clique_poa_chain_from_chain_spec_with_cli_deploy_prove_and_verify(tmp_path, daemon):
    signer = Account.create()
    gov_keystore = tmp_path / "gov.json"
    gov = keystore_address(
        Path(
            json.loads(
                cli(
                    "keys",
                    "new",
                    "--keystore",
                    str(gov_keystore),
                    "--password-file",
                    str(tmp_path / "gov.pass"),
                ).stdout
            )["keystore"]
        )
    )
    spec_dir = tmp_path / "spec"
    cli(
        "chain-spec",
        "--engine",
        "clique",
        "--validators",
        signer.address,
        "--block-period",
        "1",
        "--chain-id",
        "4242",
        "--fund",
        f"{gov}=1000",
        "--out",
        str(spec_dir),
    )
    genesis = spec_dir / "clique-genesis.json"
    clique = Clique(tmp_path, genesis, bytes(signer.key))
    clique.start()
    try:
        deployed = json.loads(
            cli(
                "deploy",
                "--rpc",
                clique.url,
                "--keystore",
                str(gov_keystore),
                "--password-file",
                str(tmp_path / "gov.pass"),
            ).stdout
        )
        assert deployed["chain_id"] == 4242
        cfg = node_config(tmp_path, "q", clique.url, deployed["ledger"], chain_id=4242)
        node = json.loads(cli("keys", "show", "-c", str(cfg)).stdout)["address"]
        registered = json.loads(
            cli(
                "register-node",
                node,
                "--rpc",
                clique.url,
                "--ledger",
                deployed["ledger"],
                "--keystore",
                str(gov_keystore),
                "--password-file",
                str(tmp_path / "gov.pass"),
                "--fund-eth",
                "1",
            ).stdout
        )
        assert registered["registered"] is True
        proc = daemon(cfg)
        wait_for(
            lambda: outbox(cfg, "SELECT 1 FROM commitments WHERE seq >= 2 AND state = 'confirmed'"),
            timeout=120,
        )
        proc.signal(signal.SIGTERM)
        assert proc.wait(15)[0] == 0

        (t0, t1) = outbox(cfg, "SELECT t0, t1 FROM commitments WHERE seq = 1")[0]
        at = str(t1 - 1)  # the last reading of period 1
        proof_text = cli("prove", "-c", str(cfg), "--channel", "battery.soc_pct", "--at", at).stdout
        proof = json.loads(proof_text)
        assert t0 <= proof["t_ms"] <= int(at) and proof["commitment"]["seq"] == 1
        good = tmp_path / "proof.json"
        good.write_text(proof_text)
        ok = cli("verify", str(good), "--rpc", clique.url)
        assert json.loads(ok.stdout)["valid"] is True

        # a tampered reading fails, with the value made consistent so only the chain can tell
        tampered = dict(
            proof, value=proof["value"] + 1.0, value_micro=proof["value_micro"] + 1_000_000
        )
        bad = tmp_path / "tampered.json"
        bad.write_text(json.dumps(tampered))
        refused = cli("verify", str(bad), "--rpc", clique.url, check=False)
        assert refused.returncode == 1
        assert json.loads(refused.stdout)["valid"] is False
        # and the block headers really are Clique-sealed (extraData carries the signature)
        w3 = chainlib.connect(clique.url)
        block = w3.eth.get_block("latest")
        assert len(block["proofOfAuthorityData"]) == 32 + 65
        receipt_events = ledger_events(w3, deployed["ledger"])
        assert receipt_events >= 2
    finally:
        clique.stop()


def ledger_events(w3: Any, address: str) -> int:
    ledger = chainlib.Ledger(w3, address)
    logs = ledger.contract.events.Committed().get_logs(from_block=0)
    return len(logs)


def test_a_stuck_batch_is_replaced_with_a_higher_fee(tmp_path, daemon, anvil_chain):
    chain = anvil_chain(block_time_s=0)
    anvil, ledger = chain.anvil, chain.ledger
    cfg = node_config(
        tmp_path,
        "s",
        anvil.url,
        ledger.address,
        stuck_after_s=2,
        confirmations=1,
        period_s=600,
    )
    node = address_of(cfg)
    chain.enrol(node)
    anvil.call("evm_setAutomine", [False])  # nothing gets mined: the batch is stuck
    proc = daemon(cfg)

    txs = "SELECT nonce, fee, state FROM ledger_txs ORDER BY id"
    replaced = wait_for(lambda: len(outbox(cfg, txs)) >= 2 and outbox(cfg, txs), timeout=60)
    (n1, fee1, _), (n2, fee2, _) = replaced[:2]
    assert n1 == n2 and fee2 >= fee1 * 1.25
    pending = anvil.call("txpool_content")["pending"]
    [(_, by_nonce)] = [(k, v) for k, v in pending.items() if k.lower() == node.lower()]
    assert len(by_nonce) == 1  # the replacement took the old one's place

    anvil.call("evm_setIntervalMining", [1])
    wait_for(lambda: outbox(cfg, "SELECT 1 FROM commitments WHERE state = 'confirmed'"), timeout=60)
    states = [row[2] for row in outbox(cfg, txs)]
    assert states.count("mined") >= 1 and "replaced" in states
    fees = outbox(cfg, "SELECT value FROM counters WHERE name = 'ledger.fee_bumps'")
    assert fees and fees[0][0] >= 1
    assert [s for s, _ in committed_logs(ledger, node)][:1] == [1]
    proc.signal(signal.SIGTERM)
    assert proc.wait(15)[0] == 0


def test_hours_without_the_chain_every_period_is_sealed_then_committed_in_order(
    tmp_path, daemon, anvil_chain
):
    chain = anvil_chain()
    anvil, ledger = chain.anvil, chain.ledger
    # an hour of node time per real second, 15-minute periods; chain_id lets it seal offline
    cfg = node_config(
        tmp_path,
        "h",
        anvil.url,
        ledger.address,
        speed=3600,
        sample_s=30,
        period_s=900,
        seal_delay_s=10,
        chain_id=chain.w3.eth.chain_id,
    )
    node = address_of(cfg)
    chain.enrol(node)
    anvil.stop()  # the chain is gone before the node ever reached it

    proc = daemon(cfg)
    wait_for(lambda: sealed_seq(cfg) >= 16, timeout=60)  # four hours of periods
    assert outbox(cfg, "SELECT count(*) FROM commitments WHERE state != 'pending'") == [(0,)]
    errors = outbox(cfg, "SELECT value FROM counters WHERE name = 'ledger.submit_errors'")
    assert errors and errors[0][0] >= 1  # it kept trying

    chain.restart()
    ledger = chain.ledger
    target = sealed_seq(cfg)
    wait_for(lambda: ledger.head(node).seq >= target, timeout=90)
    proc.signal(signal.SIGTERM)
    assert proc.wait(15)[0] == 0
    seqs = [seq for seq, _ in committed_logs(ledger, node)]
    assert seqs[:target] == list(range(1, target + 1))
    assert len(seqs) == len(set(seqs))
    # each commitment covers exactly one aligned 15-minute period, in order; a period is skipped
    # only when it holds no reading (at 3,600× a period is 0.25 s: a loaded machine can
    # deschedule the sampler for that long)
    bodies = [
        json.loads(b)
        for (b,) in outbox(
            cfg, f"SELECT body FROM commitments WHERE own = 1 AND seq <= {target} ORDER BY seq"
        )
    ]
    for before, after in itertools.pairwise(bodies):
        assert after["t1"] - after["t0"] == 900_000 and after["t0"] % 900_000 == 0
        assert after["t0"] >= before["t1"]
        if after["t0"] > before["t1"]:
            gap = "SELECT count(*) FROM readings WHERE t_ms >= {} AND t_ms < {}"
            held = outbox(cfg, gap.format(before["t1"], after["t0"]))
            assert held == [(0,)], "a period with readings was never sealed"
