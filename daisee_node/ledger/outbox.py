"""The ledger's outbox in the node's SQLite database, and the sealing of periods into it.

Sealing reads the period's readings from the buffer, builds the Merkle tree, signs the commitment
and stores it, all before anything talks to the chain: with the chain away for hours, every
period is still sealed in order, and the submitter sends them when it returns.

A period can hold hundreds of thousands of readings (10 channels at 50 Hz: 450,000 in 15 min),
seconds of hashing here and minutes on a Pi. That work runs in a worker thread, never on the
event loop, which keeps sampling, rules and the watchdog running meanwhile.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from eth_hash.auto import keccak

from daisee_node.clock import Clock
from daisee_node.ledger import merkle
from daisee_node.ledger.commitment import DEFAULT_CAPACITY_W, Commitment, capacity_wh, sign
from daisee_node.logs import get_logger
from daisee_node.readings import Quality, Reading
from daisee_node.store import Store, StoreError, connect_readonly

if TYPE_CHECKING:
    from eth_account.signers.local import LocalAccount

    from daisee_node.conformity import ConformitySpec, PeriodCheck, PeriodContext

T = TypeVar("T")
ZERO32 = b"\x00" * 32
SEALED_UNTIL_KEY = "ledger_sealed_until_ms"
#: the ledger's numbered schema migrations (its tables), registered with the store
MIGRATIONS_PACKAGE = "daisee_node.ledger.migrations"
#: the conformity reports' table (see daisee_node/conformity.py), registered with the store too
REPORTS_OWNER = "conformity"
REPORTS_PACKAGE = "daisee_node.store.conformity_migrations"
#: the store counter of readings stored with a time inside a sealed period
LATE_COUNTER = "ledger.late_readings"
#: how far back the baseline of a period's counter totals is looked for
BASELINE_LOOKBACK_MS = 86_400_000
#: at most one log line about late readings per this many seconds of node time
LATE_LOG_EVERY_S = 60.0
#: how long a sealing read waits for a lock before it reads through the store instead
READ_TIMEOUT_S = 1.0
#: a sealing worker thread gives the event loop its turn at least this often
TURN_EVERY_S = 0.001
#: rows made into leaves between two calls of `pause` (a leaf: 15 µs here, 10–20× on a Pi)
LEAVES_PER_PAUSE = 4
#: rows read from the database at a time while sealing
ROWS_PER_FETCH = 128
#: the longest a worker thread waits for its turn to come back (a stopped loop never answers)
TURN_WAIT_MAX_S = 0.1
#: a period's rows in time order (the order of the table's key, so it costs nothing)
PERIOD_ROWS_SQL = (
    "SELECT r.t_ms, c.name, r.value, r.quality FROM readings r "
    "JOIN channels c ON c.id = r.channel_id WHERE r.t_ms >= ? AND r.t_ms < ? ORDER BY r.t_ms"
)

# pending → sent → included → confirmed; a reorg sends included ones back to pending.
PENDING, SENT, INCLUDED, CONFIRMED, REJECTED = (
    "pending",
    "sent",
    "included",
    "confirmed",
    "rejected",
)


@dataclass(frozen=True)
class StoredReport:
    """A period's conformity report as the node signed it (its leaf value is `digest`)."""

    seq: int
    t0: int
    t1: int
    digest: bytes
    passed: bool
    #: the report's canonical JSON
    body: str

    def report(self) -> dict[str, Any]:
        return dict(json.loads(self.body))


@dataclass
class Entry:
    """One row of the outbox."""

    commitment: Commitment
    signature: bytes
    own: bool
    state: str
    tx_hash: bytes | None
    block_number: int | None
    block_hash: bytes | None

    @property
    def key(self) -> tuple[str, int]:
        return (self.commitment.node, self.commitment.seq)


_COLUMNS = "body, signature, own, state, tx_hash, block_number, block_hash"


def _entry(row: tuple[Any, ...]) -> Entry:
    body, signature, own, state, tx_hash, block_number, block_hash = row
    return Entry(
        Commitment.from_json(json.loads(body)),
        bytes(signature),
        bool(own),
        state,
        bytes(tx_hash) if tx_hash is not None else None,
        block_number,
        bytes(block_hash) if block_hash is not None else None,
    )


