"""Relays on gpiozero mock pins, on a fake clock: safe start, interlock, dead time, overrides.

Every pin change is stamped with the fake clock's time, so the recorded history shows exactly
when each relay opened and closed; `interlock_breaches` reads it.
"""

from __future__ import annotations

import asyncio
import itertools
import math
from pathlib import Path
from typing import Any

import pytest

from daisee_node.actuators.mockpins import (
    GroupPin,
    interlock_breaches,
    persistent_mock_factory,
    pin_changes,
    pin_history,
    pin_level,
    set_pin_level,
)
from daisee_node.actuators.relays import GpioSection, RelayConfig, RelayController
from daisee_node.errors import DaiseeError
from tests.support.clocks import SteppedClock as FakeClock

DEAD = 0.2
OWN, NEIGHBOUR = 5, 6


def relay(name: str, pin: int, **extra: Any) -> dict[str, Any]:
    return {"name": name, "pin": pin, **extra}


SUPPLY = [
    relay("own", OWN, safe_state="on", group="supply", dead_time_s=DEAD),
    relay("neighbour", NEIGHBOUR, safe_state="off", group="supply", dead_time_s=DEAD),
]


def make(
    tmp_path: Path, clock: FakeClock, *relays: dict[str, Any], known: bool = True
) -> RelayController:
    """A controller on mock pins stamped by `clock`; `known=False`: lines like a real Pi's."""
    factory = persistent_mock_factory(tmp_path / "mock-gpio", clock=clock.monotonic)
    factory.reports_levels = known
    return RelayController(
        [RelayConfig(**r) for r in relays],
        GpioSection(backend="mock"),
        tmp_path,
        clock=clock,
        pin_factory=factory,
    )


def opened(tmp_path: Path, clock: FakeClock, *relays: dict[str, Any]) -> RelayController:
    c = make(tmp_path, clock, *relays)
    c.open()
    return c


def breaches(tmp_path: Path, active_high: bool = True, after: float = -math.inf) -> list[str]:
    pins = [GroupPin(OWN, active_high), GroupPin(NEIGHBOUR, active_high)]
    return interlock_breaches(
        pin_changes(tmp_path / "mock-gpio"),
        {"supply": pins},
        {"supply": DEAD},
        tolerance_s=1e-6,
        after=after,
    )


def states(c: RelayController) -> tuple[bool, bool]:
    return c.relays["own"].on, c.relays["neighbour"].on


def closed_at(tmp_path: Path, pin: int) -> list[float]:
    return [t for t, high in pin_history(tmp_path / "mock-gpio", pin) if high]


# -- start -------------------------------------------------------------------------------------


def test_start_goes_straight_to_the_safe_state(tmp_path: Path) -> None:
    clock = FakeClock()
    c = opened(tmp_path, clock, relay("low", 7, active_high=False), relay("heater", 8))
    assert pin_level(tmp_path / "mock-gpio", 7) is True  # active-low relay, off = pin high
    assert pin_history(tmp_path / "mock-gpio", 8) == []  # never driven high, never toggled
    assert {n: r.on for n, r in c.relays.items()} == {"low": False, "heater": False}
    c.close()


def test_an_ungrouped_safe_on_relay_closes_at_start_at_once(tmp_path: Path) -> None:
    clock = FakeClock()
    c = opened(tmp_path, clock, relay("fridge", 9, safe_state="on"))
    assert pin_history(tmp_path / "mock-gpio", 9) == [(clock.t, True)]
    c.close()


# The levels a killed process may leave, the last change made just before the new start.
LEVELS = list(itertools.product([False, True], repeat=2))


@pytest.mark.parametrize("known", [True, False], ids=["levels-known", "levels-unknown"])
@pytest.mark.parametrize("force_safe", [False, True], ids=["daemon", "safe-state"])
@pytest.mark.parametrize("active_high", [True, False], ids=["active-high", "active-low"])
@pytest.mark.parametrize(("own", "neighbour"), LEVELS, ids=lambda v: "closed" if v else "open")
async def test_start_from_any_levels_is_break_before_make(
    tmp_path: Path, own: bool, neighbour: bool, active_high: bool, force_safe: bool, known: bool
) -> None:
    """From any levels a killed process left; a real line (levels unknown) is claimed open."""
    clock = FakeClock()
    pins = tmp_path / "mock-gpio"
    # What a process killed a moment ago left: the last change 1 ms before the start.
    set_pin_level(pins, OWN, own == active_high, t=clock.t - 5)
    set_pin_level(pins, NEIGHBOUR, neighbour == active_high, t=clock.t - 0.001)
    c = make(tmp_path, clock, *[{**r, "active_high": active_high} for r in SUPPLY], known=known)
    start = clock.t
    c.open(force_safe=force_safe)
    if force_safe:
        await clock.drive(c.all_safe())
    else:
        worker = asyncio.create_task(c.run())
        await clock.advance(1.0)
        worker.cancel()
    assert breaches(tmp_path, active_high, after=start) == []
    assert states(c) == (True, False)
    own_closings = [
        ch.t for ch in pin_changes(pins) if ch.pin == f"GPIO{OWN}" and ch.high == active_high
    ]
    if own and known:
        assert own_closings == [start - 5]  # closed already: left alone
    else:  # a closing was needed: it waited a whole dead time from the start
        assert own_closings[-1] - start == pytest.approx(DEAD)
    c.close()


