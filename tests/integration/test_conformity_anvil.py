"""A real daemon commits its periods to anvil with their conformity reports: the report
`conformity --prove` shows is the one whose digest the committed root holds, `verify` accepts its
proof, and a tampered report fails it.

The daemon is `daisee-node run` with its node made to seal reports (`conformity.attach`, which
the daemon calls once it makes reports by default).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daisee_node.conformity import REPORT_CHANNEL_ID, canonical, digest, digest_value
from daisee_node.ledger.commitment import Commitment
from daisee_node.ledger.keys import keystore_address, new_keystore
from tests.conftest import ROOT, db_rows, sim_sensors, wait_for, write_config

pytestmark = pytest.mark.slow

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


@pytest.fixture
def node(tmp_path: Path, anvil: Any) -> Iterator[tuple[Path, subprocess.Popen[bytes]]]:
    data = tmp_path / "n1"
    address = new_keystore(data / "node-key.json", data / "node-key.pass")
    anvil.enrol(address)
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
    with (tmp_path / "n1.log").open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", LAUNCH, str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    try:
        yield config, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "daisee_node", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


def test_the_committed_digest_is_the_shown_reports_and_a_tampered_report_fails(
    tmp_path: Path, anvil: Any, node: tuple[Path, subprocess.Popen[bytes]]
) -> None:
    config, proc = node
    db = config.parent / "n1" / "node.db"

    def confirmed_with_report() -> int | None:
        assert proc.poll() is None, (config.parent / "n1.log").read_text()[-3000:]
        rows = db_rows(
            db,
            "SELECT max(c.seq) FROM commitments c JOIN conformity_reports r "
            "ON r.node = c.node AND r.seq = c.seq WHERE c.own = 1 AND c.state = 'confirmed'",
        )
        return rows[0][0] if rows else None

    seq = wait_for(confirmed_with_report, timeout=90, every=0.2)
    proof_file = tmp_path / "report-proof.json"
    shown = cli(
        "conformity",
        "-c",
        str(config),
        "--period",
        f"seq:{seq}",
        "--prove",
        "--json",
        "-o",
        str(proof_file),
    )
    assert shown.returncode in (0, 1), shown.stderr
    result = json.loads(shown.stdout)
    report = result["report"]
    # the report shown is the one stored at sealing, and its digest is the committed leaf's value
    [(body, stored)] = db_rows(
        db, "SELECT body, digest FROM conformity_reports WHERE seq = ?", (seq,)
    )
    assert canonical(report).decode() == body and digest(report) == bytes(stored)
    assert result["signed"] and result["chain"]["valid"], result["chain"]
    assert shown.returncode == (0 if report["passed"] else 1)
    assert report["seq"] == seq and report["readings"] == result["proof"]["commitment"]["count"]
    # the ledger itself accepts that leaf against the commitment it recorded
    proof = json.loads(proof_file.read_text())
    commitment = Commitment.from_json(proof["commitment"])
    leaf = (REPORT_CHANNEL_ID, commitment.t1 - 1, digest_value(digest(report)), 0)
    siblings = [bytes.fromhex(p[2:]) for p in proof["proof"]]
    batch = [bytes.fromhex(p[2:]) for p in proof["batch_proof"]]
    assert anvil.ledger.verify_reading(commitment, batch, leaf, siblings)
    assert commitment.node == keystore_address(config.parent / "n1" / "node-key.json")

    verified = cli("verify", str(proof_file), "--rpc", anvil.anvil.url)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert json.loads(verified.stdout)["valid"]

    # a reading of that period still proves: its tree holds the report's leaf too
    reading_file = tmp_path / "reading-proof.json"
    [(at,)] = db_rows(
        db,
        "SELECT max(r.t_ms) FROM readings r JOIN channels c ON c.id = r.channel_id "
        "WHERE c.name = 'grid.power_w' AND r.t_ms >= ? AND r.t_ms < ?",
        (commitment.t0, commitment.t1),
    )
    proved = cli("prove", "-c", str(config), "--channel", "grid.power_w", "--at", str(at))
    assert proved.returncode == 0, proved.stderr
    reading_file.write_text(proved.stdout)
    assert json.loads(proved.stdout)["commitment"] == proof["commitment"]
    verified = cli("verify", str(reading_file), "--rpc", anvil.anvil.url)
    assert verified.returncode == 0, verified.stdout + verified.stderr

    # a report that says something else is not the signed one …
    tampered = {**proof, "report": {**report, "passed": not report["passed"]}}
    forged_file = tmp_path / "forged.json"
    forged_file.write_text(json.dumps(tampered))
    refused = cli("verify", str(forged_file), "--rpc", anvil.anvil.url)
    assert refused.returncode == 1
    assert "not the one whose digest the leaf holds" in refused.stdout
    # … and a leaf made to match it is not in the committed tree
    tampered["value_micro"] = digest_value(digest(tampered["report"]))
    forged_file.write_text(json.dumps(tampered))
    refused = cli("verify", str(forged_file), "--rpc", anvil.anvil.url)
    assert refused.returncode == 1
    assert json.loads(refused.stdout)["problems"] == [
        "the ledger does not accept this reading and proof"
    ]
    assert not anvil.ledger.verify_reading(
        commitment, batch, (leaf[0], leaf[1], tampered["value_micro"], 0), siblings
    )