class Outbox:
    """Signed commitments waiting for, or recorded on, the chain."""

    def __init__(self, store: Store) -> None:
        self.store = store
        store.register_migrations("ledger", MIGRATIONS_PACKAGE)
        store.register_migrations(REPORTS_OWNER, REPORTS_PACKAGE)

    def keep_unsealed_readings(self) -> None:
        """Have the store keep raw readings past retention until their period is sealed."""
        self.store.add_retention_hold(self.sealed_until_ms)

    async def sealed_until_ms(self) -> int:
        """End (ms) of the newest own sealed period, 0 before the first."""
        value = await self.store.get_meta(SEALED_UNTIL_KEY)
        return int(value) if value else 0

    async def add(
        self,
        commitment: Commitment,
        signature: bytes,
        *,
        own: bool,
        sealed_ms: int,
        report: StoredReport | None = None,
    ) -> bool:
        """Store a signed commitment (and the conformity report its root holds); False when
        (node, seq) is already there."""
        async with self.store.transaction() as db:
            cur = await db.execute(
                "INSERT OR IGNORE INTO commitments (node, seq, own, body, hash, signature, t0, t1,"
                " count, sealed_ms) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (
                    commitment.node,
                    commitment.seq,
                    int(own),
                    json.dumps(commitment.to_json()),
                    commitment.struct_hash(),
                    signature,
                    commitment.t0,
                    commitment.t1,
                    commitment.count,
                    sealed_ms,
                ),
            )
            added = cur.rowcount == 1
            if added and own:
                await db.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                    (SEALED_UNTIL_KEY, str(commitment.t1)),
                )
            if added and report is not None:
                await db.execute(
                    "INSERT OR REPLACE INTO conformity_reports (node, seq, t0, t1, digest, passed,"
                    " body) VALUES (?,?,?,?,?,?,?)",
                    (
                        commitment.node,
                        commitment.seq,
                        report.t0,
                        report.t1,
                        report.digest,
                        int(report.passed),
                        report.body,
                    ),
                )
        return added

    async def report(self, node: str, seq: int) -> StoredReport | None:
        """The conformity report sealed with commitment (node, seq), if it has one."""
        if not await self._has_reports():
            return None
        rows = await self.store.query(
            "SELECT seq, t0, t1, digest, passed, body FROM conformity_reports "
            "WHERE node = ? AND seq = ?",
            (node, seq),
        )
        return _stored_report(rows[0]) if rows else None

    async def last_report(self, node: str, before_seq: int | None = None) -> StoredReport | None:
        """The newest conformity report of `node` (before `before_seq`)."""
        if not await self._has_reports():
            return None
        below = 2**63 - 1 if before_seq is None else before_seq
        rows = await self.store.query(
            "SELECT seq, t0, t1, digest, passed, body FROM conformity_reports "
            "WHERE node = ? AND seq < ? ORDER BY seq DESC LIMIT 1",
            (node, below),
        )
        return _stored_report(rows[0]) if rows else None

    async def _has_reports(self) -> bool:
        """False beside a file that never had the reports' table (read-only, an older node)."""
        if not self.store.read_only:
            return True
        rows = await self.store.query(
            "SELECT 1 FROM sqlite_master WHERE name = 'conformity_reports'"
        )
        return bool(rows)

    async def drop_own_after(self, seq: int) -> int | None:
        """Delete the node's own commitments after `seq` that are not on the chain (pending or
        refused), so they can be sealed again; None (nothing deleted) while one of them is in
        flight or included."""
        async with self.store.transaction() as db:
            cur = await db.execute(
                "SELECT count(*) FROM commitments WHERE own = 1 AND seq > ? AND state IN (?, ?)",
                (seq, SENT, INCLUDED),
            )
            row = await cur.fetchone()
            if row is not None and row[0]:
                return None
            cur = await db.execute(
                "DELETE FROM commitments WHERE own = 1 AND seq > ? AND state IN (?, ?)",
                (seq, PENDING, REJECTED),
            )
            # Their reports go with them: the periods are sealed again, with new reports.
            await db.execute(
                "DELETE FROM conformity_reports WHERE seq > ? AND NOT EXISTS (SELECT 1 FROM "
                "commitments c WHERE c.node = conformity_reports.node AND c.seq = "
                "conformity_reports.seq)",
                (seq,),
            )
            return cur.rowcount

    async def last_own(self) -> Entry | None:
        rows = await self.store.query(
            f"SELECT {_COLUMNS} FROM commitments WHERE own = 1 ORDER BY seq DESC LIMIT 1"
        )
        return _entry(rows[0]) if rows else None

    async def get(self, node: str, seq: int) -> Entry | None:
        rows = await self.store.query(
            f"SELECT {_COLUMNS} FROM commitments WHERE node = ? AND seq = ?", (node, seq)
        )
        return _entry(rows[0]) if rows else None

    async def covering(self, node: str, t_ms: int) -> Entry | None:
        """The commitment whose period holds `t_ms`."""
        if self.store.read_only and not await self.store.query(
            "SELECT 1 FROM sqlite_master WHERE name = 'commitments'"
        ):
            return None  # read beside a node that never had a ledger: nothing was sealed
        rows = await self.store.query(
            f"SELECT {_COLUMNS} FROM commitments WHERE node = ? AND t0 <= ? AND t1 > ?",
            (node, t_ms, t_ms),
        )
        return _entry(rows[0]) if rows else None

    async def newest_confirmed(self) -> dict[str, int]:
        """Per node, the highest seq counted confirmed."""
        rows = await self.store.query(
            "SELECT node, max(seq) FROM commitments WHERE state = ? GROUP BY node", (CONFIRMED,)
        )
        return {node: int(seq) for node, seq in rows}

    async def confirmed_after(self, node: str, seq: int) -> list[Entry]:
        """The node's commitments counted confirmed after `seq`, in seq order."""
        rows = await self.store.query(
            f"SELECT {_COLUMNS} FROM commitments WHERE node = ? AND seq > ? AND state = ? "
            "ORDER BY seq",
            (node, seq, CONFIRMED),
        )
        return [_entry(r) for r in rows]

    async def in_state(self, *states: str, own: bool | None = None) -> list[Entry]:
        marks = ",".join("?" * len(states))
        sql = f"SELECT {_COLUMNS} FROM commitments WHERE state IN ({marks})"
        params: list[Any] = list(states)
        if own is not None:
            sql += " AND own = ?"
            params.append(int(own))
        rows = await self.store.query(sql + " ORDER BY own DESC, node, seq", params)
        return [_entry(r) for r in rows]

    async def update(self, keys: list[tuple[str, int]], state: str, **fields: Any) -> None:
        """Set the state (and optionally tx_hash, block_number, block_hash, note)."""
        if not keys:
            return
        sets = ", ".join(["state = ?"] + [f"{k} = ?" for k in fields])
        values = [state, *fields.values()]
        async with self.store.transaction() as db:
            await db.executemany(
                f"UPDATE commitments SET {sets} WHERE node = ? AND seq = ?",
                [(*values, node, seq) for node, seq in keys],
            )

    async def summary(self, node: str) -> dict[str, Any]:
        """Own commitments by state, and the last sealed and confirmed seq."""
        rows = await self.store.query(
            "SELECT state, count(*), max(seq) FROM commitments WHERE node = ? GROUP BY state",
            (node,),
        )
        by_state = {state: n for state, n, _ in rows}
        top = {state: s for state, _, s in rows}
        return {
            "sealed_seq": max((s for s in top.values() if s is not None), default=0),
            "confirmed_seq": top.get(CONFIRMED, 0) or 0,
            "backlog": sum(n for st, n in by_state.items() if st in (PENDING, SENT, INCLUDED)),
            "by_state": by_state,
        }


