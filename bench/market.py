"""Gas of one energy purchase on chain, against DAISEE v2's way, and what the node over-delivers.

    .venv/bin/python bench/market.py [--periods 4] [--sample-s 1] [--no-real]

On py-evm (the market helpers of tests/support/market.py: a ledger, its credit, the market with
grace 2 h, three funded nodes), in one run:
- one GRID order's whole life, every transaction's `gasUsed` from its receipt: the buyer's
  `approve` of the escrow, `open`, the seller's `accept`, `--periods` periods each settled from
  both nodes' recorded commitments (`settleGrid`; the seller exports less than ordered, so the
  delivery is partial), and the `refund` of the rest after the grace time. The commitments the
  two nodes record anyway (one batch of both per period) are measured too and reported beside;
- the worst `settleGrid`: MAX_ACTIVE (8) orders on the seller's and the buyer's lists at once,
  sharing one period; with the genesis gas limit (daisee_node/ledger/chainspec.py) it gives the
  `settleGrid` calls one block holds, worst case and single-order case;
- the reference, DAISEE v2 doing the same delivery (its DApp kept every reading on chain, a
  transaction each, and paid with a `buyEnergy` call moving its coin from buyer to seller):
  bench/contracts/PerReading.sol (one stored, logged reading per transaction) measured in its
  steady state (each slot already written), times the readings of both nodes over the same
  periods at `--sample-s`, plus the `approve` and a `buyEnergy` call of the contract below
  (compiled here with the project's toolchain), moving the same credits on the same token.

Over-delivery, simulated: `DeliveryTracker` (the node's own code) fed a simulated export counter
at several powers and sampling phases; the flow stops on the reading at which the tracker's
`market.order_active` falls to 0 (relay switching time not included: it is the rule and relay
latency of bench/rule_latency.py). Reference in the same simulation: a node that stops when the
chain tells it, at the first 5 s block after the same reading.
Over-delivery and switching, real (`real_run`, skipped with `--no-real`): the purchase of
tests/integration/test_market_nodes.py with its harness (two daemons, mosquitto, anvil with 1 s
blocks, mock relay pins): what the producer's export counter had counted beyond the order when
its relay opened, and the time from when the order could flow (its acceptance mined and its
window begun, whichever is later) to the relay closing.
One JSON line. Targets: over-delivery ≤ the energy of one sampling interval; relay closed ≤ one
block + 100 ms after the order could flow.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from web3.logs import DISCARD  # noqa: E402

from daisee_node.delivery import DELIVERED_ALL, DeliveryTracker, Order  # noqa: E402
from daisee_node.ledger import build, chain, merkle  # noqa: E402
from daisee_node.ledger.chainspec import DEFAULT_GAS_LIMIT  # noqa: E402
from daisee_node.readings import Reading  # noqa: E402
from tests.support import market as mk  # noqa: E402

PRICE = 200 * mk.UNIT  # credit base units per kWh (0.2 credits)
AMOUNT_WH = 2_000
EXPORT_WH = 400  # the seller's committed export per period: 4 periods deliver 1,600 Wh
IMPORT_WH = 450  # the buyer's committed import per period
BLOCK_TIME_S = 5

#: DAISEE v2's purchase, as its `Daisee.buyEnergy`: the buyer's coins go to the seller by
#: `transferFrom`, and what the buyer may consume from that seller is raised; no escrow, no
#: metering. Written for the project's solc, same logic.
BUY_ENERGY_SOL = """// SPDX-License-Identifier: MIT
pragma solidity 0.8.28;

interface ICoin {
    function transferFrom(address from, address to, uint256 value) external returns (bool);
}

