"""Sample → rule decision → pin change latency, with 8 channels sampled at 100 Hz each.

    .venv/bin/python bench/rule_latency.py [--seconds 8]

A node with simulated battery (4 channels), grid (3) and load (1) sensors, every 10 ms; a rule on
`load.power_w` whose threshold sits in the noise, so the relay (gpiozero mock pin) flips often.
Latency runs from the moment a reading is published to the moment the pin changes. In the same
run, the reference: the same rule evaluated on a 100 ms tick (Victron's control loop period)
instead of on every input. One JSON line. Target: p99 ≤ 10 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

from daisee_node import logs
from daisee_node.config import config_from_dict
from daisee_node.daemon import Node

TARGET_P99_MS = 10.0


def node_config(data_dir: Path) -> dict:
    sensors = [
        {"name": m, "kind": "simulated", "model": m, "interval_s": 0.01}
        for m in ("battery", "grid", "load")
    ]
    return {
        "node": {"id": "bench", "data_dir": str(data_dir)},
        "log": {"level": "error"},
        "simulation": {"seed": 7, "noise_pct": 5.0},
        "sensors": sensors,
        "gpio": {"backend": "mock"},
        "relays": [{"name": "heater", "pin": 12}],
        "rules": [
            {
                "name": "flip",
                "when": "load.power_w > threshold.load_w",
                "then": {"relay": "heater", "state": "on"},
                "otherwise": {"relay": "heater", "state": "off"},
            }
        ],
        "derived": {"threshold.load_w": "0 * load.power_w + THRESHOLD"},
    }


async def measure(seconds: float, event_driven: bool, threshold: float) -> list[float]:
    with tempfile.TemporaryDirectory() as tmp:
        raw = node_config(Path(tmp))
        raw["derived"]["threshold.load_w"] = f"0 * load.power_w + {threshold}"
        node = Node(config_from_dict(raw))
        latencies: list[float] = []
        # When the first sample arrived that makes the rule's outcome differ from the relay.
        stamp: dict[str, float | None] = {"t": None}
        relays = node.relays

        def published(readings) -> None:
            for r in readings:
                if r.channel == "load.power_w" and r.good:
                    assert relays is not None
                    differs = (r.value > threshold) != relays.relays["heater"].on
                    if differs and stamp["t"] is None:
                        stamp["t"] = time.perf_counter()
                    elif not differs:
                        stamp["t"] = None  # flipped back before anything acted

        node._sinks.insert(0, published)
        assert node.relays is not None and node.rules is not None
        drive = node.relays._drive

        def timed_drive(r, on, reason):
            drive(r, on, reason)
            if reason.startswith("rule") and stamp["t"] is not None:
                latencies.append((time.perf_counter() - stamp["t"]) * 1000)
                stamp["t"] = None

        node.relays._drive = timed_drive
        ticker = None
        if not event_driven:
            node._sinks.remove(node.rules.on_readings)

            async def tick() -> None:
                while True:
                    await asyncio.sleep(0.1)
                    node.rules.tick()

            ticker = asyncio.create_task(tick())
        task = asyncio.create_task(node.run())
        await node.started.wait()
        await asyncio.sleep(seconds)
        node.request_stop()
        await task
        if ticker:
            ticker.cancel()
        return latencies


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seconds", type=float, default=8.0)
    args = p.parse_args()
    logs.configure("error")
    from daisee_node.sensors.simulated import SimulatedSite, SimulationConfig

    # The threshold: the load's value at the start, so noise flips the rule both ways.
    site = SimulatedSite(SimulationConfig(seed=7), start=time.time())
    threshold = site.load_w(time.time())
    ours = asyncio.run(measure(args.seconds, True, threshold))
    ref = asyncio.run(measure(args.seconds, False, threshold))
    print(
        json.dumps(
            {
                "bench": "rule_latency",
                "channels": 8,
                "rate_hz_per_channel": 100,
                "switches": len(ours),
                "p50_ms": round(statistics.median(ours), 3),
                "p99_ms": round(pct(ours, 0.99), 3),
                "max_ms": round(max(ours), 3),
                "target_p99_ms": TARGET_P99_MS,
                "meets_target": pct(ours, 0.99) <= TARGET_P99_MS,
                "reference": {
                    "name": "same rule on a 100 ms tick (Victron's loop period)",
                    "switches": len(ref),
                    "p50_ms": round(statistics.median(ref), 3),
                    "p99_ms": round(pct(ref, 0.99), 3),
                },
            }
        )
    )


if __name__ == "__main__":
    main()
