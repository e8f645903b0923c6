"""The ledger contract on py-evm: registry, signatures, sequencing, credits and proofs."""

from __future__ import annotations

import pytest
from eth_account import Account
from eth_hash.auto import keccak
from web3 import Web3

from daisee_node.ledger import chain, merkle
from daisee_node.ledger.commitment import Commitment, sign

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
