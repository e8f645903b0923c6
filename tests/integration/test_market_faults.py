"""The DAISEE purchase with a third node relaying, and its faults, on real daemons, mosquitto and
anvil (and one contract-level case on py-evm).

Each node switches between two sources through an interlock group: the consumer between its own
battery (`supply_own`) and the producer's supply (`supply_neighbour`), the producer between the
grid (`feed_grid`) and the consumer (`feed_neighbour`); the rule is `market.order_active == 1`
on both ends, so each end stops the flow from its own meter. The mock pins' history is judged by
`interlock_breaches`: never two relays of a group closed at once, never a close sooner than the
dead time after an open.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hexbytes import HexBytes
from web3.logs import DISCARD

from daisee_node.actuators.mockpins import GroupPin, interlock_breaches, pin_changes, pin_history
from daisee_node.delivery import PEER_LOST
from daisee_node.ledger import market as marketlib
from daisee_node.market_node import STATUS_KEY
from tests.conftest import db_rows, wait_for
from tests.support.broker import Broker
from tests.support.chains import AnvilLedger
from tests.support.market import GRACE_MS, PERIOD_MS, new_market, window_start
from tests.support.market_nodes import (
    counted_at,
    earn_credits,
    interlocked,
    make_keys,
    node_config,
    readings,
)

PERIOD_S = 10
PRICE = 1.0  # credits per kWh
UNIT = 10**18
DEAD_TIME_S = 0.5
#: consumer: supply_own (its battery), supply_neighbour (the producer's line)
OWN, NEIGHBOUR = 17, 27
#: producer: feed_grid, feed_neighbour
GRID_PIN, FEED = 22, 17
CONSUMER_GROUP = {"supply": [GroupPin(OWN), GroupPin(NEIGHBOUR)]}
PRODUCER_GROUP = {"feed": [GroupPin(GRID_PIN), GroupPin(FEED)]}


@pytest.fixture
def node_broker(tmp_path: Path) -> Iterator[Broker]:
    b = Broker(tmp_path, node_logins=("producer", "consumer"))
    b.start()
    yield b
    b.stop()


class Scenario:
    """A producer and a consumer (and optionally a relay) on one market; the consumer's battery
    is low and its `[[market.buy]]` orders `amount_wh` from the producer."""

    def __init__(
        self,
        tmp_path: Path,
        chain: AnvilLedger,
        broker: Broker,
        *,
        amount_wh: int,
        grace_ms: int,
        relay: bool = False,
        consumer_heartbeat_s: float = 10.0,
    ) -> None:
        names = ("producer", "consumer", "relay") if relay else ("producer", "consumer")
        self.keys = make_keys(tmp_path, chain, names)
        self.address = {name: key[2] for name, key in self.keys.items()}
        earn_credits(chain, *self.keys["consumer"][:2], export_wh=1000)  # 1 credit
        self.amount_wh = amount_wh
        self.market = marketlib.deploy(chain.w3, chain.gov, chain.ledger.address, grace_ms=grace_ms)
        self.from_block = int(chain.w3.eth.block_number)
        self.chain = chain
        self.on_chain = marketlib.Market(chain.w3, self.market)
        self.buyer_start = self.on_chain.balance(self.address["consumer"])
        p_relays, p_rules = interlocked(
            "feed", ("feed_grid", GRID_PIN), ("feed_neighbour", FEED), DEAD_TIME_S
        )
        c_relays, c_rules = interlocked(
            "supply", ("supply_own", OWN), ("supply_neighbour", NEIGHBOUR), DEAD_TIME_S
        )
        common = {"address": self.market, "from_block": self.from_block}
        self.configs = {
            "producer": node_config(
                tmp_path,
                "producer",
                chain=chain,
                broker=broker,
                key=self.keys["producer"],
                # a full battery and 10 kW of sun: about 2.5 Wh exported a second
                simulation={
                    "pv_peak_w": 10_000,
                    "battery_initial_soc_pct": 100,
                    "load_base_w": 100,
                },
                market={
                    **common,
                    "accept_from": ["consumer"],
                    "min_price": 0.5,
                    "seller_meter": "grid.export_wh",
                },
                peers={"consumer": self.address["consumer"]},
                relays=p_relays,
                rules=p_rules,
            ),
            "consumer": node_config(
                tmp_path,
                "consumer",
                chain=chain,
                broker=broker,
                key=self.keys["consumer"],
                # no sun, a battery below its floor, 10 kW of load: about 3 Wh imported a second
                simulation={
                    "pv_peak_w": 0,
                    "battery_initial_soc_pct": 15,
                    "battery_min_soc_pct": 20,
                    "load_base_w": 10_000,
                    "load_peak_w": 0,
                },
                # with a relay, the consumer only signs and shares its commitments
                chain_extra={"submit": False} if relay else None,
                market={
                    **common,
                    "buyer_meter": "grid.import_wh",
                    "heartbeat_s": consumer_heartbeat_s,
                    "buy": [
                        {
                            "name": "low_battery",
                            "when": "battery.soc_pct < 20",
                            "seller": "producer",
                            "amount_wh": amount_wh,
                            "max_price": PRICE,
                            "window_min": PERIOD_S / 60,
                            "lead_s": 4,
                        }
                    ],
                },
                peers={"producer": self.address["producer"]},
                relays=c_relays,
                rules=c_rules,
            ),
        }
        if relay:
            # the relay submits the commitments its neighbours share over MQTT
            self.configs["relay"] = node_config(
                tmp_path,
                "relay",
                chain=chain,
                broker=broker,
                key=self.keys["relay"],
                simulation={"pv_peak_w": 0, "load_base_w": 500},
                chain_extra={"relay_peers": True},
                login="node",
            )
        self.data = {name: tmp_path / f"{name}-data" for name in self.configs}

    def pins(self, name: str) -> Path:
        return self.data[name] / "mock-gpio"

    def accepted(self) -> marketlib.Order:
        """Order 1, once the producer's node has accepted it."""
        return wait_for(
            lambda: (o := self.on_chain.order(1)).state == marketlib.ACCEPTED and o,
            timeout=40,
            every=0.5,
        )

    def closed_then_opened(self, name: str, pin: int, timeout: float = 30) -> tuple[float, float]:
        """When a relay that starts open closed, and when it opened again (s)."""
        history = wait_for(
            lambda: (h := pin_history(self.pins(name), pin)) and len(h) >= 2 and h,
            timeout=timeout,
        )
        (closed_s, up), (opened_s, down) = history[0], history[1]
        assert up is True and down is False
        return closed_s, opened_s

    def closed(self, name: str, pin: int, timeout: float = 30) -> float:
        history = wait_for(lambda: pin_history(self.pins(name), pin), timeout=timeout)
        assert history[0][1] is True
        return history[0][0]

    def assert_interlocked(self) -> None:
        for name, groups in (("consumer", CONSUMER_GROUP), ("producer", PRODUCER_GROUP)):
            dead = dict.fromkeys(groups, DEAD_TIME_S)
            assert interlock_breaches(pin_changes(self.pins(name)), groups, dead) == []

    def metered(self, name: str, channel: str, t0_ms: int, opened_s: float) -> tuple[float, float]:
        """What `name`'s counter had counted in the window when its relay opened, and one
        sampling interval's energy; waits for a reading after the opening."""
        db = self.data[name] / "node.db"
        series = wait_for(
            lambda: (s := readings(db, channel)) and s[-1][0] > opened_s * 1000 + 500 and s
        )
        return counted_at(series, t0_ms, int(opened_s * 1000))

    def flow(self, name: str, order_id: int = 1) -> str | None:
        """Why order `order_id` flows or not on `name`'s node, as its `status` shows it."""
        rows = db_rows(
            self.data[name] / "node.db", "SELECT value FROM meta WHERE key = ?", (STATUS_KEY,)
        )
        orders = json.loads(rows[0][0])["orders"] if rows else []
        return next((o["flow"] for o in orders if o["id"] == order_id), None)

    def paid(self, order_id: int = 1) -> list[dict[str, Any]]:
        return [
            e.args
            for e in self.on_chain.events(self.from_block, names=("Settled",))
            if int(e.args["id"]) == order_id
        ]

    def refunded(self, order_id: int = 1) -> list[int]:
        return [
            int(e.args["amount"])
            for e in self.on_chain.events(self.from_block, names=("Refunded",))
            if int(e.args["id"]) == order_id
        ]

    def settled(self, order: marketlib.Order) -> marketlib.Order | None:
        periods = self.on_chain.periods(order, self.from_block)
        done = len(periods.both) == 1 and all(p.settled for p in periods.both)
        return self.on_chain.order(order.id) if done else None