def test_keep_leaves_the_hardware_as_it_is(tmp_path: Path) -> None:
    clock = FakeClock()
    c = opened(tmp_path, clock, relay("pump", 9))
    c.override("pump", "on")
    asyncio.run(clock.drive(c.converge()))
    c.close()  # the process goes; the line holds its level
    again = opened(tmp_path, clock, relay("pump", 9, initial="keep"))
    assert again.relays["pump"].on is True
    assert [level for _, level in pin_history(tmp_path / "mock-gpio", 9)] == [True]  # untouched
    again.close()


async def test_a_kept_group_found_with_two_closed_keeps_only_the_first(tmp_path: Path) -> None:
    clock = FakeClock()
    set_pin_level(tmp_path / "mock-gpio", OWN, True, t=clock.t - 1)
    set_pin_level(tmp_path / "mock-gpio", NEIGHBOUR, True, t=clock.t - 1)
    c = opened(tmp_path, clock, *[{**r, "initial": "keep"} for r in SUPPLY])
    assert states(c) == (True, False)
    await clock.drive(c.converge())
    assert states(c) == (True, False)  # nobody asked anything: kept as found
    c.close()


async def test_keep_on_real_lines_cannot_keep_a_group_and_goes_safe(tmp_path: Path) -> None:
    clock = FakeClock()
    set_pin_level(tmp_path / "mock-gpio", NEIGHBOUR, True, t=clock.t - 1)
    c = make(tmp_path, clock, *[{**r, "initial": "keep"} for r in SUPPLY], known=False)
    start = clock.t
    c.open()
    assert states(c) == (False, False)  # claimed open: the level of a real line is not known
    worker = asyncio.create_task(c.run())
    await clock.advance(1.0)
    worker.cancel()
    assert states(c) == (True, False)
    assert closed_at(tmp_path, OWN) == [start + DEAD]
    assert breaches(tmp_path) == []
    c.close()


# -- rules and overrides -----------------------------------------------------------------------


async def start_supply(tmp_path: Path, clock: FakeClock) -> tuple[RelayController, asyncio.Task]:
    c = opened(tmp_path, clock, *SUPPLY)
    worker = asyncio.create_task(c.run())
    await clock.advance(DEAD)
    assert states(c) == (True, False)
    return c, worker


async def test_change_of_source_is_break_before_make(tmp_path: Path) -> None:
    clock = FakeClock()
    c, worker = await start_supply(tmp_path, clock)
    c.request("own", False, "rule")
    c.request("neighbour", True, "rule")
    await clock.advance(DEAD / 2)
    assert states(c) == (False, False)  # the old source opened, the new one waits
    await clock.advance(DEAD / 2)
    assert states(c) == (False, True)
    c.request("neighbour", False, "rule")
    c.request("own", True, "rule")
    await clock.advance(0.5)
    worker.cancel()
    assert states(c) == (True, False)
    assert breaches(tmp_path) == []
    assert [v for _, v in pin_history(tmp_path / "mock-gpio", OWN)] == [True, False, True]
    assert [v for _, v in pin_history(tmp_path / "mock-gpio", NEIGHBOUR)] == [True, False]
    assert c.relays["neighbour"].switches == 2
    c.close()


async def test_two_rules_wanting_two_sources_never_close_both(tmp_path: Path) -> None:
    clock = FakeClock()
    c = opened(tmp_path, clock, *SUPPLY)
    c.request("own", True, "rule a")
    c.request("neighbour", True, "rule b")
    await clock.drive(c.converge())
    await clock.drive(c.converge())
    assert states(c) == (True, False)
    assert c.conflicts == 1  # counted once, not on every round
    c.close()


async def test_an_override_on_beats_a_rule_within_the_group(tmp_path: Path) -> None:
    clock = FakeClock()
    c, worker = await start_supply(tmp_path, clock)
    c.request("own", True, "rule")
    c.override("neighbour", "on")
    await clock.advance(1.0)
    worker.cancel()
    assert states(c) == (False, True)
    assert c.conflicts == 0
    assert breaches(tmp_path) == []
    c.close()


