"""Data access end to end on anvil: a real daemon commits its periods (with conformity reports);
its node key grants a recipient on the community registry; `export` writes the signed file and
`verify-export` accepts it against the chain. An altered value, a dropped reading and another
key's signature each fail with their problem named; a revoked grant and an ended one are refused
by `export` and flagged by `verify-export`.

The daemon is stopped before the node key sends its grants: a grant is the member's own
transaction, and this keeps it apart from the daemon's batches.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account

from daisee_node import export
from daisee_node.community.registry import Registry, deploy
from daisee_node.config import load_config
from daisee_node.errors import DaiseeError
from daisee_node.ledger import merkle
from daisee_node.ledger.keys import keystore_address, load_account, new_keystore
from tests.conftest import ROOT, db_rows, sim_sensors, wait_for, write_config
from tests.support.chains import AnvilLedger, rpc

pytestmark = [pytest.mark.slow, pytest.mark.beside]  # waits on a daemon and the chain

LAUNCH = """
import sys
from daisee_node import conformity, daemon
plain_init = daemon.Node.__init__
def init_with_reports(self, *args, **kwargs):
    plain_init(self, *args, **kwargs)
    conformity.attach(self)
daemon.Node.__init__ = init_with_reports
from daisee_node.cli import main
sys.exit(main(["run", "-c", sys.argv[1]]))
"""


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "daisee_node", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


def run_node_until_two_periods(
    tmp_path: Path, anvil: AnvilLedger
) -> tuple[Path, list[tuple[int, ...]]]:
    """Run a daemon until two of its periods are confirmed, then stop it; its config and those
    periods' (seq, t0, t1, count)."""
    data = tmp_path / "n1"
    new_keystore(data / "node-key.json", data / "node-key.pass")
    anvil.enrol(keystore_address(data / "node-key.json"))
    config = write_config(
        tmp_path / "n1.toml",
        {
            "node": {"id": "n1", "data_dir": str(data), "time_speed": 60},
            "store": {"flush_interval_s": 0.05},
            "sensors": sim_sensors(1.0),
            "chain": {
                "rpc_url": anvil.anvil.url,
                "ledger_address": anvil.ledger.address,
                "period_s": 60,  # a second of real time at x60
                "seal_delay_s": 5,
                "submit_interval_s": 0.5,
                "confirmations": 1,
                "retry_max_s": 1,
                "import_channel": "grid.import_wh",
                "export_channel": "grid.export_wh",
            },
        },
    )
    db = data / "node.db"
    with (tmp_path / "n1.log").open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", LAUNCH, str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    try:

        def two_confirmed() -> list[tuple[int, ...]] | None:
            assert proc.poll() is None, (tmp_path / "n1.log").read_text()[-3000:]
            rows = db_rows(
                db,
                "SELECT seq, t0, t1, count FROM commitments WHERE own = 1 AND "
                "state = 'confirmed' ORDER BY seq",
            )
            # two periods in a row that are both complete ones (the first may be short)
            return rows[-2:] if len(rows) >= 3 else None

        periods = wait_for(two_confirmed, timeout=90, every=0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return config, periods


def in_process(
    config: Path,
    key: Any,
    role: str,
    recipient: str,
    registry: str,
    t0: int,
    t1: int,
    channels: list[str] | None = None,
) -> dict[str, Any]:
    """What `export` writes, made in this process (the command's start-up is a few seconds)."""
    return asyncio.run(
        export.build_export(
            load_config(config),
            key,
            role=role,
            recipient=recipient,
            from_ms=t0,
            to_ms=t1,
            registry=registry,
            channels=channels,
        )
    )


def chain_now_ms(anvil: AnvilLedger) -> int:
    return int(anvil.w3.eth.get_block("latest")["timestamp"]) * 1000


@dataclass
class Node:
    """A node that committed two full periods on anvil (its daemon stopped), the registry."""

    anvil: AnvilLedger
    config: Path
    db: Path
    periods: list[tuple[int, ...]]
    registry: str
    key: Any

    def args(self, recipient: str) -> list[str]:
        """The options naming this node, its registry and a recipient, and the two periods."""
        (_, t0, _, _), (_, _, t1, _) = self.periods
        return [
            "-c", str(self.config), "--registry", self.registry, "--recipient", recipient,
            "--from", str(t0), "--to", str(t1),
        ]  # fmt: skip


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """One daemon run shared by the tests here (each grants its own recipient)."""
    tmp_path = tmp_path_factory.mktemp("export")
    anvil = AnvilLedger(tmp_path, block_time_s=1)
    try:
        config, periods = run_node_until_two_periods(tmp_path, anvil)
        data = config.parent / "n1"
        yield Node(
            anvil,
            config,
            data / "node.db",
            periods,
            deploy(anvil.w3, anvil.gov, anvil.ledger.address),
            load_account(data / "node-key.json", data / "node-key.pass"),
        )
    finally:
        anvil.anvil.stop()


def verify_problems(
    anvil: AnvilLedger, tampered: dict[str, Any], cli_file: Path | None = None
) -> list[str]:
    """The problems `verify-export` finds (in this process, or by the command with `cli_file`)."""
    if cli_file is None:
        result = export.verify_export(json.loads(json.dumps(tampered)), anvil.w3)
        assert not result["valid"]
        return list(result["problems"])
    cli_file.write_text(json.dumps(tampered))
    checked = cli("verify-export", str(cli_file), "--rpc", anvil.anvil.url)
    assert checked.returncode == 1, checked.stdout + checked.stderr
    lines = checked.stdout.splitlines()
    assert lines[-1] == "INVALID" and "problems:" in lines
    return [line.strip() for line in lines[lines.index("problems:") + 1 : -1]]


def test_a_granted_export_verifies_and_a_tampered_one_fails_with_its_problem_named(
    tmp_path: Path, node: Node
) -> None:
    anvil, config, key, registry = node.anvil, node.config, node.key, node.registry
    (first, t0, _, _), (last, _, t1, _) = node.periods
    recipient = Account.create().address
    args = node.args(recipient)

    # nothing granted yet: refused in one line
    out = tmp_path / "own.json"
    refused = cli("export", *args, "--role", "own", "-o", str(out))
    assert refused.returncode == 1 and not out.exists()
    assert refused.stderr.strip().count("\n") == 0
    assert "no grant in force" in refused.stderr and "never granted, or revoked" in refused.stderr

    until = chain_now_ms(anvil) + 3_600_000
    granted = cli("grant", *args[:6], "--role", "own", "--until", str(until))
    assert granted.returncode == 0, granted.stderr
    made = cli("export", *args, "--role", "own", "-o", str(out))
    assert made.returncode == 0, made.stderr
    data = json.loads(out.read_text())
    [(stored,)] = db_rows(
        node.db, "SELECT count(*) FROM readings WHERE t_ms >= ? AND t_ms < ?", (t0, t1)
    )
    assert json.loads(made.stdout)["readings"] == stored > 0
    assert [p["commitment"]["seq"] for p in data["periods"]] == [first, last]
    assert all(p["complete"] and p["report"] is not None for p in data["periods"])
    assert export.signer(data) == data["node"]

    verified = cli("verify-export", str(out), "--rpc", anvil.anvil.url, "--json")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    result = json.loads(verified.stdout)
    assert result["valid"] and result["readings"] == stored and result["periods"] == 2
    # one channel only, each of its readings checked by the ledger's verifyReading itself
    channel = data["periods"][0]["readings"][0]["channel"]
    narrow = in_process(config, key, "own", recipient, registry, t0, t1, [channel])
    readings = [r for p in narrow["periods"] for r in p["readings"]]
    assert readings and {r["channel"] for r in readings} == {channel}
    assert not any(p["complete"] for p in narrow["periods"])
    every = export.verify_export(narrow, anvil.w3, every_reading_on_chain=True)
    assert every["valid"] and every["readings_on_chain"] == len(readings), every["problems"]

    # a value changed (its micro-units with it)
    changed = json.loads(out.read_text())
    reading = changed["periods"][0]["readings"][0]
    reading["value"] = (reading["value"] or 0) + 1000
    reading["value_micro"] = merkle.value_micro(reading["value"])
    problems = verify_problems(anvil, changed)
    assert problems[0].startswith("signed by ")
    assert f"reading {reading['channel']} at {reading['t_ms']}: not a leaf" in problems[1]
    # a reading dropped, signed again by the node itself
    dropped = json.loads(out.read_text())
    dropped["periods"][1]["readings"].pop()
    count = dropped["periods"][1]["commitment"]["count"]
    assert verify_problems(anvil, export.sign(dropped, key)) == [
        f"period seq {last}: {count - 1} readings exported of the {count} the commitment counts"
    ]
    # signed by another key (checked by the command: its problems as it prints them)
    other = Account.create()
    assert verify_problems(anvil, export.sign(data, other), tmp_path / "other.json") == [
        f"signed by {other.address}, not by the node {data['node']}"
    ]


def test_a_revoked_or_ended_grant_is_refused_by_export_and_flagged_by_verify_export(
    tmp_path: Path, node: Node
) -> None:
    anvil, config, key, registry = node.anvil, node.config, node.key, node.registry
    (_, t0, _, _), (_, _, t1, _) = node.periods
    recipient = Account.create().address
    args = node.args(recipient)
    reg = Registry(anvil.w3, registry)

    # revoked: no new export, and the file made before no longer verifies
    reg.grant(key, recipient, "own", chain_now_ms(anvil) + 3_600_000)
    data = in_process(config, key, "own", recipient, registry, t0, t1)
    assert export.verify_export(data, anvil.w3)["valid"]
    with pytest.raises(DaiseeError, match=r"no channel 'grid\.powr_w' in the buffer; did you mean"):
        in_process(config, key, "own", recipient, registry, t0, t1, ["grid.powr_w"])
    revoked = cli("revoke", *args[:6], "--role", "own")
    assert revoked.returncode == 0, revoked.stderr
    again = cli("export", *args, "--role", "own", "-o", str(tmp_path / "again.json"))
    assert again.returncode == 1 and "no grant in force" in again.stderr
    (problem,) = verify_problems(anvil, data, tmp_path / "revoked.json")
    assert problem.startswith(f"the grant of 'own' by {data['node']} to {recipient} was revoked")

    # ended: a supplier grant of an hour, then the chain's clock moved two hours on
    reg.grant(key, recipient, "supplier", chain_now_ms(anvil) + 3_600_000)
    sdata = in_process(config, key, "supplier", recipient, registry, t0, t1)
    assert "readings" not in sdata["periods"][0] and sdata["totals"]["periods"] == 2
    assert sdata["totals"]["import_wh"] == sum(
        p["commitment"]["import_wh"] for p in data["periods"]
    )
    assert export.verify_export(sdata, anvil.w3)["valid"]
    rpc(anvil.anvil.url, "evm_increaseTime", [7200])
    rpc(anvil.anvil.url, "evm_mine")
    ended = cli("export", *args, "--role", "supplier", "-o", str(tmp_path / "s.json"))
    assert ended.returncode == 1 and "ended at" in ended.stderr, ended.stderr
    (problem,) = verify_problems(anvil, sdata)
    assert f"the grant of 'supplier' by {data['node']} to {recipient} ended at" in problem
