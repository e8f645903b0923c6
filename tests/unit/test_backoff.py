"""The one retry delay every reconnecting loop of the node uses."""

from __future__ import annotations

import random

from daisee_node.backoff import Backoff


def test_delays_double_up_to_the_cap_within_the_jitter() -> None:
    backoff = Backoff(0.5, 8.0, _rng=random.Random(7))
    delays = [backoff.next_delay() for _ in range(8)]
    ceilings = [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0, 8.0]
    for delay, ceiling in zip(delays, ceilings, strict=True):
        assert ceiling / 2 <= delay <= ceiling
    assert backoff.failures == 8


def test_reset_starts_again_from_the_base() -> None:
    backoff = Backoff(1.0, 30.0)
    for _ in range(5):
        backoff.next_delay()
    backoff.reset()
    assert backoff.failures == 0
    assert backoff.next_delay() <= 1.0


def test_a_very_long_outage_stays_at_the_cap() -> None:
    backoff = Backoff(1.0, 60.0, jitter=1.0)
    for _ in range(5000):
        delay = backoff.next_delay()
    assert delay == 60.0


def test_two_nodes_do_not_retry_in_lockstep() -> None:
    a, b = Backoff(1.0, 60.0), Backoff(1.0, 60.0)
    assert [a.next_delay() for _ in range(6)] != [b.next_delay() for _ in range(6)]
