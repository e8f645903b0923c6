"""The store under faults it must tell apart: a lock held elsewhere is not corruption, a
read-only look writes nothing, and the files holding a household's readings stay private."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from daisee_node.readings import Reading
from daisee_node.status import read_status
from daisee_node.store import MIGRATIONS, Store, StoreError

T0 = 1_781_000_040_000


async def make_db(path: Path, n: int = 10) -> None:
    """A real node database holding `n` readings, closed cleanly (no -wal left)."""
    s = Store(path)
    await s.open()
    s.put_many([Reading("grid.power_w", T0 + i * 1000, float(i)) for i in range(n)])
    s.stop()
    await s.run()
    await s.close()


def count(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute("SELECT count(*) FROM readings").fetchone()[0])
    finally:
        conn.close()


def snapshot(folder: Path) -> dict[str, tuple[int, int, int]]:
    """Every file in `folder` with its size, mtime and mode: what a writer would change."""
    return {
        p.name: (p.stat().st_size, p.stat().st_mtime_ns, stat.S_IMODE(p.stat().st_mode))
        for p in sorted(folder.iterdir())
    }


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


class ExclusiveLock:
    """Another process's connection holding an EXCLUSIVE lock on the database."""

    def __init__(self, path: Path) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA locking_mode=EXCLUSIVE")
        self.conn.execute("BEGIN EXCLUSIVE")
        self.conn.execute("INSERT INTO meta (key, value) VALUES ('locked-by', 'test')")

    def release(self) -> None:
        self.conn.execute("ROLLBACK")
        self.conn.close()


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)  # the usual umask: files 0644 and folders 0755 unless asked otherwise
    try:
        yield
    finally:
        os.umask(old)


# -- a locked database is not a corrupt one -----------------------------------------------------


async def test_a_database_locked_for_a_moment_is_waited_for_not_moved_aside(
    tmp_path: Path,
) -> None:
    path = tmp_path / "node.db"
    await make_db(path)
    lock = ExclusiveLock(path)
    timer = threading.Timer(1.0, lock.release)
    timer.start()
    try:
        s = Store(path)
        await s.open()
        assert len(await s.readings("grid.power_w", 0, 2 * T0)) == 10
        await s.close()
    finally:
        timer.join()
    assert not list(tmp_path.glob("*corrupt*"))
    assert count(path) == 10


async def test_a_database_locked_for_good_is_a_clear_error_and_nothing_moves(
    tmp_path: Path,
) -> None:
    path = tmp_path / "node.db"
    await make_db(path)
    lock = ExclusiveLock(path)
    try:
        before = path.stat().st_size
        s = Store(path, lock_timeout_s=0.5)
        with pytest.raises(StoreError, match="locked by another process"):
            await s.open()
        assert path.exists() and path.stat().st_size == before
        assert not list(tmp_path.glob("*corrupt*"))
    finally:
        lock.release()
    assert count(path) == 10


async def test_a_file_that_is_not_a_database_is_still_moved_aside(tmp_path: Path) -> None:
    path = tmp_path / "node.db"
    path.write_bytes(b"this is a text file, not SQLite " * 256)
    s = Store(path)
    await s.open()
    await s.close()
    kept = list(tmp_path.glob("node.db.corrupt-*"))
    assert len(kept) == 1 and kept[0].read_bytes().startswith(b"this is a text file")
    assert count(path) == 0


# -- read-only ----------------------------------------------------------------------------------


async def test_read_only_open_writes_nothing_beside_a_stopped_node(tmp_path: Path) -> None:
    path = tmp_path / "node.db"
    await make_db(path)
    os.chmod(path, 0o644)  # not tightened either: a read-only look changes nothing
    before = snapshot(tmp_path)
    assert set(before) == {"node.db", "store-health.json"}
    async with Store(path, read_only=True) as s:
        got = await s.readings("grid.power_w", 0, 2 * T0)
        assert [r.value for r in got] == [float(i) for i in range(10)]
        with pytest.raises(StoreError, match="read-only"):
            async with s.transaction():
                pass
        with pytest.raises(StoreError, match="read-only"):
            await s.run()
    assert snapshot(tmp_path) == before


async def test_read_only_reads_a_live_node_through_its_wal(tmp_path: Path) -> None:
    path = tmp_path / "node.db"
    live = Store(path)
    await live.open()
    writer = asyncio.create_task(live.run())
    try:
        live.put(Reading("grid.power_w", T0, 42.0))
        await live.flush()
        assert Path(f"{path}-wal").exists()
        async with Store(path, read_only=True) as ro:
            assert [r.value for r in await ro.readings("grid.power_w", 0, 2 * T0)] == [42.0]
        live.put(Reading("grid.power_w", T0 + 1000, 43.0))
        await live.flush()  # the live node still writes after the look
    finally:
        live.stop()
        await writer
        await live.close()
    assert count(path) == 2


async def test_read_only_never_creates_or_migrates(tmp_path: Path) -> None:
    missing = tmp_path / "sub" / "node.db"
    with pytest.raises(StoreError, match="no node database"):
        await Store(missing, read_only=True).open()
    assert not missing.parent.exists()

    old = tmp_path / "old.db"
    conn = sqlite3.connect(old)
    conn.executescript(MIGRATIONS[0])
    conn.execute("PRAGMA user_version=1")
    conn.close()
    async with Store(old, read_only=True) as s:
        assert await s.query("PRAGMA user_version") == [(1,)]
    conn = sqlite3.connect(old)
    tables = {n for (n,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    conn.close()
    assert "events" not in tables and "commitments" not in tables


async def test_status_writes_nothing_beside_a_stopped_node(tmp_path: Path) -> None:
    await make_db(tmp_path / "node.db")
    before = snapshot(tmp_path)
    report = read_status(tmp_path)
    assert report["database"]["readings"] == 10
    assert report["store"]["healthy"] is True
    assert snapshot(tmp_path) == before


# -- personal data on disk ------------------------------------------------------------------------


async def test_a_new_database_and_its_folder_are_private(tmp_path: Path, umask_022: None) -> None:
    folder = tmp_path / "var" / "daisee-node"
    path = folder / "node.db"
    s = Store(path)
    await s.open()
    writer = asyncio.create_task(s.run())
    try:
        s.put(Reading("grid.power_w", T0, 1.0))
        await s.flush()
        # While the node runs, SQLite's side files hold readings too.
        assert mode(Path(f"{path}-wal")) == 0o600
        assert mode(Path(f"{path}-shm")) == 0o600
    finally:
        s.stop()
        await writer
        await s.close()
    assert mode(folder) == 0o700
    assert mode(path) == 0o600
    assert mode(folder / "store-health.json") == 0o600


async def test_existing_files_with_wider_modes_are_tightened_once(
    tmp_path: Path, umask_022: None
) -> None:
    folder = tmp_path / "data"
    folder.mkdir(mode=0o755)
    path = folder / "node.db"
    await make_db(path)
    os.chmod(folder, 0o755)
    os.chmod(path, 0o644)
    with capture_logs() as logs:
        async with Store(path):
            pass
        async with Store(path):
            pass
    assert mode(folder) == 0o700 and mode(path) == 0o600
    tightened = [e for e in logs if e["event"].startswith("permissions tightened")]
    assert sorted(e["path"] for e in tightened) == [str(folder), str(path)]
