"""Fuzzed rule expressions through `check` and evaluation: problems or values, never an exception
other than the documented ones, and each in a bounded time.

Two seeded sources: a grammar of everything rule-engine parses (regular expressions, bitwise
operators, functions, comprehensions and literals of every kind included, nested at random), and
byte-level mutations of valid rules (characters inserted, dropped, swapped, runs repeated).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

from daisee_node.rules.expressions import EvaluationError, Expression, check

KNOWN = ("battery.soc_pct", "load.power_w", "pv.power_w", "peer.solar.surplus_w", "time.hour")
UNKNOWN = ("ghost.power_w", "battery", "x", "time.year", "$abs", "a.b.c.d.e.f")
NUMBERS = ("0", "1", "20", "0.5", "-3", "1e308", "1e999999999", "0x1f", "0b101", ".5e-3", "9" * 80)
STRINGS = ('"x"', "'20'", '"' + "a" * 36 + '!"', '"(a+)+$"', 's"y"', 'r"\\d+"', '""')
OTHERS = ("true", "false", "null", "inf", "nan", 'd"2026-01-01"', 't"P1D"', 'b"z"')
BINARY = (
    *("+", "-", "*", "/", "//", "%", "**", "<", "<=", ">", ">=", "==", "!=", "and", "or"),
    *("=~", "=~~", "!~", "!~~", "&", "|", "^", "<<", ">>", "in", "??", "not in"),
)
SEEDS = (
    "battery.soc_pct < 20",
    "battery.soc_pct < 20 and peer.solar.surplus_w > 50",
    "time.hour >= 22 or time.hour < 6",
    "pv.power_w - load.power_w > 500",
    "not (battery.soc_pct > 90) ? pv.power_w > 0 : load.power_w / 2 < 100",
    "battery.soc_pct ** 2 % 7 // 1 >= -1.5e3",
)
CHARS = "()[]{}\"'.,:?!=~<>+-*/%&|^$#\\ \n\t0123456789aeinotxz_é\x00"
LIMIT_S = 0.25  # per expression and per evaluation; each is a few ms at most


def grammar(rng: random.Random, depth: int) -> str:
    """An expression of rule-engine's whole language."""
    if depth <= 0 or rng.random() < 0.25:
        pool = rng.choice((KNOWN, KNOWN, UNKNOWN, NUMBERS, STRINGS, OTHERS))
        return rng.choice(pool)
    pick = rng.random()
    sub = lambda: grammar(rng, depth - 1)  # noqa: E731
    if pick < 0.45:
        return f"{sub()} {rng.choice(BINARY)} {sub()}"
    if pick < 0.55:
        return f"{rng.choice(('not ', '-'))}{sub()}"
    if pick < 0.62:
        return f"({sub()})"
    if pick < 0.68:
        return f"{sub()} ? {sub()} : {sub()}"
    if pick < 0.74:
        return f"{sub()}.{rng.choice(('length', 'soc_pct', 'as_upper', 'to_ary', 'ceiling'))}"
    if pick < 0.79:
        return f"{sub()}[{sub()}]"
    if pick < 0.84:
        return f"[{sub()}, {sub()}]"
    if pick < 0.89:
        return f"{rng.choice(('$abs', '$min', '$split', '$parse_float'))}({sub()})"
    if pick < 0.93:
        return f"[v for v in {sub()} if {sub()}]"
    # a construct repeated: long chains and deep nesting
    n = rng.choice((8, 30, 33, 100, 400, 3000))
    unit = rng.choice(("not ", "-", "(", "pv.power_w + ", "true and "))
    closing = ")" * n if unit == "(" else ""
    return unit * n + sub() + closing


def mutate(rng: random.Random, text: str) -> str:
    """A valid rule with a few bytes changed."""
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(len(text) + 1)
        j = min(len(text), i + rng.randint(1, 6))
        op = rng.random()
        if op < 0.35:
            text = text[:i] + rng.choice(CHARS) + text[i:]
        elif op < 0.55:
            text = text[:i] + text[j:]
        elif op < 0.75:
            text = text[:i] + rng.choice((*BINARY, "(", ")", '"')) + text[i:]
        elif op < 0.9:
            text = text[:i] + text[i:j] * rng.choice((2, 10, 60, 300)) + text[j:]
        else:
            text = text[:i] + text[j : j + (j - i)] + text[i:j] + text[j + (j - i) :]
    return text


def timed(call: Callable[[], object]) -> tuple[object, float]:
    started = time.thread_time()
    out = call()
    return out, time.thread_time() - started


def test_fuzzed_expressions_give_problems_or_values_in_bounded_time() -> None:
    rng = random.Random(20261122)
    texts = [grammar(rng, rng.randint(1, 5)) for _ in range(1200)]
    texts += [mutate(rng, rng.choice(SEEDS)) for _ in range(1200)]
    known = set(KNOWN).__contains__
    values_sets = [
        dict.fromkeys(KNOWN, v) for v in (0.0, 1.0, -1.0, 20.5, 1e308, -1e-308, 5e-324)
    ] + [{}]
    slowest_check = slowest_eval = 0.0
    refused = evaluated = failed = 0
    for text in texts:
        problems, took = timed(lambda t=text: check(t, known))  # type: ignore[misc]
        slowest_check = max(slowest_check, took)
        assert took < LIMIT_S, (text[:200], took)
        assert isinstance(problems, list) and all(isinstance(p, str) for p in problems), text
        if problems:
            refused += 1
            continue
        expression = Expression(text)
        for values in values_sets:
            try:
                _, took = timed(lambda e=expression, v=values: e.test(v))  # type: ignore[misc]
            except EvaluationError:
                failed += 1
                continue
            finally:
                evaluated += 1
            slowest_eval = max(slowest_eval, took)
            assert took < LIMIT_S, (text[:200], values, took)
    print(
        f"\nfuzzed {len(texts)} expressions: {refused} refused, {len(texts) - refused} passed; "
        f"{evaluated} evaluations, {failed} failed as EvaluationError; "
        f"slowest check {slowest_check * 1000:.1f} ms, slowest evaluation "
        f"{slowest_eval * 1000:.2f} ms"
    )
    assert len(texts) - refused >= 200  # the mutations keep enough valid rules to evaluate
    assert refused >= 1000
