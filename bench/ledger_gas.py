"""Gas per committed reading for a node with default `[chain]` settings, and what one chain holds.

    .venv/bin/python bench/ledger_gas.py [--hours 6]

On one anvil chain (npm; 30 M gas blocks), two real nodes run side by side on the same readings:
8 channels sampled every second, 15-minute periods (7,200 readings a commitment), sealed by the
node's `Sealer` from its SQLite store and sent by its `Submitter`, over `--hours` of node time
(a clock the bench moves) plus the first period:
- the node with default `[chain]` settings (the headline);
- the reference "one period per transaction": the same node with `submit_interval_s` equal to
  the period, which sends each commitment as soon as it is sealed.
Gas is summed from the receipts of the transactions the submitters sent (each node's nonce must
equal the transactions counted); readings are the `count` of the commitments they carried. The
first transaction after a start goes at once, alone, and pays for the node's new storage slots:
the headline is the steady state after it, the start-up transaction is reported beside it.
Also in the same run:
- the first DAISEE prototype's approach, one transaction per reading
  (bench/contracts/PerReading.sol), steady state;
- a relay's full batch (`batch_max` of the defaults: that many nodes' commitments in one
  transaction), from which, with the default node's own transactions, the commitments one block
  holds and the nodes one chain serves at 15-minute periods with 5 s blocks.
One JSON line. Target: ≤ 5 gas per reading for the default node.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eth_account import Account
from eth_account.signers.local import LocalAccount
from hexbytes import HexBytes
from web3 import Web3

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from daisee_node import logs  # noqa: E402
from daisee_node.clock import Clock  # noqa: E402
from daisee_node.ledger import build, chain, merkle  # noqa: E402
from daisee_node.ledger.commitment import Commitment, sign  # noqa: E402
from daisee_node.ledger.keys import new_keystore  # noqa: E402
from daisee_node.ledger.outbox import CONFIRMED, INCLUDED, PENDING, Entry  # noqa: E402
from daisee_node.ledger.service import LedgerService  # noqa: E402
from daisee_node.ledger.settings import ChainSection  # noqa: E402
from daisee_node.readings import Reading  # noqa: E402
from daisee_node.store import Retention, Store  # noqa: E402
from tests.support.chains import ANVIL_KEY, Anvil, rpc  # noqa: E402
from tests.support.clocks import FixedClock as BenchClock  # noqa: E402

CHANNELS = (
    "grid.power_w",
    "grid.voltage_v",
    "grid.current_a",
    "grid.import_wh",
    "grid.export_wh",
    "pv.power_w",
    "battery.current_a",
    "battery.soc_pct",
)
PERIOD_S = 900
PERIOD_MS = PERIOD_S * 1000
READINGS = len(CHANNELS) * PERIOD_S  # in one period
T0 = 1_800_000_000_000 // 3_600_000 * 3_600_000  # a whole hour
BLOCK_TIME_S = 5
TARGET_GAS_PER_READING = 5.0
TARGET_NODES = 100_000
ZERO32 = b"\0" * 32


def period_readings(k: int) -> list[Reading]:
    """Period k's readings: 8 channels, one a second; the Wh counters rise steadily."""
    start = T0 + k * PERIOD_MS
    out = []
    for s in range(PERIOD_S):
        t = start + s * 1000
        second = k * PERIOD_S + s
        for c, name in enumerate(CHANNELS):
            if name == "grid.import_wh":
                value = 10_000 + second * 0.05  # 180 W
            elif name == "grid.export_wh":
                value = 20_000 + second * 0.4  # 1,440 W
            else:
                value = 100.0 + c + (second % 7) * 0.25
            out.append(Reading(name, t, value))
    return out


