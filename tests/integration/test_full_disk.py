"""The store on a disk that really fills up: a small tmpfs mounted for the test.

A tmpfs of a few MiB is a real filesystem that answers ENOSPC like a full SD card (no reserved
blocks for root, unlike ext4), and mounting one needs no image file. Mounting needs root
(CAP_SYS_ADMIN), which the test machines have.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from daisee_node.datadir import DataDirLock
from daisee_node.readings import Reading
from daisee_node.store import HEALTH_NAME, MIGRATIONS, Retention, Store, StoreError
from tests.conftest import db_rows, run_cli, until, wait_for, write_config

T0 = 1_781_000_040_000
FAST = Retention(flush_interval_s=0.01, retry_max_s=0.2)


class SmallDisk:
    """A tmpfs of `size` bytes that the test fills and frees at will."""

    def __init__(self, mountpoint: Path, size: int) -> None:
        self.root = mountpoint
        mountpoint.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(mountpoint)],
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, f"cannot mount a tmpfs (needs root): {done.stderr}"
        self.filler = mountpoint / "filler"

    def fill(self) -> None:
        """Take every free byte, as a runaway log file would."""
        with self.filler.open("ab", buffering=0) as f:
            chunk = b"\0" * 4096
            while True:
                try:
                    f.write(chunk)
                except OSError:
                    break
            while True:  # the last partial page too
                try:
                    f.write(b"\0")
                except OSError:
                    break
        assert os.statvfs(self.root).f_bavail == 0

    def free(self) -> None:
        self.filler.unlink()

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", str(self.root)], check=False)


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[SmallDisk]:
    d = SmallDisk(tmp_path / "disk", 8 * 1024 * 1024)
    try:
        yield d
    finally:
        d.unmount()


def health_of(data: Path) -> dict[str, Any]:
    """The writer's health file, as `status` reads it."""
    return dict(json.loads((data / HEALTH_NAME).read_bytes()))


