"""ChannelChecks: ranges, counters that go backwards or jump, counter resets, with stamped times."""

from __future__ import annotations

import math

import pytest

from daisee_node.checks import ANCHOR_MS, CONFIRM_READINGS, ChannelChecks, counter_advance
from daisee_node.readings import Channel, Quality, Reading

G, BACK, STEP, RANGE = (
    Quality.GOOD,
    Quality.COUNTER_BACKWARDS,
    Quality.IMPLAUSIBLE_STEP,
    Quality.OUT_OF_RANGE,
)
#: an SDM120-like export counter: ~11.4 kW at most, 10 Wh display steps
MAX_W = 11_385.0
COUNTER = Channel(
    "grid.export_wh", "Wh", "total_increasing", 0, 1e10, max_rate_per_s=MAX_W / 3600, resolution=10
)
POWER = Channel("grid.power_w", "W", min=-25_000, max=25_000)


def run(
    checks: ChannelChecks,
    steps: list[tuple[int, float]],
    latest: dict[str, Reading] | None = None,
    channel: str = COUNTER.name,
) -> list[Quality]:
    """Feed (t_ms, value) readings one at a time, as a sampler does; their qualities."""
    latest = {} if latest is None else latest
    out = []
    for t_ms, value in steps:
        (r,) = checks.apply([Reading(channel, t_ms, value)], latest)
        latest[r.channel] = r  # flagged readings are published too
        out.append(r.quality)
    return out


def test_steps_within_the_maximum_power_are_good() -> None:
    checks = ChannelChecks([COUNTER])
    # 1 s apart: 11.4 kW for a second is ~3.2 Wh, plus one 10 Wh display step.
    assert run(checks, [(0, 1000.0), (1000, 1003.0), (2000, 1013.0), (3000, 1013.0)]) == [G] * 4
    # After an hour away, an hour of full power is plausible.
    assert run(checks, [(3_603_000, 1013.0 + MAX_W - 1)]) == [G]


def test_one_corrupt_read_is_flagged_and_never_the_baseline() -> None:
    checks = ChannelChecks([COUNTER])
    qualities = run(
        checks,
        [(0, 5000.0), (1000, 1e15), (2000, 5002.0), (3000, 5001.0), (4000, 5004.0)],
    )
    # 1e15 is out of range; the next normal reading is judged against 5000, not against 1e15.
    assert qualities == [G, RANGE, G, BACK, G]


def test_an_in_range_jump_is_an_implausible_step() -> None:
    checks = ChannelChecks([COUNTER])
    # 1 MWh in one second: in range, but more than 11.4 kW can make.
    qualities = run(checks, [(0, 5000.0), (1000, 1_005_000.0), (2000, 5003.0), (3000, 5005.0)])
    assert qualities == [G, STEP, G, G]


def test_the_bound_is_the_maximum_power_over_the_elapsed_time() -> None:
    checks = ChannelChecks([COUNTER])
    allowed = MAX_W / 3600 * 10 + 10  # ten seconds at full power, plus a display step
    assert run(checks, [(0, 0.0), (10_000, allowed - 0.5)]) == [G, G]
    checks = ChannelChecks([COUNTER])
    assert run(checks, [(0, 0.0), (10_000, allowed + 0.5)]) == [G, STEP]


def test_a_counter_going_backwards_is_flagged() -> None:
    checks = ChannelChecks([COUNTER])
    assert run(checks, [(0, 100.0), (1000, 99.0), (2000, 101.0)]) == [G, BACK, G]


def test_a_counter_that_restarts_at_a_new_level_is_accepted_after_a_few_readings() -> None:
    checks = ChannelChecks([COUNTER])
    replaced = [(1000 * i, 10.0 + 0.5 * i) for i in range(1, 6)]  # a new meter, counting on
    qualities = run(checks, [(0, 90_000.0), *replaced])
    assert qualities == [G] + [BACK] * (CONFIRM_READINGS - 1) + [G] * (6 - CONFIRM_READINGS)
    # From the new level on, an old-level value is a step backwards from the new baseline.
    assert run(checks, [(7000, 90_000.0)]) == [STEP]


def test_a_jump_up_that_holds_is_accepted_too_but_readings_that_disagree_are_not() -> None:
    checks = ChannelChecks([COUNTER])
    # Garbage that changes every read never confirms a level.
    garbage = [(1000, 5e6), (2000, 7e6), (3000, 2e6), (4000, 9e6), (5000, 3e6)]
    assert run(checks, [(0, 100.0), *garbage]) == [G] + [STEP] * 5
    # A level that holds (a meter swapped for a used one) is accepted.
    held = [(6000 + 1000 * i, 8e6 + i) for i in range(CONFIRM_READINGS)]
    assert run(checks, held) == [STEP] * (CONFIRM_READINGS - 1) + [G]
    assert run(checks, [(10_000, 8e6 + 5)]) == [G]


