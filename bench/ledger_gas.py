"""Gas per committed reading, and how many nodes one PoA chain serves.

    .venv/bin/python bench/ledger_gas.py [--relay 150]

On one anvil chain (npm, 30 M gas blocks), for a node with 8 channels sampled every second and
15-minute periods (7,200 readings per commitment, with a real Merkle root):
- the node's own commitment alone in a transaction, and four periods in one (hourly batching);
- a relay's batch of `--relay` nodes' commitments; its marginal gas per commitment gives the
  commitments one block holds, and so the nodes served at 15-minute periods with 5 s blocks;
- the reference, in the same run on the same chain: the first DAISEE prototype's approach, one
  transaction per reading (bench/contracts/PerReading.sol), steady state.
One JSON line. Targets: ≤ 5 gas per reading; ≥ 10,000 nodes per chain.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from eth_account import Account

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from daisee_node.ledger import build, chain, merkle  # noqa: E402
from daisee_node.ledger.commitment import Commitment, sign  # noqa: E402
from tests.support.chains import ANVIL_KEY, Anvil  # noqa: E402

CHANNELS = 8
PERIOD_S = 900
READINGS = CHANNELS * PERIOD_S
BLOCK_TIME_S = 5
TARGET_GAS_PER_READING = 5.0
TARGET_NODES = 10_000


def period_root(node: str, t0_ms: int) -> bytes:
    """The real Merkle root of a period: 8 channels, one reading a second."""
    node_bytes = bytes.fromhex(node[2:])
    rows = [
        (t0_ms + s * 1000, f"meter.ch{c}_w", 100.0 + c + s % 7, 0)
        for s in range(PERIOD_S)
        for c in range(CHANNELS)
    ]
    from daisee_node.ledger.outbox import period_leaves

    return merkle.root(period_leaves(node_bytes, rows))


def commitments(node: Account, seqs: range, ledger: chain.Ledger, root: bytes, prev: bytes) -> list:
    """Signed commitments of consecutive periods, chained from `prev`."""
    out = []
    for seq in seqs:
        t0 = 1_800_000_000_000 + (seq - 1) * PERIOD_S * 1000
        c = Commitment(
            node.address,
            seq,
            t0,
            t0 + PERIOD_S * 1000,
            root,
            READINGS,
            150,
            420,
            prev,
            b"\x11" * 32,
        )
        out.append((c, sign(c, node.key, ledger.chain_id, ledger.address)))
        prev = c.struct_hash()
    return out


def send_all(w3, sender, txs: list[dict]) -> list:
    """Send many transactions back to back; return their receipts."""
    nonce = w3.eth.get_transaction_count(sender.address, "pending")
    fees = chain.fee_fields(w3)
    hashes = []
    for i, tx in enumerate(txs):
        full = {"chainId": w3.eth.chain_id, "nonce": nonce + i, "gas": 8_000_000, **fees, **tx}
        hashes.append(w3.eth.send_raw_transaction(sender.sign_transaction(full).raw_transaction))
    return [w3.eth.wait_for_transaction_receipt(h, timeout=120) for h in hashes]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--relay", type=int, default=150, help="commitments in the relay batch")
    args = parser.parse_args()
    reference = build.compile_contracts(
        {"PerReading": (ROOT / "bench/contracts/PerReading.sol").read_text()}
    )["PerReading"]
    with tempfile.TemporaryDirectory() as tmp:
        anvil = Anvil(Path(tmp), block_time_s=0)
        anvil.command = lambda: [
            str(Path(anvil.command_bin)),
            "--port",
            str(anvil.port),
            "--silent",
        ]  # type: ignore[method-assign]
        anvil.command_bin = str(ROOT / "node_modules/.bin/anvil")  # type: ignore[attr-defined]
        anvil.start()
        try:
            result = run(anvil.url, reference, args.relay)
        finally:
            anvil.stop()
    print(json.dumps(result))


def run(url: str, reference: dict, relay: int) -> dict:
    w3 = chain.connect(url)
    gov = Account.from_key(ANVIL_KEY)
    ledger = chain.Ledger(w3, chain.deploy(w3, gov, None, 1000))
    nodes = [Account.create() for _ in range(relay + 2)]
    send_all(
        w3,
        gov,
        [
            {
                "to": ledger.address,
                "data": ledger.contract.functions.addNode(
                    n.address, chain.DEFAULT_CAPACITY_W
                )._encode_transaction_data(),
            }
            for n in nodes
        ],
    )
    root = period_root(nodes[0].address, 1_800_000_000_000)

    def batch_gas(items: list) -> int:
        receipt = send_all(w3, gov, [{"to": ledger.address, "data": ledger.batch_data(items)}])[0]
        included, rejected = ledger.outcome(receipt)
        assert len(included) == len(items) and not rejected, rejected
        return int(receipt["gasUsed"])

    zero = b"\0" * 32

    def steady(node: Account, per_tx: int, root: bytes) -> int:
        """Gas of the node's second transaction: its first pays for new storage slots."""
        first = commitments(node, range(1, per_tx + 1), ledger, root, zero)
        batch_gas(first)
        then = commitments(
            node, range(per_tx + 1, 2 * per_tx + 1), ledger, root, first[-1][0].struct_hash()
        )
        return batch_gas(then)

    single = steady(nodes[0], 1, root)
    hourly = steady(nodes[1], 4, root)
    relay_nodes = nodes[2:]
    firsts = [commitments(n, range(1, 2), ledger, os.urandom(32), zero)[0] for n in relay_nodes]
    batch_gas(firsts)
    relay_items = [
        commitments(n, range(2, 3), ledger, os.urandom(32), c.struct_hash())[0]
        for n, (c, _) in zip(relay_nodes, firsts, strict=True)
    ]
    relayed = batch_gas(relay_items)

    # The reference: one transaction per reading.
    data = reference["bytecode"]
    address = send_all(w3, gov, [{"data": data, "gas": 1_000_000}])[0]["contractAddress"]
    fn = w3.eth.contract(address=address, abi=reference["abi"]).functions.storeReading
    calls = [
        {
            "to": address,
            "data": fn(
                merkle.channel_id(f"meter.ch{i % CHANNELS}_w"),
                1_800_000_000 + i,
                1_000_000 * (230 + i % 5),
            )._encode_transaction_data(),
            "gas": 200_000,
        }
        for i in range(5 * CHANNELS)
    ]
    receipts = send_all(w3, gov, calls)
    steady = [int(r["gasUsed"]) for r in receipts[CHANNELS:]]  # after each slot's first write
    reference_gas = sum(steady) / len(steady)

    marginal = (relayed - single) / (relay - 1)
    block_gas = int(w3.eth.get_block("latest")["gasLimit"])
    per_block = int((block_gas - single) // marginal) + 1
    nodes_served = per_block * (PERIOD_S // BLOCK_TIME_S)
    best = relayed / (relay * READINGS)
    return {
        "bench": "ledger_gas",
        "readings_per_commitment": READINGS,
        "gas_per_reading": {
            "own_commitment_alone": round(single / READINGS, 2),
            "own_4_periods_per_tx": round(hourly / (4 * READINGS), 2),
            f"relay_batch_{relay}": round(best, 2),
        },
        "gas_per_tx": {"alone": single, "4_periods": hourly, f"relay_{relay}": relayed},
        "marginal_gas_per_commitment": round(marginal),
        "target_gas_per_reading": TARGET_GAS_PER_READING,
        "reference_one_tx_per_reading_gas": round(reference_gas),
        "reference_gas_per_reading": round(reference_gas),
        "improvement_x": round(reference_gas / best),
        "block_gas_limit": block_gas,
        "commitments_per_block": per_block,
        "nodes_served_at_15min_5s_blocks": nodes_served,
        "target_nodes": TARGET_NODES,
    }


if __name__ == "__main__":
    main()
