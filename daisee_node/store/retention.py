"""Keeping the file bounded: roll raw readings up into 1-minute aggregates, drop what has expired.

Raw readings are kept for `raw_days`, then 1-minute aggregates (min, max, mean, last, count of good
readings, count of bad ones) for `aggregate_days`; events for `events_days`. Maintenance works in
short slices within a time budget per turn, so a long backlog never holds the writer for long.

Another part of the node may need raw readings for longer (the ledger, until a period is sealed):
it adds a hold, asked before raw readings are dropped.
"""

from __future__ import annotations

import asyncio
import math
import time

from daisee_node.store.base import DAY_MS, MINUTE_MS, RawReadingsHold, StoreBase, now_ms
from daisee_node.store.events import (
    ADD_COUNTER,
    LAST_EVENTS_KEPT,
    LAST_EVENTS_SCAN,
    SET_LAST_EVENT,
    last_events,
)

# Aggregates of good readings per channel and minute; `last` is the value of the newest good one.
ROLLUP_SQL = """
INSERT OR REPLACE INTO readings_1m (minute, channel_id, min, max, mean, last, count, bad)
SELECT a.minute, a.channel_id, a.mn, a.mx, a.mean, r.value, a.n, a.bad
FROM (
    SELECT t_ms / 60000 AS minute, channel_id,
           min(value) FILTER (WHERE quality = 0) AS mn,
           max(value) FILTER (WHERE quality = 0) AS mx,
           avg(value) FILTER (WHERE quality = 0) AS mean,
           count(*) FILTER (WHERE quality = 0) AS n,
           count(*) FILTER (WHERE quality != 0) AS bad,
           max(t_ms) FILTER (WHERE quality = 0) AS last_t
    FROM readings WHERE t_ms >= ? AND t_ms < ?
    GROUP BY minute, channel_id
) AS a
LEFT JOIN readings AS r ON r.t_ms = a.last_t AND r.channel_id = a.channel_id
"""


