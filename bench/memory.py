"""Resident memory of running nodes, sampled over the run, next to the same libraries loaded bare.

    .venv/bin/python bench/memory.py [--minutes 3] [--target node|demo|both] [--interval-s 5]

Targets (ours):
- `node`: `daisee-node run` with `[chain]` on a real JSON-RPC chain (anvil from node_modules,
  the ledger deployed, the node registered and funded: its periods are sealed and committed) and
  `[mqtt]` on a real mosquitto (readings, retained state, Home Assistant discovery), sampling four
  simulated sources (12 channels) once a second in real time. Its period is `--node-period-s`
  (default 60 s rather than 15 min, so that sealing and committing happen within a short run).
- `demo`: `daisee-node demo` (time ×60, its in-process py-evm chain sealing a period every 15 s).

Each process's VmRSS (and VmHWM) from /proc/PID/status and its Pss from /proc/PID/smaps_rollup are
sampled every `--interval-s` for `--minutes`. Reported per target: the value at the end of the
warm-up, the final value, the peak, the slope after the warm-up (least squares, MB per minute) and
the number of samples taken.

Reference, measured in the same run: a bare interpreter that imports exactly the modules the target
had imported by the end of its warm-up (read from the target's own `-X importtime` output, every
module but ours, in the same order), then idles in an asyncio loop. It is sampled the same way
until the end of the run, so `ours_mb` = target − reference is what our code and data hold.

Prints one JSON line. Targets: node ≤ 60 MB, demo after 30 min ≤ 100 MB, both flat after warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TARGET_MB = {"node": 60.0, "demo": 100.0}
#: post-warm-up slope under which a process counts as flat (3 MB an hour)
FLAT_MB_PER_MIN = 0.05
#: `-X importtime` lines: "import time:  self |  cumulative | name" (nesting shown by spaces)
IMPORTTIME = re.compile(r"^import time:\s+\d+ \|\s+\d+ \|(\s+)(\S+)\s*$")

REFERENCE_SCRIPT = """
import asyncio, importlib, sys
failed = 0
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except Exception:
        failed += 1
print(failed, flush=True)
asyncio.run(asyncio.Event().wait())
"""


@dataclass
class Sample:
    """One reading of a process's memory, `t` minutes after the process started."""

    t: float
    rss_mb: float
    pss_mb: float | None
    hwm_mb: float


def read_memory(pid: int, t: float) -> Sample:
    fields: dict[str, str] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    pss: float | None = None
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                pss = int(line.split()[1]) / 1024
                break
    except OSError:  # not readable on every kernel
        pass
    return Sample(
        t, int(fields["VmRSS"].split()[0]) / 1024, pss, int(fields["VmHWM"].split()[0]) / 1024
    )


def slope_per_min(samples: list[Sample]) -> float | None:
    """Least-squares slope of RSS against time, MB per minute."""
    if len(samples) < 2:
        return None
    n = len(samples)
    mt = sum(s.t for s in samples) / n
    mr = sum(s.rss_mb for s in samples) / n
    var = sum((s.t - mt) ** 2 for s in samples)
    if var == 0:
        return None
    return sum((s.t - mt) * (s.rss_mb - mr) for s in samples) / var


@dataclass
class Watched:
    """A process under measurement and what was sampled from it."""

    name: str
    proc: subprocess.Popen[bytes]
    started: float
    samples: list[Sample] = field(default_factory=list)

    def sample(self) -> None:
        if self.proc.poll() is not None:
            raise SystemExit(f"{self.name} exited early with {self.proc.returncode}")
        self.samples.append(read_memory(self.proc.pid, (time.monotonic() - self.started) / 60))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def summary(w: Watched, warmup_min: float) -> dict[str, Any]:
    after = [s for s in w.samples if s.t >= warmup_min] or w.samples[-1:]
    slope = slope_per_min(after)
    pss = [s.pss_mb for s in after if s.pss_mb is not None]
    return {
        "samples": len(w.samples),
        "samples_after_warmup": len(after),
        "warmup_rss_mb": round(after[0].rss_mb, 1),
        "final_rss_mb": round(after[-1].rss_mb, 1),
        "peak_rss_mb": round(max(s.hwm_mb for s in w.samples), 1),
        "slope_mb_per_min": None if slope is None else round(slope, 3),
        "final_pss_mb": round(pss[-1], 1) if pss else None,
    }


def imported_modules(importtime_log: Path) -> list[str]:
    """Every module a process imported so far (from its `-X importtime` stderr), in import order
    (a module's line comes after its own imports), ours left out."""
    names: list[str] = []
    for line in importtime_log.read_text(errors="replace").splitlines():
        m = IMPORTTIME.match(line)
        if m is None:
            continue
        name = m.group(2)
        if name.split(".")[0] in ("daisee_node", "__main__", "tests", "bench"):
            continue
        names.append(name)
    return names


def start(cmd: list[str], name: str, log: Path, env: dict[str, str] | None = None) -> Watched:
    with log.open("wb") as err:
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.DEVNULL,
            stderr=err,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
        )
    return Watched(name, proc, time.monotonic())


# -- the targets ----------------------------------------------------------------------------------


