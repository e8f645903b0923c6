"""The ledger against broken meters, out-of-order relays, lost outboxes and a flaky RPC link:
the contract on py-evm, the sealer on a real SQLite store."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import requests
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_hash.auto import keccak
from web3.middleware.base import Web3Middleware

from daisee_node.clock import Clock
from daisee_node.ledger import chain
from daisee_node.ledger.commitment import Commitment, sign
from daisee_node.ledger.keys import load_account, new_keystore
from daisee_node.ledger.outbox import Outbox, Sealer
from daisee_node.ledger.service import LedgerService
from daisee_node.ledger.settings import ChainSection
from daisee_node.readings import Quality, Reading
from daisee_node.store import Retention, Store
from tests.support.clocks import FixedClock
from tests.unit.test_ledger_node import start_node, until

PERIOD_MS = 900_000
T0 = 1_781_000_000_000 // PERIOD_MS * PERIOD_MS  # a period boundary in 2026
ZERO = b"\0" * 32
EXPORT = "grid.export_wh"


# -- the contract --------------------------------------------------------------------------


@pytest.fixture
def env() -> tuple[Any, LocalAccount, chain.Ledger, LocalAccount]:
    w3 = chain.connect(chain.EMBEDDED)
    gov = Account.from_key(chain.TESTER_KEYS[0])
    ledger = chain.Ledger(w3, chain.deploy(w3, gov, None, 1000))
    node = Account.create()
    ledger.set_node(gov, node.address, capacity_w=36_000)
    return w3, gov, ledger, node


def period(
    node: LocalAccount, seq: int, prev: bytes, *, import_wh: int = 0, export_wh: int = 0
) -> Commitment:
    """The node's commitment of the seq-th 15-minute period from T0."""
    t0 = T0 + (seq - 1) * PERIOD_MS
    return Commitment(
        node.address, seq, t0, t0 + PERIOD_MS, keccak(b"root"), 1, import_wh, export_wh, prev,
        keccak(b"rules"),
    )  # fmt: skip


def submit(w3: Any, ledger: chain.Ledger, node: LocalAccount, *cs: Commitment) -> Any:
    sender = Account.from_key(chain.TESTER_KEYS[1])
    items = [(c, sign(c, node.key, ledger.chain_id, ledger.address)) for c in cs]
    receipt = chain.send(w3, sender, {"to": ledger.address, "data": ledger.batch_data(items)})
    return ledger.outcome(receipt)


def test_the_contract_refuses_totals_beyond_the_node_capacity(env) -> None:
    w3, gov, ledger, node = env
    credit = ledger.credit().functions
    assert ledger.head(node.address).capacity_w == 36_000
    # 36 kW over 15 minutes is 9,000 Wh: one more is refused, export or import
    over = period(node, 1, ZERO, export_wh=9_001)
    ok, rejected = submit(w3, ledger, node, over, period(node, 1, ZERO, import_wh=9_001))
    assert ok == [] and [r[2] for r in rejected] == ["totals exceed the node's capacity"] * 2
    assert ledger.head(node.address).seq == 0
    assert credit.totalSupply().call() == 0
    # the corrupt SDM120 read of the field report: refused, nothing minted
    absurd = period(node, 1, ZERO, export_wh=999_999_994_873_906)
    assert submit(w3, ledger, node, absurd)[1][0][2] == "totals exceed the node's capacity"
    assert credit.totalSupply().call() == 0

    c1 = period(node, 1, ZERO, import_wh=9_000, export_wh=9_000)
    ok, rejected = submit(w3, ledger, node, c1)
    assert [i.seq for i in ok] == [1] and rejected == []
    assert credit.balanceOf(node.address).call() == 9_000 * 10**15

    # governance lowers it: 1 kW over 15 minutes is 250 Wh
    ledger.set_capacity(gov, node.address, 1_000)
    assert ledger.head(node.address).capacity_w == 1_000
    ok, rejected = submit(w3, ledger, node, period(node, 2, c1.struct_hash(), export_wh=251))
    assert ok == [] and rejected[0][2] == "totals exceed the node's capacity"
    ok, _ = submit(w3, ledger, node, period(node, 2, c1.struct_hash(), export_wh=250))
    assert [i.seq for i in ok] == [2]
    assert credit.balanceOf(node.address).call() == 9_250 * 10**15