contract BuyEnergy {
    mapping(address => mapping(address => uint256)) public allowance;

    event Buy(address from, address to, uint256 energy);

    function buyEnergy(ICoin coin, address seller, uint256 energy, uint256 price)
        external
        returns (bool)
    {
        require(coin.transferFrom(msg.sender, seller, price));
        allowance[seller][msg.sender] += energy;
        emit Buy(msg.sender, seller, energy);
        return true;
    }
}
"""


def last_block_gas(m: mk.Market) -> int:
    """Gas of the newest block: py-evm mines one transaction a block."""
    return int(m.w3.eth.get_block("latest")["gasUsed"])


def order_life(periods: int) -> dict[str, Any]:
    """One partially delivered GRID order from open to refund, every step's gas."""
    m = mk.new_market()
    fns = m.market.functions
    t0 = mk.window_start(m)
    t1 = t0 + periods * mk.PERIOD_MS
    escrow = AMOUNT_WH * PRICE // 1000
    m.send(m.buyer, m.credit.functions.approve(m.market.address, escrow), "approve")
    zero = b"\0" * 32
    call = fns.open(m.seller.address, AMOUNT_WH, PRICE, t0, t1, mk.GRID, zero, zero)
    receipt = m.send(m.buyer, call, "open")
    (event,) = m.market.events.OrderOpened().process_receipt(receipt, errors=DISCARD)
    oid = int(event["args"]["id"])
    m.send(m.seller, fns.accept(oid), "accept")
    settles, commits, paid = [], [], 0
    for k in range(periods):
        pt0 = t0 + k * mk.PERIOD_MS
        m.travel_to(pt0 + mk.PERIOD_MS + 1_000)
        s, b = m.commit(
            (m.seller, pt0, pt0 + mk.PERIOD_MS, 0, EXPORT_WH, []),
            (m.buyer, pt0, pt0 + mk.PERIOD_MS, IMPORT_WH, 0, []),
        )
        commits.append(last_block_gas(m))
        receipt = m.settle_grid(oid, s, b, "settle")
        settles.append(m.gas["settle"])
        # not the seller's balance: its committed export mints credits too
        (settled,) = m.market.events.Settled().process_receipt(receipt, errors=DISCARD)
        paid += int(settled["args"]["paid"])
    m.travel_to(t1 + mk.GRACE_MS)
    buyer_before = m.balance(m.buyer)
    m.send(m.gov, fns.refund(oid), "refund")
    delivered = min(AMOUNT_WH, periods * EXPORT_WH)
    order = m.order(oid)
    refunded = m.balance(m.buyer) - buyer_before
    # The run is only worth its figures if the order did what it should.
    if order["deliveredWh"] != delivered or order["state"] != mk.CLOSED:
        raise RuntimeError(f"order ended as {order}")
    if paid != delivered * PRICE // 1000 or paid + refunded != escrow:
        raise RuntimeError(f"paid {paid}, refunded {refunded} of {escrow}")
    steps = {k: m.gas[k] for k in ("approve", "open", "accept", "refund")}
    return {
        "steps": steps,
        "settle": settles,
        "total": sum(steps.values()) + sum(settles),
        "commitments": commits,
        "delivered_wh": delivered,
    }


def worst_settle() -> tuple[int, int]:
    """(orders on each list, highest `settleGrid` gas) with MAX_ACTIVE orders between one seller
    and one buyer sharing a period."""
    m = mk.new_market()
    n = int(m.market.functions.MAX_ACTIVE().call())
    t0 = mk.window_start(m)
    ids = []
    for _ in range(n):
        oid = m.open(m.buyer, m.seller, 100, PRICE, t0, t0 + mk.PERIOD_MS)
        m.send(m.seller, m.market.functions.accept(oid))
        ids.append(oid)
    m.travel_to(t0 + mk.PERIOD_MS + 1_000)
    s, b = m.commit(
        (m.seller, t0, t0 + mk.PERIOD_MS, 0, 50 * n, []),
        (m.buyer, t0, t0 + mk.PERIOD_MS, 60 * n, 0, []),
    )
    gas = []
    for oid in ids:
        m.settle_grid(oid, s, b, "settle")
        gas.append(m.gas["settle"])
    if any(m.order(oid)["deliveredWh"] != 50 for oid in ids):
        raise RuntimeError("the worst case did not share the export equally")
    return n, max(gas)


