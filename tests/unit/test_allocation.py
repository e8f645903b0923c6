"""Allocation keys: cases worked by hand from each key's published rule, then properties that must
hold for any data (hypothesis), then key files and their hash.

Hand-worked cases write the arithmetic in comments; the expected numbers come from that
arithmetic, not from running the code.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daisee_node.community import (
    AllocationError,
    Allocator,
    PeriodAllocation,
    Trade,
    apportion,
    canonical_json,
    key_hash,
    load_key,
    parse_key,
)
from daisee_node.community.keys import AnyKey, StaticKey, TiersKey
from daisee_node.errors import ConfigError

PRORATA = parse_key({"kind": "prorata"})
EQUAL = parse_key({"kind": "equal"})


def run(
    key: AnyKey,
    consumption: dict[str, int],
    production: dict[str, int],
    trades: list[Trade] | None = None,
) -> dict[str, Any]:
    """Allocate one period; {member: MemberAllocation}."""
    allocator = Allocator(key, [*consumption, *production])
    return allocator.allocate(consumption, production, trades or []).by_member()


def figures(result: dict[str, Any], field: str) -> dict[str, int]:
    return {m: getattr(row, field) for m, row in result.items()}


# --- the remainder rule -----------------------------------------------------------------


def test_apportion_floors_then_gives_left_wh_to_largest_remainders_ties_to_lower_index() -> None:
    # 7 Wh by weights 3, 5, 2 (sum 10): quotas 2.1, 3.5, 1.4 → floors 2, 3, 1 (6 Wh);
    # 1 Wh left goes to the largest remainder, 0.5 (index 1).
    assert apportion(7, [3, 5, 2], 10, 7) == [2, 4, 1]
    # 2 Wh by equal weights 1, 1, 1: quotas 2/3 each, floors 0; the 2 Wh left go to the two
    # lowest indices (equal remainders).
    assert apportion(2, [1, 1, 1], 3, 2) == [1, 1, 0]
    # Equal remainders at the top: 5 Wh by 1, 2, 2, 1 (sum 6): quotas 5/6, 10/6, 10/6, 5/6 →
    # floors 0, 1, 1, 0 (2 Wh); remainders 5/6, 4/6, 4/6, 5/6: 3 Wh left go to index 0 and 3
    # (5/6), then index 1 (4/6, lower index than 2).
    assert apportion(5, [1, 2, 2, 1], 6, 5) == [1, 2, 1, 1]


# --- the French default key (D315-6): pro rata of consumption, capped at it -------------


def test_prorata_production_above_consumption_serves_everyone_in_full() -> None:
    # P = 100 ≥ C = 30 + 50 + 20 = 100: each gets its consumption; nothing imported, no surplus.
    r = run(PRORATA, {"a": 30, "b": 50, "c": 20}, {"p": 100})
    assert figures(r, "allocated") == {"a": 30, "b": 50, "c": 20, "p": 0}
    assert figures(r, "grid_import") == {"a": 0, "b": 0, "c": 0, "p": 0}
    assert figures(r, "surplus") == {"a": 0, "b": 0, "c": 0, "p": 0}


def test_prorata_shares_exactly_when_quotas_are_whole() -> None:
    # P = 60, C = 100: a 60·30/100 = 18, b 60·50/100 = 30, c 60·20/100 = 12 (sum 60).
    r = run(PRORATA, {"a": 30, "b": 50, "c": 20}, {"p": 60})
    assert figures(r, "allocated") == {"a": 18, "b": 30, "c": 12, "p": 0}
    # grid import = consumption − allocated: 12, 20, 8.
    assert figures(r, "grid_import") == {"a": 12, "b": 20, "c": 8, "p": 0}
    assert r["p"].surplus == 0


def test_prorata_rounds_by_largest_remainder() -> None:
    # P = 7, C = 3 + 5 + 2 = 10: quotas 2.1, 3.5, 1.4 → 2, 3, 1 and the 7th Wh to b (0.5).
    r = run(PRORATA, {"a": 3, "b": 5, "c": 2}, {"p": 7})
    assert figures(r, "allocated") == {"a": 2, "b": 4, "c": 1, "p": 0}


def test_prorata_equal_remainders_go_to_lower_member_ids_whatever_the_order_given() -> None:
    # P = 2, C = 3 (1 Wh each): quotas 2/3 each → 0 each, 2 Wh left, equal remainders:
    # the two lowest ids, "a" and "b", get 1 Wh; "c" none. Given in reverse order: the same.
    forward = run(PRORATA, {"a": 1, "b": 1, "c": 1}, {"p": 2})
    backward = run(PRORATA, {"c": 1, "b": 1, "a": 1}, {"p": 2})
    assert figures(forward, "allocated") == {"a": 1, "b": 1, "c": 0, "p": 0}
    assert figures(backward, "allocated") == figures(forward, "allocated")


def test_surplus_is_apportioned_among_producers_pro_rata_of_what_they_offered() -> None:
    # p1 offers 30, p2 offers 10 (P = 40); a consumes 25: a gets 25 (P ≥ C).
    # Used 25 Wh, taken from producers pro rata: p1 25·30/40 = 18.75, p2 25·10/40 = 6.25 →
    # floors 18 and 6, 1 Wh left to p1 (0.75): p1 gives 19, p2 6.
    # Surplus: p1 30 − 19 = 11, p2 10 − 6 = 4.
    r = run(PRORATA, {"a": 25}, {"p1": 30, "p2": 10})
    assert r["a"].allocated == 25
    assert (r["p1"].surplus, r["p2"].surplus) == (11, 4)


def test_prosumer_is_a_member_like_any_other() -> None:
    # m imports 10 and exports 0; n imports 0 and exports 50 in the same period (net meters).
    # P = 50 ≥ C = 10: m gets 10; n's surplus 50 − 10 = 40.
    r = run(PRORATA, {"m": 10, "n": 0}, {"n": 50})
    assert (r["m"].allocated, r["m"].grid_import, r["n"].surplus) == (10, 0, 40)


def test_no_production_means_everything_from_the_grid() -> None:
    r = run(PRORATA, {"a": 7, "b": 0}, {})
    assert figures(r, "allocated") == {"a": 0, "b": 0}
    assert figures(r, "grid_import") == {"a": 7, "b": 0}


# --- peer-to-peer energy first ----------------------------------------------------------


def test_p2p_is_taken_before_the_key_shares_the_rest() -> None:
    # p exports 100; a and b import 60 each; a bought 30 Wh from p in a P2P order.
    # After P2P: p offers 70, a needs 30, b needs 60 (C = 90 > 70).
    # Pro rata: a 70·30/90 = 23.33, b 70·60/90 = 46.67 → 23, 46, 1 Wh left to b (0.67): 23, 47.
    # Grid import: a 60 − 30 − 23 = 7; b 60 − 47 = 13. p sold 30; surplus 70 − 70 = 0.
    r = run(PRORATA, {"a": 60, "b": 60}, {"p": 100}, [Trade(buyer="a", seller="p", wh=30)])
    assert (r["a"].p2p_bought, r["p"].p2p_sold) == (30, 30)
    assert (r["a"].allocated, r["b"].allocated) == (23, 47)
    assert (r["a"].grid_import, r["b"].grid_import) == (7, 13)
    assert r["p"].surplus == 0
    # The committed figures are reported as they are.
    assert (r["a"].consumption, r["p"].production) == (60, 100)


def test_p2p_trade_is_capped_at_what_seller_offers_and_buyer_consumes() -> None:
    # Sold 150 Wh but p exported 100 and a imported 60: delivered min(150, 100, 60) = 60.
    # Then p offers 40; a needs 0, b needs 60: b gets 40 (P < C, b alone).
    r = run(PRORATA, {"a": 60, "b": 60}, {"p": 100}, [Trade(buyer="a", seller="p", wh=150)])
    assert (r["a"].p2p_bought, r["p"].p2p_sold) == (60, 60)
    assert (r["a"].allocated, r["b"].allocated, r["b"].grid_import) == (0, 40, 20)


def test_p2p_shortfall_falls_on_trades_in_seller_buyer_order() -> None:
    # p exported 50; orders: b buys 40, a buys 40 (given in that order). Trades are taken in
    # (seller, buyer) order: a first gets 40, then b gets min(40, 50 − 40) = 10.
    r = run(
        PRORATA,
        {"a": 100, "b": 100},
        {"p": 50},
        [Trade(buyer="b", seller="p", wh=40), Trade(buyer="a", seller="p", wh=40)],
    )
    assert (r["a"].p2p_bought, r["b"].p2p_bought, r["p"].p2p_sold) == (40, 10, 50)


# --- static coefficients ----------------------------------------------------------------


def test_static_key_does_not_give_a_members_unused_share_to_others() -> None:
    # Coefficients a 1/2, b 3/10, c 1/5; P = 100: shares 50, 30, 20.
    # Consumption a 20, b 40, c 30: a takes 20 (capped), b 30, c 20. a's unused 30 Wh are not
    # given to b or c (who still import 10 each): they are surplus.
    key = parse_key({"kind": "static", "coefficients": {"a": 0.5, "b": "0.3", "c": "20%"}})
    r = run(key, {"a": 20, "b": 40, "c": 30}, {"p": 100})
    assert figures(r, "allocated") == {"a": 20, "b": 30, "c": 20, "p": 0}
    assert figures(r, "grid_import") == {"a": 0, "b": 10, "c": 10, "p": 0}
    assert r["p"].surplus == 30


def test_static_key_below_one_leaves_the_rest_unallocated_and_rounds_the_pot_down() -> None:
    # a 1/3, b 1/3 (2/3 in all). P = 11: quotas 11/3 = 3.67 each; pot floor(22/3) = 7;
    # floors 3 + 3 = 6, 1 Wh left, equal remainders → a. a 4, b 3; surplus 11 − 7 = 4.
    key = parse_key({"kind": "static", "coefficients": {"a": "1/3", "b": "1/3"}})
    r = run(key, {"a": 100, "b": 100}, {"p": 11})
    assert (r["a"].allocated, r["b"].allocated, r["p"].surplus) == (4, 3, 4)
    # P = 10: quotas 10/3 = 3.33 each; pot floor(20/3) = 6 = floors: a 3, b 3; surplus 4.
    r = run(key, {"a": 100, "b": 100}, {"p": 10})
    assert (r["a"].allocated, r["b"].allocated, r["p"].surplus) == (3, 3, 4)


def test_static_key_member_without_data_still_holds_its_share() -> None:
    # z (1/2) is in the key but sent no data this period: its 50 Wh of P = 100 are surplus;
    # a (1/2) gets 50 of its 80.
    key = parse_key({"kind": "static", "coefficients": {"a": "1/2", "z": "1/2"}})
    r = run(key, {"a": 80}, {"p": 100})
    assert (r["a"].allocated, r["z"].allocated, r["p"].surplus) == (50, 0, 50)


# --- priority tiers with redistribution -------------------------------------------------

TIERS = parse_key({"kind": "tiers", "tiers": [["a"], ["c", "b"]]})


def test_tiers_serve_tier_one_first_then_share_pro_rata_within_the_next() -> None:
    # a 40 (tier 1), b 30 and c 10 (tier 2), d 50 (no tier: the last one). P = 60:
    # a takes 40, 20 left; tier 2 needs 40 > 20: b 20·30/40 = 15, c 20·10/40 = 5; d 0.
    r = run(TIERS, {"a": 40, "b": 30, "c": 10, "d": 50}, {"p": 60})
    assert figures(r, "allocated") == {"a": 40, "b": 15, "c": 5, "d": 0, "p": 0}


def test_tiers_pass_what_a_tier_cannot_use_to_the_next() -> None:
    # P = 100: a 40 (60 left), tier 2 in full 40 (20 left), d gets min(20, 50) = 20.
    r = run(TIERS, {"a": 40, "b": 30, "c": 10, "d": 50}, {"p": 100})
    assert figures(r, "allocated") == {"a": 40, "b": 30, "c": 10, "d": 20, "p": 0}
    # P = 200 ≥ C = 130: everyone in full, surplus 70.
    r = run(TIERS, {"a": 40, "b": 30, "c": 10, "d": 50}, {"p": 200})
    assert figures(r, "grid_import") == {"a": 0, "b": 0, "c": 0, "d": 0, "p": 0}
    assert r["p"].surplus == 70


# --- equal shares with redistribution ---------------------------------------------------


def test_equal_shares_redistribute_what_a_member_cannot_use() -> None:
    # a 10, b 50, c 100; P = 90: 30 each; a uses 10, its 20 split between b and c: 40 each.
    # Check: min(10, 40) + min(50, 40) + min(100, 40) = 90.
    r = run(EQUAL, {"a": 10, "b": 50, "c": 100}, {"p": 90})
    assert figures(r, "allocated") == {"a": 10, "b": 40, "c": 40, "p": 0}
    # P = 140: level λ with 10 + min(50, λ) + min(100, λ) = 140 → λ = 80: b 50, c 80.
    r = run(EQUAL, {"a": 10, "b": 50, "c": 100}, {"p": 140})
    assert figures(r, "allocated") == {"a": 10, "b": 50, "c": 80, "p": 0}


def test_equal_shares_give_the_odd_wh_to_the_lower_id() -> None:
    # P = 101: a 10, then b and c share 91: 45.5 each → 45 and 45, the last Wh to b.
    # d consumes nothing and gets nothing.
    r = run(EQUAL, {"a": 10, "b": 50, "c": 100, "d": 0}, {"p": 101})
    assert figures(r, "allocated") == {"a": 10, "b": 46, "c": 45, "d": 0, "p": 0}


# --- bad data ---------------------------------------------------------------------------


def test_bad_period_data_is_refused() -> None:
    allocator = Allocator(PRORATA, ["a", "p"])
    with pytest.raises(AllocationError, match="≥ 0"):
        allocator.allocate({"a": -1}, {"p": 5})
    with pytest.raises(AllocationError, match="not a member"):
        allocator.allocate({"x": 1}, {"p": 5})
    with pytest.raises(AllocationError, match="whole Wh"):
        allocator.allocate({"a": 1.5}, {"p": 5})
    with pytest.raises(AllocationError, match="whole Wh"):
        allocator.allocate({"a": 1}, {"p": Fraction(5, 2)})
    with pytest.raises(AllocationError, match="expected 2"):
        allocator.allocate_period([1], [2])
    with pytest.raises(AllocationError, match="itself"):
        allocator.allocate({"a": 1}, {"a": 5}, [Trade("a", "a", 1)])
    with pytest.raises(AllocationError, match="≥ 0"):
        allocator.allocate({"a": 1}, {"p": 5}, [Trade("a", "p", -1)])


# --- properties -------------------------------------------------------------------------

IDS = ["0x" + f"{i:02x}" * 20 for i in range(1, 9)] + ["alice", "bob", "carol", "zed"]


@st.composite
def communities(
    draw: st.DrawFn,
) -> tuple[AnyKey, list[str], dict[str, int], dict[str, int], list[Trade]]:
    members = draw(st.lists(st.sampled_from(IDS), min_size=1, max_size=8, unique=True))
    wh = st.one_of(st.integers(0, 50), st.integers(0, 10**6))
    consumption = {m: draw(wh) for m in members}
    production = {m: draw(st.one_of(st.just(0), wh)) for m in members}
    trades: list[Trade] = []
    if len(members) > 1:
        pairs = st.tuples(st.sampled_from(members), st.sampled_from(members), st.integers(0, 500))
        for buyer, seller, amount in draw(st.lists(pairs, max_size=4)):
            if buyer != seller:
                trades.append(Trade(buyer, seller, amount))
    kind = draw(st.sampled_from(["prorata", "static", "tiers", "equal"]))
    data: dict[str, Any] = {"kind": kind}
    if kind == "static":
        chosen = draw(st.lists(st.sampled_from(members), min_size=1, unique=True))
        parts = draw(st.lists(st.integers(0, 7), min_size=len(chosen), max_size=len(chosen)))
        denom = max(sum(parts), 1) + draw(st.integers(0, 5))
        data["coefficients"] = {m: f"{p}/{denom}" for m, p in zip(chosen, parts, strict=True)}
    elif kind == "tiers":
        order = draw(st.permutations(members))
        cuts = sorted(draw(st.sets(st.integers(1, len(order)), min_size=1)))
        bounds = [0, *cuts]
        data["tiers"] = [order[a:b] for a, b in itertools.pairwise(bounds) if b > a]
    return parse_key(data), members, consumption, production, trades


def _check_invariants(r: PeriodAllocation, key: AnyKey) -> None:
    net_cons = [c - b for c, b in zip(r.consumption, r.p2p_bought, strict=True)]
    net_prod = [p - s for p, s in zip(r.production, r.p2p_sold, strict=True)]
    fields = (r.consumption, r.production, r.p2p_bought, r.p2p_sold)
    fields += (r.allocated, r.grid_import, r.surplus)
    assert all(type(v) is int and v >= 0 for f in fields for v in f)
    assert sum(r.p2p_bought) == sum(r.p2p_sold)
    assert all(b <= c for b, c in zip(r.p2p_bought, r.consumption, strict=True))
    assert all(s <= p for s, p in zip(r.p2p_sold, r.production, strict=True))
    # Each allocation ≤ what the member still consumes; together ≤ what is still offered.
    assert all(a <= c for a, c in zip(r.allocated, net_cons, strict=True))
    assert sum(r.allocated) <= sum(net_prod)
    for c, b, a, g in zip(r.consumption, r.p2p_bought, r.allocated, r.grid_import, strict=True):
        assert g == c - b - a
    assert all(s <= p for s, p in zip(r.surplus, net_prod, strict=True))
    assert sum(r.surplus) == sum(net_prod) - sum(r.allocated)
    if not isinstance(key, StaticKey):
        # These keys place everything that can be placed.
        assert sum(r.allocated) == min(sum(net_prod), sum(net_cons))


@settings(max_examples=400, deadline=None, database=None)
@given(communities())
def test_allocation_invariants_hold_for_any_data(case: Any) -> None:
    key, members, consumption, production, trades = case
    _check_invariants(Allocator(key, members).allocate(consumption, production, trades), key)


@settings(max_examples=300, deadline=None, database=None)
@given(communities(), st.randoms(use_true_random=False))
def test_allocation_is_independent_of_member_and_trade_order(case: Any, rnd: random.Random) -> None:
    key, members, consumption, production, trades = case
    first = Allocator(key, members).allocate(consumption, production, trades).by_member()
    shuffled = members[:]
    rnd.shuffle(shuffled)
    cons2 = {m: consumption[m] for m in reversed(shuffled)}
    prod2 = {m: production[m] for m in shuffled}
    trades2 = trades[:]
    rnd.shuffle(trades2)
    second = Allocator(key, shuffled).allocate(cons2, prod2, trades2).by_member()
    assert second == first
    # And the same again (no state carried between periods or allocators).
    assert Allocator(key, members).allocate(consumption, production, trades).by_member() == first


@settings(max_examples=300, deadline=None, database=None)
@given(communities())
def test_p2p_comes_first_and_the_key_sees_only_what_is_left(case: Any) -> None:
    key, members, consumption, production, trades = case
    allocator = Allocator(key, members)
    with_trades = allocator.allocate(consumption, production, trades)
    net_cons = [c - b for c, b in zip(with_trades.consumption, with_trades.p2p_bought, strict=True)]
    net_prod = [p - s for p, s in zip(with_trades.production, with_trades.p2p_sold, strict=True)]
    without = allocator.allocate_period(net_cons, net_prod)
    assert with_trades.allocated == without.allocated
    assert with_trades.surplus == without.surplus
    # Delivered P2P never exceeds what the orders asked.
    asked = sum(t.wh for t in trades)
    assert sum(with_trades.p2p_bought) <= asked


@settings(max_examples=300, deadline=None, database=None)
@given(communities())
def test_each_key_follows_its_rule_within_one_wh(case: Any) -> None:
    key, members, consumption, production, _ = case
    r = Allocator(key, members).allocate(consumption, production)
    cons = dict(zip(r.members, r.consumption, strict=True))
    alloc = dict(zip(r.members, r.allocated, strict=True))
    total_p, total_c = sum(r.production), sum(r.consumption)
    if isinstance(key, StaticKey):
        for m, a in alloc.items():
            exact = total_p * key.coefficients.get(m, Fraction(0))
            assert a <= exact + 1 and (a >= exact - 1 or a == cons[m])
    elif isinstance(key, TiersKey):
        listed = [m for tier in key.tiers for m in tier]
        tiers = [*key.tiers, [m for m in r.members if m not in listed]]
        for later, tier in enumerate(tiers):
            if any(alloc[m] for m in tier):
                # Everyone in an earlier tier is served in full before this tier gets anything.
                assert all(alloc[m] == cons[m] for t in tiers[:later] for m in t)
    elif key.kind == "prorata" and total_p < total_c:
        for m, a in alloc.items():
            assert abs(a - Fraction(total_p * cons[m], total_c)) < 1
    elif key.kind == "equal":
        # Nobody left short gets less (by more than the odd Wh) than anybody else.
        short = [alloc[m] for m in r.members if alloc[m] < cons[m]]
        if short:
            assert max(alloc.values()) - min(short) <= 1


# --- key files and their hash -----------------------------------------------------------


def test_canonical_json_is_the_documented_form() -> None:
    # sorted keys, no spaces, fractions reduced, tiers' members sorted, addresses lower case
    key = parse_key({"kind": "tiers", "tiers": [["zed", "0x" + "AB" * 20], ["alice"]]})
    expected = (
        '{"kind":"tiers","name":"","tiers":[["0x' + "ab" * 20 + '","zed"],["alice"]],"version":1}'
    )
    assert canonical_json(key) == expected.encode()
    assert key_hash(key) == "0x" + hashlib.sha256(expected.encode()).hexdigest()


def test_key_hash_depends_on_meaning_not_spelling(tmp_path: Path) -> None:
    toml = tmp_path / "key.toml"
    toml.write_text(
        'kind = "static"\nname = "roof"\n[coefficients]\nalice = 0.25\nbob = "75%"\n',
        encoding="utf-8",
    )
    js = tmp_path / "key.json"
    js.write_text(
        json.dumps(
            {"coefficients": {"bob": "3/4", "alice": "1/4"}, "name": "roof", "kind": "static"}
        ),
        encoding="utf-8",
    )
    assert key_hash(load_key(toml)) == key_hash(load_key(js))
    changed = parse_key(
        {"kind": "static", "name": "roof", "coefficients": {"alice": "0.26", "bob": "0.74"}}
    )
    assert key_hash(changed) != key_hash(load_key(toml))
    a = parse_key({"kind": "tiers", "tiers": [["alice"], ["bob"]]})
    b = parse_key({"kind": "tiers", "tiers": [["bob"], ["alice"]]})
    assert key_hash(a) != key_hash(b)


def test_key_file_errors_are_all_listed_with_their_paths(tmp_path: Path) -> None:
    path = tmp_path / "key.toml"
    path.write_text(
        'kind = "static"\ncolour = "red"\n[coefficients]\nalice = 1.5\n"bad id" = "x"\n',
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as caught:
        load_key(path)
    problems = {(p.path, p.message.split(" (")[0]) for p in caught.value.problems}
    assert ("colour", "unknown key") in problems
    assert ("coefficients.alice", "a coefficient lies between 0 and 1") in problems
    assert any(p == 'coefficients."bad id"' and "member id" in m for p, m in problems)
    assert any(p == 'coefficients."bad id"' and "not a number" in m for p, m in problems)


def test_key_file_semantic_errors() -> None:
    with pytest.raises(ConfigError, match="coefficients: coefficients add up to 3/2"):
        parse_key({"kind": "static", "coefficients": {"a": "1/2", "b": 1}})
    with pytest.raises(ConfigError, match="tiers: a member may be in one tier only: a"):
        parse_key({"kind": "tiers", "tiers": [["a"], ["b", "a"]]})
    with pytest.raises(ConfigError, match="unknown kind 'fixed'"):
        parse_key({"kind": "fixed"})
    with pytest.raises(ConfigError, match="version"):
        parse_key({"kind": "equal", "version": 2})


def test_a_float_coefficient_means_its_decimal_spelling() -> None:
    # 0.1 in TOML is the binary float nearest 1/10; the key takes it as exactly 1/10.
    key = parse_key({"kind": "static", "coefficients": {"a": 0.1}})
    assert isinstance(key, StaticKey)
    assert key.coefficients["a"] == Fraction(1, 10)
