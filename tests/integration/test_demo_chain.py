"""The demo keeps its chain: its readings are proven and verified after it stops, and a second
run goes on committing to the same chain."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli


def _demo(data: Path, seconds: float, *extra: str, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        [
            *(sys.executable, "-m", "daisee_node", "demo", "--data-dir", str(data)),
            *("--duration", str(seconds), "--speed", "600", *extra),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def _confirmed(data: Path) -> int:
    status = run_cli("status", "--data-dir", str(data), "--json")
    assert status.returncode == 0, status.stderr
    return int(json.loads(status.stdout)["ledger"]["confirmed_seq"] or 0)


def _verify(proof: Path, data: Path) -> tuple[int, dict[str, object]]:
    result = run_cli("verify", str(proof), "--data-dir", str(data))
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, json.loads(result.stdout)


@pytest.mark.slow
def test_the_demo_readings_are_proven_after_it_stops_and_its_chain_lives_on(
    tmp_path: Path,
) -> None:
    data = tmp_path / "demo"
    bare = {k: v for k, v in os.environ.items() if k != "DAISEE_NODE_COMMAND"}
    out = _demo(data, 4, "--start", "2026-06-21T10:00:00Z", env=bare)
    # Without ./run the hints name the bare command, with the folder it used.
    assert f"See them with: daisee-node status --data-dir {data}\n" in out
    first = _confirmed(data)
    assert first >= 1
    assert (data / "chain" / "transactions.hex").stat().st_size > 0

    p1 = tmp_path / "p1.json"
    prove = run_cli("prove", "--data-dir", str(data), "--channel", "pv.energy_wh", "-o", str(p1))
    assert prove.returncode == 0, prove.stderr
    proof = json.loads(p1.read_text())
    assert proof["channel"] == "pv.energy_wh" and proof["commitment"]["seq"] == first
    code, result = _verify(p1, data)
    assert (code, result["valid"], result["problems"]) == (0, True, [])

    # A proof whose value was changed is refused by the same chain.
    forged = tmp_path / "forged.json"
    forged.write_text(json.dumps({**proof, "value_micro": proof["value_micro"] + 1}))
    code, result = _verify(forged, data)
    assert code == 1 and result["valid"] is False

    # A channel that does not exist: which ones do, in words; times as people write them.
    wrong = run_cli("prove", "--data-dir", str(data), "--channel", "pv.energy")
    assert wrong.returncode == 1
    assert "did you mean 'pv.energy_wh'?" in wrong.stderr and "grid.import_wh" in wrong.stderr
    early = run_cli(
        "prove", "--data-dir", str(data), "--channel", "pv.energy_wh", "--at", "2026-06-21T09:00Z"
    )
    assert early.returncode == 1 and "2026-06-21 09:00:00 UTC" in early.stderr
    for text in (wrong.stderr, early.stderr):
        assert not re.search(r"\d{13}", text) and "Traceback" not in text

    # A second run (through ./run, which names itself in the hints) commits to the same chain:
    # on past the first run's periods, and the first proof still holds.
    # 5 s at 600x: three periods, so one is sealed and confirmed even when a loaded machine
    # spends the first seconds starting the process.
    env = {**os.environ, "DAISEE_NODE_COMMAND": "./run daisee-node"}
    out = _demo(data, 5, env=env)
    assert f"./run daisee-node status --data-dir {data}" in out
    assert f"./run daisee-node prove --data-dir {data} --channel" in out
    assert _confirmed(data) > first
    code, result = _verify(p1, data)
    assert (code, result["valid"]) == (0, True)
    p2 = tmp_path / "p2.json"
    prove = run_cli("prove", "--data-dir", str(data), "--channel", "grid.import_wh", "-o", str(p2))
    assert prove.returncode == 0, prove.stderr
    assert json.loads(p2.read_text())["commitment"]["seq"] > first
    assert _verify(p2, data)[0] == 0
