"""A rule can neither freeze nor starve the node: refused by `check-config`, `run` and SIGHUP in a
moment, and a rule that fails at run time falls back alone while its sensors keep sampling."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from daisee_node.actuators.mockpins import pin_level
from tests.conftest import db_rows, run_cli, sim_sensors, wait_for, write_config

#: issue 10's rule: a regular expression with catastrophic backtracking over two literals
FREEZING = 'battery.soc_pct > 0 and "' + "a" * 36 + '!" =~ "(a+)+$"'
INTERVAL_S = 0.05


def node_config(tmp_path: Path, when: str, **rule: Any) -> Path:
    return write_config(
        tmp_path / "node.toml",
        {
            "node": {"id": "rules-1", "data_dir": str(tmp_path / "data")},
            "store": {"flush_interval_s": 0.25},
            "sensors": sim_sensors(INTERVAL_S),
            "gpio": {"backend": "mock"},
            "relays": [{"name": "heater", "pin": 22, "safe_state": "off"}],
            "rules": [
                {
                    "name": "heat",
                    "when": when,
                    "then": {"relay": "heater", "state": "on"},
                    "otherwise": {"relay": "heater", "state": "off"},
                    **rule,
                }
            ],
        },
    )


def log_events(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def count(db: Path, channel: str, since_ms: int, until_ms: int) -> int:
    rows = db_rows(
        db,
        "SELECT count(*) FROM readings r JOIN channels c ON c.id = r.channel_id "
        "WHERE c.name = ? AND r.t_ms >= ? AND r.t_ms < ?",
        (channel, since_ms, until_ms),
    )
    return rows[0][0] if rows else 0


def newest_ms(db: Path) -> int:
    rows = db_rows(db, "SELECT max(t_ms) FROM readings")
    return rows[0][0] if rows and rows[0][0] is not None else 0


@pytest.mark.parametrize(
    ("when", "words"),
    [
        (FREEZING, "regular expressions"),
        ("not " * 3000 + "battery.soc_pct > 1", "too long"),
        ("not " * 200 + "battery.soc_pct > 1", "too complex"),
        ("not (" * 40 + "battery.soc_pct > 1" + ")" * 40, "nested too deeply"),
        ("battery.soc_pct / 0 > 1", "division by zero"),
        ('battery.soc_pct > "x"', "type error"),
    ],
)
def test_check_config_refuses_what_could_hang_crash_or_fail_in_a_moment(
    tmp_path: Path, when: str, words: str
) -> None:
    path = node_config(tmp_path, when)
    started = time.monotonic()
    result = run_cli("check-config", str(path), timeout=30)
    took = time.monotonic() - started
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "rules[0].when" in output and words in output, output
    assert "Traceback" not in output
    assert took < 15.0  # a Python start under load takes seconds; the fault hung for minutes


def test_run_refuses_a_freezing_rule_before_it_starts(tmp_path: Path) -> None:
    path = node_config(tmp_path, FREEZING)
    started = time.monotonic()
    result = run_cli("run", "-c", str(path), timeout=30)
    assert result.returncode == 2, result.stderr
    assert "rules[0].when" in result.stderr and "regular expressions" in result.stderr
    assert time.monotonic() - started < 15.0


def test_a_rule_failing_at_run_time_falls_back_and_its_sensor_keeps_sampling(
    tmp_path: Path, daemon
) -> None:
    # Valid to check-config (no constant zero), a division by zero at every evaluation.
    when = "battery.soc_pct / (load.power_w - load.power_w) > 1"
    path = node_config(tmp_path, when, fallback="on")
    assert run_cli("check-config", str(path)).returncode == 0
    d = daemon(path)
    db = tmp_path / "data" / "node.db"
    pins = tmp_path / "data" / "mock-gpio"
    # The rule asks for its fallback ("on"; the relay's safe state is "off").
    wait_for(lambda: pin_level(pins, 22) is True, timeout=30)
    wait_for(lambda: newest_ms(db) > 0)
    since = newest_ms(db)
    wait_for(lambda: newest_ms(db) >= since + 3000, timeout=20)
    until = since + 3000
    nominal = 3.0 / INTERVAL_S
    battery = count(db, "battery.soc_pct", since, until)
    load = count(db, "load.power_w", since, until)
    pv = count(db, "pv.power_w", since, until)  # no rule reads it: the reference
    assert battery >= 0.5 * nominal and load >= 0.5 * nominal, (battery, load, pv)
    assert battery >= 0.8 * pv and load >= 0.8 * pv, (battery, load, pv)

    def rule_status() -> dict[str, Any] | None:
        result = run_cli("status", "-c", str(path), "--json")
        rules = json.loads(result.stdout).get("rules", {}) if result.returncode == 0 else {}
        heat = rules.get("heat")
        failing = heat and "division by zero" in heat.get("reason", "")
        return heat if failing and heat.get("errors", 0) > 0 else None

    heat = wait_for(rule_status, timeout=15, every=0.5)
    assert heat["asks"] == {"heater": "on"}
    assert "fallback on" in heat["reason"]
    assert pin_level(pins, 22) is True
    d.signal(signal.SIGTERM)
    code, output = d.wait()
    assert code == 0, output
    assert "Traceback" not in output
    errors = [e for e in log_events(output) if e.get("level") == "error"]
    assert errors == []  # no sampler, rules tick or reading consumer failed
    warnings = [e for e in log_events(output) if e.get("event", "").startswith("rule failed")]
    assert len(warnings) == 1 and warnings[0]["rule"] == "heat"  # once, not at every sample
    assert "division by zero" in warnings[0]["error"]


def test_sighup_with_a_freezing_rule_is_refused_and_the_node_keeps_running(
    tmp_path: Path, daemon
) -> None:
    path = node_config(tmp_path, "load.power_w > 1")
    d = daemon(path)
    db = tmp_path / "data" / "node.db"
    pins = tmp_path / "data" / "mock-gpio"
    wait_for(lambda: pin_level(pins, 22) is True, timeout=30)
    node_config(tmp_path, FREEZING)
    d.signal(signal.SIGHUP)

    def rejected() -> list[dict[str, Any]]:
        return [e for e in log_events(d.output()) if "reload rejected" in e.get("event", "")]

    events = wait_for(rejected, timeout=10)
    assert any("rules[0].when" in p and "regular expressions" in p for p in events[0]["problems"])
    # Still sampling, still running its old rule, and it stops when asked.
    after = newest_ms(db)
    wait_for(lambda: newest_ms(db) >= after + 1000, timeout=10)
    assert pin_level(pins, 22) is True
    started = time.monotonic()
    d.signal(signal.SIGTERM)
    code, output = d.wait(timeout=10)
    assert code == 0, output
    assert time.monotonic() - started < 5.0
