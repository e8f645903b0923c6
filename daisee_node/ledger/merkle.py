"""Reading leaves and Merkle trees, as the ledger contract checks them.

A leaf is `keccak256(abi.encode(node, channel_id, t_ms, value_micro, quality))`, leaves are sorted
by `(t_ms, channel_id)`, and pairs are hashed sorted (OpenZeppelin's `MerkleProof` convention).
Neighbours are paired level by level; an odd node at the end of a level moves up unchanged, so
its proof simply has no sibling at that level.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

from eth_hash.auto import keccak

ZERO32 = b"\x00" * 32


@lru_cache(maxsize=4096)
def channel_id(name: str) -> bytes:
    """A channel's id in the ledger: the keccak of its name, so anyone can derive it."""
    return keccak(name.encode())


def value_micro(value: float | None) -> int:
    """A reading's value in millionths of its unit (0 for a reading without a value)."""
    if value is None or math.isnan(value) or math.isinf(value):
        return 0
    return round(value * 1_000_000)


def reading_leaf(node: bytes, channel: bytes, t_ms: int, micro: int, quality: int) -> bytes:
    return keccak(
        ZERO32[:12]
        + node
        + channel
        + t_ms.to_bytes(32, "big")
        + micro.to_bytes(32, "big", signed=True)
        + quality.to_bytes(32, "big")
    )


def hash_pair(a: bytes, b: bytes) -> bytes:
    return keccak(a + b) if a < b else keccak(b + a)


def levels(leaves: Sequence[bytes]) -> list[list[bytes]]:
    """Every level of the tree, leaves first and the root's level last."""
    if not leaves:
        return [[ZERO32]]
    out = [list(leaves)]
    level = out[0]
    while len(level) > 1:
        nxt = [hash_pair(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        out.append(nxt)
        level = nxt
    return out


def root(leaves: Sequence[bytes]) -> bytes:
    """The Merkle root (all zeros for no leaves, the leaf itself for one)."""
    return levels(leaves)[-1][0]


def proof(tree: list[list[bytes]], index: int) -> list[bytes]:
    """The sibling hashes that lead from leaf `index` to the root."""
    path = []
    for level in tree[:-1]:
        sibling = index ^ 1
        if sibling < len(level):
            path.append(level[sibling])
        index //= 2
    return path


def verify(path: Sequence[bytes], expected_root: bytes, leaf: bytes) -> bool:
    node = leaf
    for sibling in path:
        node = hash_pair(node, sibling)
    return node == expected_root
