"""The conformity report of one period, from its rows: a clean period passes, each kind of defect
injected into the readings is found (and only where it was put), and the digest is stable.

The rows are built here by hand, so each expected finding follows from how the rows were made.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest

from daisee_node.community import Allocator, PeriodAllocation, Trade, parse_key
from daisee_node.conformity import (
    CHECKS,
    REPORT_CHANNEL_ID,
    ConformitySpec,
    PeriodCheck,
    PeriodContext,
    canonical,
    check_allocation,
    conformity_spec,
    digest,
    digest_value,
    leaf_entry,
)
from daisee_node.readings import Quality

PERIOD = 900_000
T0 = 1_781_000_000_000 // PERIOD * PERIOD
T1 = T0 + PERIOD
SPEC = ConformitySpec(intervals_ms={"grid": 1000, "pv": 1000})
COUNTERS = ("grid.import_wh", "grid.export_wh")
CHANNELS = ("grid.power_w", *COUNTERS, "pv.power_w")
GOOD, LATE = int(Quality.GOOD), int(Quality.LATE)

Row = tuple[int, str, float | None, int]


def at(k: int) -> int:
    """The stamp of the k-th read (a sampler's stamps jitter by a few ms)."""
    return T0 + k * 1000 + 3 + k % 3


def clean_rows() -> list[Row]:
    """A quarter hour of a busy meter and a PV inverter, read every second: import in the first
    half, export in the second, power that moves a little every read."""
    rows: list[Row] = []
    imp, exp = 1000.0, 500.0
    for k in range(900):
        if k < 450:
            imp += 0.4
        else:
            exp += 0.3
        rows += [
            (at(k), "grid.power_w", 1500 + 50 * math.sin(k / 20) + k % 7, GOOD),
            (at(k), "grid.import_wh", imp, GOOD),
            (at(k), "grid.export_wh", exp, GOOD),
            (at(k), "pv.power_w", 800 + 30 * math.cos(k / 15) + k % 5, GOOD),
        ]
    return rows


def context(**changes: Any) -> PeriodContext:
    base = PeriodContext(
        node="0x" + "ab" * 20,
        seq=7,
        t0=T0,
        t1=T1,
        state_classes={c: "total_increasing" for c in COUNTERS},
        recent=frozenset(CHANNELS),
        events_upto=3,
        late_total=4,
        late_before=4,
        import_channel="grid.import_wh",
        export_channel="grid.export_wh",
    )
    return replace(base, **changes)


def report_of(
    rows: list[Row], spec: ConformitySpec = SPEC, chunk: int = 128, **ctx: Any
) -> dict[str, Any]:
    check = PeriodCheck(spec, context(**ctx))
    # As the sealer hands them over: in time order, a chunk at a time.
    ordered = sorted(rows, key=lambda r: r[0])
    chunks = [ordered[i : i + chunk] for i in range(0, len(ordered), chunk)]
    assert list(check.observe(chunks)) == chunks  # the rows go on to the tree unchanged
    return check.report()


def edited(rows: list[Row], channel: str, ks: range | list[int], fn: Callable[[Row], Row | None]):
    """`rows` with the readings of `channel` at reads `ks` replaced by `fn(row)` (None: dropped)."""
    times = {at(k) for k in ks}
    out = []
    for r in rows:
        if r[1] == channel and r[0] in times:
            new = fn(r)
            if new is not None:
                out.append(new)
        else:
            out.append(r)
    return out


def failing(report: dict[str, Any]) -> set[str]:
    return {name for name, c in report["checks"].items() if not c["passed"]}


def test_a_clean_period_passes_every_check() -> None:
    report = report_of(clean_rows())
    assert report["passed"] and report["reasons"] == []
    assert failing(report) == set()
    assert report["readings"] == 3600
    grid = report["channels"]["grid.power_w"]
    assert (grid["present"], grid["usable"], grid["expected"]) == (900, 900, 900)
    assert grid["interval_from"] == "config" and grid["qualities"] == {"GOOD": 900}
    assert report["channels"]["grid.import_wh"]["state_class"] == "total_increasing"
    assert set(report["checks"]) == set(CHECKS)


def test_missing_readings_fail_completeness_without_a_gap() -> None:
    # every tenth read lost: 810 of 900 (90 %, below 95 %); never more than 2 s without one
    rows = edited(clean_rows(), "grid.power_w", range(0, 900, 10), lambda r: None)
    report = report_of(rows)
    assert failing(report) == {"completeness"}
    assert report["checks"]["completeness"]["findings"] == [
        {"channel": "grid.power_w", "usable": 810, "expected": 900}
    ]
    assert not report["passed"] and report["reasons"][0].startswith("completeness: 1 finding")


def test_failed_reads_are_present_but_not_usable() -> None:
    rows = edited(
        clean_rows(), "pv.power_w", range(100, 160), lambda r: (r[0], r[1], None, 3)
    )  # 60 s of SOURCE_ERROR: a gap of 61 s, and 840 usable of 900
    report = report_of(rows)
    pv = report["channels"]["pv.power_w"]
    assert (pv["present"], pv["usable"]) == (900, 840)
    assert pv["qualities"] == {"GOOD": 840, "SOURCE_ERROR": 60}
    assert failing(report) == {"completeness", "gaps"}
    assert report["checks"]["gaps"]["findings"] == [
        {"channel": "pv.power_w", "from_ms": at(99), "to_ms": at(160)}
    ]


def test_a_gap_longer_than_n_intervals_is_found_with_its_bounds() -> None:
    rows = edited(clean_rows(), "grid.power_w", range(100, 111), lambda r: None)  # 12 s
    short = edited(clean_rows(), "grid.power_w", range(100, 103), lambda r: None)  # 4 s
    report = report_of(rows)
    assert failing(report) == {"gaps"}
    assert report["checks"]["gaps"]["findings"] == [
        {"channel": "grid.power_w", "from_ms": at(99), "to_ms": at(111)}
    ]
    assert report_of(short)["passed"]  # within 5 intervals


def test_a_channel_that_stops_early_has_a_gap_to_the_end_of_the_period() -> None:
    rows = edited(clean_rows(), "pv.power_w", range(880, 900), lambda r: None)
    findings = report_of(rows)["checks"]["gaps"]["findings"]
    assert findings == [{"channel": "pv.power_w", "from_ms": at(879), "to_ms": T1}]


def test_a_spike_is_found_and_so_is_one_the_ingest_checks_flagged() -> None:
    spiked = edited(clean_rows(), "pv.power_w", [300], lambda r: (r[0], r[1], 5000.0, GOOD))
    report = report_of(spiked)
    assert failing(report) == {"spikes"}
    assert report["checks"]["spikes"]["findings"] == [
        {"channel": "pv.power_w", "t_ms": at(300), "value_micro": 5_000_000_000}
    ]
    flagged = edited(clean_rows(), "pv.power_w", [300], lambda r: (r[0], r[1], -9e9, 1))
    report = report_of(flagged)
    assert report["checks"]["spikes"]["findings"] == [
        {"channel": "pv.power_w", "flagged": "OUT_OF_RANGE", "readings": 1}
    ]


def test_a_step_that_stays_is_not_a_spike() -> None:
    # a kettle switched on: +2 kW from read 300 on
    rows = edited(
        clean_rows(), "grid.power_w", range(300, 900), lambda r: (r[0], r[1], r[2] + 2000, GOOD)
    )
    assert report_of(rows)["passed"]


def test_a_counter_reset_is_found_and_so_are_readings_flagged_at_ingest() -> None:
    reset = edited(
        clean_rows(), "grid.import_wh", range(200, 900), lambda r: (r[0], r[1], r[2] - 1000, GOOD)
    )
    report = report_of(reset)
    assert failing(report) == {"counter_resets"}
    value = {r[0]: r[2] for r in reset if r[1] == "grid.import_wh"}
    assert report["checks"]["counter_resets"]["findings"] == [
        {
            "channel": "grid.import_wh",
            "t_ms": at(200),
            "from_micro": round(value[at(199)] * 1e6),
            "to_micro": round(value[at(200)] * 1e6),
        }
    ]
    assert value[at(200)] < value[at(199)] - 900
    flagged = edited(clean_rows(), "grid.export_wh", [600], lambda r: (r[0], r[1], r[2], 4))
    report = report_of(flagged)
    assert {"channel": "grid.export_wh", "flagged": "COUNTER_BACKWARDS", "readings": 1} in report[
        "checks"
    ]["counter_resets"]["findings"]


def test_a_flat_line_warns_and_zero_is_not_flat() -> None:
    stuck = edited(
        clean_rows(), "grid.power_w", range(100, 500), lambda r: (r[0], r[1], 1234.5, GOOD)
    )
    report = report_of(stuck)
    flat = report["checks"]["flat_lines"]
    assert flat["severity"] == "warn" and not flat["passed"]
    assert flat["findings"] == [
        {
            "channel": "grid.power_w",
            "from_ms": at(100),
            "to_ms": at(499),
            "value_micro": 1_234_500_000,
        }
    ]
    assert report["passed"]  # a warning only: a full battery holds 100 % for hours
    night = edited(clean_rows(), "pv.power_w", range(0, 900), lambda r: (r[0], r[1], 0.0, GOOD))
    assert report_of(night)["checks"]["flat_lines"]["count"] == 0


def test_a_wall_clock_step_fails_the_period() -> None:
    report = report_of(clean_rows(), clock_steps=[(9, T0 + 5_000, "stepped -3600.000 s")])
    assert failing(report) == {"clock_steps"}
    assert report["checks"]["clock_steps"]["findings"] == [
        {"event": 9, "t_ms": T0 + 5_000, "reason": "stepped -3600.000 s"}
    ]


def test_late_readings_are_found_in_the_period_and_as_arrivals_since_the_last_report() -> None:
    late = edited(clean_rows(), "pv.power_w", [10, 11], lambda r: (r[0], r[1], r[2], LATE))
    report = report_of(late)
    assert failing(report) == {"late_readings"}
    assert report["checks"]["late_readings"]["findings"] == [
        {"channel": "pv.power_w", "flagged": "LATE", "readings": 2}
    ]
    arrivals = report_of(clean_rows(), late_total=9, late_before=4)
    assert arrivals["checks"]["late_readings"]["findings"] == [{"arrived_late": 5}]
    assert arrivals["cursor"] == {"events_upto": 3, "late_total": 9}
    # the first report has no earlier count to compare with
    assert report_of(clean_rows(), late_total=9, late_before=None)["passed"]


def test_import_and_export_rising_in_the_same_interval_is_found() -> None:
    both = edited(
        clean_rows(), "grid.export_wh", range(100, 900), lambda r: (r[0], r[1], r[2] + 1.0, GOOD)
    )  # export steps up between reads 99 and 100, while import rises there too
    report = report_of(both)
    assert failing(report) == {"import_export"}
    assert report["checks"]["import_export"]["findings"] == [{"from_ms": at(99), "to_ms": at(100)}]
    assert report_of(clean_rows(), import_channel=None)["checks"]["import_export"]["passed"]


def test_configured_sensors_and_channels_with_nothing_in_the_period_fail() -> None:
    spec = ConformitySpec(intervals_ms={"grid": 1000, "pv": 1000, "battery": 2000, "meter": 5000})
    report = report_of(clean_rows(), spec, recent=frozenset({*CHANNELS, "battery.soc_pct"}))
    findings = report["checks"]["completeness"]["findings"]
    assert {"channel": "battery.soc_pct", "usable": 0, "expected": 450} in findings
    assert {"sensor": "meter", "channels": 0} in findings
    assert {"channel": "battery.soc_pct", "from_ms": T0, "to_ms": T1} in report["checks"]["gaps"][
        "findings"
    ]


def test_a_channel_of_no_configured_sensor_is_judged_on_its_own_interval() -> None:
    rows = clean_rows() + [
        (T0 + 2000 * k + 1, "meter.power_w", 10.0 + k % 3, GOOD) for k in range(400)
    ]
    report = report_of(rows)
    meter = report["channels"]["meter.power_w"]
    assert (meter["interval_ms"], meter["interval_from"], meter["expected"]) == (
        2000,
        "readings",
        450,
    )
    assert {"channel": "meter.power_w", "usable": 400, "expected": 450} in report["checks"][
        "completeness"
    ]["findings"]


def test_no_sensors_and_no_readings_make_an_empty_report_that_passes() -> None:
    report = report_of([], ConformitySpec(), recent=frozenset())
    assert report["passed"] and report["readings"] == 0 and report["channels"] == {}
    # a node whose sensors all stayed silent is not conform
    silent = report_of([], SPEC, recent=frozenset())
    assert failing(silent) == {"completeness"}


def test_the_digest_is_stable_and_changes_with_any_change() -> None:
    rows = clean_rows()
    first = report_of(rows)
    assert digest(first) == digest(report_of(list(reversed(rows)), chunk=7))
    assert canonical(first) == canonical(dict(reversed(list(first.items()))))  # key order
    changed = [
        edited(rows, "pv.power_w", [5], lambda r: (r[0], r[1], r[2] + 1e-6, GOOD)),  # 1 µW
        edited(rows, "pv.power_w", [5], lambda r: (r[0], r[1], r[2], 6)),
        edited(rows, "pv.power_w", [0], lambda r: None),
        edited(rows, "pv.power_w", [0], lambda r: (r[0] - 1, r[1], r[2], r[3])),
    ]
    digests = {digest(report_of(r)) for r in changed}
    digests |= {digest(report_of(rows, seq=8)), digest(report_of(rows, events_upto=4))}
    assert digest(first) not in digests and len(digests) == 6
    for key in first:  # every field is covered
        if isinstance(first[key], int) and not isinstance(first[key], bool):
            assert digest({**first, key: first[key] + 1}) != digest(first)


def test_the_report_leaf_is_a_pseudo_reading_at_the_periods_last_ms() -> None:
    report = report_of(clean_rows())
    d = digest(report)
    t_ms, cid, value, quality = leaf_entry(T1, d)
    assert (t_ms, cid, quality) == (T1 - 1, REPORT_CHANNEL_ID, 0)
    # the digest read as a two's-complement int256, and back
    assert value == digest_value(d) and (value % 2**256).to_bytes(32, "big") == d
    assert -(2**255) <= value < 2**255


def test_the_spec_comes_from_the_config() -> None:
    class Sensor:
        def __init__(self, name: str, interval_s: float, enabled: bool = True) -> None:
            self.name, self.interval_s, self.enabled = name, interval_s, enabled

    class Config:
        def __init__(self) -> None:
            self.sensors = [Sensor("grid", 1.0), Sensor("pv", 0.25), Sensor("x", 1.0, False)]

    assert conformity_spec(Config()).intervals_ms == {"grid": 1000, "pv": 250}


# -- community checks ---------------------------------------------------------------------------


def allocation() -> PeriodAllocation:
    members = ["a", "b", "c"]
    return Allocator(parse_key({"kind": "prorata"}), members).allocate(
        {"a": 300, "b": 700, "c": 0}, {"a": 0, "b": 0, "c": 800}, [Trade("a", "c", 100)]
    )


def test_a_real_allocation_passes_the_community_checks() -> None:
    result = check_allocation(allocation())
    assert result.passed and result.reasons == ()


def plus(values: tuple[int, ...], i: int, wh: int) -> tuple[int, ...]:
    return tuple(v + wh if j == i else v for j, v in enumerate(values))


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        # one Wh more allocated to b than was produced
        (lambda a: {"allocated": plus(a.allocated, 1, 1)}, "p2p sold + allocated + surplus"),
        (lambda a: {"surplus": plus(a.surplus, 2, 1)}, "p2p sold + allocated + surplus"),
        (lambda a: {"p2p_bought": plus(a.p2p_bought, 0, -1)}, "p2p bought 99 Wh"),
        # a gets one Wh beyond what it consumed (b one less: the sum still adds up)
        (
            lambda a: {
                "allocated": (201, a.allocated[1] - (201 - a.allocated[0]), 0),
                "grid_import": (-1, 700 - a.allocated[1] + (201 - a.allocated[0]), 0),
            },
            "> consumption 300 Wh",
        ),
        (lambda a: {"grid_import": plus(a.grid_import, 0, 1)}, "grid import"),
    ],
)
def test_a_tampered_allocation_fails_the_community_checks(
    change: Callable[[PeriodAllocation], dict[str, tuple[int, ...]]], reason: str
) -> None:
    a = allocation()
    # a bought 100 Wh from c; the 700 Wh left are shared pro rata of 200 and 700 Wh
    assert a.p2p_bought == (100, 0, 0) and a.p2p_sold == (0, 0, 100)
    assert sum(a.allocated) == 700 and a.surplus == (0, 0, 0)
    result = check_allocation(replace(a, **change(a)))
    assert not result.passed
    assert any(reason in r for r in result.reasons), result.reasons
