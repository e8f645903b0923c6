"""Conformity reports: what one node's readings of one settlement period are worth.

When a period is sealed, its readings stream past `PeriodCheck` on their way into the Merkle tree.
The report says, per channel and for the period as a whole: how complete the readings are (from
each sensor's interval), the gaps longer than `gap_intervals` intervals, spikes, counter resets,
flat lines, wall-clock steps, late readings, and import and export rising together. It ends with
a verdict (`passed`) and the reasons for it.

The report's canonical JSON (sorted keys, no spaces, integers only: values are in millionths of
their unit, times in ms) is hashed with keccak; that digest goes into the period's Merkle tree as
one more leaf, a pseudo-reading of channel `conformity.report` at the period's last millisecond
whose value is the digest read as a 256-bit two's-complement integer. The node signs the root, so
the report it shows later is provably the one it signed: the ledger contract's `verifyReading`
accepts that leaf against the commitment on chain, and any other report gives another leaf.

The community checks at the end (`check_allocation`) are pure functions over an allocation result.
"""

from __future__ import annotations

import itertools
import json
import math
import sqlite3
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from eth_hash.auto import keccak

from daisee_node.checks import BACKWARDS_SLACK
from daisee_node.logs import get_logger
from daisee_node.readings import Quality

if TYPE_CHECKING:
    from daisee_node.community.allocation import PeriodAllocation

#: the pseudo-channel of the report's leaf (its id is the keccak of the name, as for readings)
REPORT_CHANNEL = "conformity.report"
REPORT_CHANNEL_ID = keccak(REPORT_CHANNEL.encode())
#: the report leaf's quality field
REPORT_QUALITY = int(Quality.GOOD)
#: the report format; a change of the checks or of the JSON is a new version
REPORT_VERSION = 1
#: the store's owner name and package of the reports' table
MIGRATIONS_OWNER = "conformity"
MIGRATIONS_PACKAGE = "daisee_node.store.conformity_migrations"
#: checks whose findings fail the period; the others only warn
WARN_ONLY = frozenset({"flat_lines"})
CHECKS = (
    "completeness",
    "gaps",
    "spikes",
    "counter_resets",
    "flat_lines",
    "clock_steps",
    "late_readings",
    "import_export",
)
#: readings that say the source gave no value: present, but not usable
_FAILED = frozenset({int(Quality.SOURCE_ERROR), int(Quality.UNAVAILABLE)})
#: readings whose value the ingest checks trust (LATE only says when it was stored)
_TRUSTED = frozenset({int(Quality.GOOD), int(Quality.LATE)})
#: ingest flags that are spikes of a measured value, and those of a counter
_SPIKE_FLAGS = (Quality.OUT_OF_RANGE, Quality.SATURATED)
_COUNTER_FLAGS = (Quality.COUNTER_BACKWARDS, Quality.IMPLAUSIBLE_STEP)
#: readings looked at between two calls of `pause` (about a millisecond here)
READINGS_PER_PAUSE = 2048
_INF = math.inf


@dataclass(frozen=True)
class ConformitySpec:
    """What a period's readings are checked against: each sensor's interval, and thresholds.

    Every figure is an integer, so the spec goes into the report (and its digest) as it is.
    """

    #: sensor name → ms between reads; its channels are `<sensor>.*`
    intervals_ms: Mapping[str, int] = field(default_factory=dict)
    #: a channel with fewer usable readings than this share of the expected ones fails
    completeness_min_pct: int = 95
    #: no usable reading for longer than this many intervals is a gap
    gap_intervals: int = 5
    #: a spike leaves its neighbours by more than this many times the channel's median step …
    spike_factor: int = 10
    #: … and by more than this share of the channel's median magnitude …
    spike_rel_pct: int = 50
    #: … and by more than this (millionths of the unit)
    spike_min_micro: int = 500_000
    #: a non-zero measured value that does not change for this long is a flat line (a warning)
    flat_min_ms: int = 300_000
    #: a configured sensor's channel is expected when it had a reading this recently
    expect_lookback_ms: int = 86_400_000
    #: findings listed per check (the count covers them all)
    max_findings: int = 20

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["intervals_ms"] = dict(sorted(self.intervals_ms.items()))
        return out

    def interval_of(self, channel: str) -> int | None:
        """The configured interval (ms) of the sensor a channel belongs to."""
        return self.intervals_ms.get(channel.split(".", 1)[0])


