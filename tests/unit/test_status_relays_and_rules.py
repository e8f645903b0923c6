"""What control records about relays (state, mode, why) and how `status` words it, on mock pins
and a real store, with the node's clock stepped by hand."""

from __future__ import annotations

from pathlib import Path

import daisee_node.control as control_module
import daisee_node.status as status_module
from daisee_node.actuators.mockpins import persistent_mock_factory
from daisee_node.actuators.relays import RelayController
from daisee_node.config import config_from_dict
from daisee_node.control import Control
from daisee_node.readings import Reading
from daisee_node.status import read_status, render_status
from daisee_node.store import Store
from tests.support.clocks import SteppedClock

CONFIG = {
    "node": {"id": "n1"},
    "gpio": {"backend": "mock"},
    "relays": [
        {"name": "heater", "pin": 5, "safe_state": "off"},
        {"name": "spare", "pin": 6, "safe_state": "off"},
    ],
    "sensors": [{"name": "load", "kind": "simulated", "model": "load"}],
    "rules": [
        {
            "name": "heat",
            "when": "load.power_w > 1",
            "then": {"relay": "heater", "state": "on"},
            "otherwise": {"relay": "heater", "state": "off"},
            "stale_after_s": 1000,
        }
    ],
}


async def run_node(tmp_path: Path, *, stop_cleanly: bool) -> None:
    """Start, switch, override for a minute, let it expire, then stop (cleanly or not)."""
    clock = SteppedClock()
    config = config_from_dict(CONFIG)
    store = Store(tmp_path / "node.db", clock=clock)
    await store.open()
    factory = persistent_mock_factory(tmp_path / "mock-gpio", clock=clock.monotonic)
    relays = RelayController(config.relays, config.gpio, tmp_path, clock=clock, pin_factory=factory)
    latest = {"load.power_w": Reading("load.power_w", clock.now_ms(), 300.0)}
    control = Control(config, clock, latest, store, relays)
    relays.open()
    control.tick()
    await clock.drive(relays.converge())
    assert relays.relays["heater"].on
    control.override("heater", "off", 60, "mqtt")
    await clock.drive(relays.converge())
    await clock.advance(61)
    control.tick()
    await clock.drive(relays.converge())
    assert relays.relays["heater"].on
    if stop_cleanly:
        await clock.drive(relays.all_safe())
    relays.close()
    store.stop()
    await store.run()
    await store.close()


def events(tmp_path: Path) -> list[tuple[str, str, str]]:
    import sqlite3

    conn = sqlite3.connect(tmp_path / "node.db")
    try:
        rows = conn.execute(
            "SELECT name, state, reason FROM events WHERE kind = 'relay_mode' ORDER BY id"
        ).fetchall()
    finally:
        conn.close()
    return [tuple(r) for r in rows]


async def test_every_relay_its_mode_and_why_are_recorded_at_start_commands_expiry_and_stop(
    tmp_path: Path,
) -> None:
    await run_node(tmp_path, stop_cleanly=True)
    recorded = events(tmp_path)
    assert recorded[:2] == [
        ("heater", "auto", "start: safe state"),
        ("spare", "auto", "start: safe state"),
    ]
    assert recorded[2][:2] == ("heater", "off")
    assert recorded[2][2].startswith("override (mqtt) until ") and recorded[2][2].endswith(" UTC")
    assert recorded[3][:2] == ("heater", "auto")
    assert recorded[3][2].startswith("override ended; automatic: rule heat: active: ")
    assert recorded[4:] == [("heater", "auto", "safe state"), ("spare", "auto", "safe state")]

    report = read_status(tmp_path)
    assert report["running"] is False
    assert set(report["relays"]) == {"heater", "spare"}  # spare never switched
    assert report["relays"]["spare"]["state"] == "off"
    assert report["relays"]["heater"]["reason"] == "safe state"
    assert report["rules"]["heat"]["stopped"] is True
    table = render_status(report)
    assert "safe state (the node stopped)" in table
    assert "node stopped; heater off (safe state)" in table
    assert "None" not in table


async def test_a_node_that_died_shows_its_relays_as_last_recorded_not_as_safe(
    tmp_path: Path,
) -> None:
    await run_node(tmp_path, stop_cleanly=False)  # as after kill -9: no safe state recorded
    report = read_status(tmp_path)
    assert report["relays"]["heater"]["state"] == "on"
    table = render_status(report)
    heater = next(line for line in table.splitlines() if line.startswith("heater "))
    assert "node not running; last recorded: " in heater and "safe state" not in heater
    rule = next(line for line in table.splitlines() if line.startswith("heat "))
    assert "node stopped; heater on (as last recorded)" in rule


def test_status_reads_the_kind_control_writes() -> None:
    assert status_module.MODE_EVENT == control_module.MODE_EVENT
