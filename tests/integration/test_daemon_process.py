"""A real `daisee-node run` process: systemd notification, signals, reload, lock, kill -9."""

from __future__ import annotations

import json
import random
import signal
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Daemon, db_rows, sim_sensors, wait_for, write_config


def config(tmp_path: Path, sensors: list[dict[str, Any]] | None = None, **store: Any) -> Path:
    return write_config(
        tmp_path / "node.toml",
        {
            "node": {"id": "proc-1", "data_dir": str(tmp_path / "data")},
            "store": {"flush_interval_s": 0.25, **store},
            "sensors": sim_sensors(0.02) if sensors is None else sensors,
        },
    )


def newest_ms(tmp_path: Path) -> int:
    rows = db_rows(tmp_path / "data" / "node.db", "SELECT max(t_ms) FROM readings")
    return rows[0][0] if rows and rows[0][0] is not None else 0


def log_events(stderr: str) -> list[dict[str, Any]]:
    out = []
    for line in stderr.splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


@pytest.fixture
def notify_socket(tmp_path: Path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify.sock")
    sock.bind(path)
    sock.settimeout(15)
    yield sock, path
    sock.close()


def receive_until(sock: socket.socket, wanted: str) -> list[str]:
    seen: list[str] = []
    while wanted not in seen:
        seen += sock.recv(4096).decode().splitlines()
    return seen


def test_systemd_sees_ready_watchdog_and_stopping_and_sigterm_flushes(
    tmp_path: Path, daemon, notify_socket
) -> None:
    sock, path = notify_socket
    d: Daemon = daemon(config(tmp_path), env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"})
    assert "READY=1" in receive_until(sock, "READY=1")
    assert "WATCHDOG=1" in receive_until(sock, "WATCHDOG=1")
    first = wait_for(lambda: newest_ms(tmp_path))
    wait_for(lambda: newest_ms(tmp_path) > first)  # sampling and committing, not just started
    sent_at = time.time()
    d.signal(signal.SIGTERM)
    assert "STOPPING=1" in receive_until(sock, "STOPPING=1")
    code, stderr = d.wait(timeout=8)
    stopped_in = time.time() - sent_at
    assert code == 0, stderr
    assert stopped_in < 5.0
    # Sampling stopped at the signal and what was sampled until then was committed.
    assert newest_ms(tmp_path) >= (sent_at - 0.1) * 1000
    db = tmp_path / "data" / "node.db"
    assert db_rows(db, "PRAGMA integrity_check") == [("ok",)]
    # A clean stop checkpoints the WAL into the main file.
    wal = Path(f"{db}-wal")
    assert not wal.exists() or wal.stat().st_size == 0
    events = [e["event"] for e in log_events(stderr)]
    assert "node started" in events and "node stopped" in events
    assert all(e.get("node_id") == "proc-1" for e in log_events(stderr))


def test_sighup_rejects_a_broken_config_and_applies_a_good_one(tmp_path: Path, daemon) -> None:
    path = config(tmp_path, sim_sensors(0.05)[:1])
    d = daemon(path)
    db = tmp_path / "data" / "node.db"
    channels = lambda: {n for (n,) in db_rows(db, "SELECT name FROM channels")}  # noqa: E731
    wait_for(lambda: "pv.power_w" in channels())

    path.write_text(
        path.read_text() + "\n[[sensors]]\nname = 'grid'\nkind = 'simulated'\n"
        "model = 'grid'\ninterval_s = 0.05\nwrong_key = 1\n"
    )
    d.signal(signal.SIGHUP)
    wait_for(lambda: "config reload rejected" in d.output())
    assert d.proc.poll() is None, "a bad config must not stop the node"
    assert "grid.power_w" not in channels()

    config(tmp_path, sim_sensors(0.05)[:1] + sim_sensors(0.05)[3:])
    d.signal(signal.SIGHUP)
    wait_for(lambda: "grid.power_w" in channels())
    d.signal(signal.SIGTERM)
    code, stderr = d.wait()
    assert code == 0
    rejected = [e for e in log_events(stderr) if "rejected" in e["event"]]
    assert rejected and any("sensors[1].wrong_key" in p for p in rejected[0]["problems"])


def test_sigint_stops_like_sigterm(tmp_path: Path, daemon) -> None:
    d = daemon(config(tmp_path))
    wait_for(lambda: newest_ms(tmp_path) > 0)
    d.signal(signal.SIGINT)
    code, stderr = d.wait()
    assert code == 0, stderr
    assert "node stopped" in stderr


def test_sigterm_during_startup_exits_cleanly(tmp_path: Path, daemon) -> None:
    d = daemon(config(tmp_path))
    time.sleep(0.3)  # still importing
    d.signal(signal.SIGTERM)
    code, stderr = d.wait()
    assert code == 0, stderr
    assert "Traceback" not in stderr


def test_a_second_daemon_on_the_same_data_dir_is_refused(tmp_path: Path, daemon) -> None:
    path = config(tmp_path)
    first = daemon(path)
    wait_for(lambda: newest_ms(tmp_path) > 0)
    second = daemon(path)
    code, stderr = second.wait(timeout=30)
    assert code == 1
    assert "another daisee-node" in stderr and str(first.proc.pid) in stderr
    assert "Traceback" not in stderr
    assert first.proc.poll() is None


@pytest.mark.slow
def test_kill_9_loses_at_most_a_second_and_never_corrupts(tmp_path: Path, daemon) -> None:
    """Kill a real daemon repeatedly, mid-write; every restart finds an intact database."""
    path = config(tmp_path)
    db = tmp_path / "data" / "node.db"
    rng = random.Random(42)
    kept_before: list[tuple[int, int]] = []
    for round_ in range(6):
        started_at = time.time() * 1000
        d = daemon(path)
        wait_for(lambda t=started_at: newest_ms(tmp_path) > t, timeout=30)
        time.sleep(rng.uniform(0.3, 1.5))
        killed_at_ms = time.time() * 1000
        d.kill()
        assert db_rows(db, "PRAGMA integrity_check") == [("ok",)], f"round {round_}"
        newest = newest_ms(tmp_path)
        lost_ms = killed_at_ms - newest
        assert lost_ms <= 1000, f"round {round_}: lost {lost_ms:.0f} ms of readings"
        # Everything kept by earlier rounds is still there, unchanged.
        for t_before, count_before in kept_before:
            assert db_rows(db, "SELECT count(*) FROM readings WHERE t_ms <= ?", (t_before,)) == [
                (count_before,)
            ]
        count = db_rows(db, "SELECT count(*) FROM readings WHERE t_ms <= ?", (newest,))[0][0]
        kept_before.append((newest, count))
    # And the node starts cleanly after the last kill.
    restarted_at = time.time() * 1000
    d = daemon(path)
    wait_for(lambda: newest_ms(tmp_path) > restarted_at, timeout=30)
    d.signal(signal.SIGTERM)
    assert d.wait()[0] == 0