@dataclass
class NodeRun:
    """One node: its store, its ledger service, and when each commitment was first sent."""

    name: str
    service: LedgerService
    store: Store
    writer: asyncio.Task[None]
    sent_at_ms: dict[int, int] = field(default_factory=dict)

    async def step(self, clock: BenchClock, url: str) -> None:
        """Seal what is due, then run submit rounds (a block mined after each) until idle."""
        svc = self.service
        assert svc.ledger is not None and svc.submitter is not None
        await svc.sealer.seal_due(svc.ledger.chain_id, svc.ledger.address)
        for _ in range(10):
            busy = await svc.submitter.round()
            for e in await svc.outbox.in_state(INCLUDED, CONFIRMED, own=True):
                self.sent_at_ms.setdefault(e.commitment.seq, clock.now_ms())
            if not busy:
                return
            rpc(url, "evm_mine")  # blocks go on while the node waits
        raise RuntimeError(f"{self.name}: the submitter never settled")

    def waits_s(self) -> list[float]:
        """For each commitment, from its period's end to the node time it was sent."""
        return [(at - T0 - seq * PERIOD_MS) / 1000 for seq, at in sorted(self.sent_at_ms.items())]


async def start_node(
    name: str, workdir: Path, url: str, ledger: chain.Ledger, gov: LocalAccount, clock: Clock,
    **chain_settings: Any,
) -> NodeRun:  # fmt: skip
    data = workdir / name
    new_keystore(data / "node-key.json", data / "node-key.pass")
    settings = ChainSection(
        rpc_url=url,
        ledger_address=ledger.address,
        chain_id=ledger.chain_id,
        import_channel="grid.import_wh",
        export_channel="grid.export_wh",
        **chain_settings,
    )
    store = Store(data / "node.db", clock=clock, retention=Retention(flush_interval_s=0.02))
    await store.open()
    writer = asyncio.create_task(store.run())
    svc = LedgerService(settings, store, clock, data, [], {})
    ledger.set_node(gov, svc.address)
    chain.fund(ledger.w3, gov, svc.address, 10**18)
    await svc.connect()
    return NodeRun(name, svc, store, writer)


@dataclass
class Tally:
    """What a node's transactions cost, from their receipts."""

    txs: list[dict[str, int]]  # in nonce order: gas, commitments, readings

    def gas_per_reading(self, skip_first: bool) -> float:
        txs = self.txs[1:] if skip_first else self.txs
        return sum(t["gas"] for t in txs) / sum(t["readings"] for t in txs)


async def tally(run: NodeRun, w3: Web3) -> Tally:
    """Every transaction the node sent, from its committed entries and their receipts."""
    svc = run.service
    entries: list[Entry] = await svc.outbox.in_state(INCLUDED, CONFIRMED, PENDING, own=True)
    if any(e.state == PENDING for e in entries):
        raise RuntimeError(f"{run.name}: commitments left pending")
    by_tx: dict[bytes, list[Entry]] = {}
    for e in entries:
        assert e.tx_hash is not None
        by_tx.setdefault(e.tx_hash, []).append(e)
    txs = []
    for tx_hash, batch in by_tx.items():
        receipt = w3.eth.get_transaction_receipt(HexBytes(tx_hash))
        tx = w3.eth.get_transaction(HexBytes(tx_hash))
        assert receipt["status"] == 1 and tx["from"] == svc.address
        readings = sum(e.commitment.count for e in batch)
        txs.append(
            {"nonce": tx["nonce"], "gas": receipt["gasUsed"], "commitments": len(batch),
             "readings": readings}
        )  # fmt: skip
    txs.sort(key=lambda t: t["nonce"])
    # Every transaction the node ever sent carried commitments: none is left out.
    if w3.eth.get_transaction_count(svc.address) != len(txs):
        raise RuntimeError(f"{run.name}: the node sent transactions this bench did not count")
    return Tally(txs)


