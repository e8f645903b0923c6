"""`daisee-node status` on relays and rules, against a real daemon and a real mosquitto: every
relay is listed with its state, mode and why; a command back to AUTO shows what decides now; after
a stop the relays show their safe state and the rules ask nothing."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import Any

import aiomqtt

from daisee_node.actuators.mockpins import pin_level
from tests.conftest import run_cli, wait_for, write_config
from tests.support.broker import Broker

SET = "daisee/st1/relay/heater/set"


def node_file(tmp_path: Path, broker: Broker) -> Path:
    return write_config(
        tmp_path / "node.toml",
        {
            "node": {"id": "st1", "data_dir": str(tmp_path / "data")},
            "store": {"flush_interval_s": 0.05},
            "sensors": [{"name": "load", "kind": "simulated", "model": "load", "interval_s": 0.1}],
            "gpio": {"backend": "mock"},
            "relays": [
                {"name": "heater", "pin": 22, "safe_state": "off"},
                # no rule drives it and it is already in its safe state: it never switches
                {"name": "spare", "pin": 23, "safe_state": "off"},
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
            "mqtt": {
                "host": broker.host,
                "port": broker.port,
                "username": "node",
                "password_file": str(broker.password_file("node")),
            },
        },
    )


def status(path: Path) -> dict[str, Any]:
    result = run_cli("status", "-c", str(path), "--json")
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def relay_shows(path: Path, name: str, **expected: Any) -> dict[str, Any] | None:
    """The report once relay `name` shows `expected` (the store commits in batches)."""
    report = status(path)
    relay = report.get("relays", {}).get(name, {})
    ok = all(
        (want(relay.get(k)) if callable(want) else relay.get(k) == want)
        for k, want in expected.items()
    )
    return report if ok else None


async def command(broker: Broker, payload: bytes) -> None:
    async with aiomqtt.Client(
        broker.host,
        broker.port,
        username="ha",
        password=broker.password_file("ha").read_text().strip(),
    ) as client:
        await client.publish(SET, payload, qos=1)


async def test_status_lists_every_relay_follows_commands_and_shows_the_safe_state_after_a_stop(
    tmp_path: Path, broker: Broker, daemon: Any
) -> None:
    path = node_file(tmp_path, broker)
    pins = tmp_path / "data" / "mock-gpio"
    d = daemon(path)
    await asyncio.to_thread(wait_for, lambda: pin_level(pins, 22) is True, 30)

    # The relay that never switched is listed too, with its state, mode and why.
    report = await asyncio.to_thread(
        wait_for,
        lambda: relay_shows(path, "spare", state="off", mode="auto", reason="start: safe state"),
        15,
        0.2,
    )
    heater = report["relays"]["heater"]
    assert heater["state"] == "on" and heater["mode"] == "auto"
    assert heater["reason"].startswith("rule heat: active: load.power_w > 1 holds (load.power_w=")
    rule = report["rules"]["heat"]
    assert rule["reason"].startswith("active: load.power_w > 1 holds (load.power_w=")
    assert "None" not in json.dumps(report["rules"]) and "condition: active" not in rule["reason"]
    table = run_cli("status", "-c", str(path)).stdout
    assert "MODE" in table and "spare" in table and "start: safe state" in table

    # A command forces the heater off for an hour; AUTO gives it back to the rule, and says so.
    await command(broker, b"OFF 3600")
    report = await asyncio.to_thread(
        wait_for, lambda: relay_shows(path, "heater", state="off", mode="off"), 15, 0.2
    )
    why = report["relays"]["heater"]["reason"]
    assert why.startswith("override (mqtt) until ") and why.endswith(" UTC"), why
    assert "forced off" in run_cli("status", "-c", str(path)).stdout
    await command(broker, b"AUTO")
    report = await asyncio.to_thread(
        wait_for, lambda: relay_shows(path, "heater", state="on", mode="auto"), 15, 0.2
    )
    why = report["relays"]["heater"]["reason"]
    assert "override" not in why and "rule heat" in why, why

    d.signal(signal.SIGTERM)
    code, _ = await asyncio.to_thread(d.wait, 10)
    assert code == 0
    report = status(path)
    assert report["running"] is False
    assert report["relays"]["heater"]["state"] == "off"
    assert report["relays"]["heater"]["reason"] == "safe state"
    spare = report["relays"]["spare"]
    assert (spare["state"], spare["mode"], spare["reason"]) == ("off", "auto", "safe state")
    assert report["rules"]["heat"]["stopped"] is True
    table = run_cli("status", "-c", str(path)).stdout
    rule_line = next(line for line in table.splitlines() if line.startswith("heat "))
    assert "node stopped; heater off (safe state)" in rule_line
    assert " yes " not in rule_line and "heater on" not in rule_line
    heater_line = next(line for line in table.splitlines() if line.startswith("heater "))
    assert "safe state (the node stopped)" in heater_line