def _stored_report(row: tuple[Any, ...]) -> StoredReport:
    seq, t0, t1, digest, passed, body = row
    return StoredReport(seq, t0, t1, bytes(digest), bool(passed), str(body))


def rules_hash(rules: list[Any], derived: dict[str, str]) -> bytes:
    """The hash of the rules that ran: anyone holding the same rules can recompute it."""
    canonical = json.dumps(
        {"derived": derived, "rules": [r.model_dump(mode="json") for r in rules]},
        sort_keys=True,
        separators=(",", ":"),
    )
    return keccak(canonical.encode())


@dataclass(frozen=True)
class ChainHead:
    """The last commitment of this node the chain holds: where sealing resumes when the
    outbox knows less (a database moved aside, a node restored from its key alone)."""

    seq: int
    t1: int
    commitment_hash: bytes


#: this many flagged counter readings in a row before a good one mean a confirmed new level (the
#: ingest checks accept a new level after agreeing readings); a single flagged spike between two
#: good readings does not break the chain, so the energy across it still counts
REBASE_RUN = 2


class Sealer:
    """Seals every complete period of the buffer into a signed commitment, in order.

    Its seq is the node's own counter: it never skips one. Periods without readings are simply
    not sealed (the next commitment's `t0` is later than the last one's `t1`), so the chain of
    seqs and prevHashes has no holes for a relay to wait on.
    """

    def __init__(
        self,
        store: Store,
        outbox: Outbox,
        account: LocalAccount | None = None,
        *,
        node: str | None = None,
        period_s: int,
        delay_s: float,
        import_channel: str | None,
        export_channel: str | None,
        rules_hash: bytes,
        clock: Clock,
        capacity_w: int = DEFAULT_CAPACITY_W,
        conformity: ConformitySpec | None = None,
        salted: bool = False,
    ) -> None:
        self.store = store
        #: build each period's tree over salted leaves (`merkle.salt_packed`), with the secret
        #: the node key gives; what the node runs (a period sealed before its key is unlocked
        #: is not salted, and `proofs.period_tree` proves either kind)
        self.salted = salted
        self.outbox = outbox
        #: the key commitments are signed with; the ledger may set it after the node is up
        #: (decrypting it loads eth-account: slow, and not needed to start sampling)
        self.account = account
        address = account.address if account is not None else node
        if address is None:
            raise ValueError("a Sealer needs the node's account or its address")
        self.node = address
        self._node_bytes = bytes.fromhex(address[2:])
        self.period_ms = period_s * 1000
        self.delay_ms = int(delay_s * 1000)
        self.import_channel = import_channel
        self.export_channel = export_channel
        self.rules_hash = rules_hash
        self.clock = clock
        #: no period total claims more than this power over the period
        self.capacity_w = capacity_w
        #: what each period's conformity report checks; None: periods are sealed without one
        #: (their trees then hold the readings alone)
        self.conformity = conformity
        #: the chain's head for this node, once known (see `ChainHead`)
        self.chain_head: ChainHead | None = None
        self._resumed_from_chain = False
        #: end (ms) of the last sealed period: readings stamped before it are late
        self.sealed_until_ms: int | None = None
        self.late_readings = 0
        #: end (ms) of the period being sealed: the loop runs meanwhile, and a reading of that
        #: period committed now is most likely not in the rows already being read
        self._sealing_until_ms: int | None = None
        self._late_logged_at: float | None = None
        self._late_unlogged = 0
        #: held while sealing, and while commitments the chain refused are dropped
        self.lock = asyncio.Lock()
        self.log = get_logger("ledger")

    async def load(self) -> None:
        """Read where sealing stands from the outbox (so `sealed_until_ms` is known early)."""
        last = await self.outbox.last_own()
        if last is not None:
            self.sealed_until_ms = max(self.sealed_until_ms or 0, last.commitment.t1)

    def count_late(self, readings: Sequence[Reading]) -> None:
        """Count readings made durable with a time inside an already sealed period.

        A sealed period is never reopened: such readings stay in the buffer, out of every
        commitment, and are counted (`ledger.late_readings`) and logged here.
        """
        until = max(self.sealed_until_ms or 0, self._sealing_until_ms or 0) or None
        if until is None or not readings:
            return
        late = sum(1 for r in readings if r.t_ms < until)
        if not late:
            return
        self.late_readings += late
        self._late_unlogged += late
        self.store.add_counter("ledger.late_readings", late)
        now = self.clock.now()
        if self._late_logged_at is None or now - self._late_logged_at >= LATE_LOG_EVERY_S:
            first = self._late_logged_at is None
            (self.log.warning if first else self.log.info)(
                "readings stamped inside sealed periods; kept out of the commitments",
                late=self._late_unlogged,
                late_total=self.late_readings,
                sealed_until_ms=until,
            )
            self._late_logged_at = now
            self._late_unlogged = 0

    async def seal_due(self, chain_id: int, contract: str) -> list[tuple[Commitment, bytes]]:
        """Seal each period that ended at least `delay_s` ago and holds readings; return the
        new commitments with their signatures."""
        async with self.lock:
            return await self._seal_due(chain_id, contract)

    async def _seal_due(self, chain_id: int, contract: str) -> list[tuple[Commitment, bytes]]:
        sealed = []
        horizon = self.clock.now_ms() - self.delay_ms
        # Everything published before now is in the database before a period is read.
        await self.store.flush()
        last = await self.outbox.last_own()
        seq = last.commitment.seq if last else 0
        prev_hash = last.commitment.struct_hash() if last else ZERO32
        after = last.commitment.t1 if last else 0
        head = self.chain_head
        if head is not None and head.seq > seq:
            # The chain is ahead of the outbox: it lost commitments the chain has. Resuming
            # from the outbox would sign seqs the chain already holds, refused forever.
            if not self._resumed_from_chain:
                self._resumed_from_chain = True
                self.log.warning(
                    "outbox behind the chain; sealing resumes from the chain's head",
                    outbox_seq=seq,
                    chain_seq=head.seq,
                )
            seq, prev_hash, after = head.seq, head.commitment_hash, max(after, head.t1)
        if after:
            self.sealed_until_ms = max(self.sealed_until_ms or 0, after)
        while True:
            rows = await self.store.query(
                "SELECT min(t_ms) FROM readings WHERE t_ms >= ?", (after,)
            )
            first = rows[0][0]
            if first is None:
                break
            start = first // self.period_ms * self.period_ms
            t0, t1 = max(after, start), start + self.period_ms
            if t1 > horizon:
                break
            self._sealing_until_ms = t1
            try:
                commitment, report = await self._seal_period(seq + 1, t0, t1, prev_hash)
                assert self.account is not None, "the node key is not unlocked yet"
                signature = await asyncio.to_thread(
                    sign, commitment, self.account.key, chain_id, contract
                )
                await self.outbox.add(
                    commitment, signature, own=True, sealed_ms=self.clock.now_ms(), report=report
                )
            except BaseException:
                self._sealing_until_ms = None  # the period stays open: sealed on the next round
                raise
            self.store.set_counter("ledger.sealed_seq", commitment.seq)
            self.log.info(
                "period sealed",
                seq=commitment.seq,
                t0=t0,
                t1=t1,
                readings=commitment.count,
                export_wh=commitment.export_wh,
                **({} if report is None else {"conformity": "pass" if report.passed else "fail"}),
            )
            sealed.append((commitment, signature))
            seq, prev_hash, after = commitment.seq, commitment.struct_hash(), t1
            self.sealed_until_ms = max(self.sealed_until_ms or 0, t1)
            self._sealing_until_ms = None
        return sealed

    async def _commitment(self, seq: int, t0: int, t1: int, prev_hash: bytes) -> Commitment:
        """The period's commitment (unsigned)."""
        return (await self._seal_period(seq, t0, t1, prev_hash))[0]

    async def _seal_period(
        self, seq: int, t0: int, t1: int, prev_hash: bytes
    ) -> tuple[Commitment, StoredReport | None]:
        """The period's commitment (unsigned) and, with `conformity` set, its report, whose
        digest is one more leaf of the tree (see daisee_node/conformity.py)."""
        turns = LoopTurns(asyncio.get_running_loop())
        node = self._node_bytes
        spec = self.conformity
        secret = None
        if self.salted and self.account is not None:
            secret = merkle.salt_secret(bytes(self.account.key))

        def salt(packed: bytes) -> bytes:
            return packed if secret is None else merkle.salt_packed(packed, secret, turns)

        context = None if spec is None else await self._report_context(seq, t0, t1)
        checks: list[PeriodCheck] = []

        def tree(chunks: Iterable[Sequence[tuple[Any, ...]]]) -> tuple[bytes, int]:
            if spec is None or context is None:
                packed = salt(packed_leaves(node, chunks, turns))
                return merkle.packed_root(packed, turns), len(packed) // 32
            from daisee_node.conformity import PeriodCheck

            # A fresh check on every attempt: a read that failed half-way starts over.
            check = PeriodCheck(spec, context, turns)
            checks[:] = [check]
            packed = packed_leaves(node, check.observe(chunks), turns, extra=check.leaf_entry)
            return merkle.packed_root(salt(packed), turns), len(packed) // 32 - 1

        tree_root, count = await self._in_worker(PERIOD_ROWS_SQL, (t0, t1), tree, turns)
        report = None
        if checks:
            from daisee_node.conformity import canonical

            check = checks[0]
            report = StoredReport(
                seq,
                t0,
                t1,
                check.digest(),
                bool(check.report()["passed"]),
                canonical(check.report()).decode(),
            )
        commitment = Commitment(
            node=self.node,
            seq=seq,
            t0=t0,
            t1=t1,
            root=tree_root,
            count=count,
            import_wh=await self._energy(self.import_channel, t0, t1, seq, turns),
            export_wh=await self._energy(self.export_channel, t0, t1, seq, turns),
            prev_hash=prev_hash,
            rules_hash=self.rules_hash,
        )
        return commitment, report

    async def _report_context(self, seq: int, t0: int, t1: int) -> PeriodContext:
        """What the report needs besides the period's readings (small queries, on the loop)."""
        from daisee_node.conformity import PeriodContext

        assert self.conformity is not None
        store = self.store
        classes = dict(await store.query("SELECT name, state_class FROM channels"))
        recent = await store.query(
            "SELECT c.name FROM latest l JOIN channels c ON c.id = l.channel_id WHERE l.t_ms >= ?",
            (t0 - self.conformity.expect_lookback_ms,),
        )
        top = await store.query("SELECT coalesce(max(id), 0) FROM events")
        events_upto = int(top[0][0])
        late = await store.query("SELECT value FROM counters WHERE name = ?", (LATE_COUNTER,))
        late_total = int(late[0][0]) if late else 0
        previous = await self.outbox.last_report(self.node, seq)
        cursor = previous.report().get("cursor", {}) if previous is not None else None
        if cursor is not None:
            steps = await store.query(
                "SELECT id, t_ms, reason FROM events WHERE kind = 'clock' AND id > ? AND id <= ? "
                "ORDER BY id",
                (int(cursor.get("events_upto", 0)), events_upto),
            )
        else:
            # The first report: the steps noticed from the period's start on.
            steps = await store.query(
                "SELECT id, t_ms, reason FROM events WHERE kind = 'clock' AND id <= ? "
                "AND t_ms >= ? ORDER BY id",
                (events_upto, t0),
            )
        return PeriodContext(
            node=self.node,
            seq=seq,
            t0=t0,
            t1=t1,
            state_classes={str(k): str(v) for k, v in classes.items()},
            recent=frozenset(str(n) for (n,) in recent),
            clock_steps=[(int(i), int(t), str(r)) for i, t, r in steps],
            events_upto=events_upto,
            late_total=late_total,
            late_before=None if cursor is None else int(cursor.get("late_total", 0)),
            import_channel=self.import_channel,
            export_channel=self.export_channel,
        )

    async def _in_worker(
        self,
        sql: str,
        params: tuple[Any, ...],
        consume: Callable[[Iterable[Sequence[tuple[Any, ...]]]], T],
        turns: Callable[[], None],
    ) -> T:
        """`consume` the rows of a read query, chunk by chunk, in a worker thread.

        The rows are read there too, on a read-only connection of its own: the node's database
        is in WAL mode, so it sees everything committed and blocks no writer, and no row is
        ever held on the event loop. When that connection cannot read (the store holds the
        file exclusively after a full disk, or there is no file), the rows come through the
        store's connection instead.
        """
        path = self.store.path
        try:
            return await asyncio.to_thread(lambda: consume(stream_rows(path, sql, params, turns)))
        except (sqlite3.Error, StoreError) as exc:
            self.log.debug("reading through the store", error=str(exc)[:200])
        rows = RowsHandoff(await self.store.query(sql, params))
        return await asyncio.to_thread(lambda: consume(rows.take_chunks()))

    async def _energy(
        self, channel: str | None, t0: int, t1: int, seq: int, turns: Callable[[], None]
    ) -> int:
        """Whole Wh a cumulative counter advanced over the period, capped at what the node's
        capacity can carry in that time.

        Only GOOD readings count (implausible steps, backward counters, late or failed reads
        are flagged at ingest): the total is the sum of the positive steps between consecutive
        good readings, from the last good reading before the period. Steps are taken between
        whole Wh, so rounding carries over from period to period.
        """
        if channel is None:
            return 0
        good = int(Quality.GOOD)
        # Flagged counter readings come along so that a re-based counter (a new level that
        # several reads confirmed) breaks the chain of steps instead of counting as energy.
        qualities = (good, int(Quality.COUNTER_BACKWARDS), int(Quality.IMPLAUSIBLE_STEP))
        marks = ",".join("?" * len(qualities))
        base = await self.store.query(
            "SELECT r.value, r.quality FROM readings r JOIN channels c ON c.id = r.channel_id "
            "WHERE c.name = ? AND r.quality = ? AND r.t_ms >= ? AND r.t_ms < ? "
            "ORDER BY r.t_ms DESC LIMIT 1",
            (channel, good, t0 - BASELINE_LOOKBACK_MS, t0),
        )
        total = await self._in_worker(
            "SELECT r.value, r.quality FROM readings r JOIN channels c ON c.id = r.channel_id "
            f"WHERE c.name = ? AND r.quality IN ({marks}) AND r.t_ms >= ? AND r.t_ms < ? "
            "ORDER BY r.t_ms",
            (channel, *qualities, t0, t1),
            lambda chunks: counter_total(base, chunks, turns),
            turns,
        )
        cap = capacity_wh(self.capacity_w, t0, t1)
        if total > cap:
            self.store.add_counter("ledger.capped_totals", 1)
            self.log.warning(
                "period total above the node's capacity; capped",
                channel=channel,
                seq=seq,
                total_wh=total,
                capped_wh=cap,
                capacity_w=self.capacity_w,
            )
            return cap
        return total


