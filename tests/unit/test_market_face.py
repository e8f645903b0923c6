"""What operators see of the market: the retained `market` MQTT state and its Home Assistant
entities, the `status` lines, and the delivery state kept across a restart."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from daisee_node.clock import make_clock
from daisee_node.delivery import DELIVERED_ALL, Order
from daisee_node.ledger.market import MarketEvent
from daisee_node.ledger.market import Order as ChainOrder
from daisee_node.ledger.settings import MarketSection
from daisee_node.market_node import DELIVERY_KEY, STATUS_KEY, MarketService
from daisee_node.mqtt.service import NodeMqtt
from daisee_node.mqtt.settings import MqttSection
from daisee_node.readings import Reading
from daisee_node.status import _market_lines
from tests.unit.test_discovery import FakeNode, node_mqtt

STATE = {
    "order_active": 1,
    "active_order": 4,
    "delivered_wh": 120.5,
    "remaining_wh": 379.5,
    "orders": 1,
}


class FakeMarket:
    def __init__(self) -> None:
        self.lines: dict[int, str] = {}
        self.heard: list[tuple[str, int, bytes]] = []

    def state(self) -> dict[str, Any]:
        return dict(STATE)

    def line_messages(self) -> dict[int, str]:
        return dict(self.lines)

    def on_line_message(self, peer_id: str, order_id: int, payload: bytes) -> None:
        self.heard.append((peer_id, order_id, payload))


def test_the_market_state_is_retained_and_has_its_entities() -> None:
    without = node_mqtt()
    assert not [e for e in without.discovery_entities() if "market" in e.topic]

    mqtt = node_mqtt()
    node: FakeNode = mqtt.node  # type: ignore[assignment]
    node.market = FakeMarket()  # type: ignore[attr-defined]
    entities = {e.config["unique_id"]: e for e in mqtt.discovery_entities() if "market" in e.topic}
    assert set(entities) == {
        "daisee_house-7_market_active_order",
        "daisee_house-7_market_delivered_wh",
        "daisee_house-7_market_remaining_wh",
    }
    delivered = entities["daisee_house-7_market_delivered_wh"].config
    assert delivered["state_topic"] == "daisee/house-7/market"
    assert delivered["unit_of_measurement"] == "Wh" and "entity_category" not in delivered
    assert entities["daisee_house-7_market_active_order"].state_topics == ("daisee/house-7/market",)


async def test_the_market_state_is_published_when_it_changes() -> None:
    mqtt = node_mqtt()
    node: FakeNode = mqtt.node  # type: ignore[assignment]
    market = FakeMarket()
    node.market = market  # type: ignore[attr-defined]
    sent: list[tuple[str, str, bool]] = []
    mqtt.link.publish = lambda topic, payload, retain=False, **kw: sent.append(  # type: ignore[method-assign]
        (topic, payload, retain)
    )
    await mqtt.publish_state(quick=True)
    assert ("daisee/house-7/market", json.dumps(STATE, sort_keys=True), True) in sent
    sent.clear()
    await mqtt.publish_state(quick=True)
    assert not [s for s in sent if s[0].endswith("/market")]  # unchanged: not sent again


async def test_line_proofs_go_out_retained_and_peers_proofs_come_in() -> None:
    node = FakeNode()
    market = FakeMarket()
    node.market = market  # type: ignore[attr-defined]
    mqtt = NodeMqtt(node, MqttSection(reading_interval_s=5))  # type: ignore[arg-type]
    sent: list[tuple[str, str, bool]] = []
    mqtt.link.publish = lambda topic, payload, retain=False, **kw: sent.append(  # type: ignore[method-assign]
        (topic, payload, retain)
    )
    market.lines = {7: '{"order":7}'}
    await mqtt.publish_state(quick=True)
    assert ("daisee/house-7/market/line/7", '{"order":7}', True) in sent
    sent.clear()
    market.lines = {7: ""}  # the order is over: its retained proofs are cleared
    await mqtt.publish_state(quick=True)
    assert [s for s in sent if "/line/" in s[0]] == [("daisee/house-7/market/line/7", "", True)]

    # a peer's proofs reach the market with the sender's id from the topic; our own and
    # malformed topics do not
    handlers = mqtt.link._subscriptions
    (handler,) = [h for f, (_, h) in handlers.items() if f == "daisee/+/market/line/+"]
    await handler("daisee/house-8/market/line/7", b"{}")
    await handler("daisee/house-7/market/line/7", b"{}")
    await handler("daisee/house-8/market/line/seven", b"{}")
    assert market.heard == [("house-8", 7, b"{}")]


def test_status_lists_the_orders_and_the_credits() -> None:
    report: dict[str, Any] = {
        "market": {
            "balance_units": str(1_325 * 10**15),
            "escrowed_units": str(5 * 10**17),
            "decimals": 18,
            "error": None,
            "orders": [
                {
                    "id": 1,
                    "role": "seller",
                    "peer": "consumer",
                    "amount_wh": 500,
                    "state": "accepted",
                    "delivered_wh": 500.0,
                    "flow": DELIVERED_ALL,
                    "decision": "accepted by policy",
                },
                {
                    "id": 2,
                    "role": "seller",
                    "peer": "0xabc",
                    "amount_wh": 200,
                    "state": "refused",
                    "delivered_wh": None,
                    "flow": None,
                    "decision": "buyer 0xabc is not in market.accept_from",
                },
            ],
        }
    }
    text = "\n".join(_market_lines(report["market"]))
    assert "balance 1.325 credits; escrowed 0.5 credits" in text
    rows = [line.split() for line in text.splitlines()[3:]]
    assert rows[0][:6] == ["1", "seller", "consumer", "500", "Wh", "500"]
    assert " ".join(rows[0][7:]) == "accepted ordered energy delivered"
    assert " ".join(rows[1][6:]) == "refused buyer 0xabc is not in market.accept_from"


class MetaStore:
    """The store's meta table and events, in memory."""

    def __init__(self) -> None:
        self.meta: dict[str, str] = {}
        self.events: list[tuple[Any, ...]] = []

    async def get_meta(self, key: str) -> str | None:
        return self.meta.get(key)

    async def set_meta(self, key: str, value: str) -> None:
        self.meta[key] = value

    def put_event(self, *args: Any) -> None:
        self.events.append(args)


