"""gpiozero mock pins whose level outlives the process, as a real GPIO line's does.

gpiozero's MockFactory keeps pin states in memory: enough inside one process, not to check what a
relay looks like after `kill -9` and `daisee-node safe-state` from a fresh process. These pins
append every change to `<dir>/history.log` (`<time> <pin> <0|1>` lines, every pin in the order
the changes were made, across processes) and take their level at start from its last line for
them, while staying gpiozero's own MockPin in everything else. One appended line is the whole
change, so a process killed at any instant leaves a history that tells the level it left.
`interlock_breaches` reads that history the way an oscilloscope on the relay lines would be
read: were two relays of a group ever closed together, and did every change of source wait the
group's dead time?
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpiozero.pins.mock import MockFactory, MockPin

HISTORY = "history.log"


def _pin_name(pin: int | str) -> str:
    return f"GPIO{pin}" if isinstance(pin, int) else pin


def _append(path: Path, line: str) -> None:
    # One write on an O_APPEND descriptor: lines from several processes never interleave.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def _record(state_dir: Path, name: str, high: bool, t: float) -> None:
    _append(state_dir / HISTORY, f"{t:.6f} {name} {int(high)}\n")


class PersistentMockPin(MockPin):
    """A MockPin that reloads its last output level and records every change on disk."""

    state_dir: Path = Path(".")
    #: the time stamped on each recorded change (wall clock: shared by every process)
    clock: Callable[[], float] = staticmethod(time.time)

    def __init__(self, factory: Any, info: Any) -> None:
        super().__init__(factory, info)
        level = pin_level(self.state_dir, info.name)
        if level is not None:
            self._state = level

    def _change_state(self, value: bool) -> bool:
        changed = bool(super()._change_state(value))
        if changed and self._function == "output":
            _record(self.state_dir, self.info.name, value, self.clock())
        return changed

    def close(self) -> None:
        # Releasing the line must not count as driving it low: the level stays as it was.
        self.when_changed = None
        self._function = "input"


def persistent_mock_factory(
    state_dir: Path, *, clock: Callable[[], float] = time.time
) -> MockFactory:
    """A MockFactory whose pins keep their levels under `state_dir`, changes stamped by `clock`."""
    state_dir.mkdir(parents=True, exist_ok=True)
    pin_class = type(
        "PersistentMockPinIn",
        (PersistentMockPin,),
        {"state_dir": state_dir, "clock": staticmethod(clock)},
    )
    factory = MockFactory(pin_class=pin_class)
    #: its pins report the level a previous process left (a real line's is not known)
    factory.reports_levels = True
    return factory


def pin_history(state_dir: Path, pin: int | str) -> list[tuple[float, bool]]:
    """Every level a mock pin was driven to, across processes: [(unix time, high?)]."""
    name = _pin_name(pin)
    return [(c.t, c.high) for c in pin_changes(state_dir) if c.pin == name]


def pin_level(state_dir: Path, pin: int | str) -> bool | None:
    """The level a mock pin holds now, or None if it was never driven."""
    history = pin_history(state_dir, pin)
    return history[-1][1] if history else None


def set_pin_level(state_dir: Path, pin: int | str, high: bool, t: float | None = None) -> None:
    """Leave a pin at a level, as a process that is gone would have (recorded in the history)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    _record(state_dir, _pin_name(pin), high, time.time() if t is None else t)


@dataclass(frozen=True, slots=True)
class PinChange:
    """One recorded change of a mock pin's level."""

    t: float
    pin: str
    high: bool


def pin_changes(state_dir: Path) -> list[PinChange]:
    """Every change of every mock pin under `state_dir`, in the order the changes were made."""
    try:
        lines = (state_dir / HISTORY).read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        t, pin, level = line.split()
        out.append(PinChange(float(t), pin, level == "1"))
    return out


@dataclass(frozen=True, slots=True)
class GroupPin:
    """A relay of an interlock group, as its pin sees it."""

    pin: int | str
    active_high: bool = True


def interlock_breaches(
    changes: Sequence[PinChange],
    groups: Mapping[str, Sequence[GroupPin]],
    dead_time_s: Mapping[str, float],
    *,
    tolerance_s: float = 1e-3,
    after: float = -math.inf,
) -> list[str]:
    """What in a pin history breaks the interlock, in words (an empty list: nothing).

    A relay counts as open until its pin's first recorded change. Two breaches are looked for:
    two relays of one group closed at once, and a relay closing sooner than its group's dead
    time after any relay of the group opened (`tolerance_s` allows for the stamps' rounding).
    Changes made before `after` set the levels the judged part starts from; only later changes
    are judged (to set up a state that breaks the interlock, as a crash may leave it).
    """
    relay_of: dict[str, tuple[str, bool]] = {}
    for group, pins in groups.items():
        for p in pins:
            relay_of[_pin_name(p.pin)] = (group, p.active_high)
    closed: dict[str, set[str]] = {group: set() for group in groups}
    last_opened: dict[str, float] = {group: -math.inf for group in groups}
    breaches: list[str] = []
    for change in changes:
        if change.pin not in relay_of:
            continue
        group, active_high = relay_of[change.pin]
        is_closed = change.high == active_high
        judged = change.t >= after
        if is_closed and change.pin not in closed[group]:
            if closed[group] and judged:
                breaches.append(
                    f"{change.t:.6f}: {change.pin} closed while {sorted(closed[group])} "
                    f"of group {group} was closed"
                )
            gap = change.t - last_opened[group]
            if gap < dead_time_s[group] - tolerance_s and judged:
                breaches.append(
                    f"{change.t:.6f}: {change.pin} closed {gap:.4f} s after group {group} "
                    f"opened a relay (dead time {dead_time_s[group]} s)"
                )
            closed[group].add(change.pin)
        elif not is_closed and change.pin in closed[group]:
            closed[group].discard(change.pin)
            last_opened[group] = change.t
    return breaches
