"""Sample → pin latency of the node's rule path, 8 channels at 100 Hz, with a core loaded.

    .venv/bin/python bench/rule_latency.py [--switches 400]

A real `daisee_node.daemon.Node` runs in this process: simulated battery (4 channels), grid (3)
and load (1) sensors each read every 10 ms, the channel checks, the rules engine (evaluated on
every reading), the relay controller and its gpiozero mock pin. The rule compares
`load.power_w` with a threshold set in the load's noise, so the relay flips often.

A switch's latency runs from the start of the read of the load sample that first asked for the
new state (taken before `read` is called) to the change of the pin as gpiozero's `MockPin`
records it (`MockPin.states`). Everything is counted, nothing dropped: every reading published,
every load sample, every change of what the samples ask for ("edge"), every pin change; an edge
that the samples took back before the pin moved is counted as `superseded`, a pin change that no
edge explains as `unexplained`. The run lasts until `--switches` pin changes are counted.

Two runs in one process, the same node each time: under load (a busy-loop subprocess started
before and killed after, its CPU share reported) and the reference without it. The floor: a
bare write of the same kind of pin (gpiozero `OutputDevice` on the node's mock pin factory),
under load. One JSON line. Target: p99 ≤ 10 ms under load (DESIGN.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from daisee_node import logs
from daisee_node.actuators.mockpins import persistent_mock_factory
from daisee_node.config import config_from_dict
from daisee_node.daemon import Node
from daisee_node.readings import Reading
from daisee_node.sensors.simulated import SimulatedSensor, SimulatedSite, SimulationConfig

TARGET_P99_MS = 10.0
PERIOD_S = 0.01
SEED = 7
TIMEOUT_S = 120.0
BUSY_LOOP = "import sys\nprint('busy', flush=True)\nwhile True:\n    pass\n"


def node_config(data_dir: Path, threshold: float) -> dict[str, Any]:
    sensors = [
        {"name": m, "kind": "simulated", "model": m, "interval_s": PERIOD_S}
        for m in ("battery", "grid", "load")
    ]
    return {
        "node": {"id": "bench", "data_dir": str(data_dir)},
        "log": {"level": "error"},
        "simulation": {"seed": SEED, "noise_pct": 5.0},
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
        "derived": {"threshold.load_w": f"0 * load.power_w + {threshold!r}"},
    }


class Probe:
    """What the load samples asked for, and when their reads started."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self.active = False
        self.read_started = 0.0
        self.readings = 0
        self.channels: set[str] = set()
        #: (monotonic time the read started, whether the sample asks for the relay on)
        self.samples: list[tuple[float, bool]] = []

    def sink(self, readings: Sequence[Reading]) -> None:
        if not self.active:
            return
        for r in readings:
            self.readings += 1
            self.channels.add(r.channel)
            # A bad sample asks for nothing the bench can predict (the rule falls back): its
            # pin change, if any, shows up as `unexplained`.
            if r.channel == "load.power_w" and r.good:
                self.samples.append((self.read_started, r.value > self.threshold))


@contextlib.contextmanager
def timed_reads(probe: Probe) -> Iterator[None]:
    """Note the moment each load read starts, before the sensor is asked."""
    read = SimulatedSensor.read

    async def timed(self: SimulatedSensor) -> Sequence[Reading]:
        started = time.monotonic()
        out = await read(self)
        if self.name == "load":
            probe.read_started = started
        return out

    SimulatedSensor.read = timed  # type: ignore[method-assign]
    try:
        yield
    finally:
        SimulatedSensor.read = read  # type: ignore[method-assign]


def match(
    samples: list[tuple[float, bool]], pin: list[tuple[float, bool]], start: bool, base: float
) -> dict[str, Any]:
    """Pair every pin change (after `base`, when the pin was in state `start`) with the sample
    that first asked for it: the first of the run of samples asking for that state.

    A load sample is read, checked and evaluated without a pause (the rule's request is made
    before the relay worker can run), so the pin moves to what the last sample read before the
    move asked for. Of the samples read before `base`, only the run the last one belongs to
    matters: it may be what the pin is about to follow.
    """
    first = sum(1 for t, _ in samples if t < base)
    if first:
        asked = samples[first - 1][1]
        while first > 0 and samples[first - 1][1] == asked:
            first -= 1
    kept = samples[first:]
    events = sorted([(t, 0, want) for t, want in kept] + [(t, 1, on) for t, on in pin])
    state, pending = start, None
    latencies: list[float] = []
    edges = superseded = unexplained = 0
    for t, kind, value in events:
        if kind == 0:  # a sample
            if value != state and pending is None:
                pending = t
                edges += 1
            elif value == state and pending is not None:
                superseded += 1
                pending = None
        else:  # the pin changed
            state = value
            if pending is not None:
                latencies.append((t - pending) * 1000)
                pending = None
            else:
                unexplained += 1
    return {
        "latencies": latencies,
        "edges": edges,
        "superseded": superseded,
        "unexplained": unexplained,
        "pending_at_end": int(pending is not None),
    }


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(latencies: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(pct(latencies, 0.5), 3),
        "p99_ms": round(pct(latencies, 0.99), 3),
        "max_ms": round(max(latencies), 3),
    }


