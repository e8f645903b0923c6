"""Every stop ends within its deadline, whatever the chain or the node's own tasks are doing.

(A broker going away and hostile sources at stop are tried in the MQTT and sensor tests.)
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daisee_node.actuators.mockpins import pin_level
from tests.conftest import ROOT, wait_for, write_config
from tests.support.meters import SilentServer

STOP_DEADLINE_S = 5.0


@pytest.fixture
def silent_server() -> Iterator[SilentServer]:
    server = SilentServer()
    yield server
    server.close()


@pytest.mark.slow
def test_stop_is_bounded_while_the_chain_node_hangs(
    tmp_path: Path, daemon, silent_server: SilentServer
) -> None:
    from daisee_node.ledger.keys import new_keystore

    rng = random.Random(7)
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    new_keystore(data / "node-key.json", data / "node-key.pass")
    config = write_config(
        tmp_path / "node.toml",
        {
            "node": {"id": "hung-chain", "data_dir": str(data)},
            "sensors": [{"name": "load", "kind": "simulated", "model": "load", "interval_s": 0.1}],
            "chain": {
                "rpc_url": f"http://127.0.0.1:{silent_server.port}",
                "ledger_address": "0x" + "11" * 20,
                "chain_id": 1337,
                "period_s": 10,
                "rpc_timeout_s": 60,
            },
        },
    )
    for attempt in range(4):
        d = daemon(config)
        # The log file is shared by the attempts: wait for this process's own start.
        wait_for(lambda d=d, n=attempt: d.output().count("node started") > n, timeout=30)
        time.sleep(rng.uniform(0.0, 1.5))  # a random moment of the chain call's hang
        stopped_at = time.monotonic()
        d.signal(signal.SIGTERM)
        code, out = d.wait(timeout=STOP_DEADLINE_S + 5)
        took = time.monotonic() - stopped_at
        assert took <= STOP_DEADLINE_S, f"attempt {attempt}: the stop took {took:.1f} s"
        assert code == 0, out[-2000:]


STUBBORN_NODE = """
import asyncio, sys
from pathlib import Path
from daisee_node.config import load_config
from daisee_node.daemon import Node

async def stubborn() -> None:
    # A task that swallows its cancellation: a bug the node must survive at stop.
    while True:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            pass

async def main() -> int:
    node = Node(load_config(Path(sys.argv[1])), config_path=Path(sys.argv[1]))
    async def add() -> None:
        await node.started.wait()
        node.supervisor.spawn("stubborn", stubborn, supervise=False)
        print("STUBBORN STARTED", flush=True)
    asyncio.get_running_loop().create_task(add())
    return await node.run()

sys.exit(asyncio.run(main()))
"""


@pytest.mark.slow
def test_a_task_that_ignores_its_cancellation_cannot_hold_the_stop(tmp_path: Path) -> None:
    pins = tmp_path / "data" / "mock-gpio"
    config = write_config(
        tmp_path / "node.toml",
        {
            "node": {"id": "stubborn", "data_dir": str(tmp_path / "data")},
            "sensors": [{"name": "load", "kind": "simulated", "model": "load", "interval_s": 0.1}],
            "gpio": {"backend": "mock"},
            "relays": [{"name": "heater", "pin": 22, "safe_state": "off"}],
            "rules": [
                {
                    "name": "heat",
                    "when": "load.power_w > 1",
                    "then": {"relay": "heater", "state": "on"},
                }
            ],
        },
    )
    script = tmp_path / "stubborn.py"
    script.write_text(textwrap.dedent(STUBBORN_NODE))
    log = tmp_path / "stubborn.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, str(script), str(config)], stdout=out, stderr=out, cwd=ROOT
        )
    try:
        wait_for(lambda: "STUBBORN STARTED" in log.read_text(), timeout=30)
        wait_for(lambda: pin_level(pins, 22) is True, timeout=30)
        stopped_at = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
        took = time.monotonic() - stopped_at
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert took < 10, f"the stop took {took:.1f} s"
    assert proc.returncode != 0, "an overrun stop must not look like a clean one"
    assert "stop overran its deadline" in text and "stubborn" in text
    # The relay reached its safe state before the overrun ended the process.
    assert pin_level(pins, 22) is False
