"""The node meters its own deliveries: stop at the ordered Wh, at the window's end, or when the
peer falls silent, from its own counter, without waiting for the chain."""

from __future__ import annotations

import json

from daisee_node.delivery import (
    ACTIVE,
    DELIVERED,
    DELIVERED_ALL,
    FLOWING,
    PEER_LOST,
    REMAINING,
    WAITING,
    WINDOW_ENDED,
    DeliveryTracker,
    Order,
)
from daisee_node.readings import Quality, Reading

T0 = 1_700_000_000_000
HOUR = 3_600_000
METER = "line.export_wh"


def order(amount_wh: int = 500, **kw: object) -> Order:
    terms: dict[str, object] = {
        "order_id": 7,
        "role": "seller",
        "peer": "house2",
        "amount_wh": amount_wh,
        "t0_ms": T0,
        "t1_ms": T0 + HOUR,
        "meter": METER,
    }
    terms.update(kw)
    return Order(**terms)  # type: ignore[arg-type]


class Heard:
    """The peer's heartbeat as the peer inbox would report it."""

    def __init__(self) -> None:
        self.age: float | None = 1.0

    def __call__(self, peer: str) -> float | None:
        return self.age if peer == "house2" else None


def values(inputs: list[Reading]) -> dict[str, float]:
    return {r.channel: r.value for r in inputs}


def meter(tracker: DeliveryTracker, t_ms: int, wh: float) -> dict[str, float]:
    return values(tracker.on_readings([Reading(METER, t_ms, wh)], t_ms))


def test_flow_starts_at_the_window_and_stops_at_the_ordered_energy() -> None:
    tracker = DeliveryTracker(Heard())
    tracker.add(order(500))
    # Before the window: a reading only sets where the count starts from.
    assert meter(tracker, T0 - 1000, 10_000.0)[ACTIVE] == 0.0
    assert tracker.flows[7].state == WAITING
    # 100 Wh over [t0 - 1 s, t0 + 1 s]: half of that interval is inside the window, 50 Wh.
    got = meter(tracker, T0 + 1000, 10_100.0)
    assert got == {ACTIVE: 1.0, DELIVERED: 50.0, REMAINING: 450.0}
    # +399 Wh: 449 counted, 51 to go.
    got = meter(tracker, T0 + 2000, 10_499.0)
    assert got[ACTIVE] == 1.0 and got[REMAINING] == 51.0
    # +60 Wh would pass the 500 ordered: the flow stops at once, before any block.
    got = meter(tracker, T0 + 3000, 10_559.0)
    assert got[ACTIVE] == 0.0
    assert got[DELIVERED] == 500.0  # never more than ordered
    assert tracker.flows[7].state == DELIVERED_ALL
    # It stays stopped: the order is done, whatever the meter does next.
    assert meter(tracker, T0 + 4000, 10_600.0)[ACTIVE] == 0.0


def test_the_window_end_stops_a_partial_delivery() -> None:
    tracker = DeliveryTracker(Heard())
    tracker.add(order(500))
    meter(tracker, T0, 0.0)
    assert meter(tracker, T0 + HOUR - 1, 200.0)[ACTIVE] == 1.0
    got = values(tracker.inputs(T0 + HOUR))
    assert got[ACTIVE] == 0.0
    assert tracker.flows[7].state == WINDOW_ENDED
    assert tracker.flows[7].delivered_wh == 200.0
    # Energy read after the window's end is not the order's.
    meter(tracker, T0 + HOUR + 5000, 260.0)
    assert tracker.flows[7].delivered_wh == 200.0


def test_a_silent_peer_pauses_the_flow_until_it_is_heard_again() -> None:
    heard = Heard()
    tracker = DeliveryTracker(heard, heartbeat_s=10.0)
    tracker.add(order(500))
    meter(tracker, T0, 0.0)
    assert values(tracker.inputs(T0 + 1000))[ACTIVE] == 1.0
    heard.age = 10.5
    assert values(tracker.inputs(T0 + 2000))[ACTIVE] == 0.0
    assert tracker.flows[7].state == PEER_LOST
    heard.age = None  # never heard since a restart: still paused
    assert values(tracker.inputs(T0 + 3000))[ACTIVE] == 0.0
    heard.age = 0.5
    assert values(tracker.inputs(T0 + 4000))[ACTIVE] == 1.0
    assert tracker.flows[7].state == FLOWING


def test_bad_readings_and_other_channels_do_not_count() -> None:
    tracker = DeliveryTracker(Heard())
    tracker.add(order(500))
    meter(tracker, T0, 100.0)
    bad = [
        Reading(METER, T0 + 1000, 9e9, Quality.IMPLAUSIBLE_STEP),
        Reading(METER, T0 + 1000, float("nan")),
        Reading("grid.export_wh", T0 + 1000, 5000.0),
    ]
    assert tracker.on_readings(bad, T0 + 1000) == []  # nothing of ours moved
    assert tracker.flows[7].counted == 0.0
    # A reading older than the newest is not a step back of the count.
    meter(tracker, T0 + 2000, 150.0)
    meter(tracker, T0 + 1500, 120.0)
    assert tracker.flows[7].counted == 50.0


def test_two_orders_on_one_meter_share_its_energy_in_order_of_id() -> None:
    tracker = DeliveryTracker(Heard())
    tracker.add(order(300, order_id=2, t0_ms=T0 + 60_000))
    tracker.add(order(100, order_id=1))
    meter(tracker, T0, 1000.0)
    # [t0, t0 + 60 s]: 50 Wh, only order 1's window is open.
    meter(tracker, T0 + 60_000, 1050.0)
    assert tracker.flows[1].counted == 50.0 and tracker.flows[2].counted == 0.0
    # +100 Wh with both open: order 1 takes the 50 it lacks, order 2 the other 50.
    got = meter(tracker, T0 + 120_000, 1150.0)
    assert tracker.flows[1].state == DELIVERED_ALL
    assert tracker.flows[2].counted == 50.0
    # Counted once: 150 Wh through the meter, 100 + 50 delivered, 250 still to go for order 2.
    assert got == {ACTIVE: 1.0, DELIVERED: 150.0, REMAINING: 250.0}


def test_a_restart_keeps_what_was_metered_and_counts_the_downtime() -> None:
    tracker = DeliveryTracker(Heard())
    tracker.add(order(500))
    meter(tracker, T0, 2000.0)
    meter(tracker, T0 + 60_000, 2300.0)
    saved = json.loads(json.dumps(tracker.snapshot()))  # as kept on disk
    again = DeliveryTracker(Heard())
    again.restore(saved)
    again.add(order(500))  # the chain still lists it: no new count
    # 150 Wh flowed while the node was down: counted from the meter's last kept reading.
    got = meter(again, T0 + 120_000, 2450.0)
    assert got[DELIVERED] == 450.0 and got[ACTIVE] == 1.0
    assert meter(again, T0 + 180_000, 2500.0)[ACTIVE] == 0.0
