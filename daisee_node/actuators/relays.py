"""Relays on GPIO (gpiozero), driven safely.

- At start each relay is put straight into its safe state (or left as the hardware holds it, with
  `initial = "keep"`), never toggled through the other state.
- Relays of one interlock `group` never close together: a change of source opens the old one,
  waits the group's dead time, then closes the new one (break-before-make).
- Rules ask (`request`), people override (`override`: ON / OFF / AUTO, with an expiry); a
  single worker task makes the pins follow, in a safe order.
- On stop every relay returns to its safe state; `daisee-node safe-state` does the same from a
  fresh process, for systemd to call after any stop, including a crash or `kill -9`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from daisee_node.errors import DaiseeError
from daisee_node.logs import get_logger
from daisee_node.sensors.base import NAME_PATTERN, StrictModel

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
    since: float = field(default_factory=time.monotonic)
    switches: int = 0
    #: what the rules want (None: no rule has an opinion; keep the current state)
    auto: bool | None = None
    auto_reason: str = ""
    override: bool | None = None
    override_until: float | None = None  # monotonic
    override_reason: str = ""

    @property
    def wanted(self) -> bool:
        if self.override is not None:
            return self.override
        return self.on if self.auto is None else self.auto

    @property
    def mode(self) -> str:
        if self.override is None:
            return "auto"
        return "on" if self.override else "off"


class RelayController:
    """The only code that touches relay pins."""

    def __init__(
        self,
        configs: Sequence[RelayConfig],
        gpio: GpioSection,
        data_dir: Path,
        *,
        on_change: Callable[[RelayState, str], None] | None = None,
    ) -> None:
        self.configs = list(configs)
        self.gpio = gpio
        self.data_dir = data_dir
        self.relays: dict[str, RelayState] = {}
        self.on_change = on_change
        self._factory: Any = None
        self._wake = asyncio.Event()
        self._group_opened: dict[str, float] = {}  # group → when its last relay opened
        self.log = get_logger("relays")
        self.conflicts = 0

    # -- lifecycle ---------------------------------------------------------------------------

    def open(self, *, force_safe: bool = False) -> None:
        """Claim the pins; each relay starts in its safe state (or as it is, if `keep`)."""
        from gpiozero import OutputDevice

        self._factory = make_pin_factory(self.gpio, self.data_dir)
        for c in self.configs:
            safe = c.safe_state == "on"
            initial: bool | None = None if (c.initial == "keep" and not force_safe) else safe
            device = OutputDevice(
                c.pin, active_high=c.active_high, initial_value=initial, pin_factory=self._factory
            )
            self.relays[c.name] = RelayState(c, device, bool(device.value))
        # Two relays of one group found closed (kept from before): open all but the first.
        for group in {c.group for c in self.configs if c.group}:
            closed = [r for r in self.relays.values() if r.config.group == group and r.on]
            for r in closed[1:]:
                self._drive(r, False, "interlock at start")

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
            r.override = None
            r.auto = r.config.safe_state == "on"
            if r.on and not r.auto:
                self._drive(r, False, "safe state")
        for r in self.relays.values():
            if r.auto and not r.on:
                # Counted from the group's last opening, whoever made it (a change of source
                # may have been waiting out its dead time when the stop came).
                opened = self._group_opened.get(r.config.group or "")
                if opened is not None:
                    wait = opened + r.config.dead_time_s - time.monotonic()
                    if wait > 0:
                        await asyncio.sleep(wait)
                self._drive(r, True, "safe state")

    # -- what rules and people ask -----------------------------------------------------------

    def request(self, name: str, on: bool | None, reason: str) -> None:
        """The rules' wish for a relay (None: no opinion)."""
        r = self.relays[name]
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
        if mode == "auto":
            r.override, r.override_until, r.override_reason = None, None, ""
        else:
            r.override = mode == "on"
            r.override_until = None if expires_s is None else time.monotonic() + expires_s
            r.override_reason = reason
        self.log.info("relay override", relay=name, mode=mode, expires_s=expires_s)
        self._wake.set()

    def expire_overrides(self) -> list[str]:
        now = time.monotonic()
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
        # Openings first: they are always safe.
        for r in self.relays.values():
            if r.on and not r.wanted:
                self._drive(r, False, self._why(r))
        for r in list(self.relays.values()):
            if r.on or not r.wanted:
                continue
            group = r.config.group
            if group:
                peers = [p for p in self.relays.values() if p is not r and p.config.group == group]
                # Only an explicit wish (a rule's request or an override) competes; a relay
                # merely kept closed yields to a change of source.
                rivals = [p for p in peers if p.wanted and (p.override is not None or p.auto)]
                if rivals and self.configs.index(rivals[0].config) < self.configs.index(r.config):
                    self.conflicts += 1
                    self.log.warning(
                        "interlock: two relays of a group wanted closed; "
                        "the first in the config wins",
                        group=group,
                        closed=rivals[0].config.name,
                        kept_open=r.config.name,
                    )
                    continue
                for p in peers:
                    if p.on:
                        self._drive(p, False, f"interlock: {r.config.name} takes over")
                opened = self._group_opened.get(group)
                if opened is not None:
                    wait = opened + r.config.dead_time_s - time.monotonic()
                    if wait > 0:
                        await asyncio.sleep(wait)
                        if not r.wanted or any(p.on for p in peers):
                            self._wake.set()  # things changed while we waited: start over
                            return
            self._drive(r, True, self._why(r))

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
            if r.config.group:
                self._group_opened[r.config.group] = time.monotonic()
        r.on = on
        r.since = time.monotonic()
        r.switches += 1
        self.log.info(
            "relay switched", relay=r.config.name, state="on" if on else "off", reason=reason
        )
        if self.on_change is not None:
            self.on_change(r, reason)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return {
            name: {
                "state": "on" if r.on else "off",
                "mode": r.mode,
                "switches": r.switches,
                "reason": self._why(r),
            }
            for name, r in self.relays.items()
        }
