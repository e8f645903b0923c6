"""What the command line says: help texts, the demo's start, address and config messages."""

from __future__ import annotations

import argparse
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from eth_account import Account

from daisee_node import demo
from daisee_node.cli import _parser
from daisee_node.ledger.chainspec import parse_address
from daisee_node.sensors.simulated import SimulatedSite, SimulationConfig
from tests.conftest import run_cli, sim_sensors, write_config


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = _parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _option_help(command: str, option: str) -> str:
    """The help argparse prints for one option of a command (empty when it has none)."""
    parser = _commands()[command]
    action = next(a for a in parser._actions if option in a.option_strings or a.dest == option)
    return " ".join((action.help or "").split())


@pytest.mark.parametrize(
    ("command", "option", "words"),
    [
        ("check-config", "file", "config file"),
        ("demo", "--seed", "same values"),
        ("demo", "--start", "solar time"),
        ("prove", "--channel", "channel"),
        ("prove", "--at", "newest one on the chain"),
        ("prove", "--config", "demo's data dir"),
        ("calibrate", "--config", "config file"),
        ("safe-state", "--config", "config file"),
        ("chain-spec", "--out", "default ./chain-spec"),
        ("chain-spec", "--validators", "addresses"),
        ("verify", "--data-dir", "demo"),
        ("status", "--data-dir", "data dir"),
    ],
)
def test_every_option_says_what_it_is(command: str, option: str, words: str) -> None:
    assert words in _option_help(command, option)


def test_every_command_and_option_has_a_help_text() -> None:
    parser = _parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert all(len(c.help or "") > 15 for c in sub._choices_actions)
    missing = [
        f"{name} {a.option_strings or a.dest}"
        for name, p in sub.choices.items()
        for a in p._actions
        if not a.help
        and not isinstance(a, argparse._SubParsersAction)
        # keys/deploy/register-node share a few self-evident flags (--remove, --rpc …)
        and name
        in {
            "run",
            "check-config",
            "demo",
            "calibrate",
            "safe-state",
            "status",
            "prove",
            "verify",
            "chain-spec",
        }
    ]
    assert missing == []
    assert len(_commands()["safe-state"].description or "") > 40
    assert len(_commands()["prove"].description or "") > 40


@pytest.mark.parametrize("day", [0, 45, 90, 135, 180, 225, 270, 315, 355])
@pytest.mark.parametrize("longitude", [-122.4, -3.7, 4.84, 13.4, 151.2])
def test_the_demo_starts_while_the_roof_produces(day: int, longitude: float) -> None:
    now = datetime(2026, 1, 1, 23, 59, tzinfo=UTC) + timedelta(days=day)
    start = demo.default_start(now, longitude)
    assert start.minute % 15 == 0 and start.second == 0  # a settlement period's start
    assert start.date() == now.date()
    site = SimulatedSite(SimulationConfig(longitude_deg=longitude, cloudiness=0), 0.0)
    assert site.pv_w(start.timestamp()) > 100
    # … and the same start whatever the hour the user runs it at
    assert demo.default_start(now.replace(hour=0, minute=1), longitude) == start


def test_the_demo_start_by_default_is_for_the_simulated_home() -> None:
    now = datetime(2026, 11, 22, 5, 26, tzinfo=UTC)
    # 10:00 solar time at 4.84° E is 09:40:38 UTC: the next period starts at 09:45
    assert demo.default_start(now) == datetime(2026, 11, 22, 9, 45, tzinfo=UTC)


def test_check_config_counts_sensors_relays_and_rules(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "node.toml",
        {
            "node": {"id": "c1", "data_dir": "data"},
            "sensors": sim_sensors(1.0),
            "gpio": {"backend": "mock"},
            "relays": [{"name": "boiler", "pin": 17}],
            "rules": [
                {
                    "name": "sun",
                    "when": "pv.power_w > 1000",
                    "then": {"relay": "boiler", "state": "on"},
                }
            ],
        },
    )
    result = run_cli("check-config", str(config))
    assert result.returncode == 0, result.stderr
    sensors = len(sim_sensors(1.0))
    assert f"{sensors} sensors, 1 relay, 1 rule," in result.stdout


def test_prove_without_a_chain_is_a_config_problem(tmp_path: Path) -> None:
    config = write_config(tmp_path / "node.toml", {"node": {"id": "p1", "data_dir": "data"}})
    result = run_cli("prove", "-c", str(config), "--channel", "grid.power_w")
    assert result.returncode == 2
    assert "chain: no [chain] section" in result.stderr and "Traceback" not in result.stderr


def test_verify_of_a_missing_proof_file_says_so(tmp_path: Path) -> None:
    result = run_cli("verify", str(tmp_path / "proof.json"), "--rpc", "embedded")
    assert result.returncode == 1
    assert "cannot read the proof" in result.stderr and "No such file" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("0xA", "1 hex digits; an address has 40"),
        ("1234" * 10, "starts with 0x"),
        ("0x" + "g" * 40, "'g' is not a hexadecimal digit"),
        ("", "empty"),
    ],
)
def test_a_bad_address_says_why(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=re.escape(why)):
        parse_address(text)


def test_a_mistyped_checksummed_address_is_refused_and_a_good_one_taken() -> None:
    good = "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed"  # EIP-55's own example
    assert parse_address(good) == good
    assert parse_address(good.lower()) == good  # no checksum to check: taken as it is
    with pytest.raises(ValueError, match="EIP-55 checksum"):
        parse_address(good[:-1] + "D")  # one letter's case changed


def test_chain_spec_names_the_wrong_address(tmp_path: Path) -> None:
    good = Account.create().address
    result = run_cli("chain-spec", "--validators", f"{good},0xA", "--out", str(tmp_path))
    assert result.returncode == 1
    assert "--validators, address 2 '0xA': 1 hex digits; an address has 40" in result.stderr
    assert "Unknown format" not in result.stderr and not list(tmp_path.iterdir())
    result = run_cli("chain-spec", "--validators", good, "--fund", "0xB=5", "--out", str(tmp_path))
    assert result.returncode == 1 and "--fund '0xB=5': address '0xB'" in result.stderr
