"""Commitments a block, inclusion latency and gas per reading on a real three-signer Clique chain.

    .venv/bin/python bench/chain_clique.py [--seconds 600] [--relays 8] [--in-flight 4]

Three geth 1.13.15 signers peered on loopback (tests/support/geth.py; `./run test` builds geth)
seal 2 s blocks of 30 M gas from the genesis `daisee-node chain-spec` writes. The ledger is
deployed and `--nodes` simulated nodes are registered. Relays then send, for `--seconds`, full
batches (`batch_max` = 100) of those nodes' signed commitments, each batch carrying 100
different nodes (the dearer case: one node's run of commitments shares its head slot), each
relay keeping `--in-flight` transactions in the pool so that the chain, not the relays, is the
limit. A commitment stands for 7,200 readings (8 channels, 1 s sampling, 15-minute periods).

Counted, not computed: commitments per block from the `Committed` events of every receipt;
inclusion latency from the moment a batch is broadcast to the moment its block is first seen by a
poller (every 50 ms); gas per reading from the receipts' gas. Blocks of the first and last few
seconds (filling the pool, draining it) are left out.

Reference, in the same run: what docs/performance.md computes from gas alone, per 30 M gas block
(`floor(gas limit / full batch's gas) × 100`, 900 commitments there with anvil's gas), here with
the gas of this run's own full batches, against what blocks actually carried. Beside it, the same
division by the batches' gas *limits* (the client's estimate plus the submitter's margin), which
is what geth packs a block by. Also the nodes one chain serves at 15-minute periods: measured
commitments a block × blocks a period (450 at 2 s), beside the document's 162,000 (5 s blocks).

The relays behave as the node's submitter does where it matters: gas from `eth_estimateGas` with
the submitter's margin (never below 1.2 × what the last full batch used: an estimate made
while a short reorg had put a batch of the same nodes back in the pool is too low), and a
commitment refused or in a failed batch is signed and sent again. One JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eth_account import Account
from eth_account.signers.local import LocalAccount
from hexbytes import HexBytes

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from daisee_node.ledger import chain  # noqa: E402
from daisee_node.ledger.commitment import Commitment, sign  # noqa: E402
from daisee_node.ledger.submitter import BATCH_GAS_BASE, BATCH_GAS_EACH  # noqa: E402
from tests.support.geth import CliqueNetwork  # noqa: E402

BATCH = 100  # `batch_max`'s default
READINGS = 8 * 900  # a commitment's readings: 8 channels at 1 s for 15 minutes
PERIOD_MS = 900_000
BLOCK_S = 2
DOC_PER_BLOCK = 900  # docs/performance.md: 9 relay batches of 100 in a 30 M gas block
DOC_NODES = 162_000  # docs/performance.md: through relays, 5 s blocks
WARMUP_S = 10.0


@dataclass
class SimNode:
    """A registered node whose commitments a relay carries."""

    key: LocalAccount
    seq: int = 0
    prev: bytes = b"\0" * 32
    t0: int = 0
    #: seq → (prev hash, t0) it was signed with, to sign it again after a refusal
    issued: dict[int, tuple[bytes, int]] = field(default_factory=dict)

    def next(self, chain_id: int, ledger: str) -> tuple[Commitment, bytes]:
        self.seq += 1
        self.issued[self.seq] = (self.prev, self.t0)
        c = Commitment(
            self.key.address,
            self.seq,
            self.t0,
            self.t0 + PERIOD_MS,
            os.urandom(32),
            READINGS,
            100,
            50,
            self.prev,
            b"\x11" * 32,
        )
        self.t0 += PERIOD_MS
        self.prev = c.struct_hash()
        return c, sign(c, bytes(self.key.key), chain_id, ledger)

    def rewind(self, seq: int) -> None:
        """`seq` did not make it (its batch failed or it was refused): issue it again next,
        as a node's submitter sends a refused commitment again."""
        if seq <= self.seq:
            self.prev, self.t0 = self.issued[seq]
            self.seq = seq - 1