async def until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def measure(switches: int, threshold: float) -> dict[str, Any]:
    probe = Probe(threshold)
    with tempfile.TemporaryDirectory() as tmp, timed_reads(probe):
        node = Node(config_from_dict(node_config(Path(tmp), threshold)))
        node.subscribe(probe.sink)
        task = asyncio.create_task(node.run())
        try:
            await node.started.wait()
            assert node.relays is not None
            pin = node.relays.relays["heater"].device.pin
            probe.active = True
            await until(lambda: len(probe.samples) > 0, "a first load sample")
            before = {name: (s.reads, s.overruns) for name, s in node.sensor_stats.items()}
            readings0 = probe.readings
            start_state = bool(pin.state)
            pin.clear_states()  # gpiozero stamps each change relative to the one before
            base = time.monotonic()  # just after: latencies err long, never short
            wall0, cpu0 = time.perf_counter(), time.process_time()
            await until(lambda: len(pin.states) > switches, f"{switches} switches")
            probe.active = False
            wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
            stamps, t = [], base
            for change in pin.states[1:]:
                t += change.timestamp
                stamps.append((t, bool(change.state)))
            stats = {
                name: (s.reads - before[name][0], s.overruns - before[name][1])
                for name, s in node.sensor_stats.items()
            }
        finally:
            node.request_stop()
            await task
    result = match(probe.samples, stamps, start_state, base)
    readings = probe.readings - readings0
    return {
        "seconds": round(wall, 2),
        "readings": readings,
        "channels": len(probe.channels),
        "readings_per_s": round(readings / wall),
        "node_cpu_share": round(cpu / wall, 3),
        "load_samples": sum(1 for t, _ in probe.samples if t >= base),
        "sampler_overruns": sum(o for _, o in stats.values()),
        "pin_changes": len(stamps),
        "edges": result["edges"],
        "superseded": result["superseded"],
        "unexplained": result["unexplained"],
        "pending_at_end": result["pending_at_end"],
        "latencies": result["latencies"],
    }


def bare_pin_writes(n: int) -> list[float]:
    """The floor: one write of a gpiozero output on the node's kind of mock pin, timed alone."""
    from gpiozero import OutputDevice

    with tempfile.TemporaryDirectory() as tmp:
        factory = persistent_mock_factory(Path(tmp))
        device = OutputDevice(12, pin_factory=factory)
        out = []
        for i in range(n):
            t0 = time.monotonic()
            device.value = i % 2 == 0
            out.append((time.monotonic() - t0) * 1000)
        device.close()
        factory.close()
    return out


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--switches", type=int, default=400)
    args = p.parse_args()
    logs.configure("error")
    # The threshold: the load's value now, so its noise flips the rule both ways.
    now = time.time()
    threshold = SimulatedSite(SimulationConfig(seed=SEED), start=now).load_w(now)

    reference = asyncio.run(measure(args.switches, threshold))
    busy = subprocess.Popen([sys.executable, "-c", BUSY_LOOP], stdout=subprocess.PIPE)
    try:
        assert busy.stdout is not None
        busy.stdout.readline()  # it runs
        load0, wall0 = cpu_s(busy.pid), time.perf_counter()
        loaded = asyncio.run(measure(args.switches, threshold))
        floor = bare_pin_writes(2000)
        load_share = (cpu_s(busy.pid) - load0) / (time.perf_counter() - wall0)
    finally:
        busy.kill()
        busy.wait()

    ours = loaded.pop("latencies")
    ref = reference.pop("latencies")
    print(
        json.dumps(
            {
                "bench": "rule_latency",
                "machine": f"{platform.machine()} x{os.cpu_count()}",
                "rate_hz_per_channel": round(1 / PERIOD_S),
                "load_process_cpu_share": round(load_share, 2),
                "switches": len(ours),
                **summary(ours),
                "target_p99_ms": TARGET_P99_MS,
                "meets_target": pct(ours, 0.99) <= TARGET_P99_MS,
                "counts": loaded,
                "reference": {
                    "name": "the same node without the load process",
                    "switches": len(ref),
                    **summary(ref),
                    "counts": reference,
                },
                "floor": {"name": "bare mock pin write, under load", **summary(floor)},
            }
        )
    )


if __name__ == "__main__":
    main()