def daisee_v2(readings: int) -> dict[str, Any]:
    """DAISEE v2's gas for the same delivery: one transaction per reading (steady state) and one
    `buyEnergy` (with the buyer's `approve`) moving the same credits."""
    m = mk.new_market()
    compiled = build.compile_contracts(
        {
            "PerReading": (ROOT / "bench/contracts/PerReading.sol").read_text(),
            "BuyEnergy": BUY_ENERGY_SOL,
        }
    )
    per = deploy(m, compiled["PerReading"])
    buy = deploy(m, compiled["BuyEnergy"])
    channel = merkle.channel_id("grid.export_wh")
    steady = []
    for i in range(12):
        node = m.seller if i % 2 == 0 else m.buyer
        m.send(node, per.functions.storeReading(channel, 1_800_000_000 + i, 10**9 + i), "r")
        if i >= 2:  # each node's slot already written, as for every reading after its first
            steady.append(m.gas["r"])
    per_reading = sum(steady) / len(steady)
    price = AMOUNT_WH * PRICE // 1000
    m.send(m.buyer, m.credit.functions.approve(buy.address, price), "approve")
    seller_before = m.balance(m.seller)
    call = buy.functions.buyEnergy(m.credit.address, m.seller.address, AMOUNT_WH, price)
    m.send(m.buyer, call, "buy")
    if m.balance(m.seller) - seller_before != price:
        raise RuntimeError("buyEnergy moved no credits")
    return {
        "per_reading": per_reading,
        "readings": readings,
        "approve": m.gas["approve"],
        "buy_energy": m.gas["buy"],
        "total": round(per_reading * readings) + m.gas["approve"] + m.gas["buy"],
    }


def deploy(m: mk.Market, art: dict[str, Any]) -> Any:
    receipt = chain.send(m.w3, m.gov, {"data": art["bytecode"], "gas": 2_000_000})
    return m.w3.eth.contract(address=receipt["contractAddress"], abi=art["abi"])


