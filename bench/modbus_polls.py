"""Modbus polls per second against an emulated SDM630 on loopback, block reads vs one per value.

    .venv/bin/python bench/modbus_polls.py [--seconds 5]

The meter (a pymodbus server from tests/support) runs in its own process. A poll reads the whole
SDM630 map (14 values). Ours plans contiguous blocks (4 requests a poll); the reference reads
one value per request, as simple loggers do (14 requests a poll), in the same run. One JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SERVER = """
import asyncio, sys
sys.path.insert(0, {root!r})
from tests.support.meters import SDM630_INPUT, EmulatedMeter, MeterServer, sdm630_values
async def main():
    server = MeterServer([EmulatedMeter(1, SDM630_INPUT, sdm630_values())], port={port})
    await server.start()
    print("ready", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def polls_per_second(port: int, seconds: float, one_per_value: bool) -> float:
    from daisee_node.clock import Clock
    from daisee_node.sensors.base import SensorContext
    from daisee_node.sensors.modbus_meter import Block, ModbusConfig, ModbusMeter

    config = ModbusConfig(name="grid", kind="modbus", model="sdm630", port=port)
    with tempfile.TemporaryDirectory() as tmp:
        meter = ModbusMeter(config, SensorContext(Clock(), Path(tmp)))
        if one_per_value:
            meter.blocks = [
                Block(b.function, s.address, s.width, (s,)) for b in meter.blocks for s in b.specs
            ]
        await meter.setup()
        await meter.read()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            readings = await meter.read()
            assert len(readings) == 14 and all(r.good for r in readings)
            n += 1
        elapsed = time.perf_counter() - t0
        await meter.close()
    return n / elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seconds", type=float, default=5.0)
    args = p.parse_args()
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER.format(root=str(ROOT), port=port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        import logging

        logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
        ours = asyncio.run(polls_per_second(port, args.seconds, one_per_value=False))
        naive = asyncio.run(polls_per_second(port, args.seconds, one_per_value=True))
    finally:
        server.terminate()
        server.wait(timeout=10)
    print(
        json.dumps(
            {
                "bench": "modbus_polls",
                "meter": "sdm630 (14 values) emulated by a pymodbus server on loopback",
                "polls_per_s": round(ours, 1),
                "requests_per_poll": 4,
                "reference": {
                    "name": "one request per value",
                    "requests_per_poll": 14,
                    "polls_per_s": round(naive, 1),
                },
                "speedup_vs_reference": round(ours / naive, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
