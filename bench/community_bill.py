"""A community's year of 15-minute periods allocated and billed from its committed totals.

    .venv/bin/python bench/community_bill.py [--members 200] [--days 365] [--seed 1]
                                             [--reference-stride 8] [--growth 50,100]

The synthetic community of `bench/allocation.py` (seeded PV roofs and household loads, a few
peer-to-peer trades at midday), laid out as the chain reader lays out committed totals, with
one member-period in 500 missing (no commitment) and two recorded keys: the French default key
for the first half of the year, priority tiers after. In the same run, on the same data:

- the product's path: `billing.monthly` (every period allocated with the key recorded for it,
  each member's figures added up per month in Europe/Paris) and `billing.bill` for every
  member-month, with peer-to-peer settlements in the bills;
- the reference, a straightforward implementation of the same rules (docs/community.md): per
  period, the key in force found by scanning the records, the plain per-member `Fraction`
  allocation of `bench/allocation.py`, the period's month from a `datetime`, each member's
  figures added into a dict per (member, month), then each bill line computed with `Decimal`.
  It runs on every `--reference-stride`-th period; on those periods its monthly figures and
  bill totals must equal the product's (`identical`), and its time per member-period is
  extrapolated to the year.
- growth: the product's path for `--growth` member counts, and for a quarter and half of the
  periods (every 4th, every 2nd: the same seasonal mix).

Times are CPU seconds of this process (`time.process_time`). Member-periods and bills are
counted from the results. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

sys.path.insert(0, str(Path(__file__).resolve().parent))

from allocation import Period, community, reference_period

from daisee_node.community import key_hash, parse_key
from daisee_node.community.billing import (
    CommunityData,
    KeyInForce,
    MemberMonth,
    Settlement,
    bill,
    monthly,
)
from daisee_node.community.files import Tariff
from daisee_node.community.keys import AnyKey

TARGET_S = 10.0
PERIOD_MS = 900_000
#: 2026-01-01T00:00 in Paris (23:00 UTC the day before)
YEAR_START_MS = 1_767_222_000_000
MISSING_ONE_IN = 500
ZONE = ZoneInfo("Europe/Paris")
TARIFF = Tariff(
    timezone="Europe/Paris",
    local_price=Decimal("0.1450"),
    producer_price=Decimal("0.1100"),
    surplus_price=Decimal("0.0400"),
    monthly_fee=Decimal("1.50"),
    credit_price=Decimal("0.10"),
)
PRICE = 150 * 10**15  # peer-to-peer price: 0.15 credits per kWh
WH_PER_CREDIT = 1000


def build(ids: list[str], periods: Sequence[Period], starts: list[int], seed: int) -> CommunityData:
    """The periods as `gather` lays out committed totals: missing member-periods at 0 Wh and
    listed, trades as GRID settlements (paid at PRICE), two keys."""
    rng = random.Random(seed + 1)
    n = len(ids)
    cons: list[list[int]] = []
    prod: list[list[int]] = []
    missing: dict[int, frozenset[int]] = {}
    trades: dict[int, list[Any]] = {}
    settlements = []
    for p, (imports, exports, period_trades) in enumerate(periods):
        absent = [i for i in range(n) if rng.randrange(MISSING_ONE_IN) == 0]
        if absent:
            imports, exports = list(imports), list(exports)
            for i in absent:
                imports[i] = exports[i] = 0
            missing[p] = frozenset(absent)
        cons.append(imports)
        prod.append(exports)
        if period_trades:
            trades[p] = period_trades
            for k, t in enumerate(period_trades):
                settlements.append(
                    Settlement(
                        p * 10 + k,
                        "grid",
                        t.buyer,
                        t.seller,
                        starts[p],
                        starts[p] + PERIOD_MS,
                        t.wh,
                        t.wh * PRICE // 1000,
                    )
                )
    prorata = parse_key({"kind": "prorata"})
    tiers = parse_key(
        {"kind": "tiers", "tiers": [list(ids[: n // 10]), list(ids[n // 10 : n // 2])]}
    )
    half = starts[len(starts) // 2] if starts else 0
    keys = [
        KeyInForce(starts[0] if starts else 0, key_hash(prorata), prorata),
        KeyInForce(half, key_hash(tiers), tiers),
    ]
    data = CommunityData(
        members=tuple(ids),
        names={m: f"member-{i:03d}" for i, m in enumerate(ids)},
        period_ms=PERIOD_MS,
        starts=starts,
        consumption=cons,
        production=prod,
        missing=missing,
        trades=trades,
        settlements=settlements,
        keys=keys,
    )
    data.wh_per_credit = WH_PER_CREDIT
    return data


def sample(data: CommunityData, stride: int) -> CommunityData:
    """Every `stride`-th period of `data` (the same member-periods, trades and settlements)."""
    chosen = range(0, len(data.starts), stride)
    kept_starts = {data.starts[p] for p in chosen}
    return CommunityData(
        members=data.members,
        names=data.names,
        period_ms=data.period_ms,
        starts=[data.starts[p] for p in chosen],
        consumption=[data.consumption[p] for p in chosen],
        production=[data.production[p] for p in chosen],
        missing={k: data.missing[p] for k, p in enumerate(chosen) if p in data.missing},
        trades={k: data.trades[p] for k, p in enumerate(chosen) if p in data.trades},
        settlements=[s for s in data.settlements if s.t0 in kept_starts],
        keys=data.keys,
        wh_per_credit=data.wh_per_credit,
    )


def run_product(data: CommunityData) -> tuple[float, int, int, Decimal]:
    """CPU seconds, member-periods and bills, and the sum of every bill's total."""
    t0 = time.process_time()
    months = monthly(data, ZONE)
    bills = [bill(acc, TARIFF) for accounts in months.values() for acc in accounts]
    seconds = time.process_time() - t0
    counted = sum(acc.periods for accounts in months.values() for acc in accounts)
    return seconds, counted, len(bills), sum((b.total for b in bills), Decimal(0))


