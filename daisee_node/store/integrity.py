"""Is the file sound, and is the writer healthy: start check, background check, quarantine, health.

Costs at start stay flat in the size of the file: `open` checks only what a crash can have touched
(the schema and the newest pages of each table; in WAL mode with `synchronous=FULL` a killed process
cannot leave the rest damaged). The full `PRAGMA integrity_check` runs on a connection of its own
in a thread, after start and then daily; a failure is logged, counted and marks the file, which is
moved aside at the next start.

The health file tells `status` whether writes work, from outside the daemon: a fixed-size file
rewritten in place, so it can still be updated when the disk is full.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import time
import urllib.parse
from pathlib import Path
from typing import Any

from daisee_node.store.base import StoreBase, now_ms
from daisee_node.store.errors import classify_error
from daisee_node.store.files import move_aside

HEALTH_BYTES = 16_384
#: rows read from the newest end of each table at start
START_CHECK_ROWS = 256


class IntegrityChecks(StoreBase):
    """The start check, the background integrity check, quarantine and the health file."""

    # -- the file ------------------------------------------------------------------------------

    async def _start_check(self) -> bool:
        """Read what a crash can have touched: the schema and the newest rows of every table.

        Cost is flat in the size of the file. With WAL and `synchronous=FULL` a killed process
        leaves committed pages intact and the rest in the WAL; a damaged page raises a
        `DatabaseError` here (classified by the caller). Damage elsewhere (a failing SD card) is
        the background check's to find.
        """
        assert self._db is not None
        async with self._db.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'table' AND sql IS NOT NULL"
        ) as cur:
            tables = list(await cur.fetchall())
        for name, sql in tables:
            if name.startswith("sqlite_"):
                continue
            async with self._db.execute(f'PRAGMA table_info("{name}")') as cur:
                info = list(await cur.fetchall())
            if "WITHOUT ROWID" in str(sql).upper():
                keys = [row[1] for row in sorted(info, key=lambda r: r[5]) if row[5]]
                order = ", ".join(f'"{k}" DESC' for k in keys)
            else:
                order = "rowid DESC"
            async with self._db.execute(
                f'SELECT * FROM "{name}" ORDER BY {order} LIMIT {START_CHECK_ROWS}'
            ) as cur:
                await cur.fetchall()
        return True

    async def check_integrity(self) -> bool | None:
        """The full `PRAGMA integrity_check`, on a read-only connection in a thread.

        The writer goes on meanwhile (a WAL reader never blocks it). True: the file is sound;
        False: damage found, logged, counted and marked so the next start moves the file aside;
        None: the check could not run (stopped, or the file is not shared).
        """
        started = time.monotonic()
        findings = await asyncio.to_thread(self._integrity_findings)
        if findings is None:
            return None
        self.stats.integrity_checks += 1
        took = round(time.monotonic() - started, 3)
        if findings == ["ok"]:
            self._log.info("database integrity check passed", path=str(self.path), took_s=took)
            self.set_counter("store.integrity_ok_ms", now_ms())
            return True
        self.stats.integrity_failures += 1
        self.add_counter("store.integrity_failures", 1)
        self._log.error(
            "database failed its integrity check; it is moved aside at the next start",
            path=str(self.path),
            found=findings[:5],
            took_s=took,
        )
        try:
            await asyncio.to_thread(write_mark, self.integrity_mark, findings)
        except OSError as exc:
            self._log.error("cannot mark the damaged database", error=str(exc))
        return False

    def _integrity_findings(self) -> list[str] | None:
        """Run the check (in a worker thread); None when it could not run to the end."""
        try:
            conn = sqlite3.connect(
                f"file:{urllib.parse.quote(str(self.path.resolve()))}?mode=ro",
                uri=True,
                timeout=5.0,
                check_same_thread=False,
            )
        except sqlite3.Error as exc:
            self._log.warning("integrity check could not open the database", error=str(exc))
            return None
        try:
            # Polled by SQLite while the check runs: a stopping writer ends it at once.
            conn.set_progress_handler(lambda: 1 if self._check_cancelled else 0, 10_000)
            rows = conn.execute("PRAGMA integrity_check(100)").fetchall()
            return [str(r[0]) for r in rows]
        except sqlite3.Error as exc:
            if self._check_cancelled:
                return None
            if classify_error(exc) == "corrupt":
                return [str(exc)]
            self._log.warning("integrity check could not run", error=str(exc))
            return None
        finally:
            conn.close()

    def _start_scheduled_check(self) -> None:
        now = time.monotonic()
        if self._check_task is not None or now < self._next_check or self._exclusive:
            return
        self._next_check = now + self.retention.integrity_interval_s

        async def scheduled() -> bool | None:
            try:
                return await self.check_integrity()
            finally:
                self._check_task = None

        self._check_task = asyncio.create_task(scheduled(), name="store.integrity")

    async def _stop_check(self) -> None:
        """End a running background check (SQLite polls the flag) and wait for its thread."""
        task = self._check_task
        if task is None:
            return
        self._check_cancelled = True
        try:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await task
        finally:
            self._check_task = None
            self._check_cancelled = False

    async def _quarantine(self) -> None:
        """Keep the damaged file for inspection and start a new one: the node must go on."""
        if self._db is not None:
            with contextlib.suppress(Exception):
                await self._db.close()
            self._db = None
        stamp = time.strftime("%Y%m%dT%H%M%S")
        await asyncio.to_thread(move_aside, self.path, f".corrupt-{stamp}")
        self._log.error(
            "corrupt database moved aside; starting a new one",
            kept_as=f"{self.path}.corrupt-{stamp}",
        )

    # -- the writer's health -------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        """False while writes fail (since the last failed write, until one succeeds)."""
        return self._failing_since_ms is None

    @property
    def write_errors(self) -> int:
        """Failed write transactions since the store was created."""
        return self.stats.write_errors

    @property
    def last_error(self) -> str | None:
        """The newest write error while writes fail; None when healthy."""
        return self.stats.last_error or None

    def status_line(self) -> str:
        """One line for systemd's STATUS= and logs: ok, or failing with the error."""
        if self.healthy and not self.stats.write_errors:
            return "store ok"
        if self.healthy:
            return f"store ok ({self.stats.write_errors} write errors, recovered)"
        return (
            f"store writes failing ({self.stats.write_errors} errors, {self.pending} readings "
            f"held, {self.stats.dropped} dropped): {self.stats.last_error}"
        )

    def health(self, closed: bool = False) -> dict[str, Any]:
        """The writer's health as plain data (what the health file holds)."""
        return {
            "pid": None if closed else os.getpid(),
            "t_ms": now_ms(),
            "healthy": self.healthy,
            "write_errors": self.stats.write_errors,
            "last_error": self.last_error,
            "failing_since_ms": self._failing_since_ms,
            "pending": self.pending,
            "dropped": self.stats.dropped,
            "dropped_events": self.stats.dropped_events,
        }

    def _unwritten_state(self) -> dict[str, Any]:
        """Relay and rule state held in memory, not yet in the database."""
        counters = {
            k: v for k, v in self._counter_sets.items() if k.startswith(("relay.", "rule."))
        }
        events: dict[str, list[Any]] = {}
        for t_ms, kind, name, target, state, reason, _ in self._events:
            events[f"{kind}|{name}|{target or ''}"] = [state, reason, t_ms]
        return {"counters": counters, "events": events}

    def _write_health(self, force: bool = False, closed: bool = False) -> None:
        """Rewrite the health file in place (no new disk blocks needed once it exists)."""
        if not force and time.monotonic() - self._health_written < 2.0:
            return
        self._health_written = time.monotonic()
        report = self.health(closed)
        if not self.healthy:
            report["unwritten"] = self._unwritten_state()
        data = json.dumps(report, separators=(",", ":")).encode()
        if len(data) > HEALTH_BYTES:
            report.pop("unwritten", None)
            data = json.dumps(report, separators=(",", ":")).encode()
        fd = os.open(self.health_path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            # Trailing spaces are valid JSON whitespace: the file keeps its full size.
            os.pwrite(fd, data.ljust(HEALTH_BYTES), 0)
        finally:
            os.close(fd)

    def _write_failed(self, exc: BaseException) -> None:
        self.stats.write_errors += 1
        self.stats.last_error = f"{classify_error(exc)}: {exc}"
        self.add_counter("store.write_errors", 1)
        if self._failing_since_ms is None:
            self._failing_since_ms = now_ms()
            self._health_written = 0.0  # the first failure is published at once
            self._log.error(
                "store writes failing; readings are held in memory and retried",
                error=str(exc),
                max_pending=self.retention.max_pending,
            )
        else:
            self._log.debug("store write failed again", error=str(exc))

    async def _write_recovered(self) -> None:
        assert self._failing_since_ms is not None
        self._log.warning(
            "store writes recovered",
            failed_for_s=round((now_ms() - self._failing_since_ms) / 1000, 1),
            write_errors=self.stats.write_errors,
            dropped=self.stats.dropped,
        )
        self._failing_since_ms = None
        self.stats.last_error = ""
        with contextlib.suppress(OSError):
            await asyncio.to_thread(self._write_health, True)


def write_mark(mark: Path, findings: list[str]) -> None:
    """Mark the file as damaged, with what the check found (read at the next start)."""
    report = {"t_ms": now_ms(), "found": findings[:20]}
    mark.write_text(json.dumps(report) + "\n")
    os.chmod(mark, 0o600)


def read_mark(mark: Path) -> list[str]:
    """What the check that marked the file found (the first few findings)."""
    try:
        return list(json.loads(mark.read_text()).get("found", []))[:5]
    except (OSError, ValueError, AttributeError):
        return []
