"""Allocation of a community's local production to its members, one settlement period at a time.

A pure function of integer Wh: the committed import (consumption) and export (production) of each
member in a period, the peer-to-peer trades of that period and the community's key. Peer-to-peer
energy is taken first (from the seller's production and the buyer's consumption); the key shares
the rest. Each member gets at most its consumption, the members together at most the production,
and every split of a whole number of Wh into parts rounds the same way (`apportion`), so the
result depends on nothing but the data: not member order, not the platform, not float rounding
(there are no floats on this path).

`Allocator.allocate_period` is the fast form (sequences aligned with `Allocator.members`, the
member ids sorted); `Allocator.allocate` takes mappings keyed by member id.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from math import lcm

from daisee_node.community.keys import (
    AnyKey,
    EqualKey,
    ProrataKey,
    StaticKey,
    TiersKey,
    member_id,
)
from daisee_node.errors import DaiseeError

Wh = Sequence[int]


class AllocationError(DaiseeError):
    """Period data the allocation cannot use (negative Wh, unknown member, wrong length)."""


@dataclass(frozen=True, slots=True)
class Trade:
    """Energy a peer-to-peer order delivered in the period: `wh` from `seller` to `buyer`."""

    buyer: str
    seller: str
    wh: int


@dataclass(frozen=True, slots=True)
class MemberAllocation:
    """One member's figures for one period, all in Wh.

    `grid_import = consumption - p2p_bought - allocated` and
    `surplus = production - p2p_sold - (its part of what the key allocated)`."""

    consumption: int
    production: int
    p2p_bought: int
    p2p_sold: int
    allocated: int
    grid_import: int
    surplus: int


@dataclass(frozen=True, slots=True)
class PeriodAllocation:
    """A period's result, one tuple per figure, each aligned with `members` (sorted ids)."""

    members: tuple[str, ...]
    consumption: tuple[int, ...]
    production: tuple[int, ...]
    p2p_bought: tuple[int, ...]
    p2p_sold: tuple[int, ...]
    allocated: tuple[int, ...]
    grid_import: tuple[int, ...]
    surplus: tuple[int, ...]

    def by_member(self) -> dict[str, MemberAllocation]:
        """The same figures keyed by member id."""
        return {
            m: MemberAllocation(*row)
            for m, *row in zip(
                self.members,
                self.consumption,
                self.production,
                self.p2p_bought,
                self.p2p_sold,
                self.allocated,
                self.grid_import,
                self.surplus,
                strict=True,
            )
        }


