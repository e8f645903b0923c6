"""Local exchange rules: evaluated on every new input, turned into relay requests.

A rule is `active` while its `when` holds (or, with `until`, from when `when` becomes true until
`until` does: hysteresis). A change of that raw condition must hold for `hold_s` before the rule
acts on it; the rule then stays in its new state at least `min_on_s` / `min_off_s`. An active rule
asks for `then`, an inactive one for `otherwise` (or nothing). If an input is missing, bad or older
than `stale_after_s`, the rule asks for its `fallback` at once: safety comes before hold and
minimum times. Inputs named `peer.<node>.<channel>` are a neighbour's readings, heard over MQTT
(`daisee_node.peers`), stamped with the neighbour's times: the same staleness and fallback apply
to them. Among the rules that ask something of one relay, the highest `priority` wins
(the first in the file on a tie). A relay under manual override suspends its rules.

An evaluation that fails (a division by a value that turned zero, a derived value that cannot be
computed) fails for that rule only: the rule asks for its fallback, the failure is counted and its
message kept on the rule (`error`, `errors`) until an evaluation succeeds again. Nothing a rule
says can make `on_readings` or `tick` raise, so no rule can stop the sampler that feeds it.
"""

from __future__ import annotations

import graphlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from daisee_node.logs import get_logger
from daisee_node.models import StrictModel
from daisee_node.readings import Quality, Reading
from daisee_node.rules.expressions import EvaluationError, Expression

if TYPE_CHECKING:
    from daisee_node.clock import Clock

RULE_NAME = r"^[a-z0-9][a-z0-9_-]*$"


class Action(StrictModel):
    """Set one relay."""

    relay: str
    state: Literal["on", "off"]


class RuleConfig(StrictModel):
    """One `[[rules]]` entry."""

    name: str = Field(pattern=RULE_NAME)
    when: str = Field(min_length=1)
    until: str | None = Field(None, description="with it, the rule stays active until this holds")
    then: Action
    otherwise: Action | None = None
    hold_s: float = Field(0.0, ge=0)
    min_on_s: float = Field(0.0, ge=0)
    min_off_s: float = Field(0.0, ge=0)
    priority: int = 0
    stale_after_s: float = Field(10.0, gt=0)
    fallback: Literal["safe", "off", "on", "keep"] = "safe"
    enabled: bool = True

    def relays(self) -> list[str]:
        names = [self.then.relay]
        if self.otherwise is not None and self.otherwise.relay not in names:
            names.append(self.otherwise.relay)
        return names


@dataclass
class Decision:
    """Why a rule asked what it asked; recorded when it changes."""

    t_ms: int
    rule: str
    relay: str
    state: str | None
    reason: str
    inputs: dict[str, float | None]
    active: bool = False
    #: why the evaluation failed (None: it did not), and failed evaluations so far
    error: str | None = None
    errors: int = 0


@dataclass
class RuleState:
    """A rule's live state."""

    config: RuleConfig
    when: Expression
    until: Expression | None
    inputs: frozenset[str]
    active: bool = False
    raw: bool | None = None  # the condition as last evaluated (None: stale)
    raw_since_ms: int | None = None
    changed_ms: int | None = None  # when `active` last flipped
    stale: bool = True
    suspended: bool = False
    #: what the rule asks now: relay → "on"/"off"/None
    asks: dict[str, str | None] = field(default_factory=dict)
    reason: str = "not evaluated yet"
    #: the derived values the rule reads, directly or not, in the order they are computed
    derived: tuple[str, ...] = ()
    #: why the rule can never be evaluated (a cycle among its derived values)
    broken: str | None = None
    #: why the last evaluation failed (None: it did not)
    error: str | None = None
    #: evaluations that failed since the engine started
    errors: int = 0
    #: the last failure written to the log (each distinct one is written once)
    logged_error: str | None = field(default=None, repr=False)


