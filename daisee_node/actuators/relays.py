"""Relays on GPIO (gpiozero), driven safely.

- Relays of one interlock `group` never close together, and a relay of a group closes only once
  the group's dead time has passed since any relay of the group last opened (break-before-make).
  This holds on every path: start, rules, overrides, reload, stop and `daisee-node safe-state`.
- At start claiming a pin never closes a relay of a group (mock lines are claimed at the level
  they hold; real lines, whose level is not known, open); the relays that must open open at
  once, and a relay of a group closes only a full dead time after the start, since a crashed
  process may have opened another one just before. Relays outside groups go straight to their
  safe state. With `initial = "keep"` a relay is left as the hardware holds it (a group only
  if every member keeps, its levels are known, and until a rule or a command asks for one).
- Rules ask (`request`), people override (`override`: ON / OFF / AUTO, with an expiry); a
  single worker task makes the pins follow, in a safe order. Within a group an override ON
  beats a rule's wish; when no command or rule asks for any member of a group to close, the
  group returns to its safe state (a member explicitly asked off stays open).
- On stop every relay returns to its safe state; `daisee-node safe-state` does the same from a
  fresh process, for systemd to call after any stop, including a crash or `kill -9`.
- Time comes from the node's `clock` given to the controller (its `monotonic` and `sleep`),
  or from the `monotonic` and `sleep` given (the real ones by default), so tests run it on a
  fake clock.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from daisee_node.errors import DaiseeError
from daisee_node.logs import get_logger
from daisee_node.models import NAME_PATTERN, StrictModel

if TYPE_CHECKING:
    from daisee_node.clock import Clock

OnOff = Literal["on", "off"]


class GpioSection(StrictModel):
    """`[gpio]`: which pin library drives the relays."""

    backend: Literal["native", "mock"] = Field(
        "native", description="native: the Pi's GPIO through gpiozero; mock: simulated pins"
    )
    mock_state_dir: Path | None = Field(
        None, description="where mock pins keep their levels (default <data_dir>/mock-gpio)"
    )


class RelayConfig(StrictModel):
    """One relay output."""

    name: str = Field(pattern=NAME_PATTERN)
    pin: int = Field(ge=0, le=27, description="BCM GPIO number")
    active_high: bool = True
    safe_state: OnOff = "off"
    initial: Literal["safe", "keep"] = Field(
        "safe", description="at start: go to the safe state, or keep what the hardware holds"
    )
    group: str | None = Field(None, description="relays of one group never close together")
    dead_time_s: float = Field(
        0.5, ge=0, le=60, description="open → close pause when the group changes source"
    )


def make_pin_factory(gpio: GpioSection, data_dir: Path) -> Any:
    """The gpiozero pin factory the config asks for."""
    if gpio.backend == "mock":
        from daisee_node.actuators.mockpins import persistent_mock_factory

        return persistent_mock_factory(gpio.mock_state_dir or data_dir / "mock-gpio")
    try:
        from gpiozero.pins.lgpio import LGPIOFactory

        return LGPIOFactory()
    except Exception as first:  # not a Pi, or lgpio missing: let gpiozero pick what it has
        try:
            from gpiozero import Device

            return Device._default_pin_factory()
        except Exception:
            raise DaiseeError(
                f"no GPIO on this machine ({first}); use [gpio] backend = 'mock' to simulate"
            ) from None


@dataclass
class RelayState:
    """What a relay is doing and why."""

    config: RelayConfig
    device: Any
    on: bool
    since: float = 0.0  # on the controller's monotonic clock, set when the pin is claimed
    switches: int = 0
    #: what the rules want (None: no rule has an opinion; keep the current state, or in a
    #: group that nobody asks for, go to the group's safe state)
    auto: bool | None = None
    auto_reason: str = ""
    override: bool | None = None
    override_until: float | None = None  # on the controller's monotonic clock
    override_reason: str = ""

    @property
    def wanted(self) -> bool:
        """What this relay alone asks for, leaving its interlock group aside."""
        if self.override is not None:
            return self.override
        return self.on if self.auto is None else self.auto

    @property
    def mode(self) -> str:
        if self.override is None:
            return "auto"
        return "on" if self.override else "off"


class RelayController:
    """The only code that touches relay pins.

    Dead times and override expiries run on `clock` (the node's steady time) when one is
    given, else on `monotonic` and `sleep`.
    """

    def __init__(
        self,
        configs: Sequence[RelayConfig],
        gpio: GpioSection,
        data_dir: Path,
        *,
        on_change: Callable[[RelayState, str], None] | None = None,
        clock: Clock | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        pin_factory: Any = None,
    ) -> None:
        if clock is not None:
            monotonic, sleep = clock.monotonic, clock.sleep
        self.configs = list(configs)
        self.gpio = gpio
        self.data_dir = data_dir
        self.relays: dict[str, RelayState] = {}
        self.on_change = on_change
        #: told every relay's state and why where no switch may say it: once the pins are
        #: claimed at start ("start: …"), and once all reached their safe state ("safe state")
        self.on_state: Callable[[RelayState, str], None] | None = None
        self._now = monotonic
        self._sleep = sleep
        #: a gpiozero pin factory to use instead of the one `gpio` names
        self._given_factory = pin_factory
        self._factory: Any = None
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()  # one converging at a time: the worker or all_safe
        #: group → its relays' names, in config order
        self.groups: dict[str, list[str]] = {}
        for c in self.configs:
            if c.group:
                self.groups.setdefault(c.group, []).append(c.name)
        #: group → its dead time: the longest any member asks for
        self.dead_time_s: dict[str, float] = {
            g: max(c.dead_time_s for c in self.configs if c.group == g) for g in self.groups
        }
        self._group_opened: dict[str, float] = {}  # group → when one of its relays last opened
        self._kept: set[str] = set()  # groups left as found at start, until someone asks
        self._conflict: dict[str, tuple[str, ...]] = {}  # group → relays asked closed together
        self.log = get_logger("relays")
        self.conflicts = 0

    # -- lifecycle ---------------------------------------------------------------------------

    def open(self, *, force_safe: bool = False) -> None:
        """Claim the pins and open what must open; closings are left to `converge`/`all_safe`.

        Each relay goes to its safe state (or stays as it is, with `keep`, unless `force_safe`).
        Relays outside groups that must close close at once. Within a group, the levels a
        crashed process left are taken as they are and nothing closes before a full dead time
        from now; the worker's first round (woken here) or `all_safe` does it.
        """
        from gpiozero import OutputDevice

        self._factory = self._given_factory or make_pin_factory(self.gpio, self.data_dir)
        # Persistent mock lines report the level a process left. A real line's level is not
        # known once claimed (gpiozero claims it as an input first, and claiming it as an output
        # without a level drives it low, which closes an active-low relay): it is claimed open.
        levels_known = bool(getattr(self._factory, "reports_levels", False))
        for c in self.configs:
            keep = c.initial == "keep" and not force_safe
            initial: bool | None
            if levels_known or (keep and c.group is None):
                initial = None  # as the line is: claiming it changes nothing
            elif c.group is None:
                initial = c.safe_state == "on"
            else:
                initial = False  # never closed here: its group's dead time comes first
            device = OutputDevice(
                c.pin, active_high=c.active_high, initial_value=initial, pin_factory=self._factory
            )
            self.relays[c.name] = RelayState(c, device, bool(device.value))
        now = self._now()
        for r in self.relays.values():
            r.since = now
        start = {
            name: r.on if (r.config.initial == "keep" and not force_safe) else self._safe(r)
            for name, r in self.relays.items()
        }
        for group, names in self.groups.items():
            for name in [n for n in names if start[n]][1:]:
                start[name] = False  # two closed at once: keep the first, open the others
            kept = all(self.relays[n].config.initial == "keep" for n in names)
            if kept and levels_known and not force_safe:
                self._kept.add(group)
            # When the others last opened is not known (maybe a moment ago, by a process that
            # then died): count the dead time from now.
            self._group_opened[group] = now
        for name, r in self.relays.items():
            if r.on and not start[name]:
                self._drive(r, False, "start")
        for name, r in self.relays.items():
            if not r.on and start[name] and r.config.group is None:
                self._drive(r, True, "start")
        if any(group not in self._kept for group in self.groups):
            self._wake.set()  # the worker closes what a group needs, after the dead time
        for r in self.relays.values():
            kept = r.config.initial == "keep" and not force_safe
            self._tell(r, "start: kept as found" if kept else "start: safe state")

    def close(self) -> None:
        for r in self.relays.values():
            r.device.close()
        self.relays.clear()
        if self._factory is not None:
            self._factory.close()
            self._factory = None

    async def all_safe(self) -> None:
        """Every relay to its safe state: openings first, closings after their dead time."""
        for r in self.relays.values():
            r.override, r.override_until, r.override_reason = None, None, ""
            r.auto, r.auto_reason = self._safe(r), "safe state"
        self._kept.clear()
        await self.converge()
        for r in self.relays.values():
            self._tell(r, "safe state")

    def _tell(self, r: RelayState, reason: str) -> None:
        if self.on_state is None:
            return
        try:
            self.on_state(r, reason)
        except Exception:  # a record that fails must not undo what the pins did
            self.log.exception("relay state not recorded", relay=r.config.name)

    # -- what rules and people ask -----------------------------------------------------------

    def request(self, name: str, on: bool | None, reason: str) -> None:
        """The rules' wish for a relay (None: no opinion)."""
        r = self.relays[name]
        if on is not None:
            self._kept.discard(r.config.group or "")
        if r.auto != on:
            r.auto, r.auto_reason = on, reason
            self._wake.set()

    def override(
        self,
        name: str,
        mode: Literal["on", "off", "auto"],
        expires_s: float | None = None,
        reason: str = "manual",
    ) -> None:
        """Manual ON / OFF (optionally for `expires_s` seconds), or back to AUTO."""
        if name not in self.relays:
            raise DaiseeError(f"no relay named {name!r}")
        r = self.relays[name]
        self._kept.discard(r.config.group or "")
        if mode == "auto":
            r.override, r.override_until, r.override_reason = None, None, ""
        else:
            r.override = mode == "on"
            r.override_until = None if expires_s is None else self._now() + expires_s
            r.override_reason = reason
        self.log.info("relay override", relay=name, mode=mode, expires_s=expires_s)
        self._wake.set()

    def expire_overrides(self) -> list[str]:
        """Return to AUTO every relay whose override has run out; their names."""
        now = self._now()
        expired = [
            n
            for n, r in self.relays.items()
            if r.override_until is not None and now >= r.override_until
        ]
        for name in expired:
            self.override(name, "auto", reason="expired")
        return expired

    # -- making the pins follow ------------------------------------------------------------------

    async def run(self) -> None:
        """The worker: converge pins to what is wanted, safely, whenever something changes."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self.converge()

    async def converge(self) -> None:
        """Drive the pins to the targets: openings at once, closings once it is safe.

        A relay of a group closes only while every other relay of the group is open and the
        group's dead time has passed since its last opening; until then this waits, and looks
        at the targets again after the wait (they may have changed).
        """
        async with self._lock:
            while True:
                wait = self._step()
                if wait <= 0:
                    return
                await self._sleep(wait)

    def _step(self) -> float:
        """One round of switching; how long until a pending closing may happen (0: none)."""
        targets = self.targets()
        for group, names in self.groups.items():
            self._note_conflict(group, self._contenders(names))
        for name, r in self.relays.items():
            if r.on and not targets[name][0]:
                self._drive(r, False, targets[name][1])
        wait = 0.0
        for name, r in self.relays.items():
            on, reason = targets[name]
            if r.on or not on:
                continue
            own = r.config.group
            if own is not None:
                others = [p for n, p in self.relays.items() if n != name and p.config.group == own]
                if any(p.on for p in others):  # cannot happen: the openings came first
                    self.log.error("interlock: a relay of the group is still closed", relay=name)
                    continue
                left = self._group_opened.get(own, -math.inf) + self.dead_time_s[own] - self._now()
                if left > 0:
                    wait = max(wait, left)
                    continue
            self._drive(r, True, reason)
        return wait

    def targets(self) -> dict[str, tuple[bool, str]]:
        """What each relay should be now, and why, with the interlock groups resolved."""
        out = {name: (r.wanted, self._why(r)) for name, r in self.relays.items()}
        for group, names in self.groups.items():
            members = [self.relays[n] for n in names if n in self.relays]
            if group in self._kept:
                for m in members:
                    out[m.config.name] = (m.on, "kept as found at start")
                continue
            contenders = self._contenders(names)
            winner: RelayState | None
            if contenders:
                winner = contenders[0]
                why = self._why(winner)
            else:
                # Nobody asks any relay of the group to close: the group's safe state, except
                # for a relay explicitly asked to stay open.
                winner = next(
                    (m for m in members if self._safe(m) and m.override is None and m.auto is None),
                    None,
                )
                why = "safe state of the group: nothing asks for another source"
            for m in members:
                if m is winner:
                    out[m.config.name] = (True, why)
                elif not m.wanted:
                    out[m.config.name] = (False, self._why(m))
                elif winner is None:
                    out[m.config.name] = (False, why)
                else:
                    out[m.config.name] = (False, f"interlock: {winner.config.name} takes over")
        return out

    def _contenders(self, names: Sequence[str]) -> list[RelayState]:
        """The relays of a group asked to close, best claim first.

        An override ON beats a rule's wish; among equals, the first in the config wins.
        """
        members = [self.relays[n] for n in names if n in self.relays]
        overridden = [m for m in members if m.override is True]
        return overridden or [m for m in members if m.override is None and m.auto is True]

    def _note_conflict(self, group: str, contenders: list[RelayState]) -> None:
        names = tuple(m.config.name for m in contenders) if len(contenders) > 1 else ()
        if names == self._conflict.get(group, ()):
            return
        self._conflict[group] = names
        if names:
            self.conflicts += 1
            self.log.warning(
                "interlock: several relays of a group asked closed; the first in the config wins",
                group=group,
                closed=names[0],
                kept_open=list(names[1:]),
            )

    @staticmethod
    def _safe(r: RelayState) -> bool:
        return r.config.safe_state == "on"

    @staticmethod
    def _why(r: RelayState) -> str:
        if r.override is not None:
            return f"override ({r.override_reason})"
        return r.auto_reason or "keep"

    def _drive(self, r: RelayState, on: bool, reason: str) -> None:
        if on:
            r.device.on()
        else:
            r.device.off()
        now = self._now()
        if not on and r.config.group:
            self._group_opened[r.config.group] = now
        r.on = on
        r.since = now
        r.switches += 1
        self.log.info(
            "relay switched", relay=r.config.name, state="on" if on else "off", reason=reason
        )
        if self.on_change is not None:
            self.on_change(r, reason)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Each relay's state, mode, switch count and reason (for status and MQTT); while an
        override with an end runs, `override_ends` in Unix seconds."""
        targets = self.targets()
        now, wall = self._now(), time.time()
        snap: dict[str, dict[str, Any]] = {}
        for name, r in self.relays.items():
            snap[name] = {
                "state": "on" if r.on else "off",
                "mode": r.mode,
                "switches": r.switches,
                "reason": targets[name][1],
            }
            if r.override is not None and r.override_until is not None:
                # Overrides run out on the controller's steady clock; people read wall time.
                snap[name]["override_ends"] = wall + max(0.0, r.override_until - now)
        return snap