# -- the reference: the rules written the plain way ---------------------------------------------


def _money(value: Decimal) -> Decimal:
    return value.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)


def reference(data: CommunityData) -> dict[tuple[str, str], dict[str, Any]]:
    """{(member, month): figures and bill total}, one member-period at a time."""
    ids = list(data.members)
    acc: dict[tuple[str, str], dict[str, Any]] = {}
    for p, t0 in enumerate(data.starts):
        key: AnyKey | None = None
        for k in data.keys:  # the last record starting at or before the period
            if k.from_ms <= t0:
                key = k.key
        month = datetime.fromtimestamp(t0 / 1000, ZONE).strftime("%Y-%m")
        assert key is not None
        r = reference_period(
            key, ids, data.consumption[p], data.production[p], data.trades.get(p, [])
        )
        missing = data.missing.get(p, frozenset())
        for i, m in enumerate(ids):
            a = acc.setdefault(
                (m, month),
                {
                    "periods": 0,
                    "missing": 0,
                    "consumption": 0,
                    "production": 0,
                    "allocated": 0,
                    "p2p_bought": 0,
                    "p2p_sold": 0,
                    "grid_import": 0,
                    "surplus": 0,
                    "paid": 0,
                    "received": 0,
                },
            )
            a["periods"] += 1
            a["missing"] += i in missing
            a["consumption"] += r.consumption[i]
            a["production"] += r.production[i]
            a["allocated"] += r.allocated[i]
            a["p2p_bought"] += r.p2p_bought[i]
            a["p2p_sold"] += r.p2p_sold[i]
            a["grid_import"] += r.grid_import[i]
            a["surplus"] += r.surplus[i]
    for s in data.settlements:
        month = datetime.fromtimestamp(s.t0 / 1000, ZONE).strftime("%Y-%m")
        acc[(s.buyer, month)]["paid"] += s.paid
        acc[(s.seller, month)]["received"] += s.paid
    for a in acc.values():
        supplied = a["production"] - a["p2p_sold"] - a["surplus"]
        credit = TARIFF.credit_price or Decimal(0)
        total = (
            _money(Decimal(a["allocated"]) * TARIFF.local_price / 1000)
            - _money(Decimal(supplied) * TARIFF.producer / 1000)
            - _money(Decimal(a["surplus"]) * TARIFF.surplus_price / 1000)
            + _money(Decimal(a["paid"]) / 10**18 * credit)
            - _money(Decimal(a["received"]) / 10**18 * credit)
            + TARIFF.monthly_fee
        )
        a["total"] = _money(total)
    return acc


