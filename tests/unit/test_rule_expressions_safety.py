"""What a rule expression may say is bounded: nothing hangs, overflows or slips a type error past
`check`, and a run-time failure is an `EvaluationError` of that evaluation only."""

from __future__ import annotations

import time

import pytest

from daisee_node.rules.expressions import (
    MAX_DEPTH,
    MAX_LENGTH,
    EvaluationError,
    Expression,
    ExpressionError,
    check,
)

NAMES = {"battery.soc_pct", "load.power_w", "pv.power_w", "peer.solar.surplus_w", "time.hour"}
#: the expression of issue 10 that kept check-config busy for more than a minute
FREEZING = 'battery.soc_pct > 0 and "' + "a" * 36 + '!" =~ "(a+)+$"'


def timed_check(text: str, **kwargs: object) -> tuple[list[str], float]:
    started = time.thread_time()
    problems = check(text, NAMES.__contains__, **kwargs)  # type: ignore[arg-type]
    return problems, time.thread_time() - started


@pytest.mark.parametrize("op", ["=~", "=~~", "!~", "!~~"])
def test_regular_expressions_are_refused_before_they_run(op: str) -> None:
    problems, took = timed_check(FREEZING.replace("=~", op))
    assert len(problems) == 1 and "regular expressions" in problems[0]
    assert op in problems[0]
    assert took < 0.1


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("not " * 3000 + "battery.soc_pct > 1", "too long"),
        ("x" * (MAX_LENGTH + 1), "too long"),
        ("not " * 200 + "true", "too complex"),
        ("-" * 900 + "battery.soc_pct > 1", "too complex"),
        ("not (" * 40 + "battery.soc_pct > 1" + ")" * 40, "nested too deeply"),
        (" and ".join(["battery.soc_pct > 1"] * 40), "nested too deeply"),
        ("pv.power_w" + " + pv.power_w" * 40 + " > 0", "nested too deeply"),
    ],
)
def test_deep_or_long_expressions_are_refused_without_recursing(text: str, words: str) -> None:
    problems, took = timed_check(text)
    assert len(problems) == 1 and words in problems[0], problems
    assert took < 0.1


def test_the_depth_limit_leaves_room_for_real_rules() -> None:
    text = " and ".join(["battery.soc_pct > 1"] * 30)  # 29 'and', '>' and '.': 31 levels
    assert timed_check(text)[0] == []
    deep = "not (" * (MAX_DEPTH - 2) + "battery.soc_pct > 1" + ")" * (MAX_DEPTH - 2)
    assert timed_check(deep)[0] == []
    parens = "(" * 400 + "battery.soc_pct" + ")" * 400 + " > 1"  # parentheses cost nothing
    assert timed_check(parens)[0] == []


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("1 << 10 ** 9 > battery.soc_pct", "bitwise"),  # folded by the parser: a huge integer
        ("battery.soc_pct & 1", "bitwise"),
        ("$abs(battery.soc_pct) > 1", "built-in functions"),
        ("time.hour in [1, 2]", "'in' is not allowed"),
        ("[x for x in [1, 2]]", "not allowed"),
        ('{"a": 1}', "not allowed"),
        ('d"2026-01-01" > d"2025-01-01"', "not allowed"),
        ("battery.soc_pct ?? 1", "not allowed"),
        ("null", "not allowed"),
        ('"abc".length > 1', "channel names only"),
        ("(battery).soc_pct > 1", "channel names only"),
    ],
)
def test_what_a_rule_has_no_need_of_is_refused(text: str, words: str) -> None:
    problems, took = timed_check(text)
    assert len(problems) == 1 and words in problems[0], problems
    assert took < 0.1


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('battery.soc_pct > "x"', "type error"),
        ("battery.soc_pct / 0 > 1", "division by zero"),
        ("battery.soc_pct // (2 - 2) > 1", "division by zero"),
        ("battery.soc_pct % 0.0 > 1", "division by zero"),
        ("(battery.soc_pct > 1) + 1 > 0", "type error"),
        ('battery.soc_pct == "20"', "type error"),
        ('"a" * 1000000 == "a"', "type error"),  # no string repetition
        ("-(battery.soc_pct > 1)", "type error"),
        ("battery.soc_pct > 1 ? 1 : true", "type error"),
        ('"low" and battery.soc_pct > 1', "type error"),
    ],
)
def test_type_errors_are_found_at_check_time(text: str, words: str) -> None:
    problems, _ = timed_check(text)
    assert len(problems) == 1 and words in problems[0], problems


def test_the_kind_of_result_can_be_required() -> None:
    assert "a condition is needed" in timed_check("battery.soc_pct * 2", result="condition")[0][0]
    assert "a number is needed" in timed_check("battery.soc_pct > 2", result="number")[0][0]
    assert timed_check("pv.power_w - load.power_w", result="number")[0] == []
    assert timed_check("battery.soc_pct < 20", result="condition")[0] == []


@pytest.mark.parametrize(
    "text",
    [
        "battery.soc_pct < 20 and peer.solar.surplus_w > 50",
        "time.hour >= 22 or time.hour < 6",
        "not (battery.soc_pct > 90) and pv.power_w - load.power_w > 500 # comment",
        "battery.soc_pct > 20 ? pv.power_w > 0 : load.power_w < 100",
        "battery.soc_pct ** 2 / 100 % 7 // 1 >= -1.5e3",
        "pv.power_w > 10 ** 10 ** 10",  # left-associative: 1e100, computed at once
        "(battery.soc_pct == 20) != false",
    ],
)
def test_what_rules_are_made_of_still_passes(text: str) -> None:
    problems, took = timed_check(text)
    assert problems == []
    assert took < 0.1


def test_names_are_found_without_recursion() -> None:
    expression = Expression("battery.soc_pct < 20 and peer.solar.surplus_w > pv.power_w * 2")
    assert expression.names == {"battery.soc_pct", "peer.solar.surplus_w", "pv.power_w"}
    assert timed_check("battery.soc_pct < ghost.power_w")[0] == [
        "unknown channel(s): ghost.power_w"
    ]


@pytest.mark.parametrize("text", ["", " ", "\x00", "é > 1", "battery.soc_pct >\n 1", "'", "#"])
def test_odd_text_gives_problems_not_exceptions(text: str) -> None:
    problems, took = timed_check(text)
    assert all(isinstance(p, str) for p in problems)
    assert took < 0.1


@pytest.mark.parametrize(
    ("text", "values"),
    [
        ("pv.power_w / load.power_w > 1", {"pv.power_w": 1.0, "load.power_w": 0.0}),
        ("pv.power_w % load.power_w > 1", {"pv.power_w": 1.0, "load.power_w": 0.0}),
        ("pv.power_w ** 0.5 > 1", {"pv.power_w": -1.0}),
        ("pv.power_w ** 1e10 > 1", {"pv.power_w": 10.0}),
        ("pv.power_w - pv.power_w > 1", {"pv.power_w": float("inf")}),
        ("pv.power_w > 1", {}),
    ],
)
def test_a_failing_evaluation_raises_evaluation_error_only(
    text: str, values: dict[str, float]
) -> None:
    expression = Expression(text)
    started = time.thread_time()
    with pytest.raises(EvaluationError):
        expression.test(values)
    assert time.thread_time() - started < 0.1


def test_refusals_are_expression_errors() -> None:
    with pytest.raises(ExpressionError, match="regular expressions"):
        Expression(FREEZING)
