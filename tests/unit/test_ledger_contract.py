"""The ledger contract on py-evm: registry, signatures, sequencing, credits and proofs."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from eth_account import Account
from eth_hash.auto import keccak
from web3 import Web3
from web3.logs import DISCARD

from daisee_node.ledger import build, chain, merkle
from daisee_node.ledger.commitment import Commitment, sign
from daisee_node.ledger.keys import new_keystore
from daisee_node.ledger.service import LedgerService
from daisee_node.ledger.settings import ChainSection
from daisee_node.readings import Reading
from daisee_node.store import Retention, Store
from tests.support.clocks import FixedClock

WH_PER_CREDIT = 1000


@pytest.fixture
def env():
    w3 = chain.connect(chain.EMBEDDED)
    gov = Account.from_key(chain.TESTER_KEYS[0])
    address = chain.deploy(w3, gov, None, WH_PER_CREDIT)
    ledger = chain.Ledger(w3, address)
    node = Account.create()
    ledger.set_node(gov, node.address)
    return w3, gov, ledger, node


def readings(node: str, t0: int, n: int) -> list[tuple[bytes, int, int, int]]:
    """n readings of two channels, one per second from t0."""
    out = []
    for i in range(n):
        for name in ("grid.power_w", "grid.export_wh"):
            out.append((merkle.channel_id(name), t0 + i * 1000, (i * 7 - 3) * 1_000_000, 0))
    return out


def make(node, seq, t0, t1, rows, prev=b"\0" * 32, export_wh=0) -> tuple[Commitment, list]:
    addr = bytes.fromhex(node.address[2:])
    rows = sorted(rows, key=lambda r: (r[1], r[0]))
    leaves = [merkle.reading_leaf(addr, *r) for r in rows]
    c = Commitment(
        node.address,
        seq,
        t0,
        t1,
        merkle.root(leaves),
        len(rows),
        5,
        export_wh,
        prev,
        keccak(b"rules"),
    )
    return c, leaves


def submit(w3, sender, ledger, items):
    receipt = chain.send(w3, sender, {"to": ledger.address, "data": ledger.batch_data(items)})
    return ledger.outcome(receipt)


def test_hashes_and_digest_match_the_contract(env):
    _w3, _gov, ledger, node = env
    c, _ = make(node, 1, 0, 900_000, readings(node.address, 0, 3))
    fn = ledger.contract.functions
    assert bytes(fn.commitmentHash(c.as_tuple()).call()) == c.struct_hash()
    assert bytes(fn.digest(c.as_tuple()).call()) == c.digest(ledger.chain_id, ledger.address)
    leaf_args = (merkle.channel_id("a.b"), 1234, -5_000_000, 3)
    addr = bytes.fromhex(node.address[2:])
    assert bytes(fn.readingLeaf(node.address, leaf_args).call()) == merkle.reading_leaf(
        addr, *leaf_args
    )


def test_commit_chain_of_periods_mints_credits_and_proves_each_reading(env):
    w3, gov, ledger, node = env
    rows1 = readings(node.address, 0, 5)
    c1, leaves1 = make(node, 1, 0, 900_000, rows1, export_wh=1500)
    c2, _ = make(
        node,
        2,
        900_000,
        1_800_000,
        readings(node.address, 900_000, 4),
        prev=c1.struct_hash(),
        export_wh=250,
    )
    ok, rejected = submit(
        w3,
        gov,
        ledger,
        [
            (c1, sign(c1, node.key, ledger.chain_id, ledger.address)),
            (c2, sign(c2, node.key, ledger.chain_id, ledger.address)),
        ],
    )
    assert rejected == []
    assert [i.seq for i in ok] == [1, 2]
    assert ok[0].tx_hash == ok[1].tx_hash  # one batch
    head = ledger.head(node.address)
    assert (head.seq, head.t1) == (2, 1_800_000) and head.follows(c2.struct_hash())
    # 1750 Wh at 1000 Wh per credit, 18 decimals
    assert ledger.credit().functions.balanceOf(node.address).call() == 1750 * 10**15

    batch_proof = ledger.batch_proof(ok[0].tx_hash, c1.struct_hash())
    assert len(batch_proof) == 1  # its sibling: c2
    tree = merkle.levels(leaves1)
    ordered = sorted(rows1, key=lambda r: (r[1], r[0]))
    for index in (0, 3, len(ordered) - 1):
        proof = merkle.proof(tree, index)
        assert ledger.verify_reading(c1, batch_proof, ordered[index], proof)
    # a tampered value, time or quality fails
    ch, t, v, q = ordered[3]
    proof = merkle.proof(tree, 3)
    assert not ledger.verify_reading(c1, batch_proof, (ch, t, v + 1, q), proof)
    assert not ledger.verify_reading(c1, batch_proof, (ch, t, v, 1), proof)
    # a commitment that was never recorded proves nothing, even with a valid reading proof
    assert not ledger.verify_reading(c1.with_(count=11), batch_proof, ordered[3], proof)
    assert not ledger.verify_reading(c1, [], ordered[3], proof)


def test_forged_replayed_and_unregistered_commitments_are_rejected(env):
    w3, gov, ledger, node = env
    cid, addr = ledger.chain_id, ledger.address
    c1, _ = make(node, 1, 0, 900_000, readings(node.address, 0, 2))
    sig1 = sign(c1, node.key, cid, addr)
    assert submit(w3, gov, ledger, [(c1, sig1)])[1] == []

    stranger = Account.create()
    c2, _ = make(
        node, 2, 900_000, 1_800_000, readings(node.address, 900_000, 2), prev=c1.struct_hash()
    )
    forged = sign(c2, stranger.key, cid, addr)
    altered = c2.with_(export_wh=10**6)  # signed c2, claims more export
    c_stranger, _ = make(stranger, 1, 0, 900_000, readings(stranger.address, 0, 2))
    ok, rejected = submit(
        w3,
        gov,
        ledger,
        [
            (c1, sig1),  # replay
            (c2, forged),
            (altered, sign(c2, node.key, cid, addr)),
            (c_stranger, sign(c_stranger, stranger.key, cid, addr)),
        ],
    )
    assert ok == []
    assert rejected == [
        (node.address, 1, "seq already committed"),
        (node.address, 2, "bad signature"),
        (node.address, 2, "bad signature"),
        (stranger.address, 1, "node not registered"),
    ]
    assert ledger.head(node.address).seq == 1
    assert ledger.credit().functions.totalSupply().call() == 0


def test_prev_hash_overlap_early_seq_and_removal(env):
    w3, gov, ledger, node = env
    cid, addr = ledger.chain_id, ledger.address
    c1, _ = make(node, 1, 0, 900_000, readings(node.address, 0, 1))
    bad_prev, _ = make(node, 2, 900_000, 1_800_000, [], prev=b"\1" * 32)
    overlap, _ = make(node, 2, 800_000, 1_800_000, [], prev=c1.struct_hash())
    early, _ = make(node, 5, 4_500_000, 5_400_000, [], prev=b"\2" * 32)
    items = [(c, sign(c, node.key, cid, addr)) for c in (c1, bad_prev, overlap, early)]
    receipt = chain.send(w3, gov, {"to": ledger.address, "data": ledger.batch_data(items)})
    ok, rejected = ledger.outcome(receipt)
    assert [i.seq for i in ok] == [1]
    assert [r[2] for r in rejected] == [
        "prevHash does not match",
        "period overlaps or is empty",
        "seq is not the next one",
    ]

    ledger.set_node(gov, node.address, registered=False)
    c2, _ = make(node, 2, 900_000, 1_800_000, [], prev=c1.struct_hash())
    assert submit(w3, gov, ledger, [(c2, sign(c2, node.key, cid, addr))])[1][0][2] == (
        "node not registered"
    )
    # only governance manages the registry
    chain.fund(w3, gov, node.address, 10**18)
    with pytest.raises(Exception, match=r"revert|OnlyGovernance"):
        ledger.set_node(node, node.address)
    with pytest.raises(Exception, match=r"revert|OnlyGovernance"):
        ledger.set_capacity(node, node.address, 10**6)


def test_any_account_may_relay_a_signed_commitment(env):
    w3, _gov, ledger, node = env
    relayer = Account.from_key(chain.TESTER_KEYS[1])
    c1, _ = make(node, 1, 0, 900_000, readings(node.address, 0, 2))
    ok, _ = submit(w3, relayer, ledger, [(c1, sign(c1, node.key, ledger.chain_id, ledger.address))])
    assert [i.node for i in ok] == [node.address]
    assert Web3.is_checksum_address(ok[0].node)


def test_credits_are_minted_once_per_run_of_one_nodes_commitments(env):
    w3, gov, ledger, node = env
    cid, addr = ledger.chain_id, ledger.address
    other = Account.create()
    ledger.set_node(gov, other.address)
    c1, _ = make(node, 1, 0, 900_000, [], export_wh=300)
    c2, _ = make(node, 2, 900_000, 1_800_000, [], prev=c1.struct_hash(), export_wh=450)
    o1, _ = make(other, 1, 0, 900_000, [], export_wh=70)
    items = [(c1, sign(c1, node.key, cid, addr)), (c2, sign(c2, node.key, cid, addr))]
    items.append((o1, sign(o1, other.key, cid, addr)))
    receipt = chain.send(w3, gov, {"to": ledger.address, "data": ledger.batch_data(items)})
    assert [i.seq for i in ledger.outcome(receipt)[0]] == [1, 2, 1]
    credit = ledger.credit()
    mints = credit.events.Transfer().process_receipt(receipt, errors=DISCARD)
    # one mint for the node's two periods (their sum), one for the other node
    assert [(m["args"]["to"], m["args"]["value"]) for m in mints] == [
        (node.address, 750 * 10**15),
        (other.address, 70 * 10**15),
    ]
    assert credit.functions.totalSupply().call() == 820 * 10**15


PROBE = """
// SPDX-License-Identifier: MIT
pragma solidity 0.8.28;

