"""Control: the rules' decisions reach the relays, and both leave a trace.

The rules engine reads the newest readings and asks for relay states; the relay controller is
the only code that drives pins and enforces interlocks, minimum times and overrides. This room
connects the two, records every decision and switch as an event with counters, and runs their
timers (hold, minimum on/off, override expiry, stale inputs).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

from daisee_node.actuators.relays import RelayController, RelayState
from daisee_node.clock import Clock
from daisee_node.errors import DaiseeError
from daisee_node.readings import Reading
from daisee_node.rules.engine import Decision, RuleEngine

#: how often timers and staleness are evaluated
TICK_S = 0.25
#: the event kind of a relay's mode (auto / on / off) and why, recorded when it changes: at start,
#: at a command or an override's expiry, at the safe state of a stop (a switch is a "relay" event)
MODE_EVENT = "relay_mode"
#: a rule's last error is cut to this many characters where it is shown
RULE_ERROR_MAX = 300


class EventLog(Protocol):
    """Where control writes its events and counters (the store)."""

    def put_event(
        self,
        t_ms: int,
        kind: str,
        name: str,
        target: str | None,
        state: str | None,
        reason: str,
        data: str | None = None,
    ) -> None: ...

    def add_counter(self, name: str, delta: int) -> None: ...

    def set_counter(self, name: str, value: int) -> None: ...


class Control:
    """Rules (optional) driving relays (optional) through the interlocked controller."""

    def __init__(
        self,
        config: Any,
        clock: Clock,
        latest: Mapping[str, Reading],
        events: EventLog,
        relays: RelayController | None,
    ) -> None:
        self.clock = clock
        self.latest = latest
        self.events = events
        self.relays = relays
        if relays is not None:
            relays.on_change = self._relay_changed
            relays.on_state = self._relay_state
        #: relay → (mode, reason, on) last recorded as a MODE_EVENT
        self._modes: dict[str, tuple[str, str, bool]] = {}
        self._safe = {r.name: r.safe_state for r in config.relays}
        self.rules: RuleEngine | None = self._build(config) if config.rules else None
        self._rule_errors: dict[str, int] = {}

    @property
    def active(self) -> bool:
        """Whether there is anything to tick."""
        return self.rules is not None or self.relays is not None

    def on_readings(self, readings: Sequence[Reading]) -> None:
        """The reading bus's sink: new values may change what the rules want."""
        if self.rules is not None:
            self.rules.on_readings(readings)

    def _build(self, config: Any) -> RuleEngine:
        return RuleEngine(
            config.rules,
            config.derived,
            self.latest,
            self._safe,
            clock=self.clock,
            request=self._rule_request,
            record=self._record_decision,
        )

    def replace_rules(self, config: Any) -> None:
        """A reload changed the rules: build them again; relays no rule drives any more go to
        their safe state (the wish of a removed rule must not outlive it)."""
        self.rules = self._build(config) if config.rules else None
        if self.relays is None:
            return
        named = {relay for rule in config.rules for relay in rule.relays()}
        for name, relay in self.relays.relays.items():
            if name not in named:
                safe = relay.config.safe_state == "on"
                self.relays.request(name, safe, "no rule drives it: safe state")
        if self.rules is not None:
            for name, r in self.relays.relays.items():
                self.rules.set_suspended(name, r.override is not None)
            self.rules.tick()

    def _rule_request(self, relay: str, on: bool | None, reason: str) -> None:
        if self.relays is not None:
            self.relays.request(relay, on, reason)

    def _record_decision(self, d: Decision) -> None:
        self.events.put_event(
            d.t_ms, "rule", d.rule, d.relay, d.state, d.reason, json.dumps(d.inputs, sort_keys=True)
        )
        self.events.set_counter(f"rule.{d.rule}.active", int(d.active))

    def _relay_changed(self, r: RelayState, reason: str) -> None:
        name = r.config.name
        now_ms = self.clock.now_ms()
        self.events.put_event(now_ms, "relay", name, None, "on" if r.on else "off", reason)
        self.events.add_counter(f"relay.{name}.switches", 1)
        self.events.set_counter(f"relay.{name}.state", int(r.on))
        self.events.set_counter(f"relay.{name}.since_ms", now_ms)

    def _relay_state(self, r: RelayState, reason: str) -> None:
        self._note_mode(r.config.name, r.mode, reason)

    def _note_mode(self, name: str, mode: str, reason: str) -> None:
        """Record a relay's mode and why, unless that is what was recorded last."""
        assert self.relays is not None
        on = self.relays.relays[name].on
        if self._modes.get(name) == (mode, reason, on):
            return
        self._modes[name] = (mode, reason, on)
        self.events.put_event(self.clock.now_ms(), MODE_EVENT, name, None, mode, reason)
        # Also for a relay that never switches: `status` lists it with its state.
        self.events.set_counter(f"relay.{name}.state", int(on))

    def _automatic(self, name: str) -> str:
        """What decides a relay in automatic mode now, in words."""
        assert self.relays is not None
        why = self.relays.targets()[name][1]
        return "nothing asks for a change" if why == "keep" else why

    async def tick_loop(self) -> None:
        """Timers (hold, minimum on/off, override expiry) and staleness, four times a second."""
        while True:
            self.tick()
            await asyncio.sleep(TICK_S)

    def tick(self) -> None:
        expired: list[str] = []
        if self.relays is not None:
            expired = self.relays.expire_overrides()
            if self.rules is not None:
                for name, r in self.relays.relays.items():
                    self.rules.set_suspended(name, r.override is not None)
        if self.rules is not None:
            self.rules.tick()
            for rule in self.rules.rules:
                if rule.errors != self._rule_errors.get(rule.config.name):
                    self._rule_errors[rule.config.name] = rule.errors
                    self.events.set_counter(f"rule.{rule.config.name}.errors", rule.errors)
        for name in expired:  # after the rules had their say: the reason names what decides
            self._note_mode(name, "auto", f"override ended; automatic: {self._automatic(name)}")

    def rule_states(self) -> dict[str, dict[str, Any]] | None:
        """Each rule's snapshot, with `error` (why it last failed) when it has one."""
        if self.rules is None:
            return None
        states = self.rules.snapshot()
        by_name = {r.config.name: r for r in self.rules.rules}
        for name, snap in states.items():
            error = snap.get("error", getattr(by_name.get(name), "error", None))
            if error:
                snap["error"] = str(error)[:RULE_ERROR_MAX]
        return states

    def override(
        self, relay: str, mode: str, expires_s: float | None = None, reason: str = "manual"
    ) -> None:
        """Manual ON / OFF / AUTO of a relay (the API the MQTT commands use)."""
        if self.relays is None:
            raise DaiseeError("this node has no relays")
        self.relays.override(relay, mode, expires_s, reason)  # type: ignore[arg-type]
        if self.rules is not None:
            self.rules.set_suspended(relay, mode != "auto")
            if mode == "auto":
                self.rules.tick()  # the rules decide again now, and the reason can say how
        now_ms = self.clock.now_ms()
        self.events.put_event(
            now_ms,
            "override",
            relay,
            relay,
            mode,
            f"{reason}" + (f" for {expires_s:g} s" if expires_s else ""),
        )
        if mode == "auto":
            why = f"automatic again ({reason}): {self._automatic(relay)}"
        else:
            why = f"override ({reason})"
            if expires_s:
                until = datetime.fromtimestamp(now_ms / 1000 + expires_s, UTC)
                why += f" until {until:%Y-%m-%d %H:%M:%S} UTC"
        self._note_mode(relay, mode, why)