def service(store: MetaStore) -> MarketService:
    return MarketService(
        MarketSection(address="0x" + "11" * 20, seller_meter="grid.export_wh"),
        ledger=None,  # type: ignore[arg-type]
        store=store,  # type: ignore[arg-type]
        clock=make_clock(1.0, None),
        latest={},
        peers={},
        deliver=lambda readings: None,
        peer_age_s=lambda peer: 0.0,
        period_s=900,
        confirmations=1,
    )


async def test_what_the_meter_counted_survives_a_restart() -> None:
    store = MetaStore()
    first = service(store)
    now = first.clock.now_ms()
    first.tracker.add(Order(3, "seller", "b", 100, now - 60_000, now + 60_000, "grid.export_wh"))
    first.on_readings([Reading("grid.export_wh", now - 2000, 1000.0)])
    first.on_readings([Reading("grid.export_wh", now - 1000, 1040.0)])
    await first.save()
    assert json.loads(store.meta[STATUS_KEY])["delivered_wh"] == 40.0

    again = service(store)
    await again.restore()
    assert again.tracker.flows[3].counted == 40.0
    # the reading after the restart counts from the last one kept, not from zero
    again.on_readings([Reading("grid.export_wh", now, 1100.0)])
    assert again.tracker.flows[3].counted == 100.0
    assert json.loads(store.meta[DELIVERY_KEY])["orders"][0]["order_id"] == 3


class FakeEth:
    def __init__(self, chain: FakeChain) -> None:
        self.chain = chain

    def get_block(self, which: int | str) -> dict[str, Any]:
        number = len(self.chain.hashes) - 1 if which == "latest" else int(which)
        return {"number": number, "hash": self.chain.hashes[number], "timestamp": self.chain.now_s}