def over_delivery(sample_s: float) -> dict[str, Any]:
    """Simulated meter: Wh exported beyond the order when the tracker stops the flow, and when a
    node waiting for the next block would, at several powers and sampling phases."""
    worst_ratio = worst_wh = chain_worst_ratio = 0.0
    amount = 500
    trials = 0
    for power_w in (300.0, 1_500.0, 3_000.0, 7_360.0):
        interval_wh = power_w * sample_s / 3600
        for phase in range(10):
            trials += 1
            t0 = 1_800_000_000_000
            tracker = DeliveryTracker(peer_age_s=lambda _peer: 0.0)
            tracker.add(Order(1, "seller", "buyer", amount, t0, t0 + 86_400_000, "export_wh"))
            start_ms = t0 - int(phase * sample_s * 100)  # readings out of phase with t0
            step_ms = int(sample_s * 1000)
            k = 0
            while True:
                t = start_ms + k * step_ms
                value = 1_000.0 + power_w * (t - t0) / 3_600_000  # counter (Wh)
                inputs = tracker.on_readings([Reading("export_wh", t, value)], t)
                k += 1
                active = [r.value for r in inputs if r.channel == "market.order_active"]
                if t >= t0 and active == [0.0]:
                    break
                if k > 10_000_000:
                    raise RuntimeError("the tracker never stopped the flow")
            if tracker.flows[1].state != DELIVERED_ALL:
                raise RuntimeError(f"stopped as {tracker.flows[1].state}")
            over = value - 1_000.0 - amount  # Wh the meter counted since t0 beyond the order
            block_ms = -(-(t - t0) // (BLOCK_TIME_S * 1000)) * BLOCK_TIME_S * 1000
            chain_over = power_w * block_ms / 3_600_000 - amount
            worst_wh = max(worst_wh, over)
            worst_ratio = max(worst_ratio, over / interval_wh)
            chain_worst_ratio = max(chain_worst_ratio, chain_over / interval_wh)
    return {
        "trials": trials,
        "worst_wh": round(worst_wh, 3),
        "worst_per_interval": round(worst_ratio, 3),
        "chain_paced_worst_per_interval": round(chain_worst_ratio, 3),
    }


def real_run() -> dict[str, Any]:
    """The DAISEE purchase of tests/integration/test_market_nodes.py with its harness (two real
    daemons, mosquitto, anvil with 1 s blocks, mock relay pins): what the producer's meter counted
    beyond the order when its relay opened, and how long after the order could flow (its
    acceptance mined, and its window begun) the relay closed."""
    from daisee_node.actuators.mockpins import pin_history
    from daisee_node.ledger import market as marketlib
    from daisee_node.ledger.keys import new_keystore
    from tests.conftest import Daemon, db_rows, wait_for
    from tests.integration import test_market_nodes as it
    from tests.support.broker import Broker
    from tests.support.chains import AnvilLedger

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        anvil = AnvilLedger(tmp_path, block_time_s=1)
        broker = Broker(tmp_path, node_logins=("producer", "consumer"))
        daemons: list[Daemon] = []
        try:
            broker.start()
            keys: dict[str, tuple[Path, Path, str]] = {}
            for name in ("producer", "consumer"):
                keystore, password = tmp_path / f"{name}-key.json", tmp_path / f"{name}-key.pass"
                address = new_keystore(keystore, password)
                anvil.enrol(address)
                keys[name] = (keystore, password, address)
            it.earn_credits(anvil, *keys["consumer"][:2], export_wh=100)
            address = marketlib.deploy(anvil.w3, anvil.gov, anvil.ledger.address, grace_ms=15_000)
            on_chain = marketlib.Market(anvil.w3, address)
            from_block = int(anvil.w3.eth.block_number)
            common = {"address": address, "from_block": from_block}
            producer = it.node_config(
                tmp_path, "producer", chain=anvil, broker=broker, keys=keys,
                simulation={"pv_peak_w": 10_000, "battery_initial_soc_pct": 100,
                            "load_base_w": 100},
                market={**common, "accept_from": ["consumer"], "min_price": 0.5,
                        "keep_battery_above_pct": 50, "battery_channel": "battery.soc_pct",
                        "max_wh_per_day": 1000, "seller_meter": "grid.export_wh"},
            )  # fmt: skip
            consumer = it.node_config(
                tmp_path, "consumer", chain=anvil, broker=broker, keys=keys,
                simulation={"pv_peak_w": 0, "battery_initial_soc_pct": 15,
                            "battery_min_soc_pct": 20, "load_base_w": 3000, "load_peak_w": 0},
                market={**common, "buyer_meter": "grid.import_wh",
                        "buy": [{"name": "low_battery", "when": "battery.soc_pct < 20",
                                 "seller": "producer", "amount_wh": it.AMOUNT_WH,
                                 "max_price": it.PRICE, "window_min": it.PERIOD_S / 60,
                                 "lead_s": 4}]},
            )  # fmt: skip
            daemons = [Daemon(producer), Daemon(consumer)]
            order = wait_for(
                lambda: (o := on_chain.order(1)).state == marketlib.ACCEPTED and o,
                timeout=60,
                every=0.2,
            )
            (accepted,) = on_chain.events(from_block, names=("OrderAccepted",))
            accepted_ms = int(anvil.w3.eth.get_block(accepted.block_number)["timestamp"]) * 1000
            data = tmp_path / "producer-data"
            pins = data / "mock-gpio"
            history = wait_for(
                lambda: (h := pin_history(pins, it.PIN)) and len(h) >= 2 and h, timeout=60
            )
            (closed_s, up), (opened_s, down) = history[0], history[1]
            if not up or down:
                raise RuntimeError(f"relay history {history}")
            exported = wait_for(
                lambda: (
                    (e := it.readings(data / "node.db", "grid.export_wh"))
                    and e[-1][0] > opened_s * 1000 + 500
                    and e
                ),
                timeout=30,
            )
            decided = db_rows(
                data / "node.db",
                "SELECT t_ms FROM events WHERE kind = 'market' AND state = 'accepted'",
            )
        finally:
            for d in daemons:
                d.kill()
            broker.stop()
            anvil.anvil.stop()
    start = it.at(exported, order.t0)
    counted = [(t, v - start) for t, v in exported if t >= order.t0]
    first = next(i for i, (_, wh) in enumerate(counted) if wh >= it.AMOUNT_WH)
    steps = [b - a for (_, a), (_, b) in itertools.pairwise(counted[: first + 1])]
    over = counted[first][1] - it.AMOUNT_WH
    can_flow_ms = max(order.t0, accepted_ms)
    return {
        "amount_wh": it.AMOUNT_WH,
        "sample_interval_wh": round(max(steps), 3),
        "over_wh_at_stop_reading": round(over, 3),
        # the energy of the sampling interval in which the ordered amount was reached
        "over_per_interval": round(over / steps[-1], 3) if steps else None,
        "over_wh_at_relay_open": round(it.at(exported, opened_s * 1000) - start - it.AMOUNT_WH, 3),
        "accept_decided_before_t0_ms": order.t0 - int(decided[0][0]) if decided else None,
        "accept_mined_before_t0_ms": order.t0 - accepted_ms,
        "relay_closed_after_flow_allowed_ms": round(closed_s * 1000 - can_flow_ms),
        "relay_opened_after_stop_reading_ms": round(opened_s * 1000 - counted[first][0]),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--periods", type=int, default=4, help="settled periods of the order")
    parser.add_argument("--no-real", action="store_true", help="skip the daemons' run")
    parser.add_argument("--sample-s", type=float, default=1.0, help="DAISEE v2 reading interval")
    args = parser.parse_args()
    life = order_life(args.periods)
    lists, worst = worst_settle()
    readings = round(2 * args.periods * mk.PERIOD_MS / 1000 / args.sample_s)
    ref = daisee_v2(readings)
    over = over_delivery(args.sample_s)
    real = None if args.no_real else real_run()
    per_period = sum(life["settle"]) / len(life["settle"])
    with_data = life["total"] + sum(life["commitments"])
    print(
        json.dumps(
            {
                "bench": "market",
                "chain": "py-evm (paris)",
                "periods": args.periods,
                "order_life_gas": life["total"],
                "order_steps_gas": life["steps"],
                "settle_per_period_gas": round(per_period),
                "settle_gas": life["settle"],
                "commitments_gas_per_period": round(sum(life["commitments"]) / args.periods),
                "order_life_with_commitments_gas": with_data,
                "delivered_wh": life["delivered_wh"],
                "reference": "DAISEE v2: a transaction per reading of both nodes + buyEnergy",
                "reference_readings": readings,
                "reference_gas_per_reading": round(ref["per_reading"]),
                "reference_buy_energy_gas": ref["buy_energy"],
                "reference_approve_gas": ref["approve"],
                "reference_gas": ref["total"],
                "reference_per_period_gas": round(ref["per_reading"] * readings / args.periods),
                "ratio_reference_over_market": round(ref["total"] / life["total"], 1),
                "ratio_reference_over_market_with_commitments": round(ref["total"] / with_data, 1),
                "block_gas_limit": DEFAULT_GAS_LIMIT,
                "settle_worst_gas": worst,
                "settle_worst_active_orders": lists,
                "orders_one_block_settles": DEFAULT_GAS_LIMIT // max(life["settle"]),
                "orders_one_block_settles_worst": DEFAULT_GAS_LIMIT // worst,
                "over_delivery_simulated": over,
                "over_delivery_target_per_interval": 1.0,
                "real_run": real,
            }
        )
    )


if __name__ == "__main__":
    main()