def test_an_early_seq_is_refused_without_any_change_then_both_commit_in_order(env) -> None:
    w3, _gov, ledger, node = env
    c1 = period(node, 1, ZERO, export_wh=10)
    c2 = period(node, 2, c1.struct_hash(), export_wh=20)
    c3 = period(node, 3, c2.struct_hash(), export_wh=30)
    submit(w3, ledger, node, c1)
    before = ledger.head(node.address)
    supply = ledger.credit().functions.totalSupply().call()

    ok, rejected = submit(w3, ledger, node, c3)  # a relay that missed seq 2
    assert ok == [] and rejected == [(node.address, 3, "seq is not the next one")]
    assert ledger.head(node.address) == before and before.follows(c1.struct_hash())
    assert ledger.credit().functions.totalSupply().call() == supply

    ok, rejected = submit(w3, ledger, node, c2, c3)
    assert rejected == [] and [i.seq for i in ok] == [2, 3]
    assert ledger.head(node.address).follows(c3.struct_hash())
    assert ledger.credit().functions.balanceOf(node.address).call() == 60 * 10**15


# -- the sealer ------------------------------------------------------------------------------


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = Store(
        tmp_path / "node.db",
        clock=FixedClock(T0),
        retention=Retention(flush_interval_s=0.01, maintenance_interval_s=3600),
    )
    await s.open()
    writer = asyncio.create_task(s.run())
    yield s
    s.stop()
    await writer
    await s.close()


def make_sealer(store: Store, clock: Clock, capacity_w: int = 36_000) -> Sealer:
    return Sealer(
        store,
        Outbox(store),
        Account.create(),
        period_s=PERIOD_MS // 1000,
        delay_s=10,
        import_channel=None,
        export_channel=EXPORT,
        rules_hash=ZERO,
        clock=clock,
        capacity_w=capacity_w,
    )


async def counter_reaches(store: Store, name: str, value: int) -> None:
    """Wait until the store's counter `name` is `value` (counters are written in batches)."""

    async def reached() -> bool:
        # Counters go with the next batch of readings: give the writer one.
        store.put(Reading("test.tick", store.clock.now_ms(), 0.0))
        await store.flush()
        rows = await store.query("SELECT value FROM counters WHERE name = ?", (name,))
        return (int(rows[0][0]) if rows else 0) == value

    await until(reached, 5)


async def seal_exports(store: Store, readings: list[Reading], periods: int) -> list[Commitment]:
    """Store the readings and seal up to the `periods`-th period from T0; the commitments of
    the periods from T0 on (a reading before T0 is a baseline, sealed in its own period)."""
    clock = FixedClock(T0 + periods * PERIOD_MS + 20_000)
    sealer = make_sealer(store, clock)
    store.put_many([Reading("grid.power_w", T0 + k * PERIOD_MS, 1.0) for k in range(periods)])
    store.put_many(readings)
    await store.flush()
    sealed = await sealer.seal_due(1, "0x" + "11" * 20)
    return [c for c, _ in sealed if c.t0 >= T0]


async def test_a_flagged_spike_as_the_last_export_read_of_a_period_is_left_out(
    store: Store,
) -> None:
    """The field report: an SDM120 answered 1e12 kWh once, as the last read of a period."""
    g, spike = Quality.GOOD, Quality.IMPLAUSIBLE_STEP
    c1, c2 = await seal_exports(
        store,
        [
            Reading(EXPORT, T0 - 1_000, 1_000.0, g),  # the baseline, before the period
            Reading(EXPORT, T0 + 300_000, 1_001.7, g),
            Reading(EXPORT, T0 + 600_000, 1_003.4, g),
            Reading(EXPORT, T0 + 899_000, 1e15, spike),  # 1e12 kWh
            Reading(EXPORT, T0 + 900_500, float("nan"), Quality.SOURCE_ERROR),
            Reading(EXPORT, T0 + 901_000, 1_004.1, g),
            Reading(EXPORT, T0 + 1_500_000, 1_005.9, g),
        ],
        periods=2,
    )
    assert (c1.export_wh, c2.export_wh) == (3, 2)  # whole Wh: 1003 − 1000, then 1005 − 1003