def apportion(total: int, weights: Wh, denom: int, place: int) -> list[int]:
    """Integer parts of the quotas `total * w / denom`, `place` Wh in all (the remainder rule).

    Each part is its quota rounded down; the `place - sum(floors)` Wh left go one each to the
    largest remainders, ties to the lower index (the lower member id: indices follow sorted
    ids). `place` must lie between the sum of the floors and the sum of the quotas, so every
    part is its quota rounded down or up, and a part whose quota is a whole number is exact.
    """
    shares = [total * w // denom for w in weights]
    left = place - sum(shares)
    if left:
        rems = [total * w % denom for w in weights]
        # sorted(reverse=True) is stable: equal remainders keep index order.
        for i in sorted(range(len(rems)), key=rems.__getitem__, reverse=True)[:left]:
            shares[i] += 1
    return shares


# A key, compiled for a fixed member order: (consumption, total consumption, production) →
# the allocation (returns `consumption` itself when everyone is served in full).
_KeyFn = Callable[[Wh, int, int], Wh]


class Allocator:
    """One community and its key, ready to allocate period after period.

    Members are the ids given plus any the key names (a member in a static key keeps its share
    even in a period it has no data for), sorted; period data is aligned with `members`."""

    def __init__(self, key: AnyKey, members: Iterable[str]) -> None:
        named: set[str] = set()
        if isinstance(key, StaticKey):
            named = set(key.coefficients)
        elif isinstance(key, TiersKey):
            named = {m for tier in key.tiers for m in tier}
        self.key = key
        self.members: tuple[str, ...] = tuple(sorted({member_id(m) for m in members} | named))
        self._index = {m: i for i, m in enumerate(self.members)}
        self._zeros: tuple[int, ...] = (0,) * len(self.members)
        self._fn = self._compile(key)

    def _compile(self, key: AnyKey) -> _KeyFn:
        zeros = self._zeros
        if isinstance(key, ProrataKey):
            return _prorata
        if isinstance(key, EqualKey):
            return _equal
        if isinstance(key, StaticKey):
            coefficients = [key.coefficients.get(m, Fraction(0)) for m in self.members]
            denom = lcm(*(c.denominator for c in coefficients))
            weights = [c.numerator * (denom // c.denominator) for c in coefficients]
            return _static(weights, denom, zeros)
        if isinstance(key, TiersKey):
            listed = {m for tier in key.tiers for m in tier}
            rest = [m for m in self.members if m not in listed]
            tiers = [sorted(self._index[m] for m in tier) for tier in [*key.tiers, rest] if tier]
            return _tiers(tiers, zeros)
        raise TypeError(f"unknown key {key!r}")  # pragma: no cover - the union is closed

    def allocate_period(
        self, consumption: Wh, production: Wh, trades: Iterable[Trade] = ()
    ) -> PeriodAllocation:
        """Allocate one period: committed import and export per member (aligned with
        `members`) and the period's delivered peer-to-peer trades."""
        n = len(self.members)
        cons = tuple(consumption)
        prod = tuple(production)
        if len(cons) != n or len(prod) != n:
            raise AllocationError(
                f"expected {n} consumption and production values, got {len(cons)} and {len(prod)}"
            )
        if n and (min(cons) < 0 or min(prod) < 0):
            raise AllocationError("consumption and production must be ≥ 0 Wh")
        bought = sold = self._zeros
        net_cons, net_prod = cons, prod
        trades = tuple(trades)
        if trades:
            net_cons, net_prod, bought, sold = self._p2p(cons, prod, trades)
        total_cons = sum(net_cons)
        total_prod = sum(net_prod)
        # A float or Fraction anywhere makes its sum one too: the check costs nothing.
        if type(total_cons) is not int or type(total_prod) is not int:
            raise AllocationError("consumption and production must be whole Wh (int)")
        allocated = tuple(self._fn(net_cons, total_cons, total_prod))
        if allocated is net_cons:
            grid = self._zeros
        elif total_prod == 0 or not any(allocated):
            grid = net_cons
        else:
            grid = tuple([c - a for c, a in zip(net_cons, allocated, strict=True)])
        used = sum(allocated)
        if used == 0:
            surplus = net_prod
        elif used == total_prod:
            surplus = self._zeros
        else:
            # Producers' share of what was used: pro rata of what each offered, same rounding.
            taken = apportion(used, net_prod, total_prod, used)
            surplus = tuple([p - t for p, t in zip(net_prod, taken, strict=True)])
        return PeriodAllocation(self.members, cons, prod, bought, sold, allocated, grid, surplus)

    def allocate(
        self,
        consumption: Mapping[str, int],
        production: Mapping[str, int],
        trades: Iterable[Trade] = (),
    ) -> PeriodAllocation:
        """`allocate_period` from mappings keyed by member id (a member left out has 0 Wh)."""
        cons = [0] * len(self.members)
        prod = [0] * len(self.members)
        for values, target in ((consumption, cons), (production, prod)):
            for member, wh in values.items():
                target[self._position(member)] = wh
        return self.allocate_period(cons, prod, trades)

    def _position(self, member: str) -> int:
        try:
            return self._index[member_id(member)]
        except (KeyError, ValueError):
            raise AllocationError(f"{member!r} is not a member of this community") from None

    def _p2p(
        self, cons: tuple[int, ...], prod: tuple[int, ...], trades: tuple[Trade, ...]
    ) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """Take peer-to-peer deliveries off the seller's production and the buyer's consumption.

        A trade is capped at what the seller still offers and the buyer still consumes, trades
        taken in (seller, buyer, Wh) order, so the data alone decides which trade falls short."""
        net_cons = list(cons)
        net_prod = list(prod)
        bought = [0] * len(cons)
        sold = [0] * len(cons)
        placed = sorted((self._position(t.seller), self._position(t.buyer), t.wh) for t in trades)
        for s, b, wh in placed:
            if wh < 0:
                raise AllocationError("a trade's Wh must be ≥ 0")
            if s == b:
                raise AllocationError(f"{self.members[s]!r} trades with itself")
            delivered = min(wh, net_prod[s], net_cons[b])
            net_prod[s] -= delivered
            net_cons[b] -= delivered
            sold[s] += delivered
            bought[b] += delivered
        return tuple(net_cons), tuple(net_prod), tuple(bought), tuple(sold)


def _prorata(cons: Wh, total_cons: int, prod: int) -> Wh:
    # D315-6: alloc_i = min(c_i, P·c_i/C). When P ≥ C that is c_i; otherwise P·c_i/C < c_i and
    # the quotas add up to exactly P.
    if prod >= total_cons:
        return cons
    if prod == 0:
        return (0,) * len(cons)
    return apportion(prod, cons, total_cons, prod)


def _equal(cons: Wh, total_cons: int, prod: int) -> Wh:
    # Equal shares with redistribution until nothing more can be placed converge to
    # alloc_i = min(c_i, λ) with Σ alloc_i = P (water filling). Serve the smallest consumers in
    # full while the equal share of what is left covers them; the others get that equal share.
    if prod >= total_cons:
        return cons
    n = len(cons)
    if prod == 0:
        return (0,) * n
    order = sorted(range(n), key=cons.__getitem__)
    alloc = [0] * n
    left = prod
    for k, i in enumerate(order):
        c = cons[i]
        if c * (n - k) <= left:
            alloc[i] = c
            left -= c
            continue
        rest = order[k:]
        level, extra = divmod(left, n - k)
        for j in rest:
            alloc[j] = level
        # Equal remainders: the remainder rule gives the extra Wh to the lowest ids.
        for j in sorted(rest)[:extra]:
            alloc[j] += 1
        break
    return alloc


def _static(weights: list[int], denom: int, zeros: tuple[int, ...]) -> _KeyFn:
    share_total = sum(weights)

    def static(cons: Wh, total_cons: int, prod: int) -> Wh:
        # share_i = P·f_i rounded by the remainder rule (floor(P·Σf) Wh in all), then capped at
        # c_i; what a member cannot use stays unallocated (surplus), as in a static key.
        if prod == 0 or total_cons == 0:
            return zeros
        shares = apportion(prod, weights, denom, prod * share_total // denom)
        return [s if s < c else c for s, c in zip(shares, cons, strict=True)]

    return static


def _tiers(tiers: list[list[int]], zeros: tuple[int, ...]) -> _KeyFn:
    def tiered(cons: Wh, total_cons: int, prod: int) -> Wh:
        # Tier by tier: a tier that can be served in full is; the first that cannot shares what
        # is left pro rata of its members' consumption (the default key within the tier).
        if prod >= total_cons:
            return cons
        if prod == 0:
            return zeros
        alloc = [0] * len(cons)
        left = prod
        for tier in tiers:
            tier_cons = [cons[i] for i in tier]
            need = sum(tier_cons)
            if need <= left:
                for i in tier:
                    alloc[i] = cons[i]
                left -= need
                continue
            for i, share in zip(tier, apportion(left, tier_cons, need, left), strict=True):
                alloc[i] = share
            break
        return alloc

    return tiered
