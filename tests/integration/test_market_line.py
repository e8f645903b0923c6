"""A LINE purchase end to end, with nobody in between: two real daemons, mosquitto, anvil, and a
direct line between the houses whose two ends are Modbus meters (a real pymodbus server).

The line carries power only while both houses' supply relays (mock pins, read across processes)
are closed; the seller's meter counts what leaves, the buyer's what arrives, less 1 % of line
losses. The consumer's node opens a LINE order by its `[[market.buy]]`; the producer's node
accepts it by policy because the order names its own line counter; both relays close in the
window and open once each end's counter has the ordered Wh. After the window each node proves
its two line readings against its own commitments, the proofs cross over MQTT, and the line is
anchored and settled on chain from both ends' readings: paid for the lower of the two, within
the contract's tolerance."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daisee_node.actuators.mockpins import pin_history, pin_level
from daisee_node.ledger import market as marketlib
from daisee_node.ledger import merkle
from daisee_node.ledger.keys import new_keystore
from daisee_node.market_line import LineMessageError, parse_message
from tests.conftest import db_rows, free_port, wait_for, write_config
from tests.support.broker import Broker
from tests.support.chains import AnvilLedger
from tests.support.market_nodes import at, earn_credits, readings
from tests.support.meters import SDM120_INPUT, EmulatedMeter, ThreadedMeterServer, sdm630_values

pytestmark = [pytest.mark.slow, pytest.mark.beside]  # waits on daemons and the chain

PERIOD_S = 10
AMOUNT_WH = 5
PRICE = 2.0  # credits per kWh
UNIT = 10**18
PIN = 17
LINE_W = 3600.0  # 1 Wh a second while the line is closed
DISPUTE_MS = 5_000


class Line:
    """The wire between the two houses: it carries `LINE_W` while both ends' relays are closed,
    and each end's meter counts it (the buyer's less the losses)."""

    def __init__(
        self, seller: EmulatedMeter, buyer: EmulatedMeter, pins: tuple[Path, Path], losses: float
    ) -> None:
        self.seller, self.buyer, self.pins, self.losses = seller, buyer, pins, losses
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def closed(self) -> bool:
        return all(pin_level(p, PIN) for p in self.pins)

    def run(self) -> None:
        last = time.monotonic()
        while not self.stop.wait(0.02):
            now = time.monotonic()
            if self.closed():
                kwh = LINE_W * (now - last) / 3.6e6
                self.seller.values["export_kwh"] += kwh
                self.buyer.values["import_kwh"] += kwh * (1 - self.losses)
                self.seller.values["power_w"] = self.buyer.values["power_w"] = LINE_W
            else:
                self.seller.values["power_w"] = self.buyer.values["power_w"] = 0.0
            last = now


def meter(unit: int) -> EmulatedMeter:
    values = sdm630_values()
    base = {k: values.get(k, 1.0) for k in SDM120_INPUT}
    return EmulatedMeter(unit, SDM120_INPUT, base | {"import_kwh": 0.0, "export_kwh": 0.0})


@pytest.fixture(params=[0.01, 0.2], ids=["ends-agree", "buyer-meter-low"])
def line_rig(tmp_path: Path, request: Any) -> Iterator[tuple[ThreadedMeterServer, Line]]:
    ends = (meter(1), meter(2))
    server = ThreadedMeterServer(list(ends), port=free_port())
    server.start()
    pins = tuple(tmp_path / f"{n}-data" / "mock-gpio" for n in ("producer", "consumer"))
    line = Line(*ends, pins=pins, losses=request.param)  # type: ignore[arg-type]
    line.thread.start()
    yield server, line
    line.stop.set()
    line.thread.join(5)
    server.close()


def node_config(
    tmp_path: Path,
    name: str,
    *,
    chain: AnvilLedger,
    broker: Broker,
    keys: dict[str, tuple[Path, Path, str]],
    meter_port: int,
    market: dict[str, Any],
    battery_soc: float,
) -> Path:
    other = "consumer" if name == "producer" else "producer"
    keystore, password, _ = keys[name]
    counter = "line.export_wh" if name == "producer" else "line.import_wh"
    sections: dict[str, Any] = {
        "node": {"id": name, "data_dir": str(tmp_path / f"{name}-data")},
        "store": {"flush_interval_s": 0.05},
        "simulation": {"battery_initial_soc_pct": battery_soc, "battery_min_soc_pct": 20},
        "sensors": [
            {"name": "battery", "kind": "simulated", "model": "battery", "interval_s": 0.5},
            {
                "name": "line",
                "kind": "modbus",
                "model": "sdm120",
                "host": "127.0.0.1",
                "port": meter_port,
                "unit": 1 if name == "producer" else 2,
                "interval_s": 0.2,
                "timeout_s": 1.0,
            },
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
            ("export_channel" if name == "producer" else "import_channel"): counter,
        },
        "market": {"line_meter": counter, **market},
        "peers": [{"id": other, "address": keys[other][2]}],
    }
    buy = sections["market"].pop("buy", None)
    if buy is not None:
        sections["market.buy"] = buy
    return write_config(tmp_path / f"{name}.toml", sections)


def test_a_line_purchase_is_metered_at_both_ends_and_settled_from_their_proofs(
    tmp_path: Path, anvil: AnvilLedger, daemon: Any, line_rig: Any
) -> None:
    server, line = line_rig
    broker = Broker(tmp_path, node_logins=("producer", "consumer"))
    broker.start()
    try:
        run_purchase(tmp_path, anvil, daemon, broker, server.port, line.losses)
    finally:
        broker.stop()


def run_purchase(
    tmp_path: Path, anvil: AnvilLedger, daemon: Any, broker: Broker, meter_port: int, losses: float
) -> None:
    keys: dict[str, tuple[Path, Path, str]] = {}
    for name in ("producer", "consumer"):
        keystore, password = tmp_path / f"{name}-key.json", tmp_path / f"{name}-key.pass"
        address = new_keystore(keystore, password)
        anvil.enrol(address)
        keys[name] = (keystore, password, address)
    earn_credits(anvil, *keys["consumer"][:2], export_wh=100)  # 0.1 credits
    market = marketlib.deploy(
        anvil.w3, anvil.gov, anvil.ledger.address, grace_ms=30_000, dispute_ms=DISPUTE_MS
    )
    on_chain = marketlib.Market(anvil.w3, market)
    from_block = int(anvil.w3.eth.block_number)
    common: dict[str, Any] = {
        "meter_port": meter_port,
        "chain": anvil,
        "broker": broker,
        "keys": keys,
    }
    producer = node_config(
        tmp_path,
        "producer",
        market={"address": market, "from_block": from_block, "accept_from": ["consumer"]},
        battery_soc=100,
        **common,
    )
    consumer = node_config(
        tmp_path,
        "consumer",
        market={
            "address": market,
            "from_block": from_block,
            "buy": [
                {
                    "name": "low_battery",
                    "when": "battery.soc_pct < 20",
                    "seller": "producer",
                    "amount_wh": AMOUNT_WH,
                    "max_price": PRICE,
                    "window_min": 2 * PERIOD_S / 60,
                    "lead_s": 4,
                    "mode": "line",
                    "seller_line_meter": "line.export_wh",
                }
            ],
        },
        battery_soc=15,
        **common,
    )
    # both nodes' proofs, heard as they are first published
    watcher = subprocess.Popen(
        subscriber(broker, "daisee/+/market/line/+", count=2), stdout=subprocess.PIPE, text=True
    )
    try:
        nodes = (producer, consumer)
        settle_and_check(
            tmp_path, on_chain, from_block, broker, watcher, daemon, nodes, disputed=losses > 0.02
        )
    finally:
        watcher.kill()


def settle_and_check(
    tmp_path: Path,
    on_chain: marketlib.Market,
    from_block: int,
    broker: Broker,
    watcher: subprocess.Popen[str],
    daemon: Any,
    nodes: tuple[Path, Path],
    *,
    disputed: bool,
) -> None:
    for config in nodes:
        daemon(config)
    p_db, c_db = (tmp_path / f"{n}-data" / "node.db" for n in ("producer", "consumer"))

    # A LINE order on both ends' counters, accepted by the producer's policy.
    order = wait_for(
        lambda: (o := on_chain.order(1)).state == marketlib.ACCEPTED and o, timeout=40, every=0.5
    )
    assert order.mode_name == "line"
    assert order.seller_channel == merkle.channel_id("line.export_wh")
    assert order.buyer_channel == merkle.channel_id("line.import_wh")

    # Each end's relay closes in the window and opens once its own counter has the ordered Wh
    # (the buyer's, short of it by the losses, at the window's end): the line carried no more.
    def switched(name: str) -> list[tuple[float, bool]]:
        h = pin_history(tmp_path / f"{name}-data" / "mock-gpio", PIN)
        return h if len(h) >= 2 else []

    p_pins = wait_for(lambda: switched("producer"), timeout=60)
    c_pins = wait_for(lambda: switched("consumer"), timeout=60)
    for (closed_s, up), (opened_s, down) in (p_pins[:2], c_pins[:2]):
        assert up and not down
        assert order.t0 <= closed_s * 1000 and opened_s * 1000 <= order.t1 + 1000
    exported = wait_for(
        lambda: (e := readings(p_db, "line.export_wh")) and e[-1][0] > order.t1 and e
    )
    sent = exported[-1][1] - at(exported, order.t0)
    step = LINE_W / 3600 * 0.2 * 3  # a few sampling intervals of the line's energy
    assert AMOUNT_WH <= sent <= AMOUNT_WH + step

    # After the window: anchored and settled from both ends' proven readings.
    def measured() -> Any:
        ev = on_chain.events(from_block, names=("LineMeasured",))
        return ev and ev[0].args

    m = wait_for(measured, timeout=90, every=1.0)
    anchored = on_chain.events(from_block, names=("LineAnchored",))
    assert len(anchored) == 1  # once, though both nodes settle
    a = anchored[0].args

    def micro(db: Path, channel: str, t_ms: int) -> int:
        (value,) = [v for t, v in readings(db, channel) if t == t_ms]
        return merkle.value_micro(value)

    # The contract measured exactly what each end's database holds between the proven readings.
    end_s = max(t for t, _ in readings(p_db, "line.export_wh") if t < order.t1)
    end_b = max(t for t, _ in readings(c_db, "line.import_wh") if t < order.t1)
    d_seller = micro(p_db, "line.export_wh", end_s) - micro(p_db, "line.export_wh", a["sellerT"])
    d_buyer = micro(c_db, "line.import_wh", end_b) - micro(c_db, "line.import_wh", a["buyerT"])
    assert (int(m["sellerMicro"]), int(m["buyerMicro"])) == (d_seller, d_buyer)
    assert a["sellerT"] <= order.t0 and a["buyerT"] <= order.t0
    assert 0 < d_buyer < d_seller  # the losses

    # Beyond the 2 % tolerance a dispute opens; nobody decides it, so once its deadline has
    # passed a node closes it and the lower value stands.
    opened = on_chain.events(from_block, names=("DisputeOpened",))
    assert len(opened) == disputed
    if disputed:
        (dispute,) = opened
        assert (dispute.args["lowMicro"], dispute.args["highMicro"]) == (d_buyer, d_seller)
        closed = wait_for(
            lambda: on_chain.events(from_block, names=("DisputeClosed",)), timeout=60, every=1.0
        )
        assert [e.args["decided"] for e in closed] == [False]

    # Paid for the lower end, in whole Wh, never more than ordered.
    settled = wait_for(lambda: (o := on_chain.order(1)).delivered_wh > 0 and o, timeout=30)
    assert settled.delivered_wh == min(AMOUNT_WH, d_buyer // 1_000_000)
    paid = [e.args for e in on_chain.events(from_block, names=("Settled",))]
    assert sum(int(p["paid"]) for p in paid) == settled.delivered_wh * order.price // 1000

    # The events of both nodes say what happened; after the grace time the rest is refunded.
    wait_for(lambda: on_chain.order(1).state_name == "closed", timeout=60, every=1.0)
    (refund,) = [e for e in on_chain.events(from_block, names=("Refunded",))]
    escrow = AMOUNT_WH * order.price // 1000
    assert int(refund.args["amount"]) == escrow - sum(int(p["paid"]) for p in paid)

    def kinds() -> set[str]:
        query = "SELECT state FROM events WHERE kind = 'market'"
        rows = (db_rows(db, query) for db in (p_db, c_db))
        return {state for found in rows for (state,) in found}

    said = {"disputed", "dispute closed"} if disputed else {"settled"}
    wait_for(lambda: {"accepted", "refund"} | said <= kinds(), timeout=10)

    # What crossed MQTT: each end's retained proofs, as any subscriber saw them; the wrong
    # end's, another order's or a reordered pair are refused before they reach the chain.
    out, _ = watcher.communicate(timeout=30)
    heard = dict(line.split(" ", 1) for line in out.splitlines())
    assert set(heard) == {f"daisee/{n}/market/line/1" for n in ("producer", "consumer")}
    payload = heard["daisee/producer/market/line/1"].encode()
    body = json.loads(payload)
    assert parse_message(payload, order, "seller").node == order.seller
    for change, why in (
        ({"node": order.buyer}, "not the order's seller"),
        ({"order": order.id + 1}, "not 1"),
        ({"anchor": body["end"], "end": body["anchor"]}, "not older"),
    ):
        with pytest.raises(LineMessageError, match=why):
            parse_message(json.dumps(body | change).encode(), order, "seller")
    foreign = heard["daisee/consumer/market/line/1"].encode()
    with pytest.raises(LineMessageError, match="not the order's seller"):
        parse_message(foreign, order, "seller")
    # and once the order is closed, neither keeps its proofs retained
    wait_for(lambda: retained(broker, "daisee/+/market/line/1") == "", timeout=20)


def subscriber(broker: Broker, topic: str, *, count: int = 0, wait_s: int = 2) -> list[str]:
    """mosquitto_sub as the read-only `viewer` login: `topic payload` per message."""
    args = ["mosquitto_sub", "-h", broker.host, "-p", str(broker.port), "-u", "viewer"]
    args += ["-P", broker.password_file("viewer").read_text().strip(), "-t", topic, "-v"]
    return args + (["-C", str(count)] if count else ["-W", str(wait_s)])


def retained(broker: Broker, topic: str) -> str:
    """Every retained message on `topic` now, one `topic payload` a line."""
    done = subprocess.run(subscriber(broker, topic), capture_output=True, text=True, check=False)
    return done.stdout.strip()
