"""The DAISEE purchase end to end with two real daemons, mosquitto and anvil: the consumer's
battery is low, its `[[market.buy]]` opens an order to the producer; the producer's node accepts
it by policy, its rule closes the supply relay (mock pins) and opens it again once its own export
counter has counted the ordered Wh; after the window both nodes' committed periods settle the
order, and the buyer's node takes back the rest of the escrow after the grace time."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daisee_node.actuators.mockpins import pin_history
from daisee_node.ledger import market as marketlib
from daisee_node.ledger.keys import new_keystore
from tests.conftest import db_rows, run_cli, wait_for, write_config
from tests.support.broker import Broker
from tests.support.chains import AnvilLedger
from tests.support.clocks import sunny_longitude
from tests.support.market_nodes import at, earn_credits, readings

pytestmark = [pytest.mark.slow, pytest.mark.beside]  # waits on daemons and the chain

PERIOD_S = 10
AMOUNT_WH = 10
PRICE = 1.0  # credits per kWh
UNIT = 10**18
PIN = 17


@pytest.fixture
def node_broker(tmp_path: Path) -> Iterator[Broker]:
    b = Broker(tmp_path, node_logins=("producer", "consumer"))
    b.start()
    yield b
    b.stop()


def node_config(
    tmp_path: Path,
    name: str,
    *,
    chain: AnvilLedger,
    broker: Broker,
    keys: dict[str, tuple[Path, Path, str]],
    market: dict[str, Any],
    simulation: dict[str, Any],
) -> Path:
    other = "consumer" if name == "producer" else "producer"
    keystore, password, _ = keys[name]
    sections: dict[str, Any] = {
        "node": {"id": name, "data_dir": str(tmp_path / f"{name}-data")},
        "store": {"flush_interval_s": 0.05},
        "simulation": {
            "latitude_deg": 0.0,
            "longitude_deg": sunny_longitude(),
            "cloudiness": 0.0,
            "noise_pct": 0.0,
            **simulation,
        },
        "sensors": [
            {"name": m, "kind": "simulated", "model": m, "interval_s": 0.2}
            for m in ("battery", "grid")
        ],
        "gpio": {"backend": "mock"},
        "relays": [{"name": "supply", "pin": PIN, "safe_state": "off"}],
        "rules": [
            {
                "name": "market_supply",
                "when": "market.order_active == 1",
                "then": {"relay": "supply", "state": "on"},
                "otherwise": {"relay": "supply", "state": "off"},
                "stale_after_s": 5,
                "fallback": "off",
            }
        ],
        "mqtt": {
            "host": broker.host,
            "port": broker.port,
            "username": name,
            "password_file": str(broker.password_file(name)),
            "reading_interval_s": 0.5,
            "discovery": False,
        },
        "chain": {
            "rpc_url": chain.anvil.url,
            "ledger_address": chain.ledger.address,
            "keystore": str(keystore),
            "password_file": str(password),
            "period_s": PERIOD_S,
            "seal_delay_s": 1.0,
            "submit_interval_s": 1.0,
            "confirmations": 1,
            "import_channel": "grid.import_wh",
            "export_channel": "grid.export_wh",
        },
        "market": market,
        "peers": [{"id": other, "address": keys[other][2]}],
    }
    buy = market.pop("buy", None)
    if buy is not None:
        sections["market.buy"] = buy
    return write_config(tmp_path / f"{name}.toml", sections)


def test_battery_low_buys_the_producer_accepts_meters_and_settles(
    tmp_path: Path, anvil: AnvilLedger, node_broker: Broker, daemon: Any
) -> None:
    keys: dict[str, tuple[Path, Path, str]] = {}
    for name in ("producer", "consumer"):
        keystore, password = tmp_path / f"{name}-key.json", tmp_path / f"{name}-key.pass"
        address = new_keystore(keystore, password)
        anvil.enrol(address)
        keys[name] = (keystore, password, address)
    earn_credits(anvil, *keys["consumer"][:2], export_wh=100)  # 0.1 credits
    market = marketlib.deploy(anvil.w3, anvil.gov, anvil.ledger.address, grace_ms=15_000)
    on_chain = marketlib.Market(anvil.w3, market)
    from_block = int(anvil.w3.eth.block_number)

    producer = node_config(
        tmp_path,
        "producer",
        chain=anvil,
        broker=node_broker,
        keys=keys,
        # a full battery and 10 kW of sun: about 2.5 Wh exported a second
        simulation={"pv_peak_w": 10_000, "battery_initial_soc_pct": 100, "load_base_w": 100},
        market={
            "address": market,
            "from_block": from_block,
            "accept_from": ["consumer"],
            "min_price": 0.5,
            "keep_battery_above_pct": 50,
            "battery_channel": "battery.soc_pct",
            "max_wh_per_day": 1000,
            "seller_meter": "grid.export_wh",
        },
    )
    consumer = node_config(
        tmp_path,
        "consumer",
        chain=anvil,
        broker=node_broker,
        keys=keys,
        # no sun, a battery below its floor: the house imports all its load
        simulation={
            "pv_peak_w": 0,
            "battery_initial_soc_pct": 15,
            "battery_min_soc_pct": 20,
            "load_base_w": 3000,
            "load_peak_w": 0,
        },
        market={
            "address": market,
            "from_block": from_block,
            "buyer_meter": "grid.import_wh",
            "buy": [
                {
                    "name": "low_battery",
                    "when": "battery.soc_pct < 20",
                    "seller": "producer",
                    "amount_wh": AMOUNT_WH,
                    "max_price": PRICE,
                    "window_min": PERIOD_S / 60,
                    "lead_s": 4,
                }
            ],
        },
    )
    daemon(producer)
    daemon(consumer)
    p_data = tmp_path / "producer-data"

    # The consumer's node opens one order; the producer's accepts it by its policy.
    order = wait_for(
        lambda: (o := on_chain.order(1)).state == marketlib.ACCEPTED and o, timeout=40, every=0.5
    )
    assert order.buyer == keys["consumer"][2] and order.seller == keys["producer"][2]
    assert order.amount_wh == AMOUNT_WH and order.price == PRICE * UNIT
    assert on_chain.order_count() == 1  # one order per entry at a time
    assert (order.t1 - order.t0) == PERIOD_S * 1000
    wait_for(
        lambda: (
            ("accepted", "accepted by policy")
            in db_rows(p_data / "node.db", "SELECT state, reason FROM events WHERE kind = 'market'")
        )
    )

    # The relay closes in the window and opens once the export counter has the ordered Wh.
    pins = p_data / "mock-gpio"
    history = wait_for(lambda: (h := pin_history(pins, PIN)) and len(h) >= 2 and h, timeout=40)
    (closed_s, up), (opened_s, down) = history[0], history[1]
    assert up is True and down is False
    assert closed_s * 1000 >= order.t0 and opened_s * 1000 < order.t1
    exported = wait_for(
        lambda: (
            (e := readings(p_data / "node.db", "grid.export_wh"))
            and e[-1][0] > opened_s * 1000 + 500
            and e
        )
    )
    start = at(exported, order.t0)
    counted = [(t, v - start) for t, v in exported if t >= order.t0]
    first = next(i for i, (_, wh) in enumerate(counted) if wh >= AMOUNT_WH)
    step = max(b - a for (_, a), (_, b) in itertools.pairwise(counted))
    t_done, wh_done = counted[first]
    assert AMOUNT_WH <= wh_done < AMOUNT_WH + step  # at most one reading's worth over
    assert t_done <= opened_s * 1000 < counted[first + 1][0]  # opened on that very reading

    # After the window: both sides' periods are committed and settled, paid for what matched.
    def settled() -> Any:
        periods = on_chain.periods(order, from_block)
        done = len(periods.both) == 1 and all(p.settled for p in periods.both)
        return done and (on_chain.order(1), periods)  # read after: settled by then

    closed, periods = wait_for(settled, timeout=40, every=1.0)
    matched = sum(
        min(p.seller.commitment.export_wh, p.buyer.commitment.import_wh) for p in periods.both
    )
    assert matched > 0 and closed.delivered_wh == min(AMOUNT_WH, matched)
    paid = [e.args for e in on_chain.events(from_block, names=("Settled",))]
    assert sum(int(a["deliveredWh"]) for a in paid) == closed.delivered_wh
    assert all(int(a["paid"]) == int(a["deliveredWh"]) * order.price // 1000 for a in paid)

    # After the grace time the consumer's node takes back what was not delivered.
    wait_for(lambda: on_chain.order(1).state_name == "closed", timeout=40, every=1.0)
    escrow = AMOUNT_WH * order.price // 1000
    refunds = [e for e in on_chain.events(from_block, names=("Refunded",)) if e.args["id"] == 1]
    assert [int(e.args["amount"]) for e in refunds] == [escrow - sum(int(a["paid"]) for a in paid)]

    # `status` on the producer: the order, what its meter counted, why the flow stopped.
    def market_status() -> Any:
        done = run_cli("status", "--data-dir", str(p_data), "--json")
        assert done.returncode == 0, done.stderr
        m = json.loads(done.stdout)["market"]
        return m and m["orders"] and m["orders"][0]["state"] == "closed" and m

    shown = wait_for(market_status, timeout=20, every=1.0)
    row = shown["orders"][0]
    assert (row["id"], row["role"], row["peer"], row["amount_wh"]) == (
        1,
        "seller",
        "consumer",
        AMOUNT_WH,
    )
    assert row["decision"] == "accepted by policy" and row["flow"] == "ordered energy delivered"
    assert row["delivered_wh"] == AMOUNT_WH and row["settled_wh"] == closed.delivered_wh
