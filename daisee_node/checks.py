"""Checks every source's readings get before anyone trusts them.

Plausible ranges, counters that never go backwards, and counter steps a channel cannot physically
make. A reading that fails is kept, marked with its quality and counted; it never stops a sampler.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from daisee_node.logs import get_logger
from daisee_node.readings import Channel, Quality, Reading

#: consecutive readings, consistent with each other, that make a counter's new level trusted
CONFIRM_READINGS = 3
#: a counter's advance is also checked against a reference this old at most, so that the slack
#: allowed per step (resolution, rounding) cannot add up reading after reading
ANCHOR_MS = 60_000
#: meters send counters as float32: two units in the last place, relative
FLOAT32_SLACK = 2.0**-22
#: meters round their counters differently from read to read
BACKWARDS_SLACK = 1e-9

#: a flagged reading that says a counter jumped: a step across one is never counted
STEP_FLAGS = frozenset({Quality.COUNTER_BACKWARDS, Quality.IMPLAUSIBLE_STEP})

log = get_logger("checks")


@dataclass(slots=True)
class _Counter:
    """What one cumulative counter's checks remember between readings."""

    channel: Channel
    #: per millisecond, in the counter's unit
    rate_ms: float | None
    started: bool = False
    #: the last trusted value and its time; None until there is one
    base: tuple[int, float] | None = None
    anchor: tuple[int, float] = (0, 0.0)
    #: readings at a level not (yet) trusted, each consistent with the one before
    candidates: list[tuple[int, float]] = field(default_factory=list)
    #: whether readings are being flagged (logged once per episode, not per reading)
    flagging: bool = False

    def judge(self, t0: int, v0: float, t1: int, v1: float) -> Quality:
        """Whether the counter can go from v0 at t0 to v1 at t1."""
        step = v1 - v0
        if step < -BACKWARDS_SLACK * max(1.0, abs(v0)):
            return Quality.COUNTER_BACKWARDS
        if self.rate_ms is None:
            return Quality.GOOD
        # Stamps out of order (the wall clock stepped back): no time elapsed that we can vouch for.
        dt = max(0, t1 - t0)
        slack = self.channel.resolution + FLOAT32_SLACK * max(abs(v0), abs(v1))
        return Quality.GOOD if step <= self.rate_ms * dt + slack else Quality.IMPLAUSIBLE_STEP

    def trust(self, t: int, v: float, *, new_level: bool = False) -> None:
        self.base = (t, v)
        self.candidates.clear()
        self.flagging = False
        if new_level or t - self.anchor[0] >= ANCHOR_MS or t < self.anchor[0]:
            self.anchor = (t, v)

    def check(self, r: Reading, latest: Mapping[str, Reading]) -> Quality:
        if not self.started:
            self.started = True
            prev = latest.get(r.channel)
            if prev is not None and prev.good and math.isfinite(prev.value):
                self.trust(prev.t_ms, prev.value, new_level=True)
            elif prev is not None:
                # There is history, but its newest value is not trusted: the step from the
                # last trusted one cannot be checked, so the level has to be confirmed.
                return self.candidate(r, Quality.IMPLAUSIBLE_STEP)
        base = self.base
        if base is None:
            if self.candidates:  # still confirming the level found at start
                return self.candidate(r, Quality.IMPLAUSIBLE_STEP)
            self.trust(r.t_ms, r.value, new_level=True)
            return Quality.GOOD
        quality = self.judge(base[0], base[1], r.t_ms, r.value)
        if quality == Quality.GOOD:
            quality = self.judge(self.anchor[0], self.anchor[1], r.t_ms, r.value)
        if quality == Quality.GOOD:
            self.trust(r.t_ms, r.value)
            return quality
        return self.candidate(r, quality)

    def candidate(self, r: Reading, quality: Quality) -> Quality:
        """A reading at an untrusted level: flagged, unless it confirms the level."""
        cands = self.candidates
        if cands and self.judge(*cands[-1], r.t_ms, r.value) != Quality.GOOD:
            cands.clear()
        if not self.flagging:
            self.flagging = True
            log.warning(
                "counter step not trusted",
                channel=r.channel,
                value=r.value,
                trusted=None if self.base is None else self.base[1],
                quality=quality.name,
            )
        cands.append((r.t_ms, r.value))
        if len(cands) < CONFIRM_READINGS:
            return quality
        log.warning(
            "counter continues at a new level; the step is not counted",
            channel=r.channel,
            value=r.value,
            trusted=None if self.base is None else self.base[1],
        )
        self.trust(r.t_ms, r.value, new_level=True)
        return Quality.GOOD