async def run_nodes(
    url: str, ledger: chain.Ledger, gov: LocalAccount, hours: int
) -> dict[str, tuple[Tally, list[float]]]:
    """Both nodes over the same periods; each one's transactions and submission delays."""
    clock = BenchClock(T0 + 60_000)  # the nodes start a minute into the hour
    w3 = ledger.w3
    with tempfile.TemporaryDirectory() as tmp:
        default = await start_node("default", Path(tmp), url, ledger, gov, clock)
        alone = await start_node(
            "alone", Path(tmp), url, ledger, gov, clock, submit_interval_s=PERIOD_S
        )
        nodes = (default, alone)
        periods = 1 + 4 * hours
        for k in range(periods):
            readings = period_readings(k)
            for n in nodes:
                n.store.put_many(readings)
                await n.store.flush()
            # the period is due once it ended `seal_delay_s` ago
            clock.t_ms = T0 + (k + 1) * PERIOD_MS + 1_000
            clock.t_ms += int(default.service.settings.seal_delay_s * 1000)
            for n in nodes:
                await n.step(clock, url)
        out = {n.name: (await tally(n, w3), n.waits_s()) for n in nodes}
        for n in nodes:
            n.store.stop()
            await n.writer
            await n.store.close()
    return out


def per_reading_reference(w3: Web3, gov: LocalAccount) -> float:
    """Gas of one transaction per reading (the first prototype), steady state."""
    reference = build.compile_contracts(
        {"PerReading": (ROOT / "bench/contracts/PerReading.sol").read_text()}
    )["PerReading"]
    address = send_all(w3, gov, [{"data": reference["bytecode"], "gas": 1_000_000}])[0][
        "contractAddress"
    ]
    fn = w3.eth.contract(address=address, abi=reference["abi"]).functions.storeReading
    n = len(CHANNELS)
    calls = [
        {
            "to": address,
            "data": fn(
                merkle.channel_id(CHANNELS[i % n]), 1_800_000_000 + i, 1_000_000 * (230 + i % 5)
            )._encode_transaction_data(),
            "gas": 200_000,
        }
        for i in range(5 * n)
    ]
    receipts = send_all(w3, gov, calls)
    steady = [int(r["gasUsed"]) for r in receipts[n:]]  # after each slot's first write
    return sum(steady) / len(steady)


def relay_batch(w3: Web3, gov: LocalAccount, ledger: chain.Ledger, size: int) -> int:
    """Gas of one transaction carrying `size` nodes' commitments (each node's second)."""
    nodes = [Account.create() for _ in range(size)]
    fns = ledger.contract.functions
    send_all(
        w3,
        gov,
        [
            {
                "to": ledger.address,
                "data": fns.addNode(n.address, chain.DEFAULT_CAPACITY_W)._encode_transaction_data(),
            }
            for n in nodes
        ],
    )

    def signed(node: LocalAccount, seq: int, prev: bytes) -> tuple[Commitment, bytes]:
        t0 = T0 + (seq - 1) * PERIOD_MS
        c = Commitment(
            node.address, seq, t0, t0 + PERIOD_MS, os.urandom(32), READINGS, 45, 360, prev,
            os.urandom(32),
        )  # fmt: skip
        return c, sign(c, node.key, ledger.chain_id, ledger.address)

    def batch(items: list[tuple[Commitment, bytes]]) -> int:
        receipt = send_all(w3, gov, [{"to": ledger.address, "data": ledger.batch_data(items)}])[0]
        included, rejected = ledger.outcome(receipt)
        if len(included) != len(items) or rejected:
            raise RuntimeError(f"relay batch refused: {rejected}")
        return int(receipt["gasUsed"])

    firsts = [signed(n, 1, ZERO32) for n in nodes]
    batch(firsts)  # creates each node's balance slot
    return batch([signed(n, 2, c.struct_hash()) for n, (c, _) in zip(nodes, firsts, strict=True)])