class RowsHandoff:
    """Query rows on their way to a worker thread, which takes them out.

    The last reference to the rows then dies in that thread: freeing hundreds of thousands of
    row tuples costs milliseconds, which must not be spent on the event loop either.
    """

    __slots__ = ("_rows",)

    def __init__(self, rows: list[tuple[Any, ...]]) -> None:
        self._rows = rows

    def take_chunks(self, size: int = ROWS_PER_FETCH) -> Iterator[list[tuple[Any, ...]]]:
        rows, self._rows = self._rows, []
        for start in range(0, len(rows), size):
            yield rows[start : start + size]


class LoopTurns:
    """Called often from a worker thread: at least every `every_s`, it waits until the event
    loop has run what was ready.

    A busy thread keeps the GIL until the interpreter forces a switch (`sys.getswitchinterval()`,
    5 ms), so every wake-up of the loop could wait that long. Handing the turn over explicitly
    bounds that wait by `every_s`.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, every_s: float = TURN_EVERY_S) -> None:
        self._loop = loop
        self._every_s = every_s
        self._turn = threading.Event()
        self._since = time.perf_counter()
        #: turns handed to the loop so far
        self.turns = 0

    def __call__(self) -> None:
        if time.perf_counter() - self._since < self._every_s:
            return
        self._turn.clear()
        try:
            self._loop.call_soon_threadsafe(self._turn.set)
        except RuntimeError:  # the loop is closed: nobody to make way for
            return
        self._turn.wait(TURN_WAIT_MAX_S)
        self.turns += 1
        self._since = time.perf_counter()


def stream_rows(
    path: Path, sql: str, params: tuple[Any, ...], pause: Callable[[], None] = merkle.no_pause
) -> Iterator[list[tuple[Any, ...]]]:
    """The rows of a read query on a read-only connection of its own, a chunk at a time
    (blocking: iterate it in a thread)."""
    if not Path(f"{path}-wal").exists():
        # Without a WAL file the read-only connection would open the file as immutable, which
        # is only right when no writer has it open.
        raise StoreError(f"{path} has no WAL file")
    conn = connect_readonly(path, timeout=READ_TIMEOUT_S)
    try:
        cur = conn.execute(sql, params)
        while chunk := cur.fetchmany(ROWS_PER_FETCH):
            yield chunk
            pause()
    finally:
        conn.close()


def counter_total(
    base: list[tuple[Any, ...]],
    chunks: Iterable[Sequence[tuple[Any, ...]]],
    pause: Callable[[], None] = merkle.no_pause,
) -> int:
    """Whole Wh a counter advanced over its (value, quality) rows, in time order, after the
    `base` row (see `Sealer._energy`). Only a step ending at a good row of the period counts,
    so a period without one totals 0."""
    good = int(Quality.GOOD)
    total = 0
    prev: int | None = None
    flagged_run = 0
    for chunk in itertools.chain([base], chunks):
        for value, quality in chunk:
            if quality != good:
                flagged_run += 1
                continue
            if flagged_run >= REBASE_RUN:
                prev = None  # the counter moved to a new level: that step is not energy
            flagged_run = 0
            if not math.isfinite(value):
                continue
            whole = math.floor(value)
            if prev is not None and whole > prev:
                total += whole - prev
            prev = whole
        pause()
    return total


#: (t_ms, channel id, value_micro, quality) of a leaf that is not a stored reading
Keyed = tuple[int, bytes, int, int]


def period_leaves(
    node: bytes,
    rows: Sequence[tuple[Any, ...]],
    pause: Callable[[], None] = merkle.no_pause,
    extra: Keyed | None = None,
) -> list[bytes]:
    """Leaves of (t_ms, channel name, value, quality) rows in any order, in the ledger's;
    `extra`: one more leaf, the period's conformity report (at the period's last ms)."""
    ordered = sorted(rows, key=_row_time)  # stable, and quick for rows already in time order
    chunks = (ordered[i : i + ROWS_PER_FETCH] for i in range(0, len(ordered), ROWS_PER_FETCH))
    packed = packed_leaves(node, chunks, pause, None if extra is None else lambda: extra)
    return [packed[i : i + 32] for i in range(0, len(packed), 32)]


def _row_time(row: tuple[Any, ...]) -> Any:
    return row[0]


def packed_leaves(
    node: bytes,
    chunks: Iterable[Sequence[tuple[Any, ...]]],
    pause: Callable[[], None] = merkle.no_pause,
    extra: Callable[[], Keyed] | None = None,
) -> bytes:
    """Leaves of (t_ms, channel name, value, quality) rows that come in time order, a chunk at
    a time, in the ledger's order, end to end (32 bytes each); `pause` is called every
    `LEAVES_PER_PAUSE` leaves. `extra`, called once every row has gone by, gives one more leaf
    no earlier than the last row (the conformity report's): it takes its place in that order.

    Only the readings of one time need sorting among themselves (by channel id), so no row
    outlives its chunk by much, and the leaves sit in one flat buffer: a whole period held as
    row tuples or a list of hashes would make the garbage collector walk them all at every
    collection, holding the GIL for milliseconds.
    """
    leaves = bytearray()
    carry: list[tuple[Any, ...]] = []  # rows of the newest time so far: it may go on
    done_t: int | None = None  # every row up to this time has its leaf
    for chunk in chunks:
        if not chunk:
            continue
        rows = carry + list(chunk)
        cut = len(rows)
        while cut and rows[cut - 1][0] == rows[-1][0]:
            cut -= 1
        carry = rows[cut:]
        if cut:
            done_t = _add_leaves(node, rows[:cut], leaves, pause, done_t)
    more = extra() if extra is not None else None
    if carry or more is not None:
        _add_leaves(node, carry, leaves, pause, done_t, more)
    return bytes(leaves)


def _add_leaves(
    node: bytes,
    rows: Sequence[tuple[Any, ...]],
    leaves: bytearray,
    pause: Callable[[], None],
    after: int | None,
    extra: Keyed | None = None,
) -> int:
    """Append the leaves of `rows`, which hold every reading of their times, all later than
    `after` (and of `extra`, no earlier than them); return their latest time."""
    keyed = sorted((t, merkle.channel_id(name), value, q) for t, name, value, q in rows)
    if keyed and after is not None and keyed[0][0] <= after:
        raise ValueError("rows are not in time order")
    at = len(keyed)
    if extra is not None:
        if (keyed and extra[0] < keyed[-1][0]) or (after is not None and extra[0] <= after):
            raise ValueError("the extra leaf comes before the period's last reading")
        at = next((i for i, k in enumerate(keyed) if k[:2] > extra[:2]), len(keyed))
    for start in range(0, len(keyed), LEAVES_PER_PAUSE):
        for i, (t, cid, value, q) in enumerate(keyed[start : start + LEAVES_PER_PAUSE], start):
            if i == at and extra is not None:
                leaves += merkle.reading_leaf(node, extra[1], extra[0], extra[2], extra[3])
            leaves += merkle.reading_leaf(node, cid, t, merkle.value_micro(value), q)
        pause()
    if extra is not None and at == len(keyed):
        leaves += merkle.reading_leaf(node, extra[1], extra[0], extra[2], extra[3])
        return int(extra[0])
    return int(keyed[-1][0])
