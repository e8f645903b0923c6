"""The conformity report of a busy node's period, against a straightforward computation of the
same report in the same run; and what the report adds to sealing that period.

    .venv/bin/python bench/conformity.py [--channels 10] [--hz 10] [--repeat 5]

One 15-minute period of `channels` channels read `hz` times a second (default 10 × 10 Hz:
90,000 readings): power channels, an import and an export counter, with a gap, a spike and a
counter reset in them so that every check has work. `PeriodCheck` is fed the rows 128 at a time
in time order, as sealing hands them over; the reference takes the same rows as one list and
computes every check the plain way (a scan of all rows per channel, a pass per check). Both must
give the same digest. Times are the best of `--repeat` runs, CPU time of this process.

Then the same period is sealed from a real store by the real `Sealer`, with and without a
report, while a probe task on the event loop records how late it wakes (the report is made in
the sealing worker thread: the loop's longest stall must stay ≤ 5 ms). Readings are counted
from what each side was given and from the commitment. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import os
import platform
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from eth_account import Account

from daisee_node import logs
from daisee_node.clock import Clock
from daisee_node.conformity import (
    CHECKS,
    REPORT_VERSION,
    WARN_ONLY,
    ConformitySpec,
    PeriodCheck,
    PeriodContext,
    _reason,
    digest,
)
from daisee_node.ledger.outbox import Outbox, Sealer
from daisee_node.readings import Channel, Quality, Reading
from daisee_node.store import Retention, Store

PERIOD_MS = 900_000
T0 = 1_781_000_000_000 // PERIOD_MS * PERIOD_MS
T1 = T0 + PERIOD_MS
CONTRACT = "0x" + "11" * 20
TARGET_STALL_MS = 5.0
IMPORT, EXPORT = "grid.import_wh", "grid.export_wh"

Row = tuple[int, str, float, int]


def make_rows(channels: int, hz: int) -> tuple[list[Row], list[str]]:
    """The period's rows in time order, and the channel names."""
    names = [f"ch{i}.power_w" for i in range(channels - 2)] + [IMPORT, EXPORT]
    step = 1000 // hz
    n = PERIOD_MS // step
    rows: list[Row] = []
    imp, exp = 1000.0, 500.0
    for k in range(n):
        t = T0 + k * step + k % 3
        if k < n // 2:
            imp += 0.01
        else:
            exp += 0.01
        if k == n // 3:
            imp = 2.0  # the meter was reset
        for i, name in enumerate(names[:-2]):
            if name == "ch0.power_w" and 1000 <= k < 1100:
                continue  # a gap
            value = 1000 + 300 * math.sin(k / (50 + i)) + (k * 7 + i) % 11
            if name == "ch1.power_w" and k == 2000:
                value = 9e5  # a spike
            rows.append((t, name, value, 0))
        rows.append((t, IMPORT, imp, 0))
        rows.append((t, EXPORT, exp, 0))
    return rows, names


