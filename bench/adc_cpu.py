"""Daemon CPU time per ADC sample, through the whole pipeline, on the fake I2C bus.

    .venv/bin/python bench/adc_cpu.py [--seconds 20]

Runs a real `daisee-node run` with four ADS1115 inputs (AC, 860 SPS, 10 mains cycles a second)
and divides the process's CPU time by the conversions it read. In the same run, the reference:
Adafruit's driver alone in its default single-shot mode on the same fake bus (samples per second
and CPU per sample). Prints one JSON line. Target: ≤ 30 µs per sample.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_US = 30.0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime + stime


def node_run(seconds: float, tmp: Path) -> dict[str, float]:
    sensors = []
    for i in range(4):
        sensors.append(
            f"""
[[sensors]]
name = "line{i}"
kind = "ads1115"
bus = "fake"
address = 0x48
channel = {i}
current_sensor = "sct013-030"
mode = "ac"
voltage_v = 230
interval_s = 1.0
[sensors.fake]
ac_rms_a = {5 + i}
noise_a = 0.02
"""
        )
    config = tmp / "node.toml"
    config.write_text(
        f'[node]\nid = "bench"\ndata_dir = "{tmp}/data"\n[log]\nlevel = "warning"\n'
        + "".join(sensors)
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "daisee_node", "run", "-c", str(config)], stderr=subprocess.DEVNULL
    )
    time.sleep(3.0)  # start-up (imports, first windows) is not what we measure
    cpu0, db = cpu_seconds(proc.pid), tmp / "data" / "node.db"

    def windows() -> int:
        conn = sqlite3.connect(db)
        try:
            return conn.execute(
                "SELECT count(*) FROM readings r JOIN channels c ON "
                "c.id = r.channel_id WHERE c.name LIKE '%.current_a'"
            ).fetchone()[0]
        finally:
            conn.close()

    w0 = windows()
    time.sleep(seconds)
    cpu1, w1 = cpu_seconds(proc.pid), windows()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=15)
    samples = (w1 - w0) * round(10 / 50 * 860)
    return {
        "samples": samples,
        "cpu_s": cpu1 - cpu0,
        "us_per_sample": (cpu1 - cpu0) / samples * 1e6,
    }


def driver_alone(seconds: float) -> dict[str, float]:
    from adafruit_ads1x15.ads1115 import ADS1115
    from adafruit_ads1x15.analog_in import AnalogIn

    from daisee_node.sensors.fake_i2c import FakeI2C

    bus = FakeI2C()
    bus.attach(0x48).set_input(0, 1.0)
    channel = AnalogIn(ADS1115(bus, data_rate=860), 0)  # default: single-shot mode
    n, cpu0, t0 = 0, time.process_time(), time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        _ = channel.value
        n += 1
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return {"samples_per_s": n / elapsed, "us_per_sample": cpu / n * 1e6}


def wake_cost_us() -> float:
    """CPU cost of one 1.16 ms sleep on this machine: the floor of paced sampling."""
    n, cpu0 = 1000, time.thread_time()
    for _ in range(n):
        time.sleep(1 / 860)
    return (time.thread_time() - cpu0) / n * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seconds", type=float, default=20.0)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ours = node_run(args.seconds, Path(tmp))
    reference = driver_alone(3.0)
    wake = wake_cost_us()
    print(
        json.dumps(
            {
                "bench": "adc_cpu_per_sample",
                "inputs": 4,
                "data_rate_sps": 860,
                "samples": ours["samples"],
                "us_per_sample": round(ours["us_per_sample"], 1),
                "target_us": TARGET_US,
                "meets_target": ours["us_per_sample"] <= TARGET_US,
                "of_which_sleep_wakeup_us": round(wake, 1),
                "reference": {
                    "name": "Adafruit driver alone, single-shot mode, polling the OS bit",
                    "samples_per_s": round(reference["samples_per_s"]),
                    "us_per_sample": round(reference["us_per_sample"], 1),
                },
            }
        )
    )


if __name__ == "__main__":
    main()