@dataclass
class Sent:
    relay: int
    tx_hash: bytes
    sent_at: float
    commitments: int
    gas_limit: int


@dataclass
class Run:
    """What the relays sent and when blocks appeared (wall time, monotonic)."""

    sent: list[Sent] = field(default_factory=list)
    block_seen: dict[int, float] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def watch_blocks(url: str, run: Run, stop: threading.Event) -> None:
    """Record when each block number is first seen."""
    w3 = chain.connect(url)
    while not stop.is_set():
        head = w3.eth.block_number
        now = time.monotonic()
        with run.lock:
            for n in range(max(run.block_seen, default=head - 1) + 1, head + 1):
                run.block_seen[n] = now
        stop.wait(0.05)


def relay(
    index: int,
    url: str,
    account: LocalAccount,
    nodes: list[SimNode],
    ledger: chain.Ledger,
    in_flight: int,
    until: float,
    run: Run,
) -> None:
    """Send full batches of distinct nodes' commitments, keeping `in_flight` unmined."""
    w3 = chain.connect(url)
    led = chain.Ledger(w3, ledger.address)
    chain_id = ledger.chain_id
    nonce = w3.eth.get_transaction_count(account.address, "pending")
    fees = chain.fee_fields(w3)
    waiting: deque[tuple[bytes, list[Commitment]]] = deque()
    by_address = {n.key.address: n for n in nodes}
    cursor = 0
    full_gas = 0  # the gas this relay's last mined batch used with all its commitments in
    while time.monotonic() < until:
        while waiting:
            try:
                receipt = w3.eth.get_transaction_receipt(HexBytes(waiting[0][0]))
            except Exception:
                break
            _, carried = waiting.popleft()
            included, refused = led.outcome(receipt)
            if len(included) == BATCH:
                full_gas = int(receipt["gasUsed"])
            missing = (
                [(c.node, c.seq) for c in carried]
                if int(receipt["status"]) != 1
                else [(node, seq) for node, seq, _ in refused]
            )
            for node, seq in sorted(missing, key=lambda m: -m[1]):
                by_address[node].rewind(seq)
        if len(waiting) >= in_flight:
            time.sleep(0.05)
            continue
        items = []
        for _ in range(BATCH):
            items.append(nodes[cursor].next(chain_id, ledger.address))
            cursor = (cursor + 1) % len(nodes)
        tx = {
            "from": account.address,
            "to": ledger.address,
            "data": led.batch_data(items),
            "nonce": nonce,
            "chainId": chain_id,
            **fees,
        }
        # As the node's submitter does: the client's estimate with its margin (a block is
        # filled by gas limits, not by the gas used). But never below what the last full batch
        # used: an estimate made while a one- or two-block reorg had put a batch of the same
        # nodes back in the pool counts its commitments as refused, too cheap.
        estimate = chain.estimate_gas(w3, tx, BATCH_GAS_BASE + BATCH_GAS_EACH * BATCH)
        tx["gas"] = max(estimate, int(full_gas * 1.2))
        signed = account.sign_transaction(tx)
        try:
            w3.eth.send_raw_transaction(signed.raw_transaction)
        except Exception as exc:  # counted: a bench that hides refusals reports too much
            with run.lock:
                run.errors.append(str(exc)[:200])
            time.sleep(0.5)
            nonce = w3.eth.get_transaction_count(account.address, "pending")
            continue
        nonce += 1
        waiting.append((bytes(signed.hash), [c for c, _ in items]))
        with run.lock:
            run.sent.append(Sent(index, bytes(signed.hash), time.monotonic(), BATCH, tx["gas"]))


def register(w3: Any, gov: LocalAccount, ledger: chain.Ledger, nodes: list[SimNode]) -> None:
    """Register every node, back to back (consecutive nonces), then wait for the receipts."""
    nonce = w3.eth.get_transaction_count(gov.address, "pending")
    fees = chain.fee_fields(w3)
    add = ledger.contract.functions.addNode
    hashes = []
    for i, node in enumerate(nodes):
        data = add(node.key.address, chain.DEFAULT_CAPACITY_W)._encode_transaction_data()
        tx = {"to": ledger.address, "data": data, "nonce": nonce + i, "gas": 150_000}
        tx.update(chainId=ledger.chain_id, **fees)
        hashes.append(w3.eth.send_raw_transaction(gov.sign_transaction(tx).raw_transaction))
    for h in hashes:
        assert w3.eth.wait_for_transaction_receipt(h, timeout=300)["status"] == 1