async def test_export_sums_the_positive_steps_between_good_reads_across_a_meter_swap(
    store: Store,
) -> None:
    """A replaced meter restarts low: its first read is flagged backwards, the next ones are
    good again; the period's export is what the new meter counted, not zero."""
    g = Quality.GOOD
    (c1,) = await seal_exports(
        store,
        [
            Reading(EXPORT, T0 + 1_000, 5_000.0, g),
            Reading(EXPORT, T0 + 100_000, 5_004.0, g),
            Reading(EXPORT, T0 + 200_000, 3.0, Quality.COUNTER_BACKWARDS),
            Reading(EXPORT, T0 + 300_000, 4.0, g),
            Reading(EXPORT, T0 + 400_000, 10.0, g),
        ],
        periods=1,
    )
    assert c1.export_wh == 4 + 6


async def test_a_good_but_absurd_total_is_capped_at_capacity_times_period(store: Store) -> None:
    g = Quality.GOOD
    c1, c2 = await seal_exports(
        store,
        [
            Reading(EXPORT, T0 + 1_000, 1_000.0, g),
            Reading(EXPORT, T0 + 899_000, 1e15, g),  # not flagged (an older ingest)
            Reading(EXPORT, T0 + 901_000, 1_004.0, g),
            Reading(EXPORT, T0 + 1_000_000, 1_006.0, g),
        ],
        periods=2,
    )
    assert c1.export_wh == 9_000  # 36 kW (the default capacity) × 15 minutes
    assert c2.export_wh == 2  # the fall back from the spike is no export, the rise after is
    await counter_reaches(store, "ledger.capped_totals", 1)


# -- a node whose outbox was lost ------------------------------------------------------------


async def _settle(svc: LedgerService, seq: int) -> None:
    """Run submit rounds, a block each, until the chain holds the node's `seq`."""
    assert svc.submitter is not None and svc.ledger is not None
    for _ in range(20):
        await svc.submitter.round()
        await svc._mine_embedded()
        if svc.ledger.head(svc.address).seq >= seq:
            return
    raise AssertionError(f"seq {seq} never reached the chain")