def send_all(w3: Web3, sender: LocalAccount, txs: list[dict[str, Any]]) -> list[Any]:
    """Send transactions back to back; return their receipts."""
    nonce = w3.eth.get_transaction_count(sender.address, "pending")
    fees = chain.fee_fields(w3)
    hashes = []
    for i, tx in enumerate(txs):
        full = {"chainId": w3.eth.chain_id, "nonce": nonce + i, "gas": 8_000_000, **fees, **tx}
        hashes.append(w3.eth.send_raw_transaction(sender.sign_transaction(full).raw_transaction))
    return [w3.eth.wait_for_transaction_receipt(h, timeout=120) for h in hashes]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hours", type=int, default=6, help="node time after the first period")
    args = parser.parse_args()
    logs.configure("error")
    with tempfile.TemporaryDirectory() as tmp:
        anvil = Anvil(Path(tmp), block_time_s=0)  # a block for each transaction
        anvil.start()
        try:
            result = asyncio.run(measure(anvil.url, args.hours))
        finally:
            anvil.stop()
    print(json.dumps(result))


async def measure(url: str, hours: int) -> dict[str, Any]:
    w3 = chain.connect(url)
    gov = Account.from_key(ANVIL_KEY)
    ledger = chain.Ledger(w3, chain.deploy(w3, gov, None, 1000))
    defaults = ChainSection(rpc_url=url)
    nodes = await run_nodes(url, ledger, gov, hours)
    (own, waits), (alone, alone_waits) = nodes["default"], nodes["alone"]
    reference_gas = per_reading_reference(w3, gov)
    relay_gas = relay_batch(w3, gov, ledger, defaults.batch_max)
    block_gas = int(w3.eth.get_block("latest")["gasLimit"])

    steady = own.txs[1:]
    headline = own.gas_per_reading(skip_first=True)
    alone_gpr = alone.gas_per_reading(skip_first=True)
    # What one block holds: default nodes' own transactions, or a relay's full batches.
    own_per_block = sum(block_gas // t["gas"] * t["commitments"] for t in steady) // len(steady)
    relay_per_block = block_gas // relay_gas * defaults.batch_max
    blocks_per_period = PERIOD_S // BLOCK_TIME_S
    return {
        "bench": "ledger_gas",
        "setup": {
            "channels": len(CHANNELS),
            "sample_interval_s": 1,
            "period_s": PERIOD_S,
            "node_hours": hours,
            "submit_interval_s": defaults.submit_interval_s,
            "batch_max": defaults.batch_max,
            "block_gas_limit": block_gas,
        },
        "gas_per_reading": round(headline, 2),
        "target_gas_per_reading": TARGET_GAS_PER_READING,
        "txs": len(own.txs),
        "commitments_per_tx": sorted({t["commitments"] for t in steady}),
        "gas_per_tx": round(sum(t["gas"] for t in steady) / len(steady)),
        "readings_committed": sum(t["readings"] for t in own.txs),
        "startup_tx": {k: own.txs[0][k] for k in ("gas", "commitments", "readings")},
        "gas_per_reading_with_startup_tx": round(own.gas_per_reading(skip_first=False), 2),
        "period_end_to_sent_s": {"mean": round(sum(waits) / len(waits)), "max": round(max(waits))},
        "reference_one_period_per_tx": {
            "gas_per_reading": round(alone_gpr, 2),
            "gas_per_tx": round(sum(t["gas"] for t in alone.txs[1:]) / len(alone.txs[1:])),
            "period_end_to_sent_s_max": round(max(alone_waits)),
        },
        "reference_one_tx_per_reading_gas": round(reference_gas),
        "improvement_vs_one_period_per_tx_x": round(alone_gpr / headline, 2),
        "improvement_vs_one_tx_per_reading_x": round(reference_gas / headline),
        "relay_batch_max_tx_gas": relay_gas,
        "relay_gas_per_reading": round(relay_gas / (defaults.batch_max * READINGS), 2),
        "commitments_per_block": {
            "default_nodes": own_per_block,
            "relay_at_batch_max": relay_per_block,
        },
        "nodes_served_at_15min_5s_blocks": {
            "default_nodes": own_per_block * blocks_per_period,
            "relay_at_batch_max": relay_per_block * blocks_per_period,
        },
        "target_nodes": TARGET_NODES,
    }


if __name__ == "__main__":
    main()
