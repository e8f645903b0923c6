"""The ledger's outbox in the node's SQLite database, and the sealing of periods into it.

Sealing reads the period's readings from the buffer, builds the Merkle tree, signs the commitment
and stores it, all before anything talks to the chain: with the chain away for hours, every
period is still sealed in order, and the submitter sends them when it returns.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from eth_account.signers.local import LocalAccount
from eth_hash.auto import keccak

from daisee_node.clock import Clock
from daisee_node.ledger import merkle
from daisee_node.ledger.commitment import Commitment, sign
from daisee_node.logs import get_logger
from daisee_node.readings import Quality
from daisee_node.store import Store

ZERO32 = b"\x00" * 32
SEALED_UNTIL_KEY = "ledger_sealed_until_ms"

# pending → sent → included → confirmed; a reorg sends included ones back to pending.
PENDING, SENT, INCLUDED, CONFIRMED, REJECTED = (
    "pending",
    "sent",
    "included",
    "confirmed",
    "rejected",
)


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

    async def add(
        self, commitment: Commitment, signature: bytes, *, own: bool, sealed_ms: int
    ) -> bool:
        """Store a signed commitment; False when (node, seq) is already there."""
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
        return added

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
        rows = await self.store.query(
            f"SELECT {_COLUMNS} FROM commitments WHERE node = ? AND t0 <= ? AND t1 > ?",
            (node, t_ms, t_ms),
        )
        return _entry(rows[0]) if rows else None

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


def rules_hash(rules: list[Any], derived: dict[str, str]) -> bytes:
    """The hash of the rules that ran: anyone holding the same rules can recompute it."""
    canonical = json.dumps(
        {"derived": derived, "rules": [r.model_dump(mode="json") for r in rules]},
        sort_keys=True,
        separators=(",", ":"),
    )
    return keccak(canonical.encode())


class Sealer:
    """Seals every complete period of the buffer into a signed commitment, in order."""

    def __init__(
        self,
        store: Store,
        outbox: Outbox,
        account: LocalAccount,
        *,
        period_s: int,
        delay_s: float,
        import_channel: str | None,
        export_channel: str | None,
        rules_hash: bytes,
        clock: Clock,
    ) -> None:
        self.store = store
        self.outbox = outbox
        self.account = account
        self.node = account.address
        self._node_bytes = bytes.fromhex(account.address[2:])
        self.period_ms = period_s * 1000
        self.delay_ms = int(delay_s * 1000)
        self.import_channel = import_channel
        self.export_channel = export_channel
        self.rules_hash = rules_hash
        self.clock = clock
        self.log = get_logger("ledger")

    async def seal_due(self, chain_id: int, contract: str) -> list[tuple[Commitment, bytes]]:
        """Seal each period that ended at least `delay_s` ago and holds readings; return the
        new commitments with their signatures."""
        sealed = []
        horizon = self.clock.now_ms() - self.delay_ms
        # Everything published before now is in the database before a period is read.
        await self.store.flush()
        last = await self.outbox.last_own()
        seq = last.commitment.seq if last else 0
        prev_hash = last.commitment.struct_hash() if last else ZERO32
        after = last.commitment.t1 if last else 0
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
            commitment = await self._commitment(seq + 1, t0, t1, prev_hash)
            signature = sign(commitment, self.account.key, chain_id, contract)
            await self.outbox.add(commitment, signature, own=True, sealed_ms=self.clock.now_ms())
            self.store.set_counter("ledger.sealed_seq", commitment.seq)
            self.log.info(
                "period sealed",
                seq=commitment.seq,
                t0=t0,
                t1=t1,
                readings=commitment.count,
                export_wh=commitment.export_wh,
            )
            sealed.append((commitment, signature))
            seq, prev_hash, after = commitment.seq, commitment.struct_hash(), t1
        return sealed

    async def _commitment(self, seq: int, t0: int, t1: int, prev_hash: bytes) -> Commitment:
        rows = await self.store.query(
            "SELECT r.t_ms, c.name, r.value, r.quality FROM readings r "
            "JOIN channels c ON c.id = r.channel_id WHERE r.t_ms >= ? AND r.t_ms < ?",
            (t0, t1),
        )
        leaves = period_leaves(self._node_bytes, rows)
        return Commitment(
            node=self.node,
            seq=seq,
            t0=t0,
            t1=t1,
            root=merkle.root(leaves),
            count=len(leaves),
            import_wh=await self._energy(self.import_channel, t0, t1),
            export_wh=await self._energy(self.export_channel, t0, t1),
            prev_hash=prev_hash,
            rules_hash=self.rules_hash,
        )

    async def _energy(self, channel: str | None, t0: int, t1: int) -> int:
        """Whole Wh a cumulative counter advanced over the period (rounding carries over)."""
        if channel is None:
            return 0
        sql = (
            "SELECT r.value FROM readings r JOIN channels c ON c.id = r.channel_id "
            "WHERE c.name = ? AND r.quality = ? AND r.t_ms >= ? AND r.t_ms < ? "
            "ORDER BY r.t_ms {} LIMIT 1"
        )
        good = int(Quality.GOOD)
        end = await self.store.query(sql.format("DESC"), (channel, good, t0, t1))
        if not end:
            return 0
        # The baseline is the last good value before the period (a day back at most).
        start = await self.store.query(sql.format("DESC"), (channel, good, t0 - 86_400_000, t0))
        if not start:
            start = await self.store.query(sql.format("ASC"), (channel, good, t0, t1))
        delta = math.floor(end[0][0]) - math.floor(start[0][0])
        return max(0, delta)


def period_leaves(node: bytes, rows: list[tuple[Any, ...]]) -> list[bytes]:
    """Leaves of (t_ms, channel name, value, quality) rows, in the ledger's order."""
    keyed = sorted((t, merkle.channel_id(name), value, q) for t, name, value, q in rows)
    return [
        merkle.reading_leaf(node, cid, t, merkle.value_micro(value), q)
        for t, cid, value, q in keyed
    ]