def assert_switched_with_the_interlock(s: Scenario, order: marketlib.Order) -> None:
    """Both ends close their neighbour relay in the window, after the dead time since their own
    source opened, and open it once their own meter counted the ordered Wh (at most one
    step of the counter over)."""
    for name, pin, own, meter in (
        ("producer", FEED, GRID_PIN, "grid.export_wh"),
        ("consumer", NEIGHBOUR, OWN, "grid.import_wh"),
    ):
        closed_s, opened_s = s.closed_then_opened(name, pin)
        assert order.t0 <= closed_s * 1000 and opened_s * 1000 < order.t1
        own_history = pin_history(s.pins(name), own)
        own_opened = max(t for t, high in own_history if not high and t <= closed_s)
        assert closed_s - own_opened >= DEAD_TIME_S - 1e-3  # the group's dead time was waited
        counted, step = s.metered(name, meter, order.t0, opened_s)
        assert s.amount_wh <= counted < s.amount_wh + step  # stopped on that very reading
        # the window opening reaches the relay at once: a tick, then the group's dead time
        assert closed_s - order.t0 / 1000 <= DEAD_TIME_S + 1.5
    s.assert_interlocked()


@pytest.mark.slow
@pytest.mark.beside
def test_daisee_scenario_with_a_relaying_third_node(
    tmp_path: Path, anvil: AnvilLedger, node_broker: Broker, daemon: Any
) -> None:
    """Battery low → order → accepted → both ends switch through their interlock and stop on
    their own meter → the consumer's period, shared over MQTT, is submitted by the relay →
    settled: the buyer paid exactly delivered × price, the seller received it, the delivery
    is the ordered amount, not more."""
    s = Scenario(tmp_path, anvil, node_broker, amount_wh=10, grace_ms=15_000, relay=True)
    for config in s.configs.values():
        daemon(config)
    order = s.accepted()
    assert order.buyer == s.address["consumer"] and order.amount_wh == 10
    assert_switched_with_the_interlock(s, order)

    closed = wait_for(lambda: s.settled(order), timeout=40, every=1.0)
    assert closed.delivered_wh == s.amount_wh  # both ends metered more than the order: all of it
    # the consumer never sent a transaction for its commitments: the relay did
    (buyer_period,) = s.on_chain.recorded(order.buyer, order.t0, order.t1, s.from_block)
    sender = anvil.w3.eth.get_transaction(HexBytes(buyer_period.tx_hash))["from"]
    assert sender == s.address["relay"]

    cost = closed.delivered_wh * order.price // 1000
    assert sum(int(a["paid"]) for a in s.paid()) == cost
    credit = s.on_chain.credit
    to_seller = credit.events.Transfer().get_logs(
        from_block=s.from_block, argument_filters={"from": s.market, "to": order.seller}
    )
    assert sum(int(e["args"]["value"]) for e in to_seller) == cost
    # the buyer exports nothing (no credits minted): its balance fell by exactly the price
    wait_for(lambda: s.on_chain.escrow_of(1) == 0, timeout=30, every=1.0)
    assert s.on_chain.balance(order.buyer) == s.buyer_start - cost


