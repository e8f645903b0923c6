"""A community's periods, allocated with the key in force, and each member's monthly bill.

Pure functions of what the chain holds (or a node's database: the same numbers): the members'
committed period totals, the peer-to-peer settlements and the recorded keys. The input is laid
out period by period (`CommunityData`), `periods` allocates one period at a time, and
`monthly` adds each member's figures up per calendar month and bills them with a `Tariff`.

Nothing is ever filled in: a member without a commitment for a period counts 0 Wh in that
period's allocation and the period says so (`missing`); a period no recorded key covers is not
allocated (`no-key`). Every figure is integer Wh; money is `Decimal`, rounded once per bill line.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal, DecimalException, localcontext
from zoneinfo import ZoneInfo

from daisee_node.community.allocation import Allocator, PeriodAllocation, Trade
from daisee_node.community.files import Tariff
from daisee_node.community.keys import AnyKey, StaticKey, TiersKey, parse_key
from daisee_node.errors import ConfigError, ConfigProblem, DaiseeError

#: member-period status, worst first: what the statement and the CSV files say
MISSING, PARTIAL, NO_KEY, INCOMPLETE, OK = "missing", "partial", "no-key", "incomplete", "ok"
#: the member's period failed the conformity report its node signed (`--reports`)
NONCONFORMING = "nonconforming"
GRID, LINE = "grid", "line"


@dataclass(frozen=True)
class KeyInForce:
    """A recorded key: from `from_ms` on (until the next one's start), with its file's hash.
    `key` names members by address (`translate_key`)."""

    from_ms: int
    key_hash: str
    key: AnyKey
    source: str = ""


@dataclass(frozen=True)
class Settlement:
    """Energy a peer-to-peer order delivered and its payment (the market's `Settled` event):
    `wh` from `seller` to `buyer` over [t0, t1), `paid` credit base units."""

    order_id: int
    mode: str
    buyer: str
    seller: str
    t0: int
    t1: int
    wh: int
    paid: int


@dataclass(frozen=True)
class Committed:
    """One committed period total of one member (addresses in lower case)."""

    node: str
    t0: int
    t1: int
    import_wh: int
    export_wh: int


@dataclass
class CommunityData:
    """The community's inputs over [starts[0], starts[-1] + period_ms), period by period.

    `consumption[p][i]` and `production[p][i]` are member `members[i]`'s committed import and
    export in period `p` (0 where it committed nothing: `missing[p]` lists those members);
    `partial[p]` lists members whose commitments cover only part of the period; `trades[p]` the
    GRID deliveries between members in it."""

    members: tuple[str, ...]
    names: Mapping[str, str]
    period_ms: int
    starts: list[int]
    consumption: list[list[int]]
    production: list[list[int]]
    missing: dict[int, frozenset[int]] = field(default_factory=dict)
    partial: dict[int, frozenset[int]] = field(default_factory=dict)
    trades: dict[int, list[Trade]] = field(default_factory=dict)
    settlements: list[Settlement] = field(default_factory=list)
    keys: list[KeyInForce] = field(default_factory=list)
    #: members whose node's signed conformity report of the period failed (`flag_failed`)
    nonconforming: dict[int, frozenset[int]] = field(default_factory=dict)
    #: commitments that do not fit in one period of the grid: (node, t0, t1)
    misaligned: list[tuple[str, int, int]] = field(default_factory=list)
    #: the ledger mints one credit per this many exported Wh (None: not known)
    wh_per_credit: int | None = None
    credit_decimals: int = 18


class CommunityError(DaiseeError):
    """Inputs the community's accounts cannot be made from."""


def period_range(t_from: int, t_to: int, period_ms: int) -> list[int]:
    """Starts of the periods of the grid (multiples of `period_ms`) that overlap [t_from, t_to)."""
    if period_ms <= 0:
        raise CommunityError("the period must be longer than 0 ms")
    first = t_from // period_ms * period_ms
    return list(range(first, t_to, period_ms))


def gather(
    members: Sequence[str],
    names: Mapping[str, str],
    period_ms: int,
    starts: list[int],
    commitments: Iterable[Committed],
    settlements: Iterable[Settlement] = (),
    keys: Sequence[KeyInForce] = (),
) -> CommunityData:
    """Lay commitments and settlements out period by period. A member's commitments inside one
    period of the grid add up (its node may commit shorter periods); one that straddles two
    periods is used in neither (`misaligned`)."""
    ids = tuple(sorted(m.lower() for m in members))
    index = {m: i for i, m in enumerate(ids)}
    n = len(ids)
    first = starts[0] if starts else 0
    count = len(starts)
    cons = [[0] * n for _ in range(count)]
    prod = [[0] * n for _ in range(count)]
    covered = [[0] * n for _ in range(count)]
    misaligned: list[tuple[str, int, int]] = []
    for c in commitments:
        i = index.get(c.node.lower())
        if i is None:
            continue
        p = (c.t0 - first) // period_ms
        if not 0 <= p < count:
            continue
        if c.t1 > first + (p + 1) * period_ms:
            misaligned.append((ids[i], c.t0, c.t1))
            continue
        cons[p][i] += c.import_wh
        prod[p][i] += c.export_wh
        covered[p][i] += c.t1 - c.t0
    missing: dict[int, frozenset[int]] = {}
    partial: dict[int, frozenset[int]] = {}
    for p, row in enumerate(covered):
        absent = [i for i, ms in enumerate(row) if ms == 0]
        if absent:
            missing[p] = frozenset(absent)
        short = [i for i, ms in enumerate(row) if 0 < ms < period_ms]
        if short:
            partial[p] = frozenset(short)
    kept = []
    trades: dict[int, list[Trade]] = {}
    for s in settlements:
        s = Settlement(
            s.order_id, s.mode, s.buyer.lower(), s.seller.lower(), s.t0, s.t1, s.wh, s.paid
        )
        if not (first <= s.t0 < first + count * period_ms):
            continue
        kept.append(s)
        # GRID deliveries are energy the shared grid carried between members' meters: they come
        # off the committed totals before the key. LINE deliveries went over their own line.
        p = (s.t0 - first) // period_ms
        if (
            s.mode == GRID
            and s.wh > 0
            and s.buyer in index
            and s.seller in index
            and s.t1 <= first + (p + 1) * period_ms
        ):
            trades.setdefault(p, []).append(Trade(s.buyer, s.seller, s.wh))
    return CommunityData(
        members=ids,
        names={m.lower(): name for m, name in names.items()},
        period_ms=period_ms,
        starts=starts,
        consumption=cons,
        production=prod,
        missing=missing,
        partial=partial,
        trades=trades,
        settlements=kept,
        keys=sorted(keys, key=lambda k: k.from_ms),
        misaligned=misaligned,
    )


class KeyMembersError(ConfigError, CommunityError):
    """A key file that names a member the members file does not have, or one member twice (by
    name and by address, say): every such problem with its path in the key file."""


def translate_key(key: AnyKey, address_of: Callable[[str], str | None], source: str) -> AnyKey:
    """The key with every member it names given by address (a key file may name members by
    name or by address); `KeyMembersError` naming each member the community does not have and
    each member named twice, with its path in the key file."""
    data = key.canonical()
    problems: list[ConfigProblem] = []
    first: dict[str, str] = {}  # address: the path that named it first

    def member(m: str, path: str) -> str:
        address = address_of(m)
        if address is None:
            problems.append(ConfigProblem(path, f"unknown member {m!r} (not in the members file)"))
            return m
        if address in first:
            problems.append(
                ConfigProblem(
                    path,
                    f"{m!r} is the member {first[address]} names already ({address}): name "
                    "each member once",
                )
            )
        else:
            first[address] = path
        return address

    if isinstance(key, StaticKey):
        data["coefficients"] = {
            member(m, _key_path("coefficients", m)): data["coefficients"][m]
            for m in key.coefficients
        }
    if isinstance(key, TiersKey):
        data["tiers"] = [
            [member(m, f"tiers[{i}][{j}]") for j, m in enumerate(tier)]
            for i, tier in enumerate(key.tiers)
        ]
    if problems:
        raise KeyMembersError(source, problems)
    return parse_key(data, source=source)


def _key_path(table: str, name: str) -> str:
    """`table.name`, quoted as TOML quotes a key when it must be (`coefficients."0x5aed…"`)."""
    return f"{table}.{name}" if re.fullmatch(r"[A-Za-z0-9_-]+", name) else f'{table}."{name}"'


@dataclass(frozen=True)
class PeriodResult:
    """One period's allocation (tuples aligned with `CommunityData.members`) and its status."""

    index: int
    t0: int
    key: KeyInForce | None
    missing: frozenset[int]
    partial: frozenset[int]
    allocation: PeriodAllocation
    failed: frozenset[int] = frozenset()

    def status(self, i: int) -> str:
        """Member `i`'s status in this period (the first that applies of missing, partial,
        nonconforming (its node's report of the period failed), no-key, incomplete: another
        member's commitment is missing or partial, ok)."""
        if i in self.missing:
            return MISSING
        if i in self.partial:
            return PARTIAL
        if i in self.failed:
            return NONCONFORMING
        if self.key is None:
            return NO_KEY
        if self.missing or self.partial:
            return INCOMPLETE
        return OK


_NO_SET: frozenset[int] = frozenset()


def periods(data: CommunityData) -> Iterator[PeriodResult]:
    """Allocate every period with the key recorded for it, in order."""
    if not data.members:
        return
    # A period before the first key is not allocated: a static key of coefficient 0 allocates
    # nothing and leaves peer-to-peer deliveries and surplus as the other keys do.
    unallocated = Allocator(
        parse_key({"kind": "static", "coefficients": {data.members[0]: 0}}), data.members
    )
    allocators: dict[str, Allocator] = {}
    keys = data.keys
    k = -1
    for p, t0 in enumerate(data.starts):
        while k + 1 < len(keys) and keys[k + 1].from_ms <= t0:
            k += 1
        key = keys[k] if k >= 0 else None
        if key is None:
            allocator = unallocated
        else:
            allocator = allocators.get(key.key_hash) or allocators.setdefault(
                key.key_hash, Allocator(key.key, data.members)
            )
            if allocator.members != data.members:
                extra = sorted(set(allocator.members) - set(data.members))
                raise CommunityError(f"key {key.key_hash} names non-members: {', '.join(extra)}")
        allocation = allocator.allocate_period(
            data.consumption[p], data.production[p], data.trades.get(p, ())
        )
        yield PeriodResult(
            p,
            t0,
            key,
            data.missing.get(p, _NO_SET),
            data.partial.get(p, _NO_SET),
            allocation,
            data.nonconforming.get(p, _NO_SET),
        )


def flag_failed(data: CommunityData, failed: Iterable[tuple[str, int, int]]) -> int:
    """Mark the member-periods covered by failed conformity reports, each `(node, t0, t1)` of
    the commitment it belongs to; how many member-periods were marked."""
    index = {m: i for i, m in enumerate(data.members)}
    first, count = (data.starts[0] if data.starts else 0), len(data.starts)
    marked: dict[int, set[int]] = {}
    for node, t0, t1 in failed:
        i = index.get(node.lower())
        if i is None:
            continue
        p = max(0, (t0 - first) // data.period_ms)
        while p < count and first + p * data.period_ms < t1:
            marked.setdefault(p, set()).add(i)
            p += 1
    for p, members in marked.items():
        data.nonconforming[p] = frozenset(members | data.nonconforming.get(p, set()))
    return sum(len(m) for m in marked.values())


# -- monthly accounts and bills ------------------------------------------------------------------


@dataclass
class MemberMonth:
    """One member's figures over one calendar month of the range (Wh unless named)."""

    member: str
    name: str
    month: str
    periods: int = 0
    missing: int = 0
    partial: int = 0
    no_key: int = 0
    nonconforming: int = 0
    consumption: int = 0
    production: int = 0
    allocated: int = 0
    p2p_bought: int = 0
    p2p_sold: int = 0
    grid_import: int = 0
    surplus: int = 0
    #: the member's production the key allocated to others: production − p2p_sold − surplus
    supplied: int = 0
    #: from the market's `Settled` events (GRID and LINE): Wh and credit base units
    settled_bought_wh: int = 0
    settled_paid: int = 0
    settled_sold_wh: int = 0
    settled_received: int = 0
    #: credit base units the ledger minted for the month's committed export (None: not known)
    credits_earned: int | None = None
    #: periods of the grid in the whole calendar month (`periods` of them are in the range)
    month_periods: int = 0
    #: the length of one period (ms)
    period_ms: int = 0
    #: starts (ms) of the periods this member has no commitment for
    missing_starts: list[int] = field(default_factory=list)
    #: starts (ms) of the periods whose conformity report from this member's node failed
    nonconforming_starts: list[int] = field(default_factory=list)


_FIGURES = ("consumption", "production", "allocated", "p2p_bought", "p2p_sold", "grid_import")


def month_of(t_ms: int, zone: ZoneInfo) -> str:
    """The calendar month (`YYYY-MM`, in `zone`) holding the instant `t_ms`."""
    return datetime.fromtimestamp(t_ms / 1000, zone).strftime("%Y-%m")


def monthly(
    data: CommunityData,
    zone: ZoneInfo | None = None,
    sink: Callable[[PeriodResult], None] | None = None,
) -> dict[str, list[MemberMonth]]:
    """Every member's figures per month (`YYYY-MM` in `zone`, default UTC), members in
    `data.members` order; `sink` sees each period's result as it is computed."""
    zone = zone or ZoneInfo("UTC")
    n = len(data.members)
    out: dict[str, list[MemberMonth]] = {}
    month: str | None = None
    rows: dict[str, list[tuple[int, ...]]] = {f: [] for f in (*_FIGURES, "surplus")}
    counts = {"periods": 0}
    flags: list[list[int]] = [[0] * n for _ in range(3)]  # missing, partial, no-key
    missing_starts: list[list[int]] = [[] for _ in range(n)]
    failed_starts: list[list[int]] = [[] for _ in range(n)]
    # Month boundaries: one datetime per period would cost more than the allocation.
    next_change = -1
    month_periods = 0

    def flush() -> None:
        if month is None:
            return
        sums = {f: [sum(col) for col in zip(*rows[f], strict=True)] for f in rows}
        accounts = []
        for i, m in enumerate(data.members):
            acc = MemberMonth(
                m,
                data.names.get(m, m),
                month,
                periods=counts["periods"],
                month_periods=month_periods,
                period_ms=data.period_ms,
            )
            for f in (*_FIGURES, "surplus"):
                setattr(acc, f, sums[f][i] if sums[f] else 0)
            acc.supplied = acc.production - acc.p2p_sold - acc.surplus
            acc.missing, acc.partial, acc.no_key = flags[0][i], flags[1][i], flags[2][i]
            acc.missing_starts = missing_starts[i]
            acc.nonconforming_starts = failed_starts[i]
            acc.nonconforming = len(failed_starts[i])
            if data.wh_per_credit:
                units = 10**data.credit_decimals
                acc.credits_earned = acc.production * units // data.wh_per_credit
            accounts.append(acc)
        out[month] = accounts

    for r in periods(data):
        if sink is not None:
            sink(r)
        if r.t0 >= next_change:
            flush()
            month = month_of(r.t0, zone)
            next_change = _month_end(r.t0, zone)
            # periods of the grid (aligned on the epoch) starting in the month
            first = _month_start(r.t0, zone)
            month_periods = -(-next_change // data.period_ms) - -(-first // data.period_ms)
            for f in rows:
                rows[f] = []
            counts["periods"] = 0
            flags = [[0] * n for _ in range(3)]
            missing_starts = [[] for _ in range(n)]
            failed_starts = [[] for _ in range(n)]
        a = r.allocation
        rows["consumption"].append(a.consumption)
        rows["production"].append(a.production)
        rows["allocated"].append(a.allocated)
        rows["p2p_bought"].append(a.p2p_bought)
        rows["p2p_sold"].append(a.p2p_sold)
        rows["grid_import"].append(a.grid_import)
        rows["surplus"].append(a.surplus)
        counts["periods"] += 1
        for i in r.missing:
            flags[0][i] += 1
            missing_starts[i].append(r.t0)
        for i in r.partial:
            flags[1][i] += 1
        for i in r.failed:
            failed_starts[i].append(r.t0)
        if r.key is None:
            for i in range(n):
                flags[2][i] += 1
    flush()
    index = {m: i for i, m in enumerate(data.members)}
    for s in data.settlements:
        accounts_of_month = out.get(month_of(s.t0, zone))
        if accounts_of_month is None:
            continue
        if s.buyer in index:
            acc = accounts_of_month[index[s.buyer]]
            acc.settled_bought_wh += s.wh
            acc.settled_paid += s.paid
        if s.seller in index:
            acc = accounts_of_month[index[s.seller]]
            acc.settled_sold_wh += s.wh
            acc.settled_received += s.paid
    return out


def _month_start(t_ms: int, zone: ZoneInfo) -> int:
    """The first instant (ms) of the month holding `t_ms`, in `zone`."""
    here = datetime.fromtimestamp(t_ms / 1000, zone)
    return int(datetime(here.year, here.month, 1, tzinfo=zone).timestamp() * 1000)


def _month_end(t_ms: int, zone: ZoneInfo) -> int:
    """The first instant (ms) of the month after the one holding `t_ms`, in `zone`."""
    here = datetime.fromtimestamp(t_ms / 1000, zone)
    year, month = (here.year + 1, 1) if here.month == 12 else (here.year, here.month + 1)
    return int(datetime(year, month, 1, tzinfo=zone).timestamp() * 1000)


@dataclass(frozen=True)
class BillLine:
    """One line of a bill: what, how much (Wh or credit base units), at what price, the amount
    (positive: the member pays; negative: the member is paid). `amount` is None for a line
    given in credits only (no `credit_price` in the tariff)."""

    label: str
    quantity: str
    price: str
    amount: Decimal | None


@dataclass(frozen=True)
class Bill:
    """A member's bill for one month."""

    account: MemberMonth
    lines: tuple[BillLine, ...]
    total: Decimal
    currency: str


def credits_text(base_units: int, decimals: int = 18) -> str:
    """Credit base units as people read them (`12.5`, `0`)."""
    text = format(Decimal(base_units).scaleb(-decimals), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def kwh_text(wh: int) -> str:
    return f"{Decimal(wh) / 1000:.3f} kWh"


def bill(account: MemberMonth, tariff: Tariff, credit_decimals: int = 18) -> Bill:
    """The month's bill: each line's amount is quantity × price, rounded half up to the tariff's
    decimals; the total is the sum of the rounded lines."""
    # Enough digits that no product of chain figures (uint64 Wh, uint256 credit units) and
    # tariff prices is ever rounded before the one rounding per line.
    with localcontext() as ctx:
        ctx.prec = 200
        try:
            return _bill(account, tariff, credit_decimals)
        except DecimalException as exc:
            raise CommunityError(
                f"{account.month} {account.name}: the bill cannot be computed "
                f"({exc.__class__.__name__}): its figures are out of range"
            ) from None


def _bill(account: MemberMonth, tariff: Tariff, credit_decimals: int) -> Bill:
    step = Decimal(1).scaleb(-tariff.decimals)
    cur = tariff.currency

    def money(value: Decimal) -> Decimal:
        return value.quantize(step, rounding=ROUND_HALF_UP)

    def energy(label: str, wh: int, price: Decimal, sign: int) -> BillLine:
        amount = money(Decimal(wh) * price / 1000)
        return BillLine(label, kwh_text(wh), f"{price} {cur}/kWh", _signed(amount, sign))

    def credit_line(label: str, wh: int, base_units: int, sign: int) -> BillLine:
        quantity = f"{kwh_text(wh)}, {credits_text(base_units, credit_decimals)} credits"
        if tariff.credit_price is None:
            return BillLine(label, quantity, "in credits", None)
        value = Decimal(base_units).scaleb(-credit_decimals) * tariff.credit_price
        return BillLine(
            label, quantity, f"{tariff.credit_price} {cur}/credit", _signed(money(value), sign)
        )

    lines = [
        energy("Local energy allocated to you", account.allocated, tariff.local_price, 1),
        energy("Your production allocated to members", account.supplied, tariff.producer, -1),
        energy("Surplus sold", account.surplus, tariff.surplus_price, -1),
        credit_line("Peer-to-peer purchases", account.settled_bought_wh, account.settled_paid, 1),
        credit_line("Peer-to-peer sales", account.settled_sold_wh, account.settled_received, -1),
    ]
    if account.periods and tariff.monthly_fee:
        lines.append(_fee_line(account, tariff.monthly_fee, money, cur))
    total = sum((line.amount for line in lines if line.amount is not None), Decimal(0))
    return Bill(account, tuple(lines), money(total), cur)


def _fee_line(
    account: MemberMonth, fee: Decimal, money: Callable[[Decimal], Decimal], cur: str
) -> BillLine:
    """The monthly fee, pro rata of the month's periods in the billed range (prorata temporis,
    as a supplier bills a subscription): two bills that split a month charge it once."""
    price = f"{money(fee)} {cur}/month"
    whole = account.month_periods
    if not whole or account.periods >= whole:
        return BillLine("Monthly fee", "1 month", price, money(fee))
    day_ms = 86_400_000

    def days(periods: int) -> str:
        value = Decimal(periods * account.period_ms) / day_ms
        return f"{value.quantize(Decimal('0.01')).normalize():f}"

    quantity = f"{days(account.periods)} of {days(whole)} days"
    return BillLine("Monthly fee", quantity, price, money(fee * account.periods / whole))


def _signed(amount: Decimal, sign: int) -> Decimal:
    """`amount` with `sign`, never a negative zero (a bill shows 0.00, not -0.00)."""
    return -amount if sign < 0 and amount else amount


def utc_text(t_ms: int) -> str:
    """A period start as the CSV files write it: ISO 8601, UTC, to the second."""
    return datetime.fromtimestamp(t_ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