def rows(path: Path, sql: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


async def make_db(path: Path) -> None:
    s = Store(path)
    await s.open()
    s.put(Reading("grid.power_w", T0, 1.0))
    s.stop()
    await s.run()
    await s.close()


async def test_writes_on_a_full_disk_are_counted_held_and_recovered(disk: SmallDisk) -> None:
    path = disk.root / "data" / "node.db"
    s = Store(path, retention=FAST)
    await s.open()
    writer = asyncio.create_task(s.run())
    try:
        s.put(Reading("grid.power_w", T0, 1.0))
        await s.flush()
        disk.fill()
        s.put_many([Reading("grid.power_w", T0 + i * 1000, float(i)) for i in range(1, 51)])
        s.set_counter("relay.supply_own.state", 1)
        s.put_event(T0 + 5, "relay", "supply_own", None, "on", "battery low")
        await until(lambda: s.write_errors >= 3)
        assert not s.healthy and "full" in (s.last_error or "")
        assert s.pending == 50 and not writer.done()  # held in memory, writer still running
        assert s.stats.write_errors == s.write_errors
        assert "store writes failing" in s.status_line()
        health = json.loads((path.parent / HEALTH_NAME).read_bytes())
        assert health["healthy"] is False and health["write_errors"] >= 1
        assert health["unwritten"]["counters"] == {"relay.supply_own.state": 1}

        disk.free()
        await until(lambda: s.healthy)
        await s.flush()
        assert s.last_error is None and s.pending == 0
        health = json.loads((path.parent / HEALTH_NAME).read_bytes())
        assert health["healthy"] is True
    finally:
        s.stop()
        await writer
        await s.close()
    assert rows(path, "SELECT count(*) FROM readings") == [(51,)]
    counters = dict(rows(path, "SELECT name, value FROM counters"))
    assert counters["store.write_errors"] == s.write_errors
    assert counters["relay.supply_own.state"] == 1
    assert rows(path, "SELECT reason FROM events") == [("battery low",)]


async def test_the_backlog_stays_bounded_while_the_disk_is_full(disk: SmallDisk) -> None:
    path = disk.root / "node.db"
    s = Store(path, retention=Retention(flush_interval_s=0.01, retry_max_s=0.2, max_pending=100))
    await s.open()
    writer = asyncio.create_task(s.run())
    try:
        disk.fill()
        with capture_logs() as logs:
            for i in range(300):
                s.put(Reading("grid.power_w", T0 + i * 1000, float(i)))
                if i % 50 == 0:
                    await asyncio.sleep(0.05)
            await until(lambda: s.write_errors >= 2)
            assert s.pending <= 100 and s.stats.dropped >= 200
            disk.free()
            await s.flush()
        assert s.healthy
    finally:
        s.stop()
        await writer
        await s.close()
    dropping = [e for e in logs if e["event"].startswith("store backlog full")]
    assert len(dropping) == 1  # said once, then counted
    stored = [v for (v,) in rows(path, "SELECT value FROM readings ORDER BY t_ms")]
    assert stored[-1] == 299.0 and len(stored) == 300 - s.stats.dropped  # the newest kept
    counters = dict(rows(path, "SELECT name, value FROM counters"))
    assert counters["store.dropped"] == s.stats.dropped


async def test_an_existing_database_opens_on_a_full_disk(disk: SmallDisk) -> None:
    path = disk.root / "node.db"
    await make_db(path)
    assert not Path(f"{path}-shm").exists()
    disk.fill()
    s = Store(path, retention=FAST)
    await s.open()  # SQLite cannot create its -shm file; the store still opens
    assert [r.value for r in (await s.load_latest()).values()] == [1.0]
    writer = asyncio.create_task(s.run())
    try:
        s.put(Reading("grid.power_w", T0 + 1000, 2.0))
        await until(lambda: s.write_errors >= 1)
        disk.free()
        await s.flush()
        assert s.healthy
        # Writes work again, and other programs (status, prove) can read beside the node.
        await until(lambda: not s._exclusive)
        counted = await asyncio.to_thread(rows, path, "SELECT count(*) FROM readings")
        assert counted == [(2,)]
    finally:
        s.stop()
        await writer
        await s.close()


async def test_opening_that_must_write_on_a_full_disk_is_a_clear_error(
    disk: SmallDisk,
) -> None:
    old = disk.root / "old.db"
    conn = sqlite3.connect(old)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(MIGRATIONS[0])
    conn.execute("PRAGMA user_version=1")
    conn.close()
    disk.fill()
    with pytest.raises(StoreError, match="full"):
        await Store(old).open()  # migrations 2 and 3 must write
    assert old.exists() and not list(disk.root.glob("*corrupt*"))
    with pytest.raises(StoreError, match=r"cannot open .*new\.db"):
        await Store(disk.root / "new.db").open()
    assert not list(disk.root.glob("*corrupt*"))


async def test_status_shows_write_errors_and_relays_held_in_memory(disk: SmallDisk) -> None:
    data = disk.root / "data"
    s = Store(data / "node.db", retention=FAST)
    await s.open()
    lock = DataDirLock(data)  # this process plays the daemon that holds the data dir
    lock.acquire()
    writer = asyncio.create_task(s.run())
    try:
        s.put(Reading("grid.power_w", T0, 1.0))
        await s.flush()
        disk.fill()
        s.set_counter("relay.supply_neighbour.state", 1)
        s.set_counter("relay.supply_neighbour.switches", 1)
        s.put_event(T0 + 5, "relay", "supply_neighbour", None, "on", "neighbour has surplus")
        s.set_counter("rule.share.active", 1)
        s.put_event(T0 + 5, "rule", "share", "supply_neighbour", "on", "soc 12 < 20")
        await until(lambda: health_of(data).get("unwritten"))  # published with the 1st error

        table = await asyncio.to_thread(run_cli, "status", "--data-dir", str(data))
        assert table.returncode == 0, table.stderr
        assert f"running (pid {os.getpid()})" in table.stdout
        assert "WRITES FAILING" in table.stdout and "database or disk is full" in table.stdout
        relay_line = next(ln for ln in table.stdout.splitlines() if "supply_neighbour" in ln)
        assert relay_line.split()[:2] == ["supply_neighbour", "on"]
        assert "neighbour has surplus" in relay_line
        assert any(ln.startswith("share ") and "yes" in ln for ln in table.stdout.splitlines())

        report = json.loads(
            (await asyncio.to_thread(run_cli, "status", "--data-dir", str(data), "--json")).stdout
        )
        assert report["store"]["healthy"] is False
        assert report["store"]["write_errors"] >= 1
        assert report["relays"]["supply_neighbour"]["state"] == "on"
        disk.free()
        await until(lambda: s.healthy)
    finally:
        s.stop()
        await writer
        await s.close()
        lock.release()
    after = json.loads(run_cli("status", "--data-dir", str(data), "--json").stdout)
    assert after["running"] is False
    assert after["store"]["write_errors"] == s.write_errors
    assert after["relays"]["supply_neighbour"]["state"] == "on"


def stored_readings(db: Path) -> int:
    """Readings in a node's database; 0 until the daemon has created it."""
    try:
        found = db_rows(db, "SELECT count(*) FROM readings")
    except sqlite3.OperationalError:
        return 0
    return int(found[0][0]) if found else 0


@pytest.mark.slow
def test_a_running_node_keeps_going_while_its_disk_is_full(
    disk: SmallDisk, tmp_path: Path, daemon
) -> None:
    data = disk.root / "data"
    config = write_config(
        tmp_path / "node.toml",
        {
            "node": {"id": "full-disk", "data_dir": str(data)},
            "sensors": [{"name": "load", "kind": "simulated", "model": "load", "interval_s": 0.1}],
            "gpio": {"backend": "mock"},
            "relays": [{"name": "heater", "pin": 22, "safe_state": "off"}],
            "rules": [
                {
                    "name": "heat",
                    "when": "load.power_w > 1",
                    "then": {"relay": "heater", "state": "on"},
                    "otherwise": {"relay": "heater", "state": "off"},
                }
            ],
        },
    )
    node = daemon(config)
    db = data / "node.db"
    wait_for(lambda: stored_readings(db) >= 5, timeout=30)
    wait_for(lambda: db_rows(db, "SELECT 1 FROM counters WHERE name = 'relay.heater.state'"))
    disk.fill()

    def failing() -> dict[str, Any] | None:
        result = run_cli("status", "--data-dir", str(data), "--json")
        report = json.loads(result.stdout) if result.returncode == 0 else None
        return report if report and not report["store"]["healthy"] else None

    report = wait_for(failing, timeout=20, every=0.5)
    assert report["running"] is True and report["store"]["write_errors"] >= 1
    assert "full" in report["store"]["last_error"]
    assert report["relays"]["heater"]["state"] == "on"
    table = run_cli("status", "--data-dir", str(data)).stdout
    assert "WRITES FAILING" in table and "heater" in table
    assert node.proc.poll() is None  # still running: the writer waits, it does not crash

    stored = stored_readings(db)
    disk.free()
    wait_for(lambda: stored_readings(db) > stored + 10, timeout=20)
    healed = json.loads(run_cli("status", "--data-dir", str(data), "--json").stdout)
    assert healed["store"]["healthy"] is True and healed["store"]["write_errors"] >= 1
    node.signal(signal.SIGTERM)
    code, output = node.wait(timeout=15)
    assert code == 0, output
    assert "store writes failing" in output and "store writes recovered" in output
    assert "Traceback" not in output
