"""After a crash or kill -9, `daisee-node safe-state` from a fresh process makes relays safe."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

from daisee_node.actuators.mockpins import pin_level
from tests.conftest import run_cli, wait_for, write_config


def relay_config(tmp_path: Path) -> Path:
    return write_config(
        tmp_path / "node.toml",
        {
            "node": {"id": "relay-node", "data_dir": str(tmp_path / "data")},
            "sensors": [{"name": "load", "kind": "simulated", "model": "load", "interval_s": 0.1}],
            "gpio": {"backend": "mock"},
            "relays": [
                {"name": "heater", "pin": 22, "safe_state": "off"},
                {"name": "supply_own", "pin": 23, "safe_state": "on"},
            ],
            # Any household draws more than 1 W: the heater relay closes at once.
            "rules": [
                {
                    "name": "heat",
                    "when": "load.power_w > 1",
                    "then": {"relay": "heater", "state": "on"},
                    "otherwise": {"relay": "heater", "state": "off"},
                }
            ],
        },
    )


def test_kill_9_then_safe_state_opens_what_the_daemon_left_closed(tmp_path: Path, daemon) -> None:
    path = relay_config(tmp_path)
    pins = tmp_path / "data" / "mock-gpio"
    d = daemon(path)
    wait_for(lambda: pin_level(pins, 22) is True, timeout=30)
    assert pin_level(pins, 23) is True
    d.kill()  # no chance to clean up: the heater stays on (kill() waits for the exit)
    assert pin_level(pins, 22) is True

    result = run_cli("safe-state", "-c", str(path))
    assert result.returncode == 0, result.stderr
    assert pin_level(pins, 22) is False and pin_level(pins, 23) is True
    assert "heater: off" in result.stdout


def test_a_clean_stop_leaves_relays_safe(tmp_path: Path, daemon) -> None:
    path = relay_config(tmp_path)
    pins = tmp_path / "data" / "mock-gpio"
    d = daemon(path)
    wait_for(lambda: pin_level(pins, 22) is True, timeout=30)
    d.signal(signal.SIGTERM)
    assert d.wait()[0] == 0
    assert pin_level(pins, 22) is False and pin_level(pins, 23) is True


def test_status_shows_relays_rules_and_why(tmp_path: Path, daemon) -> None:
    import json

    path = relay_config(tmp_path)
    d = daemon(path)
    wait_for(lambda: pin_level(tmp_path / "data" / "mock-gpio", 22) is True, timeout=30)

    def committed() -> dict[str, Any] | None:
        # The store commits in batches: poll until the switch and the rule's state are in.
        result = run_cli("status", "-c", str(path), "--json")
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        heater = report.get("relays", {}).get("heater", {})
        rule = report.get("rules", {}).get("heat", {})
        return report if heater.get("state") == "on" and rule.get("active") == 1 else None

    report = wait_for(committed, timeout=30, every=0.2)
    d.signal(signal.SIGTERM)
    d.wait()
    assert report["running"] is True
    assert report["relays"]["heater"]["state"] == "on"
    assert report["relays"]["heater"]["switches"] >= 1
    assert "rule heat" in report["relays"]["heater"]["reason"]
    assert report["rules"]["heat"]["active"] == 1
    assert report["rules"]["heat"]["asks"] == {"heater": "on"}
    assert "load.power_w=" in report["rules"]["heat"]["reason"]
    table = run_cli("status", "-c", str(path))
    assert "RELAY" in table.stdout and "heater" in table.stdout and "RULE" in table.stdout


def test_safe_state_refuses_to_drive_pins_a_running_node_drives(tmp_path: Path, daemon) -> None:
    path = relay_config(tmp_path)
    pins = tmp_path / "data" / "mock-gpio"
    d = daemon(path)
    wait_for(lambda: pin_level(pins, 22) is True, timeout=30)
    result = run_cli("safe-state", "-c", str(path))
    assert result.returncode == 1
    assert "the node is running" in result.stderr and "Traceback" not in result.stderr
    assert pin_level(pins, 22) is True  # untouched: the node still drives it
    d.signal(signal.SIGTERM)
    assert d.wait()[0] == 0
