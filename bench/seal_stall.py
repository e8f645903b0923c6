"""The event loop's longest stall while the ledger seals one big period, against the same
sealing done on the loop (as it was) in the same run.

    .venv/bin/python bench/seal_stall.py [--readings N]

Fills a store with one 15-minute period of N readings (default 346,000: 10 channels, one of
them an energy counter), then seals it with the real `Sealer` while a probe task sleeps 1 ms in
a loop and records how late it wakes. The reference reads the same rows and computes the same
leaves, root, counter total and signature directly on the loop, with the same probe running.
The readings sealed are counted from the commitment; `idle_probe` is the same probe with
nothing to do, the machine's own noise. Prints one JSON line.
Target: longest stall ≤ 5 ms (DESIGN.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from eth_account import Account
from eth_keys import keys

from daisee_node import logs
from daisee_node.clock import Clock
from daisee_node.ledger import merkle
from daisee_node.ledger.commitment import sign
from daisee_node.ledger.outbox import (
    PERIOD_ROWS_SQL,
    Outbox,
    Sealer,
    counter_total,
    period_leaves,
)
from daisee_node.readings import Reading
from daisee_node.store import Retention, Store

TARGET_MS = 5.0
PERIOD_MS = 900_000
T0 = 1_781_000_000_000 // PERIOD_MS * PERIOD_MS
CHANNELS = [f"ch{i}.power_w" for i in range(9)] + ["grid.export_wh"]
CONTRACT = "0x" + "11" * 20
PROBE_S = 0.001


class StillClock(Clock):
    """Node time fixed just after the period ends (the period is due)."""

    def now_ms(self) -> int:
        return T0 + PERIOD_MS + 60_000

    def now(self) -> float:
        return self.now_ms() / 1000


async def with_probe(work: Callable[[], Awaitable[Any]]) -> tuple[Any, list[float], float]:
    """Run `work` while a task sleeps 1 ms in a loop; its lateness at each wake-up (s)."""
    lags: list[float] = []
    stop = False

    async def probe() -> None:
        while not stop:
            start = time.perf_counter()
            await asyncio.sleep(PROBE_S)
            lags.append(time.perf_counter() - start - PROBE_S)

    task = asyncio.create_task(probe())
    await asyncio.sleep(0.05)  # the probe is ticking before the work starts
    lags.clear()
    start = time.perf_counter()
    result = await work()
    elapsed = time.perf_counter() - start
    stop = True
    await task
    return result, lags, elapsed


def stall_figures(lags: list[float]) -> dict[str, Any]:
    ordered = sorted(lags)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] if ordered else 0.0
    return {
        "longest_stall_ms": round(max(ordered, default=0.0) * 1000, 2),
        "p99_lag_ms": round(p99 * 1000, 2),
        "median_lag_ms": round(statistics.median(ordered) * 1000, 3) if ordered else 0.0,
        "probe_ticks": len(ordered),
    }


async def run(n: int, directory: Path) -> dict[str, Any]:
    store = Store(
        directory / "node.db",
        clock=StillClock(),
        retention=Retention(max_pending=n + 1, maintenance_interval_s=86_400),
    )
    await store.open()
    writer = asyncio.create_task(store.run())
    try:
        per_channel = n // len(CHANNELS)
        step = PERIOD_MS / per_channel
        for i, name in enumerate(CHANNELS):
            store.put_many(
                [
                    Reading(name, T0 + int(k * step), float(k * 7 + i) / 10)
                    for k in range(per_channel)
                ]
            )
            await asyncio.sleep(0)
        await store.flush()
        account = Account.create()
        sealer = Sealer(
            store,
            Outbox(store),
            account,
            period_s=PERIOD_MS // 1000,
            delay_s=10,
            import_channel=None,
            export_channel="grid.export_wh",
            rules_hash=b"\0" * 32,
            clock=store.clock,
        )

        async def seal() -> Any:
            return await sealer.seal_due(1, CONTRACT)

        sealed, lags, elapsed = await with_probe(seal)
        if len(sealed) != 1:
            raise SystemExit(f"sealed {len(sealed)} periods, expected 1")
        commitment = sealed[0][0]

        async def on_loop() -> tuple[bytes, int]:
            # The sealing as it ran before: every step between two awaits runs on the loop.
            rows = await store.query(PERIOD_ROWS_SQL, (T0, T0 + PERIOD_MS))
            leaves = period_leaves(bytes.fromhex(account.address[2:]), rows)
            root = merkle.root(leaves)
            counter = await store.query(
                "SELECT r.value, r.quality FROM readings r JOIN channels c ON c.id = r.channel_id "
                "WHERE c.name = ? AND r.t_ms >= ? AND r.t_ms < ? ORDER BY r.t_ms",
                ("grid.export_wh", T0, T0 + PERIOD_MS),
            )
            counter_total([], [counter])
            sign(commitment, account.key, 1, CONTRACT)
            return root, len(leaves)

        (ref_root, ref_count), ref_lags, ref_elapsed = await with_probe(on_loop)
        # The machine's own noise: the same probe with nothing to do for as long as sealing took.
        _, idle_lags, _ = await with_probe(lambda: asyncio.sleep(elapsed))
        if ref_root != commitment.root or ref_count != commitment.count:
            raise SystemExit("the reference sealing computed another root")
    finally:
        store.stop()
        await writer
        await store.close()
    ours = stall_figures(lags)
    ref = stall_figures(ref_lags)
    return {
        "bench": "seal_stall",
        "readings_sealed": commitment.count,
        "seal_s": round(elapsed, 2),
        **ours,
        "target_ms": TARGET_MS,
        "meets_target": ours["longest_stall_ms"] <= TARGET_MS,
        "reference": {
            "name": "the same sealing run on the event loop",
            "readings_sealed": ref_count,
            "seal_s": round(ref_elapsed, 2),
            **ref,
        },
        "idle_probe": stall_figures(idle_lags),
        "stall_ratio_vs_reference": round(
            ours["longest_stall_ms"] / max(ref["longest_stall_ms"], 1e-9), 4
        ),
        "switch_interval_ms": sys.getswitchinterval() * 1000,
        "ecdsa_backend": type(keys.backend).__name__,
        "python": platform.python_version(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--readings", type=int, default=346_000)
    args = p.parse_args()
    logs.configure("warning")
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        result = asyncio.run(run(args.readings, Path(tmp)))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
