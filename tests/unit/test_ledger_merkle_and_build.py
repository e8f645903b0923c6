"""Merkle trees of any size, and the committed contract artifacts against their sources."""

from __future__ import annotations

import json

import pytest
from eth_hash.auto import keccak

from daisee_node.ledger import build, merkle


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 13, 17])
def test_every_leaf_has_a_proof_and_only_its_own(n):
    leaves = [keccak(bytes([i])) for i in range(n)]
    tree = merkle.levels(leaves)
    root = tree[-1][0]
    assert merkle.root(leaves) == root
    for i, leaf in enumerate(leaves):
        path = merkle.proof(tree, i)
        assert merkle.verify(path, root, leaf)
        assert len(path) <= max(1, (n - 1).bit_length())
        assert not merkle.verify(path, root, keccak(b"other" + bytes([i])))
    assert merkle.root([]) == b"\0" * 32
    assert merkle.root(leaves[:1]) == leaves[0]


@pytest.mark.parametrize("n", [1, 2, 7])
def test_salted_leaves_prove_with_their_salt_and_hide_their_neighbours(n):
    secret = merkle.salt_secret(b"\x11" * 32)
    leaves = [keccak(bytes([i])) for i in range(n)]
    salted = merkle.salt_packed(b"".join(leaves), secret)
    hidden = [salted[i : i + 32] for i in range(0, len(salted), 32)]
    tree = merkle.levels(hidden)
    root = tree[-1][0]
    for i, leaf in enumerate(leaves):
        path = [merkle.leaf_salt(secret, leaf), *merkle.proof(tree, i)]
        assert merkle.verify(path, root, leaf)  # the contract folds the salt like a sibling
        assert not merkle.verify(path[1:], root, leaf)
        assert not set(leaves) - {leaf} & set(path)  # no other plain leaf is revealed
    # another node's secret gives other salts, and another root
    other = merkle.salt_packed(b"".join(leaves), merkle.salt_secret(b"\x22" * 32))
    assert merkle.root([other[i : i + 32] for i in range(0, len(other), 32)]) != root


def test_value_micro_rounds_and_maps_missing_values_to_zero():
    assert merkle.value_micro(1.2345675) == 1_234_568
    assert merkle.value_micro(-0.5) == -500_000
    assert merkle.value_micro(float("nan")) == 0
    assert merkle.value_micro(None) == 0


def test_committed_artifacts_match_the_solidity_sources():
    """Fails when a contract changed without `python -m daisee_node.ledger.build`."""
    compiled = build.compile_contracts()
    for name, artifact in compiled.items():
        committed = json.loads((build.ARTIFACTS / f"{name}.json").read_text())
        assert committed["abi"] == artifact["abi"], name
        assert committed["bytecode"] == artifact["bytecode"], name
        assert committed["evmVersion"] == "paris"
        assert len(artifact["bytecode"]) > 1000
    assert build.main(["--check"]) == 0