@pytest.mark.slow
@pytest.mark.beside
def test_seller_killed_mid_delivery_buyer_opens_and_is_refunded(
    tmp_path: Path, anvil: AnvilLedger, node_broker: Broker, daemon: Any
) -> None:
    """The producer's node is killed (SIGKILL) while the energy flows: the consumer's node no
    longer hears its heartbeat, `market.order_active` drops and its rule switches back to its
    own supply before the window ends; the producer never committed the window, so nothing is
    paid and after the grace time the whole escrow returns to the buyer."""
    heartbeat_s = 2.0
    # 100 Wh cannot be delivered in the 10 s window: only the lost heartbeat stops the flow
    s = Scenario(
        tmp_path,
        anvil,
        node_broker,
        amount_wh=100,
        grace_ms=5_000,
        consumer_heartbeat_s=heartbeat_s,
    )
    procs = {name: daemon(config) for name, config in s.configs.items()}
    order = s.accepted()
    s.closed("producer", FEED)
    s.closed("consumer", NEIGHBOUR)
    procs["producer"].signal(signal.SIGKILL)
    killed_s = time.time()

    _, opened_s = s.closed_then_opened("consumer", NEIGHBOUR)
    assert opened_s * 1000 < order.t1  # not the window's end: the lost heartbeat
    assert opened_s - killed_s <= heartbeat_s + 2.0
    # the consumer's node says why (kept for `status` every second)
    wait_for(lambda: s.flow("consumer") == PEER_LOST, timeout=5)
    wait_for(lambda: any(high for t, high in pin_history(s.pins("consumer"), OWN) if t > opened_s))
    s.assert_interlocked()

    escrow = s.amount_wh * order.price // 1000
    refunds = wait_for(s.refunded, timeout=40, every=1.0)
    assert s.on_chain.recorded(order.seller, order.t0, order.t1, s.from_block) == []
    assert s.paid() == [] and refunds == [escrow]
    assert s.on_chain.order(1).state_name == "closed"
    assert s.on_chain.balance(order.buyer) == s.buyer_start