async def test_the_sealer_resumes_from_the_chain_head_after_its_outbox_is_lost(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    new_keystore(data / "node-key.json", data / "node-key.pass")
    settings = ChainSection(
        rpc_url="embedded", period_s=900, seal_delay_s=10, export_channel=EXPORT
    )
    clock = FixedClock(T0 + 3 * PERIOD_MS + 20_000)

    async def opened(name: str) -> tuple[Store, asyncio.Task[None]]:
        s = Store(tmp_path / name, clock=clock, retention=Retention(flush_interval_s=0.01))
        await s.open()
        return s, asyncio.create_task(s.run())

    def exports(store: Store, first: int, last: int) -> None:
        store.put_many(
            [Reading(EXPORT, T0 + k * PERIOD_MS + 1_000, 100.0 * k) for k in range(first, last)]
        )

    store1, writer1 = await opened("node.db")
    svc1 = LedgerService(settings, store1, clock, data, [], {})
    await svc1.connect()
    assert svc1.ledger is not None
    exports(store1, 0, 3)
    await store1.flush()
    sealed = await svc1.sealer.seal_due(svc1.ledger.chain_id, svc1.ledger.address)
    assert [c.seq for c, _ in sealed] == [1, 2, 3]
    await _settle(svc1, 3)
    last = sealed[-1][0]

    # The database is moved aside (a failed integrity check); the node starts on a new one.
    store2, writer2 = await opened("node-new.db")
    svc2 = LedgerService(settings, store2, clock, data, [], {})
    assert svc2.address == load_account(data / "node-key.json", data / "node-key.pass").address

    def same_chain() -> None:
        svc2.ledger, svc2.chain_id, svc2.contract = svc1.ledger, svc1.chain_id, svc1.contract

    svc2._connect = same_chain  # type: ignore[method-assign]
    await svc2.connect()
    clock.t_ms = T0 + 5 * PERIOD_MS + 20_000
    exports(store2, 3, 5)
    await store2.flush()
    resumed = await svc2.sealer.seal_due(svc1.ledger.chain_id, svc1.ledger.address)
    assert [c.seq for c, _ in resumed] == [4, 5]
    assert resumed[0][0].prev_hash == last.struct_hash() and resumed[0][0].t0 >= last.t1
    await _settle(svc2, 5)
    head = svc1.ledger.head(svc2.address)
    assert head.seq == 5 and head.follows(resumed[-1][0].struct_hash())
    assert (await svc2.outbox.summary(svc2.address))["by_state"].get("rejected") is None

    # the daemon flags readings stamped inside sealed periods; the sealer counts them
    assert svc2.sealed_until_ms == resumed[-1][0].t1
    store2.put_many([Reading(EXPORT, T0 + 4 * PERIOD_MS + 5_000, 450.0, Quality.LATE)])
    await store2.flush()
    await counter_reaches(store2, "ledger.late_readings", 1)
    for s, w in ((store1, writer1), (store2, writer2)):
        s.stop()
        await w
        await s.close()


async def test_own_commitments_refused_for_good_are_sealed_again_from_the_chain_head(
    tmp_path: Path,
) -> None:
    """Governance lowers the node's capacity after the node sealed: its next commitment is
    refused, and as seqs are accepted only in order nothing after it could ever be. The node
    seals those periods again, within the new capacity, and carries on."""
    data = tmp_path / "data"
    new_keystore(data / "node-key.json", data / "node-key.pass")
    settings = ChainSection(
        rpc_url="embedded", period_s=900, seal_delay_s=10, export_channel=EXPORT
    )
    clock = FixedClock(T0 + 3 * PERIOD_MS + 20_000)
    store = Store(tmp_path / "node.db", clock=clock, retention=Retention(flush_interval_s=0.01))
    await store.open()
    writer = asyncio.create_task(store.run())
    svc = LedgerService(settings, store, clock, data, [], {})
    await svc.connect()
    assert svc.ledger is not None and svc.submitter is not None
    # 2,000 Wh a period (8 kW): within the default 36 kW
    store.put_many([Reading(EXPORT, T0 + k * PERIOD_MS + 1_000, 2_000.0 * k) for k in range(4)])
    await store.flush()
    sealed = await svc.sealer.seal_due(svc.ledger.chain_id, svc.ledger.address)
    assert [c.export_wh for c, _ in sealed] == [0, 2_000, 2_000]
    # now only 4 kW: 1,000 Wh a period
    svc.ledger.set_capacity(Account.from_key(chain.TESTER_KEYS[0]), svc.address, 4_000)
    await _settle(svc, 1)
    for _ in range(10):
        await svc.submitter.round()
        await svc._mine_embedded()
    resealed = await svc.sealer.seal_due(svc.ledger.chain_id, svc.ledger.address)
    assert [(c.seq, c.export_wh) for c, _ in resealed] == [(2, 1_000), (3, 1_000)]
    await _settle(svc, 3)
    head = svc.ledger.head(svc.address)
    assert head.follows(resealed[-1][0].struct_hash())
    await counter_reaches(store, "ledger.resealed", 2)
    store.stop()
    await writer
    await store.close()


# -- an RPC error is not a reorg --------------------------------------------------------------


class TimeoutOnce(Web3Middleware):
    """Times out the first request for a block by number, as a hung RPC link would."""

    fired = 0

    def wrap_make_request(self, make_request: Any) -> Any:
        def middleware(method: Any, params: Any) -> Any:
            numbered = params and isinstance(params[0], (int, str)) and params[0] != "latest"
            if method == "eth_getBlockByNumber" and numbered and TimeoutOnce.fired == 0:
                TimeoutOnce.fired += 1
                raise requests.exceptions.ReadTimeout("read timed out (test)")
            return make_request(method, params)

        return middleware


async def test_an_rpc_timeout_while_rereading_a_block_is_not_taken_for_a_reorg(
    tmp_path: Path,
) -> None:
    node, task = await start_node(tmp_path)
    svc = node.ledger
    assert svc is not None
    await asyncio.wait_for(svc._connected.wait(), 10)
    assert svc.ledger is not None
    TimeoutOnce.fired = 0
    svc.ledger.w3.middleware_onion.add(TimeoutOnce)

    async def confirmed() -> bool:
        return (await svc.outbox.summary(svc.address))["confirmed_seq"] >= 2

    await until(confirmed)
    assert TimeoutOnce.fired == 1
    counters = dict(await node.store.query("SELECT name, value FROM counters"))
    assert counters.get("ledger.reorged", 0) == 0
    states = [s for (s,) in await node.store.query("SELECT state FROM ledger_txs")]
    assert "dropped" not in states
    assert counters.get("ledger.rpc_errors", 0) >= 1
    # each commitment went on chain once: nothing was sent again
    logs = svc.ledger.contract.events.Committed().get_logs(from_block=0)
    seqs = [ev["args"]["seq"] for ev in logs]
    assert len(seqs) == len(set(seqs))
    node.request_stop()
    assert await asyncio.wait_for(task, 8) == 0


async def test_a_counter_rebased_by_agreeing_reads_does_not_count_its_jump(store: Store) -> None:
    """The ingest checks accept a new level only after agreeing reads (the first ones stay
    flagged): the jump to it is not energy; a lone flagged spike still is crossed."""
    g, jump = Quality.GOOD, Quality.IMPLAUSIBLE_STEP
    (c1,) = await seal_exports(
        store,
        [
            Reading(EXPORT, T0 + 1_000, 100.0, g),
            Reading(EXPORT, T0 + 50_000, 1e12, jump),  # a lone spike: 100 → 102 still counts
            Reading(EXPORT, T0 + 100_000, 102.0, g),
            Reading(EXPORT, T0 + 200_000, 5_000.0, jump),  # a used meter fitted at 5,000 Wh
            Reading(EXPORT, T0 + 300_000, 5_001.0, jump),
            Reading(EXPORT, T0 + 400_000, 5_002.0, g),  # confirmed
            Reading(EXPORT, T0 + 500_000, 5_007.0, g),
        ],
        periods=1,
    )
    assert c1.export_wh == 2 + 5


async def test_a_nonce_gap_that_a_transaction_of_the_node_fills_is_no_hole(
    store: Store, env: tuple[Any, LocalAccount, chain.Ledger, LocalAccount]
) -> None:
    """A chain node that does not count the node's own transaction in flight shows a gap below
    the next one: that gap is filled, and the next transaction is not given up for it. A gap
    nothing of the node's fills is a hole."""
    from daisee_node.ledger.submitter import Submitter
    from daisee_node.ledger.worker import ChainThread

    w3, _, ledger, node = env
    settings = ChainSection(rpc_url="embedded", period_s=900, export_channel=EXPORT)
    worker = ChainThread("test-chain")
    submitter = Submitter(store, Outbox(store), ledger, node, settings, store.clock, worker)
    chain_next = w3.eth.get_transaction_count(node.address, "pending")
    assert await submitter._behind_a_hole(chain_next + 2)
    assert not await submitter._behind_a_hole(chain_next)
    async with store.transaction() as db:  # one of the node's own, in flight, in the gap
        await db.execute(
            "INSERT INTO ledger_txs (nonce, tx_hash, raw, items, fee, sent_ms, state) "
            "VALUES (?, ?, x'00', '[]', 1, 0, 'sent')",
            (chain_next, b"\x01" * 32),
        )
    assert not await submitter._behind_a_hole(chain_next + 2)