def why_failed(w3: Any, receipt: Any) -> str:
    """A failed batch replayed on the state before its block: the revert, or out of gas."""
    tx = w3.eth.get_transaction(receipt["transactionHash"])
    call = {"from": tx["from"], "to": tx["to"], "data": tx["input"], "gas": tx["gas"]}
    try:
        w3.eth.call(call, int(receipt["blockNumber"]) - 1)
    except Exception as exc:
        return str(exc)[:200]
    return f"no revert on replay (gas limit {tx['gas']:,}, used {receipt['gasUsed']:,})"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=600.0, help="how long relays send")
    p.add_argument("--relays", type=int, default=8)
    p.add_argument("--in-flight", type=int, default=4, help="unmined batches per relay")
    p.add_argument(
        "--nodes", type=int, help="simulated nodes (default: 100 × relays × (in-flight + 1))"
    )
    args = p.parse_args()
    least = BATCH * args.relays * (args.in_flight + 1)
    args.nodes = args.nodes or least
    if args.nodes < least:
        # A node in two unmined batches of one relay: the second's gas is estimated before
        # the first is mined (its commitment refused then), too low for when it is accepted.
        p.error(f"--nodes must be at least 100 × relays × (in-flight + 1) = {least}")

    # stopped early: the chain nodes are stopped too (the `finally` below runs)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    gov = Account.create()
    relays = [Account.create() for _ in range(args.relays)]
    funds = {a.address: 10**24 for a in [gov, *relays]}
    with tempfile.TemporaryDirectory(prefix="bench-clique-") as tmp:
        net = CliqueNetwork(Path(tmp), signers=3, period_s=BLOCK_S, funds=funds)
        try:
            result = measure(net, gov, relays, args)
        finally:
            net.stop()
    print(json.dumps(result))


