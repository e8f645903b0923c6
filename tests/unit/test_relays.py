"""Relays on gpiozero mock pins: safe start, interlock, dead time, overrides."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from daisee_node.actuators.mockpins import pin_history, pin_level
from daisee_node.actuators.relays import GpioSection, RelayConfig, RelayController


def controller(tmp_path: Path, *relays: dict[str, Any]) -> RelayController:
    c = RelayController([RelayConfig(**r) for r in relays], GpioSection(backend="mock"), tmp_path)
    c.open()
    return c


SUPPLY = [
    {"name": "own", "pin": 5, "safe_state": "on", "group": "supply", "dead_time_s": 0.2},
    {"name": "neighbour", "pin": 6, "safe_state": "off", "group": "supply", "dead_time_s": 0.2},
]


def test_start_goes_straight_to_the_safe_state(tmp_path: Path) -> None:
    c = controller(tmp_path, *SUPPLY, {"name": "low", "pin": 7, "active_high": False})
    assert [(h[1]) for h in pin_history(tmp_path / "mock-gpio", 5)] == [True]
    assert pin_history(tmp_path / "mock-gpio", 6) == []  # never driven high, never toggled
    assert pin_level(tmp_path / "mock-gpio", 7) is True  # active-low relay, off = pin high
    assert {n: r.on for n, r in c.relays.items()} == {"own": True, "neighbour": False, "low": False}
    c.close()


def test_keep_leaves_the_hardware_as_it_is(tmp_path: Path) -> None:
    c = controller(tmp_path, {"name": "pump", "pin": 9})
    c.override("pump", "on")
    asyncio.run(c.converge())
    c.close()  # the process goes; the line holds its level
    again = controller(tmp_path, {"name": "pump", "pin": 9, "initial": "keep"})
    assert again.relays["pump"].on is True
    assert [level for _, level in pin_history(tmp_path / "mock-gpio", 9)] == [True]  # untouched
    again.close()


async def test_change_of_source_is_break_before_make(tmp_path: Path) -> None:
    c = controller(tmp_path, *SUPPLY)
    worker = asyncio.create_task(c.run())
    c.request("own", False, "rule")
    c.request("neighbour", True, "rule")
    await asyncio.sleep(0.5)
    c.request("neighbour", False, "rule")
    c.request("own", True, "rule")
    await asyncio.sleep(0.5)
    worker.cancel()
    own = pin_history(tmp_path / "mock-gpio", 5)
    neighbour = pin_history(tmp_path / "mock-gpio", 6)
    events = sorted([(t, "own", v) for t, v in own] + [(t, "neighbour", v) for t, v in neighbour])
    closed: set[str] = set()
    opened_at: dict[str, float] = {}
    for t, name, level in events:
        if level:
            assert not closed, f"{name} closed while {closed} was closed"
            other = "own" if name == "neighbour" else "neighbour"
            if other in opened_at:
                assert t - opened_at[other] >= 0.2 - 1e-3, "dead time not respected"
            closed.add(name)
        else:
            closed.discard(name)
            opened_at[name] = t
    assert [v for _, _, v in events] == [True, False, True, False, True]
    assert c.relays["neighbour"].switches == 2
    c.close()


async def test_two_rules_wanting_two_sources_never_close_both(tmp_path: Path) -> None:
    c = controller(tmp_path, *SUPPLY)
    c.request("own", True, "rule a")
    c.request("neighbour", True, "rule b")
    await c.converge()
    assert (c.relays["own"].on, c.relays["neighbour"].on) == (True, False)
    assert c.conflicts == 1
    c.close()


async def test_override_wins_then_expires(tmp_path: Path) -> None:
    c = controller(tmp_path, {"name": "heater", "pin": 12})
    c.request("heater", True, "rule")
    await c.converge()
    c.override("heater", "off", expires_s=0.2)
    await c.converge()
    assert not c.relays["heater"].on and c.relays["heater"].mode == "off"
    time.sleep(0.25)
    assert c.expire_overrides() == ["heater"]
    await c.converge()
    assert c.relays["heater"].on and c.relays["heater"].mode == "auto"
    c.close()


async def test_all_safe_opens_first_and_waits_before_closing(tmp_path: Path) -> None:
    c = controller(tmp_path, *SUPPLY)
    c.override("own", "off")
    await c.converge()
    c.override("neighbour", "on")
    await asyncio.sleep(0.25)
    await c.converge()
    assert c.relays["neighbour"].on
    await c.all_safe()
    assert (c.relays["own"].on, c.relays["neighbour"].on) == (True, False)
    t_open = pin_history(tmp_path / "mock-gpio", 6)[-1][0]
    t_close = pin_history(tmp_path / "mock-gpio", 5)[-1][0]
    assert t_close - t_open >= 0.2 - 1e-3
    c.close()


def test_unknown_relay_override_is_a_clear_error(tmp_path: Path) -> None:
    from daisee_node.errors import DaiseeError

    c = controller(tmp_path, {"name": "heater", "pin": 12})
    with pytest.raises(DaiseeError, match="no relay"):
        c.override("boiler", "on")
    c.close()


async def test_a_stop_during_the_dead_time_still_waits_it_out(tmp_path: Path) -> None:
    c = controller(tmp_path, *SUPPLY)
    c.request("own", False, "rule")
    c.request("neighbour", True, "rule")
    await c.converge()  # own opened, neighbour closed after the dead time
    c.request("neighbour", None, "rule")
    c.request("own", True, "rule")
    switching_back = asyncio.create_task(c.converge())  # opens neighbour, waits the dead time
    await asyncio.sleep(0.05)
    switching_back.cancel()  # the node stops right then
    await c.all_safe()
    t_open = pin_history(tmp_path / "mock-gpio", 6)[-1][0]
    t_close = pin_history(tmp_path / "mock-gpio", 5)[-1][0]
    assert t_close - t_open >= 0.2 - 1e-3
    c.close()