@pytest.mark.slow
@pytest.mark.beside
def test_chain_down_during_delivery_switches_locally_and_settles_when_back(
    tmp_path: Path, anvil: AnvilLedger, node_broker: Broker, daemon: Any
) -> None:
    """anvil stops once the relays have closed: both nodes still open their relay on their own
    meter while it is down; once it is back (state kept), the period is committed and
    settled for the ordered amount."""
    s = Scenario(tmp_path, anvil, node_broker, amount_wh=10, grace_ms=40_000)
    for config in s.configs.values():
        daemon(config)
    order = s.accepted()
    s.closed("producer", FEED)
    anvil.anvil.stop()
    stopped_s = time.time()

    for name, pin in (("producer", FEED), ("consumer", NEIGHBOUR)):
        _, opened_s = s.closed_then_opened(name, pin)
        assert opened_s > stopped_s
    assert anvil.anvil.proc is not None and anvil.anvil.proc.poll() is not None  # still down
    s.assert_interlocked()

    anvil.restart()
    s.on_chain = marketlib.Market(anvil.w3, s.market)
    closed = wait_for(lambda: s.settled(order), timeout=45, every=1.0)
    assert closed.delivered_wh == s.amount_wh
    assert sum(int(a["paid"]) for a in s.paid()) == s.amount_wh * order.price // 1000


def test_a_buyer_that_never_commits_pays_nothing_and_gets_its_escrow_back() -> None:
    """The buyer's node never records a commitment for the window (offline, or withholding it).
    The contract settles a GRID period only from both sides' recorded commitments, so:
    - no period of the order can be settled: the seller's commitment alone, or paired with any
      commitment that is not the buyer's recorded one for that period, is refused;
    - the seller is not paid, whatever it exported (it keeps only the credits its export mints);
    - after t1 + grace, anyone refunds: the whole escrow returns to the buyer, and a buyer's
      commitment that turns up later can no longer settle anything (TooLate)."""
    m = new_market()
    fn = m.market.functions
    t0 = window_start(m)
    t1 = t0 + PERIOD_MS
    price = 10**18
    buyer0, seller0 = m.balance(m.buyer), m.balance(m.seller)
    order = m.open(m.buyer, m.seller, 500, price, t0, t1)
    m.send(m.seller, fn.accept(order))
    (seller_c,) = m.commit((m.seller, t0, t1, 0, 800, []))
    (other_c,) = m.commit((m.other, t0, t1, 800, 0, []))  # a third node's import
    m.travel_to(t1)
    m.reverts(m.gov, fn.settleGrid(order, *seller_c.args, *seller_c.args), "WrongNode")
    m.reverts(m.gov, fn.settleGrid(order, *seller_c.args, *other_c.args), "WrongNode")
    m.travel_to(t1 + GRACE_MS - 1000)
    m.reverts(m.other, fn.refund(order), "TooEarly")

    m.travel_to(t1 + GRACE_MS)
    (late,) = m.commit((m.buyer, t0, t1, 800, 0, []))
    m.reverts(m.gov, fn.settleGrid(order, *seller_c.args, *late.args), "TooLate")
    receipt = m.send(m.other, fn.refund(order))
    (refunded,) = m.market.events.Refunded().process_receipt(receipt, errors=DISCARD)
    assert refunded["args"]["amount"] == 500 * price // 1000
    assert m.balance(m.buyer) == buyer0
    assert m.balance(m.seller) == seller0 + 800 * 10**15  # minted for its export, nothing paid
    assert m.balance(m.market.address) == 0
    assert m.order(order)["deliveredWh"] == 0
