"""The node's market policy (each refusal), its buy trigger and window, and the `[market]` keys
as check-config sees them."""

from __future__ import annotations

from typing import Any

import pytest
from eth_hash.auto import keccak

from daisee_node.config import parse_config
from daisee_node.errors import ConfigError
from daisee_node.ledger.market import Order
from daisee_node.ledger.settings import BuyEntry, MarketSection
from daisee_node.market_node import BuyTrigger, Policy, buy_window, credit_units
from daisee_node.readings import Quality, Reading

MARKET = "0x" + "11" * 20
BUYER = "0x" + "ab" * 20
STRANGER = "0x" + "cd" * 20
NOW = 1_767_225_600_000  # 2026-01-01 00:00 UTC
UNIT = 10**18


def order(
    buyer: str = BUYER,
    amount_wh: int = 500,
    price: float = 0.5,
    mode: int = 0,
    seller_channel: bytes = b"\0" * 32,
) -> Order:
    return Order(
        7,
        buyer=buyer,
        amount_wh=amount_wh,
        mode=mode,
        state=1,
        seller="0x" + "ee" * 20,
        t0=NOW + 3_600_000,
        t1=NOW + 7_200_000,
        price=credit_units(price, 18),
        delivered_wh=0,
        open_disputes=0,
        seller_channel=seller_channel,
        buyer_channel=b"\0" * 32 if mode == 0 else keccak(b"line.import_wh"),
    )


def policy(latest: dict[str, Reading] | None = None, **keys: Any) -> Policy:
    settings = MarketSection(address=MARKET, **keys)
    return Policy(settings, {BUYER: "b"}, latest or {})


def soc(value: float, age_ms: int = 1000) -> dict[str, Reading]:
    return {"battery.soc_pct": Reading("battery.soc_pct", NOW - age_ms, value)}


def test_nothing_is_accepted_by_default() -> None:
    assert policy().refusal(order(), 0, NOW) == "buyer peer 'b' is not in market.accept_from"


def test_buyers_are_named_by_peer_id_or_address() -> None:
    assert policy(accept_from=["b"]).refusal(order(), 0, NOW) is None
    assert policy(accept_from=[BUYER.upper().replace("0X", "0x")]).refusal(order(), 0, NOW) is None
    why = policy(accept_from=["b"]).refusal(order(buyer=STRANGER), 0, NOW)
    assert why == f"buyer {STRANGER} is not in market.accept_from"


def test_a_price_below_the_minimum_is_refused() -> None:
    p = policy(accept_from=["b"], min_price=0.6)
    assert p.refusal(order(price=0.5), 0, NOW) == (
        "price 0.5 credits/kWh is below market.min_price 0.6"
    )
    assert p.refusal(order(price=0.6), 0, NOW) is None


def test_a_low_or_unknown_battery_is_refused() -> None:
    keys: dict[str, Any] = {
        "accept_from": ["b"],
        "keep_battery_above_pct": 30,
        "battery_channel": "battery.soc_pct",
    }
    assert policy(soc(29.6), **keys).refusal(order(), 0, NOW) == (
        "battery at 30 % is below market.keep_battery_above_pct 30 %"
    )
    assert policy(soc(30.0), **keys).refusal(order(), 0, NOW) is None
    unknown = "battery level unknown (battery.soc_pct has no recent good reading)"
    assert policy({}, **keys).refusal(order(), 0, NOW) == unknown
    assert policy(soc(80.0, age_ms=120_000), **keys).refusal(order(), 0, NOW) == unknown


def test_the_daily_limit_counts_what_is_already_accepted() -> None:
    p = policy(accept_from=["b"], max_wh_per_day=1000)
    assert p.refusal(order(amount_wh=500), 500, NOW) is None
    assert p.refusal(order(amount_wh=500), 501, NOW) == (
        "500 Wh more would exceed market.max_wh_per_day 1000 "
        "(501 Wh already accepted for 2026-01-01)"
    )


def test_a_line_order_is_accepted_on_the_nodes_own_line_counter_only() -> None:
    ours = keccak(b"line.export_wh")
    assert policy(accept_from=["b"]).refusal(order(mode=1, seller_channel=ours), 0, NOW) == (
        "a LINE order, and this node has no market.line_meter"
    )
    p = policy(accept_from=["b"], line_meter="line.export_wh")
    assert p.refusal(order(mode=1, seller_channel=ours), 0, NOW) is None
    other = keccak(b"pv.energy_wh")
    assert p.refusal(order(mode=1, seller_channel=other), 0, NOW) == (
        "a LINE order on a channel other than market.line_meter 'line.export_wh'"
    )
    # the other terms still apply to LINE orders
    why = p.refusal(order(mode=1, seller_channel=ours, buyer=STRANGER), 0, NOW)
    assert why == f"buyer {STRANGER} is not in market.accept_from"


def entry(**keys: Any) -> BuyEntry:
    base: dict[str, Any] = {
        "name": "low",
        "when": "battery.soc_pct < 20",
        "seller": "b",
        "amount_wh": 500,
        "max_price": 1.0,
        "window_min": 30,
    }
    return BuyEntry(**{**base, **keys})


