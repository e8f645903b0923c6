"""`daisee-node community-demo`, as `./run community` starts it: four homes with their own
daemons on three geth signers and a follower, trading; Ctrl-C stops everything and prints the
community's statement from the chain; nothing is left running."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.conftest import ROOT, wait_for
from tests.support.geth import geth_binary

pytestmark = [pytest.mark.slow, pytest.mark.beside]  # a community of daemons and chain nodes

HOMES = ("roof", "ana", "ben", "building")


def children_of(pid: int) -> set[int]:
    """Every process descended from `pid` (read from /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier} - found
        found |= frontier
    return found


def test_the_community_trades_and_stops_on_ctrl_c_with_its_statement(tmp_path: Path) -> None:
    env = dict(os.environ, DAISEE_GETH=str(geth_binary()), PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "daisee_node", "community-demo", "--period", "10"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")))  # type: ignore[union-attr]
    reader.start()
    try:
        # a line per home and period, once on chain; the roof's order to a neighbour shows
        def periods_of(home: str) -> int:
            return sum(1 for line in lines if re.search(rf"\s{home}\s+import .* on chain", line))

        wait_for(lambda: all(periods_of(h) >= 3 for h in HOMES), timeout=240, every=1.0)
        # (a line shows a home's newest order: the roof's may be to ana or to ben)
        sold = re.compile(r"\sroof\s.*order \d+: sells \d+ Wh to (ana|ben)")
        wait_for(lambda: any(sold.search(line) for line in lines), timeout=120)
        descendants = children_of(proc.pid)
        assert len(descendants) >= 1 + 4 + 4  # broker, four chain nodes, four daemons
        proc.send_signal(signal.SIGINT)
        assert proc.wait(180) == 0, "".join(lines[-30:])
    finally:
        if proc.poll() is None:
            proc.kill()
        reader.join(10)
    text = "".join(lines)
    assert "geth 1.13.15 (Clique): 3 signers and 1 follower" in text
    # the statement, from the chain alone: a bill per home, its digest, and the command again
    assert "statement, from the chain alone" in text
    for home in HOMES:
        assert re.search(rf"\d{{4}}-\d{{2}} {home}: total -?\d+\.\d+ EUR", text), text[-3000:]
    assert re.search(r"digest 0x[0-9a-f]{64}", text)
    # each home's signed conformity report of each billed period was proven against the chain,
    # and every period's allocation passed the community checks
    proven = re.search(r"conformity: (\d+) reports proven against the chain", text)
    assert proven and int(proven.group(1)) >= len(HOMES), text[-3000:]
    assert re.search(r"community checks: \d+ periods, all passed", text)
    assert "daisee-node community bill --rpc" in text
    statements = tmp_path / "daisee-community" / "statements"
    assert len(list(statements.glob("*.html"))) == len(HOMES)
    # nothing the community started is left running
    wait_for(lambda: not [p for p in descendants if Path(f"/proc/{p}").exists()], timeout=10)