class FakeChain:
    """The market as `MarketService.poll` uses it: blocks, `OrderOpened` events, orders."""

    def __init__(self) -> None:
        self.hashes = [b"h0"]
        self.now_s = 1_000
        self.opened: list[tuple[int, MarketEvent]] = []  # (block, event)
        self.orders: dict[int, ChainOrder] = {}
        self.calls: list[tuple[str, int]] = []
        self.w3 = type("W3", (), {"eth": FakeEth(self)})()

    def mine(self, tag: bytes = b"") -> int:
        self.hashes.append(b"h%d" % len(self.hashes) + tag)
        return len(self.hashes) - 1

    def add(self, oid: int, buyer: str, seller: str, block: int | None = None) -> None:
        """Order `oid` opened in a new block (or in `block`, a fork's)."""
        block = self.mine() if block is None else block
        self.orders[oid] = ChainOrder(
            oid,
            buyer=buyer,
            amount_wh=100,
            mode=0,
            state=1,
            seller=seller,
            t0=(self.now_s + 60) * 1000,
            t1=(self.now_s + 960) * 1000,
            price=10**18,
            delivered_wh=0,
            open_disputes=0,
            seller_channel=b"\0" * 32,
            buyer_channel=b"\0" * 32,
        )
        args = {"id": oid, "buyer": buyer, "seller": seller}
        self.opened.append((block, MarketEvent("OrderOpened", args, block, b"", 0)))

    def events(self, start: int, end: int, names: Any) -> list[MarketEvent]:
        return [e for b, e in self.opened if start <= b <= end]

    def order(self, oid: int) -> ChainOrder:
        return self.orders[oid]

    def _set(self, oid: int, state: int, action: str) -> None:
        self.calls.append((action, oid))
        self.orders[oid] = replace(self.orders[oid], state=state)
        self.mine()

    def accept(self, account: Any, oid: int) -> None:
        self._set(oid, 2, "accept")

    def refuse(self, account: Any, oid: int) -> None:
        self._set(oid, 3, "refuse")

    def balance(self, address: str) -> int:
        return 5 * 10**18

    def escrow_of(self, oid: int) -> int:
        return 0


class Worker:
    async def call(self, fn: Any, *args: Any) -> Any:
        return fn(*args)


ME = "0x" + "ee" * 20
FRIEND = "0x" + "ab" * 20
OTHER = "0x" + "cd" * 20


def fake_service(
    chain: FakeChain,
    store: MetaStore,
    latest: dict[str, Reading] | None = None,
    **market: Any,
) -> MarketService:
    """A market service of this node (ME, peer FRIEND) on `chain`, with `[market]` settings."""
    svc = MarketService(
        MarketSection(address="0x" + "11" * 20, seller_meter="grid.export_wh", **market),
        ledger=type("Ledger", (), {"worker": Worker()})(),
        store=store,  # type: ignore[arg-type]
        clock=make_clock(1.0, None),
        latest=latest or {},
        peers={FRIEND: "friend"},
        deliver=lambda readings: None,
        peer_age_s=lambda peer: 0.0,
        period_s=900,
        confirmations=1,
    )
    svc.market, svc.address, svc.account = chain, ME, object()  # type: ignore[assignment]
    return svc


async def test_the_seller_decides_each_order_once_and_meters_what_it_accepted() -> None:
    store = MetaStore()
    chain = FakeChain()
    svc = fake_service(chain, store, accept_from=["friend"])
    chain.add(1, FRIEND, ME)
    chain.add(2, OTHER, ME)
    chain.add(3, FRIEND, OTHER)  # not this node's
    await svc.poll()
    await svc.poll()  # the same events read again (confirmations): nothing is done twice
    assert chain.calls == [("accept", 1), ("refuse", 2)]
    assert sorted(svc.orders) == [1, 2] and list(svc.tracker.flows) == [1]
    assert svc.tracker.flows[1].order.peer == "friend"
    reasons = {(e[2], e[4], e[5]) for e in store.events}
    assert reasons == {
        ("order.1", "accepted", "accepted by policy"),
        ("order.2", "refused", f"buyer {OTHER} is not in market.accept_from"),
    }

    # A reorg deeper than the blocks read again replaces the last three blocks read; the fork
    # opened order 4 in the first of them. The changed hash makes the node read them again.
    head = len(chain.hashes) - 1
    for b in range(head - 2, head + 1):
        chain.hashes[b] = b"fork%d" % b
    chain.add(4, FRIEND, ME, block=head - 2)
    await svc.poll()
    assert chain.calls[-1] == ("accept", 4)
    status = svc.status()
    assert [(o["id"], o["state"], o["role"]) for o in status["orders"]] == [
        (1, "accepted", "seller"),
        (2, "refused", "seller"),
        (4, "accepted", "seller"),
    ]
    assert status["balance_units"] == str(5 * 10**18)
