"""Rule behaviour as tables driven by a fake clock: inputs at t → what the rule asks at t."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pytest

from daisee_node.readings import Quality, Reading
from daisee_node.rules.engine import Decision, RuleConfig, RuleEngine
from tests.support.clocks import FixedClock

SAFE = {"neighbour": "off", "own": "on", "heater": "off"}


class Harness:
    """A rule engine on a clock the table moves, and the relay requests it made."""

    def __init__(self, rules: list[dict[str, Any]], derived: dict[str, str] | None = None):
        self.clock = FixedClock(0)
        self.latest: dict[str, Reading] = {}
        self.asked: dict[str, bool | None] = {}
        self.decisions: list[Decision] = []
        self.engine = RuleEngine(
            [RuleConfig(**r) for r in rules],
            derived or {},
            self.latest,
            SAFE,
            clock=self.clock,
            request=self._request,
            record=self.decisions.append,
        )

    @property
    def t_ms(self) -> int:
        return self.clock.t_ms

    def _request(self, relay: str, on: bool | None, reason: str) -> None:
        self.asked[relay] = on

    def at(self, t_s: float, *, quality: Quality = Quality.GOOD, **values: float) -> dict:
        self.clock.t_ms = int(t_s * 1000)
        readings = [Reading(k.replace("__", "."), self.t_ms, v, quality) for k, v in values.items()]
        for r in readings:
            self.latest[r.channel] = r
        self.engine.on_readings(readings)
        self.engine.tick()
        return dict(self.asked)


def low_battery(**extra: Any) -> dict[str, Any]:
    return {
        "name": "buy-when-low",
        "when": "battery.soc_pct < 20",
        "then": {"relay": "neighbour", "state": "on"},
        "otherwise": {"relay": "neighbour", "state": "off"},
        "stale_after_s": 5,
        **extra,
    }


ON, OFF = True, False


def run_table(
    h: Harness, table: list[tuple[float, dict[str, float], dict[str, bool | None]]]
) -> None:
    for t, inputs, expected in table:
        got = h.at(t, **inputs)
        for relay, state in expected.items():
            assert got.get(relay) == state, f"at t={t}: {relay} {got.get(relay)} != {state}"


def test_acts_at_once_without_hold() -> None:
    run_table(
        Harness([low_battery()]),
        [
            (0, {"battery__soc_pct": 50}, {"neighbour": OFF}),
            (1, {"battery__soc_pct": 19}, {"neighbour": ON}),
            (2, {"battery__soc_pct": 21}, {"neighbour": OFF}),
        ],
    )


def test_hold_means_held_for_the_whole_time() -> None:
    run_table(
        Harness([low_battery(hold_s=10)]),
        [
            (0, {"battery__soc_pct": 50}, {"neighbour": OFF}),
            (1, {"battery__soc_pct": 19}, {"neighbour": OFF}),
            (6, {"battery__soc_pct": 25}, {"neighbour": OFF}),  # not held: the clock restarts
            (7, {"battery__soc_pct": 18}, {"neighbour": OFF}),
            (16, {"battery__soc_pct": 18}, {"neighbour": OFF}),  # 9 s
            (17, {"battery__soc_pct": 18}, {"neighbour": ON}),  # 10 s
            (18, {"battery__soc_pct": 30}, {"neighbour": ON}),  # going back also needs 10 s
            (28, {"battery__soc_pct": 30}, {"neighbour": OFF}),
        ],
    )


def test_until_gives_hysteresis() -> None:
    run_table(
        Harness([low_battery(until="battery.soc_pct > 30")]),
        [
            (0, {"battery__soc_pct": 19}, {"neighbour": ON}),
            (1, {"battery__soc_pct": 25}, {"neighbour": ON}),  # above 20, not above 30
            (2, {"battery__soc_pct": 31}, {"neighbour": OFF}),
            (3, {"battery__soc_pct": 25}, {"neighbour": OFF}),  # below 30, not below 20
            (4, {"battery__soc_pct": 19}, {"neighbour": ON}),
        ],
    )


def test_minimum_on_and_off_times() -> None:
    run_table(
        Harness([low_battery(min_on_s=60, min_off_s=30)]),
        [
            (0, {"battery__soc_pct": 19}, {"neighbour": ON}),
            (10, {"battery__soc_pct": 50}, {"neighbour": ON}),  # on for 10 s < 60
            (59, {"battery__soc_pct": 50}, {"neighbour": ON}),
            (60, {"battery__soc_pct": 50}, {"neighbour": OFF}),
            (70, {"battery__soc_pct": 10}, {"neighbour": OFF}),  # off for 10 s < 30
            (90, {"battery__soc_pct": 10}, {"neighbour": ON}),
        ],
    )


def test_stale_or_bad_inputs_fall_back_at_once() -> None:
    h = Harness(
        [
            low_battery(min_on_s=600, fallback="safe"),
            {
                **low_battery(),
                "name": "heat",
                "fallback": "on",
                "then": {"relay": "heater", "state": "off"},
                "otherwise": None,
            },
        ]
    )
    run_table(
        h,
        [
            (0, {"battery__soc_pct": 10}, {"neighbour": ON, "heater": OFF}),
            (4, {}, {"neighbour": ON}),
            (6, {}, {"neighbour": OFF, "heater": ON}),  # 6 s old > 5 s: safe state / fallback
            (7, {"battery__soc_pct": 10}, {"neighbour": ON, "heater": OFF}),  # fresh again
        ],
    )
    h.at(8, quality=Quality.SOURCE_ERROR, battery__soc_pct=float("nan"))
    assert h.asked["neighbour"] is OFF
    assert any("stale" in d.reason for d in h.decisions)


def test_missing_input_is_stale_too() -> None:
    assert Harness([low_battery()]).at(0)["neighbour"] is OFF  # safe state of 'neighbour'


def test_priority_decides_between_rules_for_one_relay() -> None:
    rules = [
        low_battery(),
        {
            "name": "never-at-night",
            "when": "time.hour >= 22 or time.hour < 6",
            "priority": 10,
            "then": {"relay": "neighbour", "state": "off"},
            "stale_after_s": 5,
        },
        {
            "name": "price",
            "when": "grid.price_eur < 0.1",
            "priority": 10,
            "then": {"relay": "neighbour", "state": "on"},
            "stale_after_s": 5,
        },
    ]
    h = Harness(rules)
    h.engine.local_time = lambda t: datetime(2026, 6, 21, 23, 0)
    assert h.at(0, battery__soc_pct=10, grid__price_eur=0.05)["neighbour"] is OFF  # first of 10s
    h.engine.local_time = lambda t: datetime(2026, 6, 21, 12, 0)
    assert h.at(1, battery__soc_pct=50, grid__price_eur=0.05)["neighbour"] is ON  # price wins


def test_derived_values_and_disabled_rules() -> None:
    rule = {
        "name": "surplus",
        "when": "home.surplus_w > 500",
        "then": {"relay": "heater", "state": "on"},
        "otherwise": {"relay": "heater", "state": "off"},
    }
    h = Harness([rule], {"home.surplus_w": "pv.power_w - load.power_w"})
    assert h.at(0, pv__power_w=2000, load__power_w=800)["heater"] is ON
    assert h.at(1, pv__power_w=900, load__power_w=800)["heater"] is OFF
    off = Harness([{**rule, "enabled": False}], {"home.surplus_w": "pv.power_w - load.power_w"})
    assert "heater" not in off.at(0, pv__power_w=2000, load__power_w=0)


def test_suspended_rules_ask_nothing() -> None:
    h = Harness([low_battery()])
    h.at(0, battery__soc_pct=10)
    h.engine.set_suspended("neighbour", True)
    assert h.at(1, battery__soc_pct=10)["neighbour"] is None


def test_decisions_are_recorded_with_their_inputs_only_when_they_change() -> None:
    h = Harness([low_battery()])
    for t in range(5):
        h.at(t, battery__soc_pct=50)
    h.at(5, battery__soc_pct=10)
    assert [d.state for d in h.decisions] == ["off", "on"]
    assert h.decisions[-1].inputs == {"battery.soc_pct": 10}
    assert h.decisions[-1].t_ms == 5000


@pytest.mark.parametrize("expression", ["battery.soc_pct <", "import os", "battery.soc_pct @ 2"])
def test_bad_expressions_do_not_compile(expression: str) -> None:
    from daisee_node.rules.expressions import Expression, ExpressionError

    with pytest.raises(ExpressionError):
        Expression(expression)


def ratio_rule(**extra: Any) -> dict[str, Any]:
    return {
        "name": "ratio",
        "when": "home.ratio > 2",
        "then": {"relay": "heater", "state": "on"},
        "otherwise": {"relay": "heater", "state": "off"},
        **extra,
    }


def test_a_failing_rule_falls_back_alone_counts_and_shows_why() -> None:
    h = Harness([ratio_rule(), low_battery()], {"home.ratio": "pv.power_w / load.power_w"})
    both = {"battery__soc_pct": 10, "pv__power_w": 1000}
    assert h.at(0, load__power_w=100, **both) == {"heater": ON, "neighbour": ON}
    # load 0: a division by zero, in the sampler's call and on the tick; neither raises.
    assert h.at(1, load__power_w=0, **both) == {"heater": OFF, "neighbour": ON}  # heater: safe
    state = h.engine.snapshot()["ratio"]
    assert "division by zero" in state["error"] and "home.ratio" in state["error"]
    assert state["errors"] == 2 and state["reason"].startswith("error: ")
    assert h.engine.snapshot()["buy-when-low"]["error"] is None
    failed = [d for d in h.decisions if d.rule == "ratio" and d.error]
    assert failed and failed[-1].state == "off" and "division by zero" in failed[-1].reason
    assert h.at(2, load__power_w=0, **both)["heater"] is OFF
    assert h.engine.snapshot()["ratio"]["errors"] == 4
    # It evaluates again: the error goes, the count stays.
    assert h.at(3, load__power_w=100, **both) == {"heater": ON, "neighbour": ON}
    assert h.engine.snapshot()["ratio"]["error"] is None
    assert h.engine.snapshot()["ratio"]["errors"] == 4


def test_a_failing_until_falls_back_too() -> None:
    rule = low_battery(until="battery.soc_pct / (pv.power_w - pv.power_w) > 1", fallback="on")
    h = Harness([rule])
    assert h.at(0, battery__soc_pct=50, pv__power_w=1)["neighbour"] is OFF  # `when` is fine
    assert h.at(1, battery__soc_pct=10, pv__power_w=1)["neighbour"] is ON  # active
    assert h.at(2, battery__soc_pct=10, pv__power_w=1)["neighbour"] is ON  # `until` fails: "on"
    assert "division by zero" in h.engine.snapshot()["buy-when-low"]["error"]


def test_derived_values_in_a_cycle_fail_their_rules_not_the_engine() -> None:
    derived = {"home.a": "home.b + 1", "home.b": "home.a + pv.power_w", "home.ratio": "home.a"}
    h = Harness([ratio_rule(), low_battery()], derived)
    assert h.at(0, pv__power_w=1, battery__soc_pct=10) == {"heater": OFF, "neighbour": ON}
    assert "depend on each other" in h.engine.snapshot()["ratio"]["error"]


def test_derived_values_may_use_each_other_in_any_order() -> None:
    derived = {"home.ratio": "home.surplus_w / 100", "home.surplus_w": "pv.power_w - 500"}
    h = Harness([ratio_rule()], derived)
    assert h.at(0, pv__power_w=1000)["heater"] is ON  # (1000 - 500) / 100 = 5 > 2
    assert h.at(1, pv__power_w=600)["heater"] is OFF  # 1 < 2
    assert h.engine.snapshot()["ratio"]["errors"] == 0


def test_time_inputs_and_staleness_come_from_the_clock_given() -> None:
    # 2026-06-21 23:30 local time: the night rule holds, and nothing else reads the time.
    night = int(datetime(2026, 6, 21, 23, 30).timestamp() * 1000)
    h = Harness([{**low_battery(), "when": "time.hour >= 22 and battery.soc_pct < 20"}])
    h.clock.t_ms = night
    h.latest["battery.soc_pct"] = Reading("battery.soc_pct", night, 10.0)
    h.engine.tick()
    assert h.asked["neighbour"] is ON
    assert h.decisions[-1].t_ms == night
    h.clock.t_ms = night + 5_001  # only the clock moves: the reading is now stale
    h.engine.tick()
    assert h.asked["neighbour"] is OFF
    assert "stale" in h.engine.snapshot()["buy-when-low"]["reason"]


def test_a_now_ms_function_still_serves_as_the_clock() -> None:
    t = {"ms": 7_000}
    asked: dict[str, bool | None] = {}
    engine = RuleEngine(
        [RuleConfig(**low_battery())],
        {},
        {"battery.soc_pct": Reading("battery.soc_pct", 6_000, 10.0)},
        SAFE,
        now_ms=lambda: t["ms"],
        request=lambda relay, on, reason: asked.__setitem__(relay, on),
    )
    engine.tick()
    assert asked == {"neighbour": ON}
    t["ms"] = 11_001
    engine.tick()
    assert asked == {"neighbour": OFF}
    with pytest.raises(ValueError, match="not both"):
        RuleEngine([], {}, {}, SAFE, clock=FixedClock(0), now_ms=lambda: 0, request=print)


# -- reasons an operator reads (status, MQTT) ------------------------------------------------------


def reason(h: Harness) -> str:
    return str(h.engine.snapshot()["buy-when-low"]["reason"])


def test_reasons_say_which_condition_holds_with_the_values() -> None:
    h = Harness([low_battery(hold_s=10)])
    h.at(0, battery__soc_pct=50)
    assert reason(h) == "inactive: battery.soc_pct < 20 does not hold (battery.soc_pct=50)"
    h.at(1, battery__soc_pct=15)
    assert reason(h) == (
        "inactive: battery.soc_pct < 20 does not hold (battery.soc_pct=15); "
        "turns active in 10.0 s if that lasts"
    )
    h.at(11, battery__soc_pct=15)
    assert reason(h) == "active: battery.soc_pct < 20 holds (battery.soc_pct=15)"


def test_an_until_rule_says_what_ends_it() -> None:
    h = Harness([low_battery(until="battery.soc_pct > 30")])
    h.at(0, battery__soc_pct=19)
    assert reason(h) == "active until battery.soc_pct > 30 holds (battery.soc_pct=19)"
    assert "condition: active" not in reason(h)


@pytest.mark.parametrize(
    ("reading", "words"),
    [
        (None, "battery.soc_pct has no reading"),
        (
            Reading("battery.soc_pct", 0, float("nan"), Quality.SOURCE_ERROR),
            "battery.soc_pct has no good reading (its source did not answer)",
        ),
        (
            Reading("battery.soc_pct", 0, 12.0, Quality.OUT_OF_RANGE),
            "battery.soc_pct has no good reading (out of range)",
        ),
        (Reading("battery.soc_pct", 0, 12.0), "battery.soc_pct is 9 s old (stale after 5 s)"),
    ],
)
def test_unusable_inputs_are_described_in_words_never_as_none(
    reading: Reading | None, words: str
) -> None:
    h = Harness([low_battery()])
    if reading is not None:
        h.latest["battery.soc_pct"] = reading
    h.clock.t_ms = 9_000
    h.engine.tick()
    text = reason(h)
    assert text == f"inputs missing or stale: {words}; fallback safe"
    assert "None" not in text and "nan" not in text
    assert h.asked["neighbour"] is OFF  # the safe state of the relay