class RuleEngine:
    """Evaluates every rule whose inputs changed, and on a tick for timers and staleness.

    Time comes from `clock` (the node's), read once per evaluation: staleness, hold and
    minimum times, and the `time.*` inputs all use that one instant. `now_ms` (milliseconds
    since the epoch) may be given instead of a clock; with neither, the wall clock is used.
    """

    def __init__(
        self,
        rules: Sequence[RuleConfig],
        derived: Mapping[str, str],
        latest: Mapping[str, Reading],
        safe_states: Mapping[str, str],
        *,
        clock: Clock | None = None,
        now_ms: Callable[[], int] | None = None,
        local_time: Callable[[int], datetime] | None = None,
        request: Callable[[str, bool | None, str], None],
        record: Callable[[Decision], None] | None = None,
    ) -> None:
        if clock is not None and now_ms is not None:
            raise ValueError("give the engine a clock or a now_ms, not both")
        if clock is None:
            from daisee_node.clock import Clock as WallClock

            clock = WallClock()
        self.clock = clock
        self.latest = latest
        self.safe_states = dict(safe_states)
        self.now_ms: Callable[[], int] = now_ms if now_ms is not None else self.clock.now_ms
        self.local_time = local_time or (lambda t: datetime.fromtimestamp(t / 1000))
        self.request = request
        self.record = record
        self.log = get_logger("rules")
        self.derived = {name: Expression(text) for name, text in derived.items()}
        self.rules: list[RuleState] = []
        for cfg in rules:
            when = Expression(cfg.when)
            until = Expression(cfg.until) if cfg.until else None
            names = set(when.names) | (set(until.names) if until else set())
            inputs, needed = self._expand(names)
            rule = RuleState(cfg, when, until, frozenset(inputs))
            try:
                order = graphlib.TopologicalSorter(
                    {n: self.derived[n].names & self.derived.keys() for n in needed}
                ).static_order()
                rule.derived = tuple(order)
            except graphlib.CycleError as exc:
                cycle = " -> ".join(dict.fromkeys(exc.args[1])) if len(exc.args) > 1 else ""
                rule.broken = f"derived values depend on each other: {cycle}"
            self.rules.append(rule)
        self._by_input: dict[str, list[RuleState]] = {}
        for rule in self.rules:
            for name in rule.inputs:
                self._by_input.setdefault(name, []).append(rule)
        self._by_relay: dict[str, list[RuleState]] = {}
        for rule in self.rules:
            for relay in rule.config.relays():
                self._by_relay.setdefault(relay, []).append(rule)
        self._asked: dict[str, tuple[bool | None, str]] = {}
        self.evaluations = 0

    def _expand(self, names: set[str]) -> tuple[set[str], set[str]]:
        """The channels a rule reads, those behind its derived values included, and the derived
        values it needs (without recursion: derived values may name each other in a cycle)."""
        channels: set[str] = set()
        needed: set[str] = set()
        todo = list(names)
        while todo:
            name = todo.pop()
            if name in self.derived:
                if name not in needed:
                    needed.add(name)
                    todo.extend(self.derived[name].names)
            else:
                channels.add(name)
        return channels, needed

    # -- triggers --------------------------------------------------------------------------------

    def on_readings(self, readings: Sequence[Reading]) -> None:
        """Evaluate the rules that read any of these channels (called for every batch)."""
        by_input = self._by_input
        touched: list[RuleState] = []
        for r in readings:
            for rule in by_input.get(r.channel, ()):
                if rule not in touched:
                    touched.append(rule)
        if touched:
            self.evaluate(touched)

    def tick(self) -> None:
        """Evaluate everything: hold and minimum times run out, inputs go stale."""
        self.evaluate(self.rules)

    def set_suspended(self, relay: str, suspended: bool) -> None:
        for rule in self._by_relay.get(relay, ()):
            rule.suspended = suspended

    # -- evaluation -----------------------------------------------------------------------------

    def evaluate(self, rules: Sequence[RuleState]) -> None:
        now = self.now_ms()
        relays: set[str] = set()
        for rule in rules:
            if rule.config.enabled:
                try:
                    self._step(rule, now)
                except Exception as exc:  # whatever a rule says, the caller (a sampler) goes on
                    self._failed(rule, now, f"{type(exc).__name__}: {exc}", {})
                relays.update(rule.config.relays())
        for relay in sorted(relays):
            self._resolve(relay, now)

    def _values(
        self, rule: RuleState, now: int
    ) -> tuple[dict[str, Any] | None, dict[str, Any], list[str]]:
        """The inputs of a rule, or None when one is missing, bad or stale; the inputs as
        recorded; and what is wrong with each unusable one, in words."""
        max_age = rule.config.stale_after_s * 1000
        values: dict[str, Any] = {}
        shown: dict[str, Any] = {}
        problems: list[str] = []
        for name in rule.inputs:
            if name.startswith("time."):
                continue
            r = self.latest.get(name)
            if r is None or not r.good or not math.isfinite(r.value) or now - r.t_ms > max_age:
                shown[name] = None if r is None or not math.isfinite(r.value) else r.value
                problems.append(_unusable(name, r, now, rule.config.stale_after_s))
            else:
                values[name] = shown[name] = r.value
        local = self.local_time(now)
        values["time.hour"] = local.hour + local.minute / 60 + local.second / 3600
        values["time.minute"] = float(local.minute)
        values["time.weekday"] = float(local.weekday())
        if problems:
            return None, shown, sorted(problems)
        return values, shown, problems

    def _derive(self, rule: RuleState, values: dict[str, Any]) -> None:
        """Add the derived values the rule reads to `values`; EvaluationError if one fails."""
        if rule.broken is not None:
            raise EvaluationError(rule.broken)
        for name in rule.derived:
            try:
                values[name] = self.derived[name].evaluate(values)
            except EvaluationError as exc:
                raise EvaluationError(f"derived {name}: {exc}") from None

    def _step(self, rule: RuleState, now: int) -> None:
        self.evaluations += 1
        cfg = rule.config
        values, shown, problems = self._values(rule, now)
        if values is None:
            rule.error = None  # not evaluated: what fails now is the inputs
            rule.stale, rule.raw, rule.raw_since_ms = True, None, None
            rule.reason = f"inputs missing or stale: {', '.join(problems)}; {_fallen_back(cfg)}"
            rule.asks = self._fallback(cfg)
            self._note(rule, now, shown)
            return
        try:
            self._derive(rule, values)
            if rule.until is None:
                raw = rule.when.test(values)
            elif rule.active:
                raw = not rule.until.test(values)
            else:
                raw = rule.when.test(values)
        except EvaluationError as exc:
            self._failed(rule, now, str(exc), shown)
            return
        if rule.error is not None:
            self.log.debug("rule evaluates again", rule=cfg.name)
            rule.error = None
        rule.stale = False
        if raw != rule.raw:
            rule.raw, rule.raw_since_ms = raw, now
        held = now - (rule.raw_since_ms or now) >= cfg.hold_s * 1000
        in_state = now - rule.changed_ms if rule.changed_ms is not None else math.inf
        minimum = cfg.min_on_s if rule.active else cfg.min_off_s
        if raw != rule.active and held and in_state >= minimum * 1000:
            rule.active, rule.changed_ms = raw, now
        described = ", ".join(f"{k}={v:g}" for k, v in sorted(shown.items()))
        described = f" ({described})" if described else ""
        if rule.active:
            rule.asks = {cfg.then.relay: cfg.then.state}
            if rule.until is not None:
                rule.reason = f"active until {cfg.until} holds{described}"
            else:
                rule.reason = f"active: {cfg.when} holds{described}"
        else:
            rule.asks = {cfg.otherwise.relay: cfg.otherwise.state} if cfg.otherwise else {}
            rule.reason = f"inactive: {cfg.when} does not hold{described}"
        if raw != rule.active:
            left = max(
                cfg.hold_s * 1000 - (now - (rule.raw_since_ms or now)), minimum * 1000 - in_state
            )
            turns = "active" if raw else "inactive"
            rule.reason += f"; turns {turns} in {left / 1000:.1f} s if that lasts"
        self._note(rule, now, shown)

    def _failed(self, rule: RuleState, now: int, message: str, shown: dict[str, Any]) -> None:
        """An evaluation of this rule failed: count it, keep why, and fall back."""
        rule.errors += 1
        if message != rule.logged_error:
            # Once per distinct message: a rule that fails at every sample must not flood the log.
            rule.logged_error = message
            self.log.warning(
                "rule failed; it asks for its fallback until it evaluates again",
                rule=rule.config.name,
                error=message,
                fallback=rule.config.fallback,
                errors=rule.errors,
            )
        rule.error = message
        rule.stale, rule.raw, rule.raw_since_ms = False, None, None
        rule.reason = f"error: {message}; fallback {rule.config.fallback}"
        rule.asks = self._fallback(rule.config)
        self._note(rule, now, shown)

    def _fallback(self, cfg: RuleConfig) -> dict[str, str | None]:
        if cfg.fallback == "keep":
            return {}
        return {
            relay: (self.safe_states.get(relay, "off") if cfg.fallback == "safe" else cfg.fallback)
            for relay in cfg.relays()
        }

    def _note(self, rule: RuleState, now: int, shown: dict[str, Any]) -> None:
        key = (rule.active, rule.stale, rule.error, tuple(sorted(rule.asks.items())))
        if getattr(rule, "_last_key", None) == key:
            return
        rule._last_key = key  # type: ignore[attr-defined]
        if self.record is not None:
            for relay in rule.config.relays():
                self.record(
                    Decision(
                        now,
                        rule.config.name,
                        relay,
                        rule.asks.get(relay),
                        rule.reason,
                        dict(shown),
                        active=rule.active,
                        error=rule.error,
                        errors=rule.errors,
                    )
                )

    def _resolve(self, relay: str, now: int) -> None:
        candidates = [
            r
            for r in self._by_relay.get(relay, ())
            if r.config.enabled and not r.suspended and r.asks.get(relay) is not None
        ]
        if candidates:
            best = max(candidates, key=lambda r: r.config.priority)  # max keeps the first on ties
            wish: bool | None = best.asks[relay] == "on"
            reason = f"rule {best.config.name}: {best.reason}"
        else:
            wish, reason = None, "no rule asks anything"
        if self._asked.get(relay, (None, ""))[0] != wish or relay not in self._asked:
            self._asked[relay] = (wish, reason)
            self.request(relay, wish, reason)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Each rule's live state, for MQTT (`error`: why its last evaluation failed, or None;
        `errors`: failed evaluations since the engine started)."""
        return {
            r.config.name: {
                "enabled": r.config.enabled,
                "active": r.active,
                "stale": r.stale,
                "suspended": r.suspended,
                "asks": dict(r.asks),
                "reason": r.reason,
                "error": r.error,
                "errors": r.errors,
            }
            for r in self.rules
        }


_QUALITY_WORDS = {
    Quality.SOURCE_ERROR: "its source did not answer",
    Quality.UNAVAILABLE: "its source is unavailable",
    Quality.OUT_OF_RANGE: "out of range",
    Quality.SATURATED: "the sensor is saturated",
    Quality.COUNTER_BACKWARDS: "the counter went backwards",
    Quality.IMPLAUSIBLE_STEP: "an implausible step",
    Quality.LATE: "stamped in a sealed period",
}


def _unusable(name: str, r: Reading | None, now_ms: int, stale_after_s: float) -> str:
    """Why one input cannot be used, in an operator's words (never a bare `None`)."""
    if r is None:
        if name.startswith("peer."):  # a neighbour's (daisee_node.peers): say where it comes from
            peer = name.split(".", 2)[1]
            return f"{name} has no reading (nothing kept from peer {peer} yet)"
        return f"{name} has no reading"
    if not r.good:
        return f"{name} has no good reading ({_QUALITY_WORDS.get(r.quality, r.quality.name)})"
    if not math.isfinite(r.value):
        return f"{name} has no value"
    age_s = (now_ms - r.t_ms) / 1000
    return f"{name} is {age_s:.0f} s old (stale after {stale_after_s:g} s)"


def _fallen_back(cfg: RuleConfig) -> str:
    """What a rule asks while it cannot be evaluated."""
    if cfg.fallback == "keep":
        return "fallback: keep its relays as they are"
    return f"fallback {cfg.fallback}"
