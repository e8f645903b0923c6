"""Start-up cost of the command line, in CPU time (user + system of the child process).

Each command is run N times in a fresh interpreter; the figure is the median CPU time, measured
with `os.wait4` (the child's own rusage, so other load on the machine matters less than with wall
time). The reference is `python -c pass` with the same interpreter, in the same run. Prints one
JSON line: each command's median CPU seconds, and its difference and ratio to the reference.

    .venv/bin/python bench/startup.py [--runs 7]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGETS_S = {"version": 0.15, "help": 0.15}  # above the reference
CHECK_CONFIG_TARGET_S = 0.5  # absolute


def cpu_seconds(argv: list[str]) -> float:
    """User + system CPU seconds of one run of `argv` (output discarded)."""
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _pid, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited with {proc.returncode}")
    return usage.ru_utime + usage.ru_stime


def median_cpu(argv: list[str], runs: int) -> float:
    """Median CPU seconds over `runs` runs, after one untimed run (warms caches, .pyc files and
    the rule parser's table cache, as on any start after the first)."""
    cpu_seconds(argv)
    return statistics.median(cpu_seconds(argv) for _ in range(runs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="runs per command (median)")
    args = parser.parse_args()
    python = sys.executable
    node = [python, "-m", "daisee_node"]
    commands = {
        "reference": [python, "-c", "pass"],
        "version": [*node, "--version"],
        "help": [*node, "--help"],
        "check_config": [*node, "check-config", "examples/house.toml"],
    }
    cpu = {name: median_cpu(argv, args.runs) for name, argv in commands.items()}
    reference = cpu["reference"]
    result: dict[str, object] = {
        "bench": "startup",
        "runs": args.runs,
        "unit": "s CPU (user+sys), median",
        "reference_python_pass_s": round(reference, 4),
    }
    for name in ("version", "help", "check_config"):
        result[f"{name}_s"] = round(cpu[name], 4)
        result[f"{name}_above_reference_s"] = round(cpu[name] - reference, 4)
        result[f"{name}_ratio"] = round(cpu[name] / reference, 1) if reference else None
    result["targets_met"] = {
        "version": cpu["version"] - reference <= TARGETS_S["version"],
        "help": cpu["help"] - reference <= TARGETS_S["help"],
        "check_config": cpu["check_config"] <= CHECK_CONFIG_TARGET_S,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
