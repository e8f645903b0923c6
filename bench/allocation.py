"""Allocating a community's local production over a year of 15-minute periods.

    .venv/bin/python bench/allocation.py [--members 200] [--days 365] [--seed 1]
                                         [--reference-stride 8] [--growth 50,100]

Generates a seeded synthetic community (a third of the members with PV roofs on a daily and
seasonal curve under a daily cloud factor, every member a household load curve with morning and
evening peaks; the PV members export what their own load does not use; a few peer-to-peer
trades at midday), then, in the same run and on the same data:

- `Allocator.allocate_period` over every period, once per key (prorata, static, tiers, equal);
- the reference: a plain per-period, per-member loop over `Fraction`s implementing the same
  rules as written in docs/community.md, on every `--reference-stride`-th period (all of them
  with `--reference-stride 1`); its results must be identical to the allocator's on those
  periods (`identical`), and its time per member-period is extrapolated to the whole year;
- growth: the prorata key for `--growth` member counts (and the full count), and for a quarter,
  half and all of the periods (every 4th, every 2nd, every period:
  the same mix of nights and seasons).

Times are CPU seconds of this process (`time.process_time`): the machine is shared, and the work
is CPU-bound. Member-periods are counted from the results. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import time
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

from daisee_node.community import Allocator, PeriodAllocation, Trade, parse_key
from daisee_node.community.keys import AnyKey, StaticKey, TiersKey

PERIODS_PER_DAY = 96
TARGET_S = 10.0
# Period values share int objects (a year for 200 members is 14 million values).
_INTS = list(range(20_000))

Period = tuple[list[int], list[int], list[Trade]]


def community(members: int, days: int, seed: int) -> tuple[list[str], list[Period]]:
    """Member ids and, per period, import Wh, export Wh and trades (aligned with sorted ids)."""
    rng = random.Random(seed)
    ids = sorted(f"0x{rng.getrandbits(160):040x}" for _ in range(members))
    pv_kwp = [rng.choice((0, 0, 3, 6, 9)) if i % 3 == 0 else 0 for i in range(members)]
    load_kw = [rng.uniform(0.2, 0.6) for _ in range(members)]
    peak_kw = [rng.uniform(0.5, 2.5) for _ in range(members)]
    producers = [i for i in range(members) if pv_kwp[i]]
    consumers = [i for i in range(members) if not pv_kwp[i]]
    # One load shape and one PV shape per day (kW per kW of base/peak/peak power).
    shape = [
        1.0
        + 2.0 * math.exp(-(((q / 4 - 7.5) / 1.2) ** 2))
        + 3.0 * math.exp(-(((q / 4 - 19.5) / 2) ** 2))
        for q in range(PERIODS_PER_DAY)
    ]
    periods: list[Period] = []
    for day in range(days):
        season = 0.55 + 0.45 * math.cos(2 * math.pi * (day - 172) / 365)
        clouds = rng.uniform(0.2, 1.0)
        noise = [rng.uniform(0.6, 1.4) for _ in range(members)]
        for q in range(PERIODS_PER_DAY):
            hour = q / 4
            sun = max(0.0, math.sin(math.pi * (hour - 6) / 14)) if 6 <= hour <= 20 else 0.0
            pv_factor = 250 * sun * season * clouds  # Wh per kWp in a quarter hour
            imports: list[int] = []
            exports: list[int] = []
            for i in range(members):
                wh = 250 * (load_kw[i] + peak_kw[i] * (shape[q] - 1) / 3) * noise[i]
                net = wh - pv_kwp[i] * pv_factor * ((i + q) % 7 + 13) / 16
                imports.append(_INTS[int(net)] if net > 0 else 0)
                exports.append(_INTS[int(-net)] if net < 0 else 0)
            trades: list[Trade] = []
            if sun > 0.8 and producers and rng.random() < 0.3:
                for _ in range(rng.randint(1, 3)):
                    seller, buyer = rng.choice(producers), rng.choice(consumers)
                    trades.append(Trade(ids[buyer], ids[seller], rng.randint(10, 300)))
            periods.append((imports, exports, trades))
    return ids, periods


def keys(ids: Sequence[str]) -> dict[str, AnyKey]:
    """One key of each kind for these members."""
    n = len(ids)
    coefficients = {m: f"1/{n}" for m in ids}
    tiers = [list(ids[: n // 10]), list(ids[n // 10 : n // 2])]
    return {
        "prorata": parse_key({"kind": "prorata"}),
        "static": parse_key({"kind": "static", "coefficients": coefficients}),
        "tiers": parse_key({"kind": "tiers", "tiers": tiers}),
        "equal": parse_key({"kind": "equal"}),
    }


def run_fast(key: AnyKey, ids: list[str], periods: Sequence[Period]) -> tuple[float, int, int]:
    """CPU seconds, member-periods and local Wh allocated, over `periods`."""
    allocator = Allocator(key, ids)
    counted = local = 0
    t0 = time.process_time()
    for imports, exports, trades in periods:
        result = allocator.allocate_period(imports, exports, trades)
        counted += len(result.allocated)
        local += sum(result.allocated)
    return time.process_time() - t0, counted, local


# The reference: the rules of docs/community.md, written the plain way.


def _round(quotas: dict[str, Fraction], total: int) -> dict[str, int]:
    """Floor each quota, then one Wh each to the largest fractional parts, ties by member id."""
    result = {m: math.floor(q) for m, q in quotas.items()}
    left = total - sum(result.values())
    ranked = sorted(quotas, key=lambda m: (-(quotas[m] - math.floor(quotas[m])), m))
    for m in ranked[:left]:
        result[m] += 1
    return result


def reference_period(
    key: AnyKey, ids: list[str], imports: list[int], exports: list[int], trades: list[Trade]
) -> PeriodAllocation:
    cons = dict(zip(ids, imports, strict=True))
    prod = dict(zip(ids, exports, strict=True))
    bought = dict.fromkeys(ids, 0)
    sold = dict.fromkeys(ids, 0)
    for t in sorted(trades, key=lambda t: (t.seller, t.buyer, t.wh)):
        delivered = min(t.wh, prod[t.seller], cons[t.buyer])
        prod[t.seller] -= delivered
        cons[t.buyer] -= delivered
        sold[t.seller] += delivered
        bought[t.buyer] += delivered
    total_prod = sum(prod.values())
    total_cons = sum(cons.values())
    quotas: dict[str, Fraction] = {}
    if key.kind == "prorata":
        for m in ids:
            share = Fraction(total_prod * cons[m], total_cons) if total_cons else Fraction(0)
            quotas[m] = min(Fraction(cons[m]), share)
        allocated = _round(quotas, min(total_prod, total_cons))
    elif isinstance(key, StaticKey):
        for m in ids:
            quotas[m] = total_prod * key.coefficients.get(m, Fraction(0))
        shares = _round(quotas, math.floor(sum(quotas.values(), Fraction(0))))
        allocated = {m: min(shares[m], cons[m]) for m in ids}
    elif isinstance(key, TiersKey):
        listed = {m for tier in key.tiers for m in tier}
        left = Fraction(total_prod)
        for tier in [*key.tiers, [m for m in ids if m not in listed]]:
            need = sum(cons[m] for m in tier)
            for m in tier:
                quotas[m] = Fraction(cons[m]) if need <= left else left * cons[m] / need
            left = max(Fraction(0), left - need)
        for m in ids:
            quotas.setdefault(m, Fraction(0))
        allocated = _round(quotas, min(total_prod, total_cons))
    else:
        # Equal shares, redistributing what members cannot use until nothing more is placed.
        quotas = dict.fromkeys(ids, Fraction(0))
        active = [m for m in ids if cons[m] > 0]
        left = Fraction(total_prod)
        while active and left > 0:
            share = left / len(active)
            full = [m for m in active if cons[m] - quotas[m] <= share]
            if not full:
                for m in active:
                    quotas[m] += share
                left = Fraction(0)
                break
            for m in full:
                left -= cons[m] - quotas[m]
                quotas[m] = Fraction(cons[m])
            active = [m for m in active if m not in full]
        allocated = _round(quotas, min(total_prod, total_cons))
    grid = {m: cons[m] - allocated[m] for m in ids}
    used = sum(allocated.values())
    taken = _round(
        {m: Fraction(used * prod[m], total_prod) if total_prod else Fraction(0) for m in ids},
        used,
    )
    surplus = {m: prod[m] - taken[m] for m in ids}
    return PeriodAllocation(
        tuple(ids),
        tuple(imports),
        tuple(exports),
        tuple(bought[m] for m in ids),
        tuple(sold[m] for m in ids),
        tuple(allocated[m] for m in ids),
        tuple(grid[m] for m in ids),
        tuple(surplus[m] for m in ids),
    )


def run_reference(
    key: AnyKey, ids: list[str], periods: Sequence[Period], stride: int
) -> tuple[float, int, bool]:
    """CPU seconds and member-periods of the reference on every `stride`-th period, and whether
    each of its results equals the allocator's."""
    sample = periods[::stride]
    allocator = Allocator(key, ids)
    t0 = time.process_time()
    results = [reference_period(key, ids, *period) for period in sample]
    seconds = time.process_time() - t0
    counted = sum(len(r.allocated) for r in results)
    identical = all(
        allocator.allocate_period(*period) == result
        for period, result in zip(sample, results, strict=True)
    )
    return seconds, counted, identical


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--members", type=int, default=200)
    parser.add_argument("--days", type=int, default=365)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--reference-stride", type=int, default=8)
    parser.add_argument("--growth", default="50,100")
    args = parser.parse_args()

    ids, periods = community(args.members, args.days, args.seed)
    by_key: dict[str, Any] = {}
    identical = True
    for name, key in keys(ids).items():
        seconds, counted, local = run_fast(key, ids, periods)
        ref_s, ref_counted, same = run_reference(key, ids, periods, args.reference_stride)
        identical &= same
        ref_per_mp = ref_s / ref_counted
        by_key[name] = {
            "cpu_s": round(seconds, 3),
            "member_periods": counted,
            "us_per_member_period": round(seconds / counted * 1e6, 4),
            "local_wh": local,
            "meets_target": seconds <= TARGET_S,
            "reference_sampled_member_periods": ref_counted,
            "reference_cpu_s_sampled": round(ref_s, 3),
            "reference_us_per_member_period": round(ref_per_mp * 1e6, 3),
            "reference_cpu_s_extrapolated": round(ref_per_mp * counted, 1),
            "speedup": round(ref_per_mp * counted / seconds, 1),
            "identical_to_reference": same,
        }

    prorata = keys(ids)["prorata"]
    growth_members: dict[str, float] = {}
    for count in sorted({*(int(c) for c in args.growth.split(",") if c), args.members}):
        if count == args.members:
            seconds = by_key["prorata"]["cpu_s"]
            counted = by_key["prorata"]["member_periods"]
        else:
            small_ids, small_periods = community(count, args.days, args.seed)
            seconds, counted, _ = run_fast(prorata, small_ids, small_periods)
        growth_members[str(count)] = round(seconds / counted * 1e6, 4)
    growth_periods: dict[str, float] = {}
    for part in (4, 2, 1):
        # Every part-th period: the same mix of nights, winter and summer days as the year.
        chunk = periods[::part]
        seconds, counted, _ = run_fast(prorata, ids, chunk)
        growth_periods[str(len(chunk))] = round(seconds, 3)

    print(
        json.dumps(
            {
                "bench": "allocation",
                "members": len(ids),
                "periods": len(periods),
                "trades": sum(len(t) for _, _, t in periods),
                "periods_with_production": sum(1 for _, e, _ in periods if any(e)),
                "periods_production_below_consumption": sum(
                    1 for i, e, _ in periods if 0 < sum(e) < sum(i)
                ),
                "target_s": TARGET_S,
                "keys": by_key,
                "reference": {
                    "name": "per-period, per-member loop over Fractions (same rules)",
                    "stride": args.reference_stride,
                },
                "identical": identical,
                "growth_us_per_member_period_by_members": growth_members,
                "growth_cpu_s_by_periods_prorata": growth_periods,
                "python": platform.python_version(),
                "machine": platform.machine(),
            }
        )
    )


if __name__ == "__main__":
    main()