def measure(
    net: CliqueNetwork, gov: LocalAccount, relays: list[LocalAccount], args: argparse.Namespace
) -> dict[str, Any]:
    began = time.monotonic()
    net.start()
    urls = [s.url for s in net.signers]
    w3 = chain.connect(urls[0])
    ledger = chain.Ledger(w3, chain.deploy(w3, gov, None, 1000))
    nodes = [SimNode(Account.create()) for _ in range(args.nodes)]
    register(w3, gov, ledger, nodes)

    run, stop = Run(), threading.Event()
    watcher = threading.Thread(target=watch_blocks, args=(urls[1], run, stop), daemon=True)
    watcher.start()
    start = time.monotonic()
    until = start + args.seconds
    threads = [
        threading.Thread(
            target=relay,
            # each relay carries its own nodes (their seqs stay in its nonce order), and sends
            # to a signer of its own, as relays on several machines would
            args=(
                i,
                urls[i % len(urls)],
                acct,
                nodes[i :: len(relays)],
                ledger,
                args.in_flight,
                until,
                run,
            ),
            daemon=True,
        )
        for i, acct in enumerate(relays)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # let the pool drain: every sent batch mined (or the bench fails)
    receipts = {}
    deadline = time.monotonic() + 120
    for s in run.sent:
        while True:
            try:
                receipts[s.tx_hash] = w3.eth.get_transaction_receipt(HexBytes(s.tx_hash))
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise RuntimeError("sent batches were never mined") from None
                time.sleep(0.2)
    stop.set()
    watcher.join()

    per_block: dict[int, int] = {}
    gas_block: dict[int, int] = {}
    latencies, full_batch_gas = [], []
    rejected = 0
    for s in run.sent:
        r = receipts[s.tx_hash]
        n = int(r["blockNumber"])
        included, refused = ledger.outcome(r)
        committed = len(included)
        rejected += len(refused)
        per_block[n] = per_block.get(n, 0) + committed
        gas_block[n] = gas_block.get(n, 0) + int(r["gasUsed"])
        if committed == BATCH:
            full_batch_gas.append(int(r["gasUsed"]))
        seen = run.block_seen.get(n)
        if seen is not None and s.sent_at >= start + WARMUP_S:
            latencies.append(seen - s.sent_at)
    # steady blocks: seen after the warm-up, before the relays stopped
    steady = sorted(n for n, seen in run.block_seen.items() if start + WARMUP_S <= seen <= until)
    counts = [per_block.get(n, 0) for n in steady]
    gas_limit = int(w3.eth.get_block("latest")["gasLimit"])
    failed = [s for s in run.sent if int(receipts[s.tx_hash]["status"]) != 1]
    failed_why = [why_failed(w3, receipts[s.tx_hash]) for s in failed[:3]]
    if not full_batch_gas:
        statuses = {int(receipts[s.tx_hash]["status"]) for s in run.sent}
        raise RuntimeError(
            f"no batch committed all its {BATCH} commitments: {len(run.sent)} sent, "
            f"statuses {statuses}, {rejected} commitments rejected, errors {run.errors[:3]}"
        )
    batch_gas = statistics.median(full_batch_gas)
    predicted = gas_limit // batch_gas * BATCH
    # geth fills a block by the transactions' gas limits, not by the gas they end up using
    tx_limit = statistics.median(x.gas_limit for x in run.sent)
    by_limits = int(gas_limit // tx_limit) * BATCH
    measured = statistics.mean(counts) if counts else 0.0
    blocks_a_period = PERIOD_MS // 1000 // BLOCK_S
    signers = {net.signers[1].signer_of(n).lower() for n in steady[-12:]}
    stamps = [int(w3.eth.get_block(n)["timestamp"]) for n in (steady[0], steady[-1])]
    interval = (stamps[1] - stamps[0]) / (len(steady) - 1) if len(steady) > 1 else None
    return {
        "bench": "chain_clique",
        "chain": f"geth 1.13.15 clique, 3 signers, {BLOCK_S} s blocks, gas limit {gas_limit:,}",
        "seconds": args.seconds,
        "nodes": args.nodes,
        "relays": args.relays,
        "batches_sent": len(run.sent),
        "setup_s": round(start - began, 1),
        "send_errors": len(run.errors),
        "commitments_committed": sum(per_block.values()),
        "commitments_rejected": rejected,
        "batches_failed": len(failed),
        "batches_failed_why": failed_why,
        "steady_blocks": len(counts),
        "block_interval_s_mean": round(interval, 2) if interval else None,
        "sealing_signers_last_12_blocks": len(signers),
        "commitments_per_block_mean": round(measured, 1),
        "commitments_per_block_min": min(counts) if counts else 0,
        "commitments_per_block_max": max(counts) if counts else 0,
        "gas_per_block_mean": round(statistics.mean(gas_block.get(n, 0) for n in steady))
        if steady
        else 0,
        "inclusion_latency_s_p50": round(percentile(latencies, 0.5), 2) if latencies else None,
        "inclusion_latency_s_p99": round(percentile(latencies, 0.99), 2) if latencies else None,
        "full_batch_gas_median": batch_gas,
        "gas_per_commitment": round(batch_gas / BATCH),
        "gas_per_reading": round(batch_gas / (BATCH * READINGS), 3),
        "reference_per_block_from_gas_this_run": predicted,
        "reference_per_block_docs": DOC_PER_BLOCK,
        "batch_gas_limit_median": tx_limit,
        "per_block_by_gas_limits": by_limits,
        "measured_vs_reference": round(measured / predicted, 3) if predicted else None,
        "nodes_at_15min_measured": round(measured * blocks_a_period),
        "nodes_at_15min_docs_5s_blocks": DOC_NODES,
        "errors": run.errors[:3],
    }


if __name__ == "__main__":
    main()