class Maintenance(StoreBase):
    """Rollup and retention, run by the writer between batches."""

    def add_retention_hold(self, hold: RawReadingsHold) -> None:
        """Keep raw readings from `hold()` on, whatever `raw_days` says (asked at each turn)."""
        self._holds.append(hold)

    async def maintain(self, now_ms: int | None = None, budget_s: float | None = None) -> bool:
        """Roll complete minutes up into aggregates, then drop what is past retention.

        With `budget_s`, stops after the slice that crosses the budget and returns False: the
        writer commits what arrived meanwhile and comes back at once. Without, runs to the end.
        """
        now_ms = self.clock.now_ms() if now_ms is None else now_ms
        deadline = math.inf if budget_s is None else time.monotonic() + budget_s
        await self._prepare_counters()
        done = await self._rollup(now_ms, deadline) and await self._expire(now_ms, deadline)
        self._next_maintenance = self.clock.now() + (
            self.retention.maintenance_interval_s if done else 0.0
        )
        return done

    async def _prepare_counters(self) -> None:
        """Once per file: count aggregates and note each key's last event, for `status`.

        Files written before these were kept are counted once here (a scan, after READY); from
        then on they are kept up to date with every write.
        """
        if self._counters_ready:
            return
        assert self._db is not None
        async with self._db.execute(
            "SELECT 1 FROM counters WHERE name = 'aggregates_stored'"
        ) as cur:
            counted = await cur.fetchone() is not None
        kept = await self._meta_int(LAST_EVENTS_KEPT) is not None
        if not (counted and kept):
            async with self.transaction() as db:
                if not counted:
                    await db.execute(
                        "INSERT OR REPLACE INTO counters (name, value, t_ms) "
                        "SELECT 'aggregates_stored', count(*), ? FROM readings_1m",
                        (now_ms(),),
                    )
                if not kept:
                    async with db.execute(LAST_EVENTS_SCAN) as cur:
                        rows = [tuple(r[:6]) for r in await cur.fetchall()]
                    await db.executemany(
                        SET_LAST_EVENT,
                        last_events([(t, k, n, g, st, why, None) for k, n, g, st, why, t in rows]),
                    )
                    await db.execute(SET_LAST_EVENT, (LAST_EVENTS_KEPT, "1"))
        self._counters_ready = True

    async def _rollup(self, now_ms: int, deadline: float = math.inf) -> bool:
        """Roll up from where the last run stopped, in short slices; False if out of time."""
        assert self._db is not None
        until = (now_ms - int(self.retention.rollup_grace_s * 1000)) // MINUTE_MS * MINUTE_MS
        start = await self._meta_int("rollup_until_ms")
        if start is None:
            async with self._db.execute("SELECT min(t_ms) FROM readings") as cur:
                row = await cur.fetchone()
            if row is None or row[0] is None:
                return True
            start = int(row[0]) // MINUTE_MS * MINUTE_MS
        step = 10 * MINUTE_MS  # a slice is one short transaction, even at high sample rates
        while start < until:
            # Skips a gap (the node was stopped) in one primary-key search.
            async with self._db.execute(
                "SELECT min(t_ms) FROM readings WHERE t_ms >= ? AND t_ms < ?", (start, until)
            ) as cur:
                row = await cur.fetchone()
            first = None if row is None or row[0] is None else int(row[0])
            async with self.transaction() as db:
                if first is None:
                    end = until
                else:
                    start = max(start, first // MINUTE_MS * MINUTE_MS)
                    end = min(until, start + step)
                    span = (start // MINUTE_MS, end // MINUTE_MS)
                    async with db.execute(
                        "SELECT count(*) FROM readings_1m WHERE minute >= ? AND minute < ?", span
                    ) as cur:
                        had = int((await cur.fetchone() or (0,))[0])
                    cur = await db.execute(ROLLUP_SQL, (start, end))
                    made = max(0, cur.rowcount)
                    self.stats.rolled_up_minutes += made
                    if made != had:
                        stamp = time.time_ns() // 1_000_000
                        await db.execute(ADD_COUNTER, ("aggregates_stored", made - had, stamp))
                await db.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('rollup_until_ms', ?)",
                    (str(end),),
                )
            start = end
            await asyncio.sleep(0)  # let the loop breathe between slices
            if start < until and time.monotonic() >= deadline:
                return False  # at least one slice per turn: a backlog always shrinks
        return True

    async def _expire(self, now_ms: int, deadline: float = math.inf) -> bool:
        """Delete what is past retention, in slices; False if out of time."""
        assert self._db is not None
        rolled = await self._meta_int("rollup_until_ms")
        raw_cutoff = now_ms - int(self.retention.raw_days * DAY_MS)
        for hold in self._holds:
            raw_cutoff = min(raw_cutoff, await hold())
        done = True
        # Raw readings are deleted only once they are summarised in the aggregates.
        if rolled is not None:
            raw_cutoff = min(raw_cutoff, rolled)
            deleted, done = await self._delete_chunked(
                "DELETE FROM readings WHERE t_ms < ?",
                "SELECT min(t_ms) FROM readings",
                raw_cutoff,
                3_600_000,
                deadline,
                counter="readings_stored",
            )
            self.stats.deleted_raw += deleted
        if not done:
            return False
        agg_cutoff = (now_ms - int(self.retention.aggregate_days * DAY_MS)) // MINUTE_MS
        deleted, done = await self._delete_chunked(
            "DELETE FROM readings_1m WHERE minute < ?",
            "SELECT min(minute) FROM readings_1m",
            agg_cutoff,
            24 * 60,
            deadline,
            counter="aggregates_stored",
        )
        self.stats.deleted_aggregates += deleted
        if not done:
            return False
        events_days = self.retention.events_days
        events_cutoff = now_ms - int((events_days or self.retention.raw_days) * DAY_MS)
        deleted, done = await self._delete_chunked(
            "DELETE FROM events WHERE t_ms < ?",
            "SELECT min(t_ms) FROM events",
            events_cutoff,
            DAY_MS,
            deadline,
        )
        self.stats.deleted_events += deleted
        return done

    async def _delete_chunked(
        self,
        delete_sql: str,
        min_sql: str,
        cutoff: int,
        step: int,
        deadline: float = math.inf,
        counter: str | None = None,
    ) -> tuple[int, bool]:
        """Delete below `cutoff` in `step`-wide slices, one short transaction each.

        Returns how many rows went, and False if the deadline came first.
        """
        assert self._db is not None
        async with self._db.execute(min_sql) as cur:
            row = await cur.fetchone()
        if row is None or row[0] is None:
            return 0, True
        total = 0
        lower = int(row[0])
        while lower < cutoff:
            lower = min(cutoff, lower + step)
            async with self.transaction() as db:
                cur = await db.execute(delete_sql, (lower,))
                if counter and cur.rowcount > 0:
                    await db.execute(ADD_COUNTER, (counter, -cur.rowcount, now_ms()))
            total += max(0, cur.rowcount)
            await asyncio.sleep(0)
            if lower < cutoff and time.monotonic() >= deadline:
                return total, False
        return total, True