def test_the_buy_trigger_fires_while_its_condition_holds_and_no_order_is_open() -> None:
    latest = soc(50.0)
    trigger = BuyTrigger([entry()], latest)
    assert trigger.due(set(), NOW, mono=0.0) == []
    latest.update(soc(19.0))
    assert [e.name for e in trigger.due(set(), NOW, mono=0.0)] == ["low"]
    assert trigger.due({"low"}, NOW, mono=0.0) == []  # one order per entry at a time
    trigger.failed("low", mono=0.0)  # a refused purchase waits before it tries again
    assert trigger.due(set(), NOW, mono=10.0) == []
    assert [e.name for e in trigger.due(set(), NOW, mono=31.0)] == ["low"]


def test_the_buy_trigger_ignores_old_bad_and_missing_inputs() -> None:
    latest = soc(10.0, age_ms=61_000)
    trigger = BuyTrigger([entry(when="battery.soc_pct < 20 and grid.power_w > 0")], latest)
    assert trigger.due(set(), NOW, mono=0.0) == []  # missing grid.power_w, old soc
    latest.update(soc(10.0))
    latest["grid.power_w"] = Reading("grid.power_w", NOW, 5.0, quality=Quality.OUT_OF_RANGE)
    assert trigger.due(set(), NOW, mono=0.0) == []  # a bad reading
    latest["grid.power_w"] = Reading("grid.power_w", NOW, 5.0)
    assert len(trigger.due(set(), NOW, mono=0.0)) == 1


def test_a_purchase_window_is_whole_periods_after_the_lead_time() -> None:
    period = 900_000
    t0, t1 = buy_window(entry(lead_s=60, window_min=30), NOW + 1, period)
    assert (t0, t1) == (NOW + period, NOW + 3 * period)
    t0, t1 = buy_window(entry(lead_s=0, window_min=1), NOW, period)
    assert t0 > NOW and t0 % period == 0 and t1 == t0 + period


MARKET_NODE = f"""
[node]
id = "a"
[[sensors]]
name = "battery"
kind = "simulated"
model = "battery"
[[sensors]]
name = "grid"
kind = "simulated"
model = "grid"
[mqtt]
host = "127.0.0.1"
[[peers]]
id = "b"
address = "{BUYER}"
[[relays]]
name = "supply"
pin = 5
[[rules]]
name = "sell"
when = "market.order_active == 1"
then = {{ relay = "supply", state = "on" }}
otherwise = {{ relay = "supply", state = "off" }}
"""
CHAIN = f"""
[chain]
rpc_url = "http://127.0.0.1:8545"
ledger_address = "0x{"22" * 20}"
"""


def problems_of(text: str) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    return {p.path: p.message for p in info.value.problems}


def test_market_inputs_and_keys_are_checked_with_their_paths() -> None:
    market = f"""
[market]
address = "{MARKET}"
accept_from = ["b", "c", "{STRANGER}"]
battery_channel = "battery.soc_pct"
keep_battery_above_pct = 40
seller_meter = "grid.export_wh"
buyer_meter = "grid.import_wh"
[[market.buy]]
name = "low"
when = "battery.soc_pct < 20 and peer.b.pv.power_w > 500"
seller = "b"
amount_wh = 500
max_price = 1.5
window_min = 30
"""
    config = parse_config(MARKET_NODE + CHAIN + market.replace('"c", ', ""))
    assert config.market is not None and config.market.buy[0].amount_wh == 500
    assert problems_of(MARKET_NODE + market.replace('"c", ', "")) == {
        "market": "the market is on the chain, with the node key: add [chain]"
    }
    assert problems_of(MARKET_NODE + CHAIN + market) == {
        "market.accept_from[1]": "'c' is neither a [[peers]] id (declared: b) nor a 0x… address"
    }
    bad = (
        market.replace('"c", ', "")
        .replace("battery.soc_pct < 20", "battery.soc < 20")
        .replace('seller = "b"', 'seller = "z"')
        .replace('"grid.export_wh"', '"grid.exported_wh"')
    )
    found = problems_of(MARKET_NODE + CHAIN + bad)
    assert found == {
        "market.buy[0].when": "unknown channel(s): battery.soc",
        "market.buy[0].seller": "'z' is not a declared peer (declared: b); add it to [[peers]]",
        "market.seller_meter": "no sensor publishes 'grid.exported_wh'; did you mean "
        "'grid.export_wh'?",
    }


def test_a_line_purchase_needs_the_line_counter() -> None:
    market = f"""
[market]
address = "{MARKET}"
[[market.buy]]
name = "low"
when = "battery.soc_pct < 20"
seller = "b"
amount_wh = 500
max_price = 1.5
window_min = 30
mode = "line"
"""
    assert problems_of(MARKET_NODE + CHAIN + market) == {
        "market.buy[0].mode": "buying over the line needs market.line_meter, the line's counter "
        "at this end, e.g. 'line.import_wh'"
    }
    metered = market.replace("[[market.buy]]", 'line_meter = "grid.import_wh"\n[[market.buy]]')
    config = parse_config(MARKET_NODE + CHAIN + metered)
    assert config.market is not None and config.market.buy[0].mode == "line"
    wrong = metered.replace('line_meter = "grid.import_wh"', 'line_meter = "line.import_wh"')
    assert problems_of(MARKET_NODE + CHAIN + wrong) == {
        "market.line_meter": "no sensor publishes 'line.import_wh'; did you mean 'grid.import_wh'?"
    }


def test_market_inputs_without_a_market_are_a_rule_error() -> None:
    assert problems_of(MARKET_NODE) == {
        "rules[0].when": "market.order_active: the market's inputs need a [market] section"
    }