interface ILedger {
    struct Commitment {
        address node; uint64 seq; uint64 t0; uint64 t1; bytes32 root; uint32 count;
        uint64 importWh; uint64 exportWh; bytes32 prevHash; bytes32 rulesHash;
    }
    function verifyCommitment(Commitment calldata c, bytes32[] calldata batchProof)
        external view returns (bool);
}

/// What a settlement contract does: rely on a commitment's totals once the ledger vouches.
contract SettlementProbe {
    ILedger public immutable ledger;

    constructor(ILedger ledger_) {
        ledger = ledger_;
    }

    function committedExport(ILedger.Commitment calldata c, bytes32[] calldata batchProof)
        external view returns (uint64)
    {
        require(ledger.verifyCommitment(c, batchProof), "not recorded");
        return c.exportWh;
    }
}
"""


def test_a_contract_verifies_any_commitments_totals_against_the_stored_batch_root(env):
    w3, gov, ledger, node = env
    cid, addr = ledger.chain_id, ledger.address
    other = Account.create()
    ledger.set_node(gov, other.address)
    c1, _ = make(node, 1, 0, 900_000, readings(node.address, 0, 3), export_wh=12)
    c2, _ = make(node, 2, 900_000, 1_800_000, [], prev=c1.struct_hash(), export_wh=34)
    o1, _ = make(other, 1, 0, 900_000, [], export_wh=56)
    signed = [(c, sign(c, k, cid, addr)) for c, k in ((c1, node.key), (c2, node.key))]
    signed.append((o1, sign(o1, other.key, cid, addr)))
    ok, _ = submit(w3, gov, ledger, signed)
    assert len(ok) == 3

    probe_art = build.compile_contracts({"SettlementProbe": PROBE})["SettlementProbe"]
    args = w3.codec.encode(["address"], [ledger.address]).hex()
    receipt = chain.send(w3, gov, {"data": probe_art["bytecode"] + args})
    probe = w3.eth.contract(address=receipt["contractAddress"], abi=probe_art["abi"]).functions

    for c in (c1, c2, o1):
        proof = ledger.batch_proof(ok[0].tx_hash, c.struct_hash())
        assert ledger.verify_commitment(c, proof)
        assert probe.committedExport(c.as_tuple(), proof).call() == c.export_wh
        # a claimed total the node never committed is refused
        inflated = c.with_(export_wh=c.export_wh + 1)
        assert not ledger.verify_commitment(inflated, proof)
        with pytest.raises(Exception, match="not recorded"):
            probe.committedExport(inflated.as_tuple(), proof).call()
    # a proof of another commitment does not vouch for this one
    wrong = ledger.batch_proof(ok[0].tx_hash, o1.struct_hash())
    assert not ledger.verify_commitment(c1, wrong)


# -- the submitter's batching with default settings --------------------------------------------

PERIOD_MS = 900_000
T0 = 1_781_000_000_000 // 3_600_000 * 3_600_000  # a whole hour in 2026


async def test_a_default_node_sends_its_first_period_at_once_then_an_hour_of_periods_a_tx(
    tmp_path: Path,
) -> None:
    """Defaults: 15-minute periods, `submit_interval_s` an hour. After the start-up batch, four
    periods share each transaction; a lone period goes once it ended an hour ago."""
    data = tmp_path / "data"
    new_keystore(data / "node-key.json", data / "node-key.pass")
    settings = ChainSection(rpc_url="embedded", export_channel="grid.export_wh")
    assert (settings.period_s, settings.submit_interval_s) == (900, 3600)
    clock = FixedClock(T0)
    store = Store(tmp_path / "node.db", clock=clock, retention=Retention(flush_interval_s=0.01))
    await store.open()
    writer = asyncio.create_task(store.run())
    svc = LedgerService(settings, store, clock, data, [], {})
    await svc.connect()
    assert svc.ledger is not None and svc.submitter is not None
    ledger, submitter = svc.ledger, svc.submitter

    async def period(k: int, *, seal: bool = True) -> None:
        """Period k from T0 is stored; the clock moves past its seal time; a submit round."""
        t0 = T0 + (k - 1) * PERIOD_MS
        store.put_many(
            [Reading("grid.export_wh", t0 + s * 60_000, 10.0 * k + s) for s in range(15)]
        )
        await store.flush()
        clock.t_ms = t0 + PERIOD_MS + 11_000
        if seal:
            assert len(await svc.sealer.seal_due(ledger.chain_id, ledger.address)) == 1
        for _ in range(4):  # sent, mined, confirmed
            await submitter.round()
            await svc._mine_embedded()

    def batches() -> list[list[int]]:
        logs = ledger.contract.events.Committed().get_logs(from_block=0)
        by_tx: dict[bytes, list[int]] = {}
        for ev in logs:
            by_tx.setdefault(bytes(ev["transactionHash"]), []).append(ev["args"]["seq"])
        return list(by_tx.values())

    await period(1)
    assert batches() == [[1]]  # the first batch after a start goes at once
    for k in (2, 3, 4):
        await period(k)
        assert batches() == [[1]]  # waiting: three periods cover 45 minutes
        assert (await svc.outbox.get(svc.address, k)).state == "pending"  # type: ignore[union-attr]
    await period(5)
    assert batches() == [[1], [2, 3, 4, 5]]
    await period(6)
    assert batches() == [[1], [2, 3, 4, 5]]
    # no further period sealed (the node lost its meter, say): seq 6 goes an hour after its end
    clock.t_ms = T0 + 6 * PERIOD_MS + 3_600_000 - 1_000
    await submitter.round()
    assert batches() == [[1], [2, 3, 4, 5]]
    clock.t_ms += 1_000
    await submitter.round()
    await svc._mine_embedded()
    assert batches() == [[1], [2, 3, 4, 5], [6]]
    store.stop()
    await writer
    await store.close()