class ChannelChecks:
    """Checks every source gets: plausible ranges, and counters that cannot jump.

    A cumulative counter (`state_class = "total_increasing"`) must not go backwards and, when its
    channel has a `max_rate_per_s`, must not advance more than that rate over the time elapsed
    since its last trusted value (plus the channel's `resolution` and float32 rounding). The
    advance is also checked against a reference up to a minute old, so that the slack cannot add
    up reading after reading. A reading that fails is flagged COUNTER_BACKWARDS or
    IMPLAUSIBLE_STEP and is never the new baseline: the next plausible reading is judged against
    the last trusted one, so one corrupt read does not move the counter.

    A counter that was reset or a meter that was replaced shows up as a step that then holds: once
    `CONFIRM_READINGS` consecutive readings agree with each other (each step from the one before
    plausible), the last of them is trusted and is the new baseline. The readings before it are
    flagged, so the step itself is never counted (see `counter_advance`). The same happens at
    start when the newest stored value is not trusted: the step from it cannot be checked.

    The baseline is kept here, per channel, rather than read back from `latest` (flagged readings
    are published too); `latest` only gives the starting point, the newest stored reading.
    """

    def __init__(self, channels: Sequence[Channel]) -> None:
        self.limits = {
            c.name: (-math.inf if c.min is None else c.min, math.inf if c.max is None else c.max)
            for c in channels
            if c.min is not None or c.max is not None
        }
        self.counters = {
            c.name: _Counter(c, None if c.max_rate_per_s is None else c.max_rate_per_s / 1000)
            for c in channels
            if c.state_class == "total_increasing"
        }

    def apply(
        self, readings: Sequence[Reading], latest: Mapping[str, Reading]
    ) -> Sequence[Reading]:
        """The readings, each with the quality it deserves; `latest`: the newest per channel."""
        if not self.limits and not self.counters:
            return readings
        out: list[Reading] | None = None
        for i, r in enumerate(readings):
            if not r.good:
                continue
            quality = Quality.GOOD
            bounds = self.limits.get(r.channel)
            if bounds is not None and not bounds[0] <= r.value <= bounds[1]:
                quality = Quality.OUT_OF_RANGE
            else:
                counter = self.counters.get(r.channel)
                if counter is not None:
                    quality = counter.check(r, latest)
            if quality != Quality.GOOD:
                if out is None:
                    out = list(readings)
                out[i] = r._replace(quality=quality)
        return readings if out is None else out


def counter_advance(readings: Iterable[Reading]) -> float:
    """How far a cumulative counter advanced over its readings (oldest first).

    The sum of the steps between consecutive good readings, leaving out any step across a
    COUNTER_BACKWARDS or IMPLAUSIBLE_STEP reading: that is where a glitch or a counter that
    restarted at a new level sits, and the step there is not energy. Every other step between
    good readings has passed `ChannelChecks`, so it is one the channel can physically make.
    """
    total = 0.0
    prev: float | None = None
    for r in readings:
        if r.good:
            if prev is not None:
                total += r.value - prev
            prev = r.value
        elif r.quality in STEP_FLAGS:
            prev = None
    return total
