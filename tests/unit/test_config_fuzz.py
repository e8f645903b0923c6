"""Fuzzed configs: whatever an operator (or a broken editor) writes, the answer is a valid config
or a `ConfigError` listing problems with their paths — never a traceback, never a hang.

Seeded, so a failure replays: the message names the seed and the case.
"""

from __future__ import annotations

import copy
import math
import random
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest

from daisee_node.config import config_from_dict, parse_config
from daisee_node.errors import ConfigError
from tests.conftest import ROOT, run_cli, toml_value

EXAMPLES = sorted((ROOT / "examples").glob("*.toml"))
CASES = 1_200
#: a config is small; anything slower than this is a hang in the making
SLOWEST_S = 1.0

HOSTILE: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    2**70,
    -(2**63),
    1e308,
    -1e308,
    math.nan,
    math.inf,
    0.5,
    "",
    " ",
    "x" * 5_000,
    "../../../../etc/passwd",
    "\x00\x01",
    "é🔥",
    "0x",
    "0x" + "zz" * 20,
    "on",
    "ON",
    [],
    [1, "a", None],
    {},
    {"a": {"b": {"c": {"d": 1}}}},
    # Rule-expression shaped strings, hostile ones among them.
    "battery.soc_pct > 0 and 'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa!' =~ '(a+)+$'",
    "not " * 3_000 + "true",
    "(" * 500 + "1" + ")" * 500,
    "battery.soc_pct / 0 > 1",
    'battery.soc_pct > "x"',
    "10 ** 10 ** 10 > 1",
    "time.hour >= 18",
]


def mutate_dict(rng: random.Random, data: Any, depth: int = 0) -> Any:
    """One random structural change somewhere in `data` (in place where possible)."""
    if isinstance(data, dict) and data:
        key = rng.choice(list(data))
        roll = rng.random()
        if roll < 0.15:
            del data[key]
        elif roll < 0.25:
            data[key + rng.choice(["_", "x", "s"])] = data.pop(key)
        elif roll < 0.6 or depth > 4:
            data[key] = copy.deepcopy(rng.choice(HOSTILE))
        else:
            data[key] = mutate_dict(rng, data[key], depth + 1)
        return data
    if isinstance(data, list) and data:
        i = rng.randrange(len(data))
        roll = rng.random()
        if roll < 0.2:
            data.append(copy.deepcopy(data[i]))  # duplicate names, pins, rules
        elif roll < 0.3:
            del data[i]
        else:
            data[i] = mutate_dict(rng, data[i], depth + 1)
        return data
    return copy.deepcopy(rng.choice(HOSTILE))


def mutate_text(rng: random.Random, text: str) -> str:
    """Byte-level damage: what a bad copy-paste or a half-written file gives."""
    chars = list(text)
    for _ in range(rng.randint(1, 6)):
        if not chars:
            break
        i = rng.randrange(len(chars))
        op = rng.random()
        if op < 0.3:
            del chars[i]
        elif op < 0.6:
            chars.insert(i, rng.choice("[]{}=\"'.#\n\\0x-+é\x00"))
        elif op < 0.8:
            chars[i] = rng.choice("abc019 =\n")
        else:
            cut = rng.randrange(len(chars))
            chars = chars[:cut]
    return "".join(chars)


def clean_outcome(case: str, attempt: Any) -> bool:
    """Run one case; True if the config was accepted, False if refused with listed problems.
    Any other exception fails the test with the case's name."""
    started = time.perf_counter()
    accepted = True
    try:
        attempt()
    except ConfigError as exc:
        accepted = False
        assert exc.problems, f"{case}: a ConfigError with no problem listed"
        rendered = exc.render()
        assert all(str(p) for p in exc.problems), f"{case}: an empty problem"
        assert "Traceback" not in rendered
    except Exception as exc:
        raise AssertionError(f"{case}: {exc!r} escaped instead of a ConfigError") from exc
    took = time.perf_counter() - started
    assert took < SLOWEST_S, f"{case}: took {took:.2f} s"
    return accepted


@pytest.mark.slow
def test_fuzzed_configs_give_a_config_or_listed_problems(tmp_path: Path) -> None:
    rng = random.Random(20261122)
    bases = [tomllib.loads(p.read_text()) for p in EXAMPLES]
    texts = [p.read_text() for p in EXAMPLES]
    refused = accepted = 0
    for n in range(CASES):
        if n % 3 == 2:
            text = mutate_text(rng, rng.choice(texts))
            case = f"seed 20261122 case {n} (text)"

            def attempt(text: str = text) -> None:
                parse_config(text, base_dir=tmp_path)

        else:
            data = copy.deepcopy(rng.choice(bases))
            if n % 3 == 1 and data.get("rules"):
                # Only an expression changes, so the checks that span keys (rules) run too.
                rule = rng.choice(data["rules"])
                key = rng.choice(["when", "until"])
                rule[key] = rng.choice(
                    [rng.choice(HOSTILE), mutate_text(rng, str(rule.get(key, "true")))]
                )
                case = f"seed 20261122 case {n} (expression)"
            else:
                for _ in range(rng.randint(1, 3)):
                    data = mutate_dict(rng, data)
                case = f"seed 20261122 case {n} (structure)"

            def attempt(data: Any = data) -> None:
                config_from_dict(data, base_dir=tmp_path)

        if clean_outcome(case, attempt):
            accepted += 1
        else:
            refused += 1
    print(f"configs fuzzed: {CASES}, accepted {accepted}, refused {refused}")
    # The fuzzer must reach both outcomes, or it is not exploring.
    assert refused > CASES // 2 and accepted > 10, (refused, accepted)


def test_check_config_process_lists_problems_and_exits_2(tmp_path: Path) -> None:
    """The command an operator runs, on a handful of fuzzed files: exit 0 or 2, no traceback."""
    rng = random.Random(7)
    base = tomllib.loads((ROOT / "examples" / "daisee-consumer.toml").read_text())
    outcomes = set()
    for n in range(6):
        data = mutate_dict(rng, copy.deepcopy(base))
        path = tmp_path / f"fuzz-{n}.toml"
        try:
            path.write_text(dumps(data))
        except ValueError:  # a value TOML cannot hold (None): write it as a string
            path.write_text(dumps(data, none_as='""'))
        result = run_cli("check-config", str(path), timeout=30)
        assert result.returncode in (0, 2), (n, result.returncode, result.stderr[-2000:])
        assert "Traceback" not in result.stderr + result.stdout
        if result.returncode == 2:
            assert "problem" in result.stderr or ":" in result.stderr
        outcomes.add(result.returncode)
    assert 2 in outcomes


def dumps(data: dict[str, Any], none_as: str | None = None) -> str:
    """A TOML rendering of nested dicts and lists of tables (enough for configs)."""
    lines: list[str] = []

    def value(v: Any) -> str:
        if v is None:
            if none_as is None:
                raise ValueError("TOML has no null")
            return none_as
        if isinstance(v, float) and not math.isfinite(v):
            return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f'"{k}" = {value(x)}' for k, x in v.items()) + " }"
        return toml_value(v)

    for name, body in data.items():
        if isinstance(body, list) and body and all(isinstance(x, dict) for x in body):
            for item in body:
                lines.append(f'[["{name}"]]')
                lines += [f'"{k}" = {value(v)}' for k, v in item.items()]
        elif isinstance(body, dict):
            lines.append(f'["{name}"]')
            lines += [f'"{k}" = {value(v)}' for k, v in body.items()]
        else:
            lines.insert(0, f'"{name}" = {value(body)}')
    return "\n".join(lines) + "\n"