def conformity_spec(config: Any) -> ConformitySpec:
    """The spec of a node config: the interval of each enabled sensor, default thresholds."""
    intervals = {
        str(s.name): max(1, round(float(s.interval_s) * 1000))
        for s in config.sensors
        if getattr(s, "enabled", True)
    }
    return ConformitySpec(intervals_ms=intervals)


def attach(node: Any) -> None:
    """Have a node's sealer make (and sign) a conformity report with every period."""
    ledger = getattr(node, "ledger", None)
    if ledger is not None:
        ledger.sealer.conformity = conformity_spec(node.config)


# -- the report's form and digest -------------------------------------------------------------


def canonical(report: Mapping[str, Any]) -> bytes:
    """The report's canonical JSON: sorted keys, no spaces, ASCII, no floats."""
    return json.dumps(
        report, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode()


def digest(report: Mapping[str, Any]) -> bytes:
    """keccak256 of the canonical JSON."""
    return keccak(canonical(report))


def digest_value(d: bytes) -> int:
    """The digest as the leaf's `valueMicro`: a 256-bit two's-complement integer."""
    return int.from_bytes(d, "big", signed=True)


def leaf_entry(t1: int, d: bytes) -> tuple[int, bytes, int, int]:
    """(t_ms, channel id, value_micro, quality) of a period's report leaf."""
    return (t1 - 1, REPORT_CHANNEL_ID, digest_value(d), REPORT_QUALITY)


def report_leaf(node: bytes, t1: int, d: bytes) -> bytes:
    """The leaf of a period's report (`node`: the node's 20 address bytes)."""
    from daisee_node.ledger import merkle

    t_ms, cid, value, quality = leaf_entry(t1, d)
    return merkle.reading_leaf(node, cid, t_ms, value, quality)


def micro(value: float) -> int:
    """A value in millionths of its unit, as leaves carry it."""
    return round(value * 1_000_000) if math.isfinite(value) else 0


# -- what the store knows besides the readings -------------------------------------------------


@dataclass
class PeriodContext:
    """The period and what the node recorded about it besides its readings."""

    node: str
    seq: int
    t0: int
    t1: int
    #: channel → state class ("measurement", "total_increasing"), every channel the store knows
    state_classes: dict[str, str] = field(default_factory=dict)
    #: channels whose newest reading is recent enough to be expected in the period
    recent: frozenset[str] = frozenset()
    #: (event id, t_ms, reason) of each wall-clock step noticed since the last report
    clock_steps: list[tuple[int, int, str]] = field(default_factory=list)
    #: the newest event id when the period was sealed: the next report starts after it
    events_upto: int = 0
    #: readings stored with a time inside an already sealed period, all time / at the last report
    late_total: int = 0
    late_before: int | None = None
    import_channel: str | None = None
    export_channel: str | None = None


# -- the checks ---------------------------------------------------------------------------------


class _Series:
    """One channel's rows of the period, in time order, in flat arrays (never walked by the GC)."""

    __slots__ = ("q", "t", "v")

    def __init__(self) -> None:
        self.t = array("q")
        self.v = array("d")
        self.q = bytearray()


class PeriodCheck:
    """Collects a period's rows as they stream by and makes the period's report from them.

    Rows are (t_ms, channel, value, quality), in time order (as the sealer reads them); `pause`
    is called now and then (a worker thread gives the event loop its turn there).
    """

    def __init__(
        self,
        spec: ConformitySpec,
        ctx: PeriodContext,
        pause: Callable[[], None] | None = None,
    ) -> None:
        self.spec = spec
        self.ctx = ctx
        self.pause = pause or _no_pause
        self.rows = 0
        self._series: dict[str, _Series] = {}
        self._report: dict[str, Any] | None = None
        self._digest: bytes | None = None

    def observe(
        self, chunks: Iterable[Sequence[tuple[Any, ...]]]
    ) -> Iterator[Sequence[tuple[Any, ...]]]:
        """The chunks, unchanged, each recorded on its way."""
        for chunk in chunks:
            self.add_rows(chunk)
            yield chunk

    def add_rows(self, rows: Iterable[tuple[Any, ...]]) -> None:
        """Record (t_ms, channel, value, quality) rows, in time order."""
        series = self._series
        appends: dict[str, tuple[Any, Any, Any]] = {}
        n = 0
        for t, name, value, quality in rows:
            app = appends.get(name)
            if app is None:
                s = series.get(name)
                if s is None:
                    s = series[name] = _Series()
                app = appends[name] = (s.t.append, s.v.append, s.q.append)
            app[0](t)
            app[1](math.nan if value is None else value)
            app[2](quality)
            n += 1
        self.rows += n

    def report(self) -> dict[str, Any]:
        """The report (made once, on the first call).

        A check that breaks must not stop the period from being sealed (every later period
        would wait behind it): the report then says that it could not be made, and fails.
        """
        if self._report is None:
            try:
                self._report = self._make()
            except Exception as exc:
                get_logger("conformity").error(
                    "conformity report failed; the period is sealed with a failed report",
                    seq=self.ctx.seq,
                    exc_info=exc,
                )
                ctx = self.ctx
                self._report = {
                    "version": REPORT_VERSION,
                    "node": ctx.node,
                    "seq": ctx.seq,
                    "t0": ctx.t0,
                    "t1": ctx.t1,
                    "readings": self.rows,
                    "error": type(exc).__name__,
                    "passed": False,
                    "reasons": [f"the report could not be made ({type(exc).__name__})"],
                }
        return self._report

    def digest(self) -> bytes:
        if self._digest is None:
            self._digest = digest(self.report())
        return self._digest

    def leaf_entry(self) -> tuple[int, bytes, int, int]:
        """The report leaf, (t_ms, channel id, value_micro, quality)."""
        return leaf_entry(self.ctx.t1, self.digest())

    # -- making the report ---------------------------------------------------------------------

    def _make(self) -> dict[str, Any]:
        spec, ctx = self.spec, self.ctx
        span = ctx.t1 - ctx.t0
        findings: dict[str, list[dict[str, Any]]] = {name: [] for name in CHECKS}
        channels: dict[str, dict[str, Any]] = {}
        names = set(self._series)
        configured = {name for name in ctx.recent | names if spec.interval_of(name) is not None}
        rises: dict[str, list[tuple[int, int]]] = {}
        for name in sorted(names | configured):
            s = self._series.get(name) or _Series()
            info, rise = self._channel(name, s, span, findings)
            channels[name] = info
            if rise is not None:
                rises[name] = rise
            self.pause()
        for sensor in sorted(spec.intervals_ms):
            if not any(n.split(".", 1)[0] == sensor for n in channels):
                findings["completeness"].append({"sensor": sensor, "channels": 0})
        for event_id, t_ms, reason in ctx.clock_steps:
            findings["clock_steps"].append({"event": event_id, "t_ms": t_ms, "reason": reason})
        late_arrived = 0
        if ctx.late_before is not None:
            late_arrived = max(0, ctx.late_total - ctx.late_before)
        if late_arrived:
            findings["late_readings"].append({"arrived_late": late_arrived})
        imp, exp = ctx.import_channel, ctx.export_channel
        if imp is not None and exp is not None and imp in rises and exp in rises:
            for a, b in _overlaps(rises[imp], rises[exp]):
                findings["import_export"].append({"from_ms": a, "to_ms": b})
        self.pause()
        checks: dict[str, Any] = {}
        reasons: list[str] = []
        passed = True
        for check in CHECKS:
            found = findings[check]
            severity = "warn" if check in WARN_ONLY else "fail"
            ok = not found or severity == "warn"
            checks[check] = {
                "count": len(found),
                "findings": found[: spec.max_findings],
                "passed": not found,
                "severity": severity,
            }
            if not ok:
                passed = False
                reasons.append(_reason(check, found))
        return {
            "version": REPORT_VERSION,
            "node": ctx.node,
            "seq": ctx.seq,
            "t0": ctx.t0,
            "t1": ctx.t1,
            "readings": self.rows,
            "spec": spec.to_json(),
            "channels": channels,
            "checks": checks,
            "cursor": {"events_upto": ctx.events_upto, "late_total": ctx.late_total},
            "passed": passed,
            "reasons": reasons,
        }

    def _channel(
        self, name: str, s: _Series, span: int, findings: dict[str, list[dict[str, Any]]]
    ) -> tuple[dict[str, Any], list[tuple[int, int]] | None]:
        """One channel's figures; its findings go into `findings`; the intervals over which it
        rose (for counters)."""
        spec, ctx = self.spec, self.ctx
        present = len(s.t)
        seen = set(s.q)
        counts = {_quality_name(q): s.q.count(q) for q in seen}
        usable_t, usable_v, trusted_t, trusted_v = self._usable(s, seen)
        configured = spec.interval_of(name)
        interval = configured
        if interval is None and len(usable_t) > 1:
            steps = [b - a for a, b in itertools.pairwise(usable_t) if b > a]
            interval = median_low(steps) if steps else None
        expected = span // interval if interval else None
        info: dict[str, Any] = {
            "present": present,
            "usable": len(usable_t),
            # With the count, the mean; and a change of any value changes the digest.
            "sum_micro": micro(math.fsum(usable_v)),
            "first_ms": usable_t[0] if usable_t else None,
            "last_ms": usable_t[-1] if usable_t else None,
            "qualities": dict(sorted(counts.items())),
            "interval_ms": interval,
            "interval_from": "config" if configured is not None else "readings",
            "expected": expected,
            "state_class": ctx.state_classes.get(name, "measurement"),
        }
        if counts.get(Quality.LATE.name):
            findings["late_readings"].append(
                {"channel": name, "flagged": Quality.LATE.name, "readings": counts["LATE"]}
            )
        if expected and len(usable_t) * 100 < expected * spec.completeness_min_pct:
            findings["completeness"].append(
                {"channel": name, "usable": len(usable_t), "expected": expected}
            )
        rise: list[tuple[int, int]] | None = None
        gap_ms = interval * spec.gap_intervals if interval else None
        if gap_ms is not None:
            edges = [ctx.t0, *usable_t, ctx.t1]
            for a, b in itertools.pairwise(edges):
                if b - a > gap_ms:
                    findings["gaps"].append({"channel": name, "from_ms": a, "to_ms": b})
        self.pause()
        if info["state_class"] == "total_increasing":
            rise = self._counter(name, usable_t, usable_v, counts, gap_ms, findings)
        else:
            info["spike_threshold_micro"] = self._measured(
                name, trusted_t, trusted_v, counts, findings
            )
        return info, rise

    def _usable(
        self, s: _Series, seen: set[int]
    ) -> tuple[list[int], list[float], list[int], list[float]]:
        """Times and values of the readings with a value (usable), and of those the ingest
        checks trust (trusted)."""
        if not seen & _FAILED and all(map(math.isfinite, s.v)):
            # The usual case, at C speed: every reading has a value.
            usable_t, usable_v = s.t.tolist(), s.v.tolist()
            if seen <= _TRUSTED:
                return usable_t, usable_v, usable_t, usable_v
        usable_t, usable_v, trusted_t, trusted_v = [], [], [], []
        for start in range(0, len(s.t), READINGS_PER_PAUSE):
            end = start + READINGS_PER_PAUSE
            part = zip(s.t[start:end], s.v[start:end], s.q[start:end], strict=True)
            for t, v, q in part:
                if q in _FAILED or not -_INF < v < _INF:
                    continue
                usable_t.append(t)
                usable_v.append(v)
                if q in _TRUSTED:
                    trusted_t.append(t)
                    trusted_v.append(v)
            self.pause()
        return usable_t, usable_v, trusted_t, trusted_v

    def _counter(
        self,
        name: str,
        times: list[int],
        values: list[float],
        counts: dict[str, int],
        gap_ms: int | None,
        findings: dict[str, list[dict[str, Any]]],
    ) -> list[tuple[int, int]]:
        """Counter resets (drops, and readings the ingest checks flagged); the intervals over
        which the counter rose."""
        for flag in _COUNTER_FLAGS:
            if counts.get(flag.name):
                findings["counter_resets"].append(
                    {"channel": name, "flagged": flag.name, "readings": counts[flag.name]}
                )
        rise: list[tuple[int, int]] = []
        longest = gap_ms if gap_ms is not None else _INF
        for i in range(1, len(values)):
            if i % READINGS_PER_PAUSE == 0:
                self.pause()
            a, b = values[i - 1], values[i]
            if b == a:
                continue
            slack = BACKWARDS_SLACK * max(1.0, abs(a))
            if b < a - slack:
                findings["counter_resets"].append(
                    {
                        "channel": name,
                        "t_ms": times[i],
                        "from_micro": micro(a),
                        "to_micro": micro(b),
                    }
                )
            elif b > a + slack and times[i] - times[i - 1] <= longest:
                rise.append((times[i - 1], times[i]))
        return rise

    def _measured(
        self,
        name: str,
        times: list[int],
        values: list[float],
        counts: dict[str, int],
        findings: dict[str, list[dict[str, Any]]],
    ) -> int:
        """Spikes (readings that leave both neighbours the same way and come straight back,
        and readings the ingest checks flagged) and flat lines; the spike threshold (micro)."""
        spec = self.spec
        for flag in _SPIKE_FLAGS:
            if counts.get(flag.name):
                findings["spikes"].append(
                    {"channel": name, "flagged": flag.name, "readings": counts[flag.name]}
                )
        if len(values) < 2:
            return 0
        steps = [b - a for a, b in itertools.pairwise(values)]
        typical = median_low(list(map(abs, steps)))
        self.pause()
        level = median_low(list(map(abs, values)))
        self.pause()
        threshold = max(
            spec.spike_factor * typical,
            spec.spike_rel_pct * level / 100,
            spec.spike_min_micro / 1_000_000,
        )
        big = [i for i, d in enumerate(steps) if d > threshold or d < -threshold]
        for i in big:
            # steps[i] leads from values[i] to values[i + 1]; a spike at k needs big steps
            # k - 1 and k, of opposite signs, with its neighbours close to each other.
            k = i + 1
            if k >= len(values) - 1:
                continue
            out, back = steps[i], steps[k]
            returns = abs(values[k + 1] - values[k - 1]) <= threshold
            if abs(back) > threshold and (out > 0) != (back > 0) and returns:
                findings["spikes"].append(
                    {"channel": name, "t_ms": times[k], "value_micro": micro(values[k])}
                )
        self.pause()
        # Flat lines: runs of one non-zero value lasting at least flat_min_ms.
        start = 0
        n = len(values)
        changes = [i + 1 for i, d in enumerate(steps) if d != 0]
        for end in [*changes, n]:
            if values[start] != 0 and times[end - 1] - times[start] >= spec.flat_min_ms:
                findings["flat_lines"].append(
                    {
                        "channel": name,
                        "from_ms": times[start],
                        "to_ms": times[end - 1],
                        "value_micro": micro(values[start]),
                    }
                )
            start = end
        return micro(threshold)


def _overlaps(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    """The overlaps of two sorted lists of half-open intervals (t_from, t_to]."""
    i = j = 0
    while i < len(a) and j < len(b):
        lo = max(a[i][0], b[j][0])
        hi = min(a[i][1], b[j][1])
        if lo < hi:
            yield (lo, hi)
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1


def _no_pause() -> None:
    """Go straight on."""


def median_low(values: Sequence[Any]) -> Any:
    """The lower median: always one of the values, so no rounding enters the report."""
    return sorted(values)[(len(values) - 1) // 2]


def _quality_name(q: int) -> str:
    try:
        return Quality(q).name
    except ValueError:
        return f"Q{q}"


def _reason(check: str, found: list[dict[str, Any]]) -> str:
    """One line on why a check failed (integers and names only: it is part of the digest)."""
    shown = "; ".join(describe(check, f) for f in found[:3])
    more = f" (and {len(found) - 3} more)" if len(found) > 3 else ""
    return f"{check}: {len(found)} finding(s): {shown}{more}"


def _clock(t_ms: int) -> str:
    """A time of day, UTC, to the ms (the period's date is in the report)."""
    return datetime.fromtimestamp(t_ms / 1000, UTC).strftime("%H:%M:%S.%f")[:-3]


def describe(check: str, f: Mapping[str, Any]) -> str:
    """A finding in words."""
    ch = f.get("channel") or f.get("sensor", "")
    if "flagged" in f:
        return f"{ch}: {f['readings']} reading(s) flagged {f['flagged']} at ingest"
    if check == "completeness":
        if "sensor" in f:
            return f"sensor {ch}: no channel had a reading"
        pct = 100 * f["usable"] // f["expected"]
        return f"{ch}: {f['usable']} of {f['expected']} expected readings ({pct} %)"
    if check in ("gaps", "import_export", "flat_lines"):
        length = (f["to_ms"] - f["from_ms"]) / 1000
        where = f"{ch}: " if ch else ""
        value = f" at {f['value_micro'] / 1e6:g}" if "value_micro" in f else ""
        return f"{where}{length:g} s from {_clock(f['from_ms'])} to {_clock(f['to_ms'])}{value}"
    if check == "spikes":
        return f"{ch}: {f['value_micro'] / 1e6:g} at {_clock(f['t_ms'])}"
    if check == "counter_resets":
        change = f"{f['from_micro'] / 1e6:g} → {f['to_micro'] / 1e6:g}"
        return f"{ch}: {change} at {_clock(f['t_ms'])}"
    if check == "clock_steps":
        return f"{f['reason']} at {_clock(f['t_ms'])}"
    if check == "late_readings":
        if "arrived_late" in f:
            return f"{f['arrived_late']} reading(s) stamped in earlier sealed periods arrived"
        return f"{ch}: {f['readings']} reading(s) stored late"
    return json.dumps(f, sort_keys=True)


# -- for `status` ------------------------------------------------------------------------


def last_verdict(conn: sqlite3.Connection) -> dict[str, Any] | None:
    """The newest own period's conformity verdict, for `status` (None: no report yet)."""
    if (
        conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'conformity_reports'").fetchone()
        is None
    ):
        return None
    row = conn.execute(
        "SELECT r.seq, r.t1, r.passed, r.body FROM conformity_reports r JOIN commitments c "
        "ON c.node = r.node AND c.seq = r.seq WHERE c.own = 1 ORDER BY r.seq DESC LIMIT 1"
    ).fetchone()
    if row is None:
        return None
    seq, t1, passed, body = row
    return {"seq": seq, "t1": t1, "passed": bool(passed), "reasons": json.loads(body)["reasons"]}


def verdict_line(verdict: dict[str, Any] | None) -> list[str]:
    """`status` lines for the newest verdict."""
    if verdict is None:
        return []
    word = "pass" if verdict["passed"] else "FAIL"
    first = f" ({verdict['reasons'][0]})" if verdict["reasons"] else ""
    return [f"  conformity    period {verdict['seq']}: {word}{first}"]


# -- the community checks --------------------------------------------------------------------


@dataclass(frozen=True)
class CommunityCheck:
    """The verdict of the community checks on one period's allocation."""

    passed: bool
    reasons: tuple[str, ...]


def allocation_balance_problems(a: PeriodAllocation) -> list[str]:
    """What breaks "allocations sum to production": every Wh produced is sold peer to peer,
    allocated or surplus, and what was bought peer to peer is what was sold."""
    problems = []
    produced = sum(a.production)
    placed = sum(a.p2p_sold) + sum(a.allocated) + sum(a.surplus)
    if placed != produced:
        problems.append(f"p2p sold + allocated + surplus = {placed} Wh, production = {produced} Wh")
    if sum(a.p2p_bought) != sum(a.p2p_sold):
        problems.append(f"p2p bought {sum(a.p2p_bought)} Wh ≠ p2p sold {sum(a.p2p_sold)} Wh")
    if sum(a.allocated) + sum(a.p2p_sold) > produced:
        problems.append(f"{sum(a.allocated)} Wh allocated out of {produced} Wh produced")
    for figure in ("consumption", "production", "p2p_bought", "p2p_sold", "allocated", "surplus"):
        for member, wh in zip(a.members, getattr(a, figure), strict=True):
            if wh < 0:
                problems.append(f"{member}: {figure} {wh} Wh < 0")
    return problems


def allocation_consumption_problems(a: PeriodAllocation) -> list[str]:
    """Members allocated beyond their consumption (local and peer-to-peer energy together),
    and grid imports that do not make up the rest."""
    problems = []
    for m, cons, bought, alloc, grid in zip(
        a.members, a.consumption, a.p2p_bought, a.allocated, a.grid_import, strict=True
    ):
        if alloc + bought > cons:
            problems.append(f"{m}: allocated {alloc} Wh + p2p {bought} Wh > consumption {cons} Wh")
        if grid != cons - bought - alloc:
            problems.append(f"{m}: grid import {grid} Wh ≠ {cons} - {bought} - {alloc} Wh")
    return problems


def check_allocation(a: PeriodAllocation) -> CommunityCheck:
    """Both community checks on one period's allocation."""
    reasons = allocation_balance_problems(a) + allocation_consumption_problems(a)
    return CommunityCheck(not reasons, tuple(reasons))