class NodeSetup:
    """anvil with the ledger, a mosquitto, and a node config using both."""

    def __init__(self, tmp: Path, period_s: int) -> None:
        from daisee_node.ledger.keys import keystore_address, new_keystore
        from tests.conftest import sim_sensors, write_config
        from tests.support.broker import Broker
        from tests.support.chains import AnvilLedger

        self.broker = Broker(tmp)
        self.broker.start()
        self.chain = AnvilLedger(tmp, block_time_s=1)
        data = tmp / "node"
        new_keystore(data / "node-key.json", data / "node-key.pass")
        self.chain.enrol(keystore_address(data / "node-key.json"))
        self.config = write_config(
            tmp / "node.toml",
            {
                "node": {"id": "bench", "data_dir": str(data)},
                "log": {"level": "warning"},
                "sensors": sim_sensors(1.0),
                "chain": {
                    "rpc_url": self.chain.anvil.url,
                    "ledger_address": self.chain.ledger.address,
                    "period_s": period_s,
                    "seal_delay_s": 5,
                    "submit_interval_s": 5,
                    "confirmations": 2,
                    "import_channel": "grid.import_wh",
                    "export_channel": "grid.export_wh",
                },
                "mqtt": {
                    "host": self.broker.host,
                    "port": self.broker.port,
                    "username": "node",
                    "password_file": str(self.broker.password_file("node")),
                },
            },
        )

    def committed(self) -> int:
        """Commitments of the node on the chain (shows the chain path ran)."""
        return len(self.chain.ledger.contract.events.Committed().get_logs(from_block=0))

    def close(self) -> None:
        self.chain.anvil.stop()
        self.broker.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=3.0, help="length of the run")
    p.add_argument(
        "--warmup-minutes",
        type=float,
        default=None,
        help="samples before this are warm-up (default: a third of the run, at most 5)",
    )
    p.add_argument("--interval-s", type=float, default=5.0, help="time between samples")
    p.add_argument("--target", choices=("node", "demo", "both"), default="both")
    p.add_argument("--speed", type=float, default=60.0, help="the demo's time speed")
    p.add_argument("--node-period-s", type=int, default=60, help="the node's period")
    args = p.parse_args()
    # a stop of the bench still stops what it started (anvil, mosquitto, the nodes)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    warmup = args.warmup_minutes if args.warmup_minutes is not None else min(5.0, args.minutes / 3)
    targets = ("node", "demo") if args.target == "both" else (args.target,)
    python = sys.executable
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp_name:
        tmp = Path(tmp_name)
        setup = NodeSetup(tmp, args.node_period_s) if "node" in targets else None
        watched: dict[str, Watched] = {}
        references: dict[str, Watched] = {}
        failed_imports: dict[str, int] = {}
        module_counts: dict[str, int] = {}
        try:
            if setup is not None:
                cmd = [python, "-X", "importtime", "-m", "daisee_node", "run"]
                watched["node"] = start([*cmd, "-c", str(setup.config)], "node", tmp / "node.err")
            if "demo" in targets:
                cmd = [python, "-X", "importtime", "-m", "daisee_node", "demo"]
                demo_dir = str(tmp / "demo")
                watched["demo"] = start(
                    [*cmd, "--data-dir", demo_dir, "--speed", str(args.speed)],
                    "demo",
                    tmp / "demo.err",
                )
            t0 = time.monotonic()
            end = t0 + args.minutes * 60
            next_sample = t0
            while True:
                now = time.monotonic()
                for w in [*watched.values(), *references.values()]:
                    w.sample()
                if now - t0 >= warmup * 60:
                    for name in watched:
                        if name in references:
                            continue
                        modules = imported_modules(tmp / f"{name}.err")
                        module_counts[name] = len(modules)
                        bare = subprocess.Popen(
                            [python, "-c", REFERENCE_SCRIPT, *modules],
                            stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL,
                            cwd=ROOT,
                        )
                        assert bare.stdout is not None
                        # its first line: imported (and how many failed); then it idles
                        failed_imports[name] = int(bare.stdout.readline() or -1)
                        references[name] = Watched(f"{name} reference", bare, time.monotonic())
                        references[name].sample()
                if now >= end:
                    break
                next_sample += args.interval_s
                time.sleep(max(0.0, min(next_sample, end) - time.monotonic()))
            committed = setup.committed() if setup is not None else None
        finally:
            for w in [*watched.values(), *references.values()]:
                w.stop()
            if setup is not None:
                setup.close()
    result: dict[str, Any] = {
        "bench": "memory",
        "minutes": args.minutes,
        "warmup_minutes": round(warmup, 2),
        "interval_s": args.interval_s,
        "flat_below_mb_per_min": FLAT_MB_PER_MIN,
    }
    for name, w in watched.items():
        ours = summary(w, warmup)
        ref = summary(references[name], 0.0) if name in references else None
        slope = ours["slope_mb_per_min"]
        ours.update(
            target_mb=TARGET_MB[name],
            flat=slope is not None and slope <= FLAT_MB_PER_MIN,
            meets_target=ours["final_rss_mb"] <= TARGET_MB[name]
            and slope is not None
            and slope <= FLAT_MB_PER_MIN,
        )
        if name == "node":
            ours["commitments_on_chain"] = committed
            ours["period_s"] = args.node_period_s
        else:
            ours["speed"] = args.speed
        if ref is not None:
            ours["reference"] = {
                "name": "bare interpreter importing the same modules, idle asyncio loop",
                "modules": module_counts[name],
                "failed_imports": failed_imports[name],
                **ref,
            }
            ours["ours_mb"] = round(ours["final_rss_mb"] - ref["final_rss_mb"], 1)
        result[name] = ours
    print(json.dumps(result))


if __name__ == "__main__":
    main()
