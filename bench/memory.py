"""Resident memory of a running demo node after 60 s, next to a bare Python interpreter.

    .venv/bin/python bench/memory.py [--seconds 60]

Prints one JSON line. Target: ≤ 100 MB (a Pi Zero 2 W has 512 MB in all).
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_MB = 100.0


def rss_mb(pid: int) -> tuple[float, float]:
    """(current, peak) resident set size of a process, in MB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def measure(cmd: list[str], seconds: float) -> tuple[float, float]:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(seconds)
        if proc.poll() is not None:
            raise SystemExit(f"{cmd} exited early with {proc.returncode}")
        return rss_mb(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--speed", type=float, default=60.0, help="the demo's simulated time speed")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        node_cmd = [
            sys.executable,
            "-m",
            "daisee_node",
            "demo",
            "--data-dir",
            tmp,
            "--speed",
            str(args.speed),
        ]
        node_rss, node_peak = measure(node_cmd, args.seconds)
    bare_cmd = [sys.executable, "-c", "import asyncio; asyncio.run(asyncio.sleep(3600))"]
    bare_rss, _ = measure(bare_cmd, 2.0)
    print(
        json.dumps(
            {
                "bench": "node_memory",
                "after_s": args.seconds,
                "demo_speed": args.speed,
                "rss_mb": round(node_rss, 1),
                "peak_rss_mb": round(node_peak, 1),
                "target_mb": TARGET_MB,
                "meets_target": node_peak <= TARGET_MB,
                "reference": {
                    "name": "bare Python interpreter running an asyncio loop",
                    "rss_mb": round(bare_rss, 1),
                },
                "node_over_interpreter_mb": round(node_rss - bare_rss, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
