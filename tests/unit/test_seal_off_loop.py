"""Sealing a big period leaves the event loop running, and commits to the same root as the
straightforward computation, whichever way the rows are read."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from eth_account import Account

from daisee_node.ledger import merkle, outbox
from daisee_node.ledger.commitment import Commitment
from daisee_node.ledger.outbox import Outbox, Sealer
from daisee_node.readings import Reading
from daisee_node.store import Retention, Store, StoreError
from tests.support.clocks import FixedClock

PERIOD_MS = 900_000
T0 = 1_781_000_000_000 // PERIOD_MS * PERIOD_MS
CHANNELS = ["a.power_w", "b.power_w", "c.power_w", "grid.export_wh"]
PER_CHANNEL = 6_000
READINGS = PER_CHANNEL * len(CHANNELS)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    """A store holding one period of readings; channels often share a time stamp."""
    s = Store(
        tmp_path / "node.db",
        clock=FixedClock(T0 + PERIOD_MS + 20_000),
        retention=Retention(
            flush_interval_s=0.01, maintenance_interval_s=3600, max_pending=READINGS + 1
        ),
    )
    await s.open()
    writer = asyncio.create_task(s.run())
    step = PERIOD_MS // PER_CHANNEL
    for i, name in enumerate(CHANNELS):
        s.put_many([Reading(name, T0 + k * step, k * 0.5 + i / 7) for k in range(PER_CHANNEL)])
    await s.flush()
    yield s
    s.stop()
    await writer
    await s.close()


def sealer_for(store: Store) -> Sealer:
    return Sealer(
        store,
        Outbox(store),
        Account.create(),
        period_s=PERIOD_MS // 1000,
        delay_s=10,
        import_channel=None,
        export_channel="grid.export_wh",
        rules_hash=b"\0" * 32,
        clock=store.clock,
    )


def straightforward_root(db: Path, node: str) -> bytes:
    """Every leaf of the period computed at once, sorted, and the tree built level by level."""
    conn = sqlite3.connect(db)
    try:
        rows = conn.execute(
            "SELECT r.t_ms, c.name, r.value, r.quality FROM readings r "
            "JOIN channels c ON c.id = r.channel_id WHERE c.name != 'test.tick'"
        ).fetchall()
    finally:
        conn.close()
    node_bytes = bytes.fromhex(node[2:])
    keyed = sorted((t, merkle.channel_id(name), v, q) for t, name, v, q in rows)
    leaves = [
        merkle.reading_leaf(node_bytes, cid, t, merkle.value_micro(v), q) for t, cid, v, q in keyed
    ]
    return merkle.levels(leaves)[-1][0]


async def seal_one(sealer: Sealer) -> Commitment:
    sealed = await sealer.seal_due(1, "0x" + "11" * 20)
    assert len(sealed) == 1
    return sealed[0][0]


async def test_the_loop_keeps_running_while_a_big_period_is_hashed(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A task on the loop sees the leaves and the tree half done: the hashing does not hold
    the loop from its first leaf to its last."""
    done = {"leaves": 0, "pairs": 0}
    reading_leaf, hash_pair = merkle.reading_leaf, merkle.hash_pair

    def counted_leaf(*args: object) -> bytes:
        done["leaves"] += 1
        return reading_leaf(*args)  # type: ignore[arg-type]

    def counted_pair(a: bytes, b: bytes) -> bytes:
        done["pairs"] += 1
        return hash_pair(a, b)

    monkeypatch.setattr(merkle, "reading_leaf", counted_leaf)
    monkeypatch.setattr(merkle, "hash_pair", counted_pair)
    seen: list[tuple[int, int]] = []
    sealing = True

    async def probe() -> None:
        while sealing:
            seen.append((done["leaves"], done["pairs"]))
            await asyncio.sleep(0.001)

    sealer = sealer_for(store)
    task = asyncio.create_task(probe())
    try:
        commitment = await seal_one(sealer)
    finally:
        sealing = False
        await task
    assert commitment.count == READINGS
    assert done["leaves"] == READINGS and done["pairs"] == READINGS - 1
    assert any(0 < leaves < READINGS for leaves, _ in seen), "no tick while leaves were made"
    assert any(0 < pairs < READINGS - 1 for _, pairs in seen), "no tick while the tree grew"
    monkeypatch.undo()
    assert commitment.root == straightforward_root(store.path, sealer.node)


async def test_without_a_connection_of_its_own_the_rows_come_through_the_store(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store holding its file exclusively (after a full disk) cannot be read beside it: the
    sealer then reads through the store and commits to the same root and totals."""
    sealer = sealer_for(store)
    own = await sealer._commitment(1, T0, T0 + PERIOD_MS, b"\0" * 32)
    refused: list[Path] = []

    def locked(path: Path, timeout: float = 5.0) -> sqlite3.Connection:
        refused.append(path)
        raise StoreError(f"cannot read {path}: database is locked")

    monkeypatch.setattr(outbox, "connect_readonly", locked)
    through_store = await sealer._commitment(1, T0, T0 + PERIOD_MS, b"\0" * 32)
    assert refused  # the second one did read through the store
    assert through_store == own
    assert own.count == READINGS and own.export_wh > 0
    assert own.root == straightforward_root(store.path, sealer.node)


async def test_a_reading_of_the_period_committed_while_it_is_sealed_is_counted_late(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loop runs while a period is sealed: a reading of that period arriving then is not
    in the commitment, and is counted as late like any reading of a sealed period."""
    done = {"leaves": 0}
    reading_leaf = merkle.reading_leaf

    def counted_leaf(*args: object) -> bytes:
        done["leaves"] += 1
        return reading_leaf(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(merkle, "reading_leaf", counted_leaf)
    injected = asyncio.Event()
    sealing = True

    async def late_meter() -> None:
        while sealing and not injected.is_set():
            if 0 < done["leaves"] < READINGS:
                store.put(Reading("a.power_w", T0 + 1, 42.0))
                await store.flush()
                injected.set()
            await asyncio.sleep(0.001)

    sealer = sealer_for(store)
    store.on_commit.append(sealer.count_late)
    task = asyncio.create_task(late_meter())
    try:
        commitment = await seal_one(sealer)
    finally:
        sealing = False
        await task
    assert injected.is_set()
    assert commitment.count == READINGS
    assert sealer.late_readings == 1