def spec_and_context(names: list[str], hz: int) -> tuple[ConformitySpec, PeriodContext]:
    spec = ConformitySpec(intervals_ms={"ch0": 1000 // hz, "grid": 1000 // hz})
    ctx = PeriodContext(
        node="0x" + "ab" * 20,
        seq=1,
        t0=T0,
        t1=T1,
        state_classes={IMPORT: "total_increasing", EXPORT: "total_increasing"},
        recent=frozenset(names),
        late_before=0,
        import_channel=IMPORT,
        export_channel=EXPORT,
    )
    return spec, ctx


def ours(rows: list[Row], spec: ConformitySpec, ctx: PeriodContext) -> tuple[bytes, int]:
    check = PeriodCheck(spec, ctx)
    chunks = (rows[i : i + 128] for i in range(0, len(rows), 128))
    for _ in check.observe(chunks):
        pass
    return check.digest(), check.rows


# -- the reference: the same report, computed the plain way ---------------------------------------


def reference(rows: list[Row], spec: ConformitySpec, ctx: PeriodContext) -> tuple[bytes, int]:
    """Every check in its own pass over one channel's readings, each channel found by a scan of
    all the rows."""
    failed = {int(Quality.SOURCE_ERROR), int(Quality.UNAVAILABLE)}
    trusted_q = {int(Quality.GOOD), int(Quality.LATE)}
    findings: dict[str, list[dict[str, Any]]] = {c: [] for c in CHECKS}
    channels: dict[str, dict[str, Any]] = {}
    names = {r[1] for r in rows}
    configured = {n for n in ctx.recent | names if n.split(".")[0] in spec.intervals_ms}
    rises: dict[str, list[tuple[int, int]]] = {}
    for name in sorted(names | configured):
        mine = [r for r in rows if r[1] == name]
        usable = [r for r in mine if r[3] not in failed and math.isfinite(r[2])]
        trusted = [r for r in usable if r[3] in trusted_q]
        counts = Counter(Quality(r[3]).name for r in mine)
        interval = spec.intervals_ms.get(name.split(".")[0])
        from_config = interval is not None
        if interval is None and len(usable) > 1:
            steps = [b[0] - a[0] for a, b in itertools.pairwise(usable) if b[0] > a[0]]
            interval = statistics.median_low(steps) if steps else None
        expected = (T1 - T0) // interval if interval else None
        state_class = ctx.state_classes.get(name, "measurement")
        info: dict[str, Any] = {
            "present": len(mine),
            "usable": len(usable),
            "sum_micro": round(math.fsum(r[2] for r in usable) * 1_000_000),
            "first_ms": usable[0][0] if usable else None,
            "last_ms": usable[-1][0] if usable else None,
            "qualities": dict(sorted(counts.items())),
            "interval_ms": interval,
            "interval_from": "config" if from_config else "readings",
            "expected": expected,
            "state_class": state_class,
        }
        if counts.get("LATE"):
            findings["late_readings"].append(
                {"channel": name, "flagged": "LATE", "readings": counts["LATE"]}
            )
        if expected and len(usable) * 100 < expected * spec.completeness_min_pct:
            findings["completeness"].append(
                {"channel": name, "usable": len(usable), "expected": expected}
            )
        gap_ms = interval * spec.gap_intervals if interval else None
        if gap_ms is not None:
            edges = [T0] + [r[0] for r in usable] + [T1]
            for a, b in itertools.pairwise(edges):
                if b - a > gap_ms:
                    findings["gaps"].append({"channel": name, "from_ms": a, "to_ms": b})
        if state_class == "total_increasing":
            for flag in ("COUNTER_BACKWARDS", "IMPLAUSIBLE_STEP"):
                if counts.get(flag):
                    findings["counter_resets"].append(
                        {"channel": name, "flagged": flag, "readings": counts[flag]}
                    )
            rise = []
            for a, b in itertools.pairwise(usable):
                slack = 1e-9 * max(1.0, abs(a[2]))
                if b[2] < a[2] - slack:
                    findings["counter_resets"].append(
                        {
                            "channel": name,
                            "t_ms": b[0],
                            "from_micro": round(a[2] * 1e6),
                            "to_micro": round(b[2] * 1e6),
                        }
                    )
                elif b[2] > a[2] + slack and (gap_ms is None or b[0] - a[0] <= gap_ms):
                    rise.append((a[0], b[0]))
            rises[name] = rise
        else:
            for flag in ("OUT_OF_RANGE", "SATURATED"):
                if counts.get(flag):
                    findings["spikes"].append(
                        {"channel": name, "flagged": flag, "readings": counts[flag]}
                    )
            threshold = 0.0
            if len(trusted) >= 2:
                v = [r[2] for r in trusted]
                typical = statistics.median_low([abs(b - a) for a, b in itertools.pairwise(v)])
                level = statistics.median_low([abs(x) for x in v])
                threshold = max(
                    spec.spike_factor * typical,
                    spec.spike_rel_pct * level / 100,
                    spec.spike_min_micro / 1_000_000,
                )
                for k in range(1, len(v) - 1):
                    out, back = v[k] - v[k - 1], v[k + 1] - v[k]
                    if (
                        abs(out) > threshold
                        and abs(back) > threshold
                        and (out > 0) != (back > 0)
                        and abs(v[k + 1] - v[k - 1]) <= threshold
                    ):
                        findings["spikes"].append(
                            {
                                "channel": name,
                                "t_ms": trusted[k][0],
                                "value_micro": round(v[k] * 1e6),
                            }
                        )
                start = 0
                for k in range(1, len(v) + 1):
                    if k == len(v) or v[k] != v[start]:
                        if (
                            v[start] != 0
                            and trusted[k - 1][0] - trusted[start][0] >= spec.flat_min_ms
                        ):
                            findings["flat_lines"].append(
                                {
                                    "channel": name,
                                    "from_ms": trusted[start][0],
                                    "to_ms": trusted[k - 1][0],
                                    "value_micro": round(v[start] * 1e6),
                                }
                            )
                        start = k
                info["spike_threshold_micro"] = round(threshold * 1e6)
            else:
                info["spike_threshold_micro"] = 0
        channels[name] = info
    for sensor in sorted(spec.intervals_ms):
        if not any(n.split(".")[0] == sensor for n in channels):
            findings["completeness"].append({"sensor": sensor, "channels": 0})
    for a in rises.get(IMPORT, []):
        for b in rises.get(EXPORT, []):
            if b[0] >= a[1]:
                break
            if max(a[0], b[0]) < min(a[1], b[1]):
                findings["import_export"].append(
                    {"from_ms": max(a[0], b[0]), "to_ms": min(a[1], b[1])}
                )
    checks, reasons = {}, []
    for check in CHECKS:
        found = findings[check]
        severity = "warn" if check in WARN_ONLY else "fail"
        checks[check] = {
            "count": len(found),
            "findings": found[: spec.max_findings],
            "passed": not found,
            "severity": severity,
        }
        if found and severity == "fail":
            reasons.append(_reason(check, found))
    report = {
        "version": REPORT_VERSION,
        "node": ctx.node,
        "seq": ctx.seq,
        "t0": ctx.t0,
        "t1": ctx.t1,
        "readings": len(rows),
        "spec": spec.to_json(),
        "channels": channels,
        "checks": checks,
        "cursor": {"events_upto": ctx.events_upto, "late_total": ctx.late_total},
        "passed": not reasons,
        "reasons": reasons,
    }
    return digest(report), len(rows)


def best_cpu_s(fn: Callable[[], tuple[bytes, int]], repeat: int) -> tuple[float, bytes, int]:
    """The least CPU time of `repeat` runs, and what the last run gave."""
    best = math.inf
    result: tuple[bytes, int] = (b"", 0)
    for _ in range(repeat):
        start = time.process_time()
        result = fn()
        best = min(best, time.process_time() - start)
    return best, *result


# -- sealing with and without the report --------------------------------------------------------


class StillClock(Clock):
    """Node time fixed just after the period ends (the period is due)."""

    def now_ms(self) -> int:
        return T1 + 60_000

    def now(self) -> float:
        return self.now_ms() / 1000


async def with_probe(work: Callable[[], Awaitable[Any]]) -> tuple[Any, float, float]:
    """`work()`, its wall time, and the longest a 1 ms sleeper on the loop woke late (ms)."""
    lags: list[float] = []
    done = False

    async def probe() -> None:
        while not done:
            start = time.perf_counter()
            await asyncio.sleep(0.001)
            lags.append((time.perf_counter() - start - 0.001) * 1000)

    task = asyncio.create_task(probe())
    await asyncio.sleep(0.01)
    start = time.perf_counter()
    result = await work()
    elapsed = time.perf_counter() - start
    done = True
    await task
    return result, elapsed, max(lags, default=0.0)


async def seal(rows: list[Row], spec: ConformitySpec, folder: Path, rounds: int) -> dict[str, Any]:
    """Seal the period `rounds` times each way, alternately, from one store; the median of
    each way's figures (the machine's own noise: `idle_probe_ms`, the probe with no work)."""
    store = Store(
        folder / "node.db",
        clock=StillClock(),
        retention=Retention(flush_interval_s=0.05, max_pending=len(rows) + 1),
    )
    store.declare([Channel(n, "Wh", "total_increasing") for n in (IMPORT, EXPORT)])
    await store.open()
    writer = asyncio.create_task(store.run())
    store.put_many([Reading(n, t, v, Quality(q)) for t, n, v, q in rows])
    await store.flush()
    outbox = Outbox(store)
    runs: dict[str, list[tuple[int, float, float]]] = {"without_report": [], "with_report": []}
    account = Account.create()
    ways: list[tuple[str, ConformitySpec | None]] = [
        ("without_report", None),
        ("with_report", spec),
    ]
    for i in range(rounds):
        # Each way goes first every other round: the file and the machine drift under both.
        for label, with_spec in ways if i % 2 == 0 else ways[::-1]:
            sealer = Sealer(
                store,
                outbox,
                account,
                period_s=PERIOD_MS // 1000,
                delay_s=10,
                import_channel=IMPORT,
                export_channel=EXPORT,
                rules_hash=b"\0" * 32,
                clock=store.clock,
                conformity=with_spec,
            )
            sealed, elapsed, stall = await with_probe(lambda s=sealer: s.seal_due(1, CONTRACT))
            [(commitment, _)] = sealed
            runs[label].append((commitment.count, elapsed, stall))
            await outbox.drop_own_after(0)  # the next round seals the same period again
    _, _, idle = await with_probe(lambda: asyncio.sleep(1.0))
    store.stop()
    await writer
    await store.close()
    return {
        label: {
            "readings_sealed": [r[0] for r in found][-1],
            "seal_s": round(statistics.median(r[1] for r in found), 3),
            "longest_stall_ms": round(statistics.median(r[2] for r in found), 2),
        }
        for label, found in runs.items()
    } | {"rounds": rounds, "idle_probe_ms": round(idle, 2)}


def longest_stretch_ms(rows: list[Row], spec: ConformitySpec, ctx: PeriodContext) -> float:
    """The longest the report's work goes without handing the event loop its turn (`pause`)."""
    stretches = [0.0]
    last = time.perf_counter()

    def pause() -> None:
        nonlocal last
        now = time.perf_counter()
        stretches.append(now - last)
        last = now

    check = PeriodCheck(spec, ctx, pause)
    for i in range(0, len(rows), 128):
        check.add_rows(rows[i : i + 128])
        pause()  # sealing's reader pauses after every chunk
    check.digest()
    pause()
    return max(stretches) * 1000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--channels", type=int, default=10)
    p.add_argument("--hz", type=int, default=10)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--rounds", type=int, default=4, help="seals each way (median)")
    args = p.parse_args()
    logs.configure("warning")
    rows, names = make_rows(args.channels, args.hz)
    spec, ctx = spec_and_context(names, args.hz)
    ours_s, our_digest, our_rows = best_cpu_s(lambda: ours(rows, spec, ctx), args.repeat)
    ref_s, ref_digest, ref_rows = best_cpu_s(lambda: reference(rows, spec, ctx), args.repeat)
    if our_digest != ref_digest or our_rows != ref_rows:
        raise SystemExit("the reference computed another report")
    stretch_ms = min(longest_stretch_ms(rows, spec, ctx) for _ in range(args.repeat))
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        sealing = asyncio.run(seal(rows, spec, Path(tmp), args.rounds))
    with_report = sealing["with_report"]
    print(
        json.dumps(
            {
                "bench": "conformity",
                "channels": len(names),
                "hz": args.hz,
                "readings_checked": our_rows,
                "report_cpu_s": round(ours_s, 4),
                "us_per_reading": round(ours_s / our_rows * 1e6, 3),
                "reference": {
                    "name": "the same report computed the plain way (a scan per channel, a pass "
                    "per check)",
                    "readings_checked": ref_rows,
                    "report_cpu_s": round(ref_s, 4),
                },
                "speedup_vs_reference": round(ref_s / ours_s, 2),
                "same_digest": our_digest == ref_digest,
                "sealing": sealing,
                "report_share_of_sealing": round(
                    1 - sealing["without_report"]["seal_s"] / with_report["seal_s"], 3
                ),
                "longest_stretch_between_turns_ms": round(stretch_ms, 2),
                "longest_stall_target_ms": TARGET_STALL_MS,
                "meets_stall_target": with_report["longest_stall_ms"] <= TARGET_STALL_MS,
                "python": platform.python_version(),
            }
        )
    )


if __name__ == "__main__":
    main()
