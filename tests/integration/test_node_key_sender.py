"""On anvil: the node key's two kinds of transactions, commitment batches and market actions,
share one run of nonces. A node with a backlog of commitments and a market deciding orders at
the same moment gets every commitment on chain once and in order, and every decision on chain,
with no nonce refused, nothing sent twice, and every transaction recorded in the nonce ledger."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account

from daisee_node.clock import Clock
from daisee_node.ledger import market as marketlib
from daisee_node.ledger.commitment import sign
from daisee_node.ledger.keys import load_account, new_keystore
from daisee_node.ledger.service import LedgerService
from daisee_node.ledger.settings import ChainSection, MarketSection
from daisee_node.market_node import MarketService
from daisee_node.store import Retention, Store
from tests.integration.test_ledger_chains import committed_logs
from tests.integration.test_ledger_order import period, submit
from tests.support.chains import AnvilLedger

pytestmark = pytest.mark.slow

BACKLOG = 8  # own commitments, one batch each
ACCEPTED_ORDERS = 3
REFUSED_ORDERS = 2
REFUSED = 3  # the contract's state of a refused order
ZERO = b"\0" * 32


async def until(check: Callable[[], Awaitable[Any]], timeout: float = 45.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = await check()
        if result:
            return result
        await asyncio.sleep(0.1)
    raise AssertionError(f"{check.__name__} still false after {timeout} s")


async def test_batches_and_market_actions_share_the_node_keys_nonces(
    tmp_path: Path, anvil: AnvilLedger
) -> None:
    ledger, w3 = anvil.ledger, anvil.w3
    # A buyer with credits (1000 Wh exported: one credit) opens orders to the node: some at a
    # price the node takes, some below its minimum.
    buyer = Account.create()
    anvil.enrol(buyer.address)
    assert submit(anvil, buyer, period(buyer, 1, ZERO, export_wh=1000))[1] == []
    market_address = marketlib.deploy(w3, anvil.gov, ledger.address)
    on_chain = marketlib.Market(w3, market_address)

    data = tmp_path / "node"
    new_keystore(data / "node-key.json", data / "node-key.pass")
    node = load_account(data / "node-key.json", data / "node-key.pass")
    anvil.enrol(node.address)
    t0 = (on_chain.now_ms() // 900_000 + 4) * 900_000
    prices = [1.0] * ACCEPTED_ORDERS + [0.1] * REFUSED_ORDERS
    orders = [
        on_chain.open(buyer, node.address, 10, marketlib.parse_credits(str(p)), t0, t0 + 900_000)
        for p in prices
    ]

    # The node's backlog: sealed commitments waiting in its outbox, one batch each.
    settings = ChainSection(
        rpc_url=anvil.anvil.url,
        ledger_address=ledger.address,
        confirmations=1,
        submit_interval_s=0.2,
        batch_max=1,
    )
    store = Store(data / "node.db", retention=Retention(flush_interval_s=0.02))
    await store.open()
    writer = asyncio.create_task(store.run())
    svc = LedgerService(settings, store, Clock(), data, [], {})
    prev = ZERO
    for seq in range(1, BACKLOG + 1):
        c = period(node, seq, prev)
        prev = c.struct_hash()
        signature = sign(c, node.key, ledger.chain_id, ledger.address)
        assert await svc.outbox.add(c, signature, own=True, sealed_ms=0)
    await svc.connect()
    market = MarketService(
        MarketSection(address=market_address, accept_from=["buyer"], min_price=0.5, poll_s=0.2),
        ledger=svc,
        store=store,
        clock=Clock(),
        latest={},
        peers={buyer.address: "buyer"},
        deliver=lambda readings: None,
        peer_age_s=lambda peer: None,
        period_s=900,
        confirmations=1,
    )
    # Both start at once: the market decides while the batches go out.
    tasks = [asyncio.create_task(svc.submit_loop()), asyncio.create_task(market.run())]
    try:

        async def all_decided() -> bool:
            states = [on_chain.order(oid).state for oid in orders]
            want = [marketlib.ACCEPTED] * ACCEPTED_ORDERS + [REFUSED] * REFUSED_ORDERS
            return states == want

        async def all_confirmed() -> bool:
            return (await svc.outbox.summary(svc.address))["confirmed_seq"] == BACKLOG

        async def all_settled() -> list[tuple[Any, ...]]:
            rows = await store.query("SELECT nonce, state, items FROM ledger_txs ORDER BY nonce")
            done = len(rows) == BACKLOG + len(orders)
            return rows if done and all(r[1] != "sent" for r in rows) else []

        await until(all_decided)
        await until(all_confirmed)
        rows = await until(all_settled)
    finally:
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # Every commitment on chain once, in seq order.
    assert [seq for seq, _ in committed_logs(ledger, node.address)] == list(range(1, BACKLOG + 1))
    # Every transaction the node key signed is in the nonce ledger, mined, with its own nonce:
    # nothing refused, dropped, replaced or sent again.
    sent = w3.eth.get_transaction_count(node.address)
    assert [r[0] for r in rows] == list(range(sent))
    assert {r[1] for r in rows} == {"mined"}
    assert sum(r[2].startswith("{") for r in rows) == len(orders)  # the market's, with a body
    store.stop()
    await writer  # counters are written with the last batch
    counters = dict(await store.query("SELECT name, value FROM counters"))
    await store.close()
    assert counters.get("ledger.submit_errors", 0) == 0
    assert counters["ledger.txs_sent"] == BACKLOG and counters["market.txs_sent"] == len(orders)
