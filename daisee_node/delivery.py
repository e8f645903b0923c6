"""Delivery of accepted market orders, metered by the node itself.

A purchase is settled on chain from both nodes' commitments, long after the energy flowed; the
flow itself is switched here, from the node's own meter, so chain latency can never make a seller
over-deliver. For each accepted order the node knows its terms (amount, window, peer) and which
of its own counters measures the order's energy (the seller's export, or the buyer's import, on
the line or at the grid connection). The tracker counts what that counter advances inside the
window; it ends the order's flow, for good, when the counter has
counted the ordered Wh or the window has closed, and pauses it while the peer's heartbeat (its
signed peer messages, `daisee_node.peers`) is missing.

Rules see the result as inputs, refreshed on every counter reading and every tick:
`market.order_active` (1 while some order should flow, else 0), `market.delivered_wh` and
`market.remaining_wh` (over the orders whose window is open). A rule such as
`market.order_active == 1` then closes the supply relays through the interlock like any rule.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from daisee_node.readings import Reading

ACTIVE = "market.order_active"
DELIVERED = "market.delivered_wh"
REMAINING = "market.remaining_wh"
CHANNELS = (ACTIVE, DELIVERED, REMAINING)

#: why an order's flow is off, in an operator's words
WAITING = "window not open yet"
FLOWING = "flowing"
DELIVERED_ALL = "ordered energy delivered"
WINDOW_ENDED = "window ended"
PEER_LOST = "peer heartbeat lost"
NO_METER = "no reading from the meter yet"
FINAL = (DELIVERED_ALL, WINDOW_ENDED)


@dataclass(frozen=True)
class Order:
    """An accepted order as this node acts on it."""

    order_id: int
    role: Literal["seller", "buyer"]
    peer: str  # the other node's id (its heartbeat is its peer messages)
    amount_wh: int
    t0_ms: int
    t1_ms: int
    #: this node's counter that measures the order's energy (a Wh counter, only rising)
    meter: str


@dataclass
class OrderFlow:
    """What the tracker knows of one order: where its meter started, and where it stands."""

    order: Order
    counted: float = 0.0  # Wh the meter gave this order
    state: str = WAITING

    @property
    def delivered_wh(self) -> float:
        return min(self.counted, float(self.order.amount_wh))

    @property
    def remaining_wh(self) -> float:
        return max(0.0, self.order.amount_wh - self.counted)


@dataclass
class DeliveryTracker:
    """Meters the node's accepted orders from its own counters and says when each must stop.

    `peer_age_s(peer)` tells how long ago the peer was last heard (None: never); a peer silent
    for more than `heartbeat_s` pauses its orders' flow until it is heard again. Time is the
    node's clock, handed in by each call, so the tracker runs on a fake clock in tests.
    """

    peer_age_s: Callable[[str], float | None]
    heartbeat_s: float = 10.0
    flows: dict[int, OrderFlow] = field(default_factory=dict)
    #: the newest good value of each meter, and when it was read
    _last: dict[str, Reading] = field(default_factory=dict)

    def add(self, order: Order) -> None:
        """Track an accepted order (adding it again keeps what was already metered)."""
        if order.order_id not in self.flows:
            self.flows[order.order_id] = OrderFlow(order)

    def remove(self, order_id: int) -> None:
        self.flows.pop(order_id, None)

    def meters(self) -> set[str]:
        return {f.order.meter for f in self.flows.values()}

    def on_readings(self, readings: Iterable[Reading], now_ms: int) -> list[Reading]:
        """Take the meters' new readings; the market inputs if any order's meter moved."""
        meters = self.meters()
        moved = False
        for r in readings:
            if r.channel not in meters or not r.good or not math.isfinite(r.value):
                continue
            before = self._last.get(r.channel)
            if before is not None and r.t_ms <= before.t_ms:
                continue
            self._last[r.channel] = r
            moved = True
            if before is not None and r.value > before.value:
                self._share(r.channel, r.value - before.value, before.t_ms, r.t_ms)
        return self.inputs(now_ms) if moved else []

    def _share(self, meter: str, wh: float, t_from: int, t_to: int) -> None:
        """Give the energy a meter counted between two readings to its orders.

        Orders on one meter cannot be told apart by it: the energy goes to the open order with
        the lowest id until it has its amount, then to the next, so the meter's energy is
        counted once and the flow ends when every order on it is served. An interval that
        straddles a window's edge counts in proportion of the time inside the window.
        """
        for flow in sorted(self.flows.values(), key=lambda f: f.order.order_id):
            order = flow.order
            if wh <= 0:
                return
            if order.meter != meter or flow.state in FINAL:
                continue
            inside = min(t_to, order.t1_ms) - max(t_from, order.t0_ms)
            if inside <= 0:
                continue
            share = wh * inside / (t_to - t_from)
            take = min(share, flow.remaining_wh)
            flow.counted += take
            wh -= take

    def inputs(self, now_ms: int) -> list[Reading]:
        """The market inputs of the rules at `now_ms`, each order's state brought up to date."""
        active = False
        delivered = remaining = 0.0
        for flow in self.flows.values():
            flow.state = self._state(flow, now_ms)
            if flow.state == FLOWING:
                active = True
            order = flow.order
            if order.t0_ms <= now_ms < order.t1_ms or flow.state == FLOWING:
                delivered += flow.delivered_wh
                remaining += flow.remaining_wh
        return [
            Reading(ACTIVE, now_ms, 1.0 if active else 0.0),
            Reading(DELIVERED, now_ms, delivered),
            Reading(REMAINING, now_ms, remaining),
        ]

    def _state(self, flow: OrderFlow, now_ms: int) -> str:
        order = flow.order
        if flow.state in FINAL:
            return flow.state
        if flow.counted >= order.amount_wh:
            return DELIVERED_ALL
        if now_ms >= order.t1_ms:
            return WINDOW_ENDED
        if now_ms < order.t0_ms:
            return WAITING
        age = self.peer_age_s(order.peer)
        if age is None or age > self.heartbeat_s:
            return PEER_LOST
        if order.meter not in self._last:
            return NO_METER
        return FLOWING

    def snapshot(self) -> dict[str, Any]:
        """Each order's state and each meter's last reading, for `status` and to keep across a
        restart (energy a meter counts while the node is down is then still counted)."""
        return {
            "orders": [
                {
                    "order_id": f.order.order_id,
                    "role": f.order.role,
                    "peer": f.order.peer,
                    "amount_wh": f.order.amount_wh,
                    "t0_ms": f.order.t0_ms,
                    "t1_ms": f.order.t1_ms,
                    "meter": f.order.meter,
                    "counted_wh": f.counted,
                    "state": f.state,
                }
                for f in sorted(self.flows.values(), key=lambda f: f.order.order_id)
            ],
            "meters": {name: [r.t_ms, r.value] for name, r in self._last.items()},
        }

    def restore(self, saved: Mapping[str, Any]) -> None:
        """Take back what `snapshot` kept: a restart neither recounts nor forgets a delivery."""
        for item in saved.get("orders", ()):
            order = Order(
                order_id=int(item["order_id"]),
                role=item["role"],
                peer=str(item["peer"]),
                amount_wh=int(item["amount_wh"]),
                t0_ms=int(item["t0_ms"]),
                t1_ms=int(item["t1_ms"]),
                meter=str(item["meter"]),
            )
            self.flows[order.order_id] = OrderFlow(
                order,
                counted=float(item.get("counted_wh", 0.0)),
                state=str(item.get("state", WAITING)),
            )
        for name, (t_ms, value) in saved.get("meters", {}).items():
            self._last[name] = Reading(name, int(t_ms), float(value))