def test_the_baseline_at_start_is_the_newest_stored_good_value() -> None:
    latest = {COUNTER.name: Reading(COUNTER.name, 0, 5000.0)}
    assert run(ChannelChecks([COUNTER]), [(1000, 1e6)], dict(latest)) == [STEP]
    assert run(ChannelChecks([COUNTER]), [(1000, 4000.0)], dict(latest)) == [BACK]
    assert run(ChannelChecks([COUNTER]), [(1000, 5002.0)], dict(latest)) == [G]


def test_a_step_from_an_untrusted_stored_value_has_to_be_confirmed() -> None:
    # The node stopped while the meter was down: the newest stored value is a failed read.
    latest = {COUNTER.name: Reading(COUNTER.name, 0, math.nan, Quality.SOURCE_ERROR)}
    steps = [(1000 * i, 7000.0 + i) for i in range(1, CONFIRM_READINGS + 2)]
    assert run(ChannelChecks([COUNTER]), steps, latest) == [STEP] * (CONFIRM_READINGS - 1) + [
        G,
        G,
    ]
    # With no history at all (a new node), the first reading is the baseline.
    assert run(ChannelChecks([COUNTER]), [(0, 7000.0), (1000, 7001.0)]) == [G, G]


def test_slack_cannot_add_up_reading_after_reading() -> None:
    checks = ChannelChecks([COUNTER])
    # Each read 9 Wh more than the one a second before: within one display step each time,
    # but ~32 kW sustained. Checked against a reference up to a minute old, it is refused.
    steps = [(1000 * i, 9.0 * i) for i in range(ANCHOR_MS // 1000)]
    qualities = run(checks, steps)
    assert qualities[:2] == [G, G]
    assert STEP in qualities


def test_a_backward_clock_step_costs_a_few_readings_not_the_counter() -> None:
    checks = ChannelChecks([COUNTER])
    assert run(checks, [(3_600_000, 500.0), (3_601_000, 501.0)]) == [G, G]
    # The wall clock stepped back an hour: no elapsed time can be vouched for, so a step beyond
    # the display resolution is not trusted until the readings agree among themselves.
    later = [(2000 + 1000 * i, 520.0 + 3 * i) for i in range(CONFIRM_READINGS + 1)]
    assert run(checks, later) == [STEP] * (CONFIRM_READINGS - 1) + [G, G]
    # An unchanged counter across the step stays good.
    checks = ChannelChecks([COUNTER])
    assert run(checks, [(3_600_000, 500.0), (2000, 500.0), (3000, 503.0)]) == [G, G, G]


def test_ranges_and_unbounded_counters() -> None:
    plain = Channel("meter.energy_wh", "Wh", "total_increasing")
    checks = ChannelChecks([POWER, plain])
    assert run(checks, [(0, 3e38), (1, -26_000.0), (2, 2000.0)], channel=POWER.name) == [
        RANGE,
        RANGE,
        G,
    ]
    # Without a rate, any step forward is good, a step back is not.
    assert run(checks, [(0, 1.0), (1, 1e9), (2, 5.0)], channel=plain.name) == [G, G, BACK]


def test_readings_already_flagged_are_left_alone_and_do_not_move_the_baseline() -> None:
    checks = ChannelChecks([COUNTER])
    latest: dict[str, Reading] = {}
    run(checks, [(0, 100.0)], latest)
    failed = Reading(COUNTER.name, 1000, math.nan, Quality.SOURCE_ERROR)
    assert checks.apply([failed], latest) == [failed]
    assert run(checks, [(2000, 1e6), (3000, 102.0)], latest) == [STEP, G]


def test_channels_without_checks_pass_the_batch_through() -> None:
    readings = [Reading("load.power_w", 0, 1e9)]
    assert ChannelChecks([Channel("load.power_w", "W")]).apply(readings, {}) is readings


@pytest.mark.parametrize("rate", [0.0, -1.0])
def test_a_rate_must_be_positive(rate: float) -> None:
    with pytest.raises(ValueError, match="max_rate_per_s"):
        Channel("grid.export_wh", "Wh", "total_increasing", max_rate_per_s=rate)


def test_counter_advance_leaves_out_steps_across_a_jump() -> None:
    def r(t: int, v: float, q: Quality = G) -> Reading:
        return Reading(COUNTER.name, t, v, q)

    readings = [
        r(0, 100.0),
        r(1, 103.0),
        r(2, math.nan, Quality.SOURCE_ERROR),  # a failed read: the step across it counts
        r(3, 105.0),
        r(4, 9e6, STEP),  # a new level being confirmed: the step to it does not count
        r(5, 9e6 + 1, STEP),
        r(6, 9e6 + 2),
        r(7, 9e6 + 6),
    ]
    assert counter_advance(readings) == pytest.approx(5.0 + 4.0)