def same(product: dict[str, list[MemberMonth]], ref: dict[tuple[str, str], dict[str, Any]]) -> bool:
    """True when every member-month's figures and bill total agree."""
    seen = 0
    for month, accounts in product.items():
        for a in accounts:
            r = ref.get((a.member, month))
            if r is None:
                return False
            seen += 1
            fields = ("periods", "missing", "consumption", "production", "allocated",
                      "p2p_bought", "p2p_sold", "grid_import", "surplus")  # fmt: skip
            if any(getattr(a, f) != r[f] for f in fields):
                return False
            if (a.settled_paid, a.settled_received) != (r["paid"], r["received"]):
                return False
            if bill(a, TARIFF).total != r["total"]:
                return False
    return seen == len(ref)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--members", type=int, default=200)
    parser.add_argument("--days", type=int, default=365)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--reference-stride", type=int, default=8)
    parser.add_argument("--growth", default="50,100")
    args = parser.parse_args()

    def dataset(members: int) -> CommunityData:
        ids, periods = community(members, args.days, args.seed)
        starts = [YEAR_START_MS + p * PERIOD_MS for p in range(len(periods))]
        return build(ids, periods, starts, args.seed)

    data = dataset(args.members)
    seconds, counted, bills, total = run_product(data)

    part = sample(data, args.reference_stride)
    t0 = time.process_time()
    ref = reference(part)
    ref_s = time.process_time() - t0
    ref_counted = sum(a["periods"] for a in ref.values())
    identical = same(monthly(part, ZONE), ref)
    ref_per_mp = ref_s / ref_counted

    growth_members: dict[str, float] = {str(args.members): round(seconds / counted * 1e6, 4)}
    for count in sorted({int(c) for c in args.growth.split(",") if c} - {args.members}):
        s, c, _, _ = run_product(dataset(count))
        growth_members[str(count)] = round(s / c * 1e6, 4)
    growth_periods: dict[str, float] = {}
    for stride in (4, 2):
        chunk = sample(data, stride)
        s, _, _, _ = run_product(chunk)
        growth_periods[str(len(chunk.starts))] = round(s, 3)
    growth_periods[str(len(data.starts))] = round(seconds, 3)

    print(
        json.dumps(
            {
                "bench": "community_bill",
                "members": len(data.members),
                "periods": len(data.starts),
                "member_periods": counted,
                "missing_member_periods": sum(len(v) for v in data.missing.values()),
                "settlements": len(data.settlements),
                "bills": bills,
                "bills_total": str(total),
                "cpu_s": round(seconds, 3),
                "us_per_member_period": round(seconds / counted * 1e6, 4),
                "target_s": TARGET_S,
                "meets_target": seconds <= TARGET_S,
                "reference": {
                    "name": "per-member-period loop: key scan, Fraction allocation, datetime "
                    "month, dict accumulators, Decimal bills (same rules)",
                    "stride": args.reference_stride,
                    "sampled_member_periods": ref_counted,
                    "cpu_s_sampled": round(ref_s, 3),
                    "us_per_member_period": round(ref_per_mp * 1e6, 3),
                    "cpu_s_extrapolated": round(ref_per_mp * counted, 1),
                },
                "speedup": round(ref_per_mp * counted / seconds, 1),
                "identical": identical,
                "growth_us_per_member_period_by_members": growth_members,
                "growth_cpu_s_by_periods": growth_periods,
                "python": platform.python_version(),
                "machine": platform.machine(),
            }
        )
    )


if __name__ == "__main__":
    main()