async def test_override_on_then_off_returns_the_group_to_its_safe_state(tmp_path: Path) -> None:
    # Item "a group left with no supply": ON then OFF from Home Assistant, no rule asking.
    clock = FakeClock()
    c, worker = await start_supply(tmp_path, clock)
    c.request("own", None, "no rule asks anything")
    c.override("neighbour", "on")
    await clock.advance(1.0)
    assert states(c) == (False, True)
    c.override("neighbour", "off")
    await clock.advance(DEAD / 2)
    assert states(c) == (False, False)  # the dead time
    await clock.advance(DEAD / 2)
    worker.cancel()
    assert states(c) == (True, False)
    assert breaches(tmp_path) == []
    assert "safe state of the group" in c.snapshot()["own"]["reason"]
    assert c.snapshot()["neighbour"]["reason"] == "override (manual)"
    c.close()


async def test_a_group_nobody_asks_for_returns_to_its_safe_state(tmp_path: Path) -> None:
    clock = FakeClock()
    c, worker = await start_supply(tmp_path, clock)
    c.request("neighbour", True, "rule")
    await clock.advance(1.0)
    assert states(c) == (False, True)
    c.request("neighbour", None, "no rule asks anything")
    await clock.advance(1.0)
    worker.cancel()
    assert states(c) == (True, False)
    assert breaches(tmp_path) == []
    c.close()


async def test_a_relay_asked_open_stays_open_even_if_safe_on(tmp_path: Path) -> None:
    clock = FakeClock()
    c, worker = await start_supply(tmp_path, clock)
    c.override("own", "off")
    await clock.advance(1.0)
    worker.cancel()
    assert states(c) == (False, False)
    c.close()


async def test_override_wins_then_expires(tmp_path: Path) -> None:
    clock = FakeClock()
    c = opened(tmp_path, clock, relay("heater", 12))
    c.request("heater", True, "rule")
    await clock.drive(c.converge())
    c.override("heater", "off", expires_s=0.2)
    await clock.drive(c.converge())
    assert not c.relays["heater"].on and c.relays["heater"].mode == "off"
    await clock.advance(0.19)
    assert c.expire_overrides() == []
    await clock.advance(0.01)
    assert c.expire_overrides() == ["heater"]
    await clock.drive(c.converge())
    assert c.relays["heater"].on and c.relays["heater"].mode == "auto"
    c.close()


async def test_an_expired_override_hands_the_group_back_safely(tmp_path: Path) -> None:
    clock = FakeClock()
    c, worker = await start_supply(tmp_path, clock)
    c.request("own", True, "rule")
    c.override("neighbour", "on", expires_s=2.0)
    await clock.advance(1.0)
    assert states(c) == (False, True)
    await clock.advance(1.0)
    assert c.expire_overrides() == ["neighbour"]
    await clock.advance(1.0)
    worker.cancel()
    assert states(c) == (True, False)
    assert breaches(tmp_path) == []
    c.close()


def test_unknown_relay_override_is_a_clear_error(tmp_path: Path) -> None:
    c = opened(tmp_path, FakeClock(), relay("heater", 12))
    with pytest.raises(DaiseeError, match="no relay"):
        c.override("boiler", "on")
    c.close()


# -- stop and safe state -----------------------------------------------------------------------


async def test_all_safe_opens_first_and_waits_before_closing(tmp_path: Path) -> None:
    clock = FakeClock()
    c = opened(tmp_path, clock, *SUPPLY)
    c.override("own", "off")
    c.override("neighbour", "on")
    await clock.drive(c.converge())
    assert states(c) == (False, True)
    t_stop = clock.t
    await clock.drive(c.all_safe())
    assert states(c) == (True, False)
    assert closed_at(tmp_path, OWN)[-1] - t_stop == pytest.approx(DEAD)
    assert breaches(tmp_path) == []
    c.close()


async def test_a_stop_during_the_dead_time_still_waits_it_out(tmp_path: Path) -> None:
    clock = FakeClock()
    c, worker = await start_supply(tmp_path, clock)
    c.request("own", False, "rule")
    c.request("neighbour", True, "rule")
    await clock.advance(1.0)
    c.request("neighbour", None, "rule")
    c.request("own", True, "rule")
    await clock.advance(0.05)  # neighbour opened, own waits the dead time …
    worker.cancel()  # … when the node stops
    await clock.drive(c.all_safe())
    assert states(c) == (True, False)
    assert breaches(tmp_path) == []
    c.close()


@pytest.mark.parametrize("crash_after", [0.0, 0.001, 0.1, DEAD, 0.3])
async def test_safe_state_after_a_crash_mid_switch(tmp_path: Path, crash_after: float) -> None:
    """A process dies while changing source; a fresh one (`safe-state`) takes over the pins."""
    clock = FakeClock()
    c, worker = await start_supply(tmp_path, clock)
    c.request("own", False, "rule")
    c.request("neighbour", True, "rule")
    await clock.advance(crash_after)
    worker.cancel()  # kill -9: nothing more from this process
    await clock.settle()
    c.close()  # (the mock lines keep their levels)
    fresh = make(tmp_path, clock, *SUPPLY)
    fresh.open(force_safe=True)
    await clock.drive(fresh.all_safe())
    assert states(fresh) == (True, False)
    assert breaches(tmp_path) == []
    fresh.close()
