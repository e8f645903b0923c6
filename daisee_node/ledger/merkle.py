"""Reading leaves and Merkle trees, as the ledger contract checks them.

A leaf is `keccak256(abi.encode(node, channel_id, t_ms, value_micro, quality))`, leaves are sorted
by `(t_ms, channel_id)`, and pairs are hashed sorted (OpenZeppelin's `MerkleProof` convention).
Neighbours are paired level by level; an odd node at the end of a level moves up unchanged, so
its proof simply has no sibling at that level.

Salted leaves. A proof hands its holder the sibling hashes on the way to the root, and a sibling
that is a plain leaf can be brute-forced when its reading is guessable (the house's load at the
same millisecond as a line reading proven in public, a flat night). So a node's tree is built
over `hash_pair(leaf, salt)`, the salt `keccak(secret ‖ leaf)` from a secret derived from the
node key: every sibling a proof reveals hides a 256-bit value nobody else can compute. A proof of
one reading starts with that reading's own salt, as its first sibling: the ledger contract's
`verifyReading` folds it like any other, so the contract is unchanged, and no reading is revealed
that the node did not give.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import lru_cache

from eth_hash.auto import keccak

ZERO32 = b"\x00" * 32
#: pairs hashed between two calls of a `pause` callback
PAUSE_EVERY = 32


def no_pause() -> None:
    """The default `pause`: go straight on."""


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


def root(leaves: Sequence[bytes], pause: Callable[[], None] = no_pause) -> bytes:
    """The Merkle root (all zeros for no leaves, the leaf itself for one); the same as
    `levels(leaves)[-1][0]`, keeping only one level in memory at a time."""
    return packed_root(b"".join(leaves), pause)


def packed_root(packed: bytes | bytearray, pause: Callable[[], None] = no_pause) -> bytes:
    """The Merkle root of leaves given end to end, 32 bytes each.

    Each level is one flat bytes object: the garbage collector never walks it, where a list of
    hundreds of thousands of hashes would be walked at every collection, holding the GIL for
    milliseconds. `pause` is called every `PAUSE_EVERY` pairs: a worker thread uses it to give
    the event loop its turn.
    """
    level = bytes(packed)
    n = len(level) // 32
    if n == 0:
        return ZERO32
    while n > 1:
        nxt = bytearray()
        for start in range(0, n - 1, 2 * PAUSE_EVERY):
            for i in range(start, min(n - 1, start + 2 * PAUSE_EVERY), 2):
                at = 32 * i
                nxt += hash_pair(level[at : at + 32], level[at + 32 : at + 64])
            pause()
        if n % 2:
            nxt += level[32 * (n - 1) :]
        level = bytes(nxt)
        n = len(level) // 32
    return level


#: keeps the salt secret of a node apart from anything else its key ever hashes
SALT_DOMAIN = b"daisee-node leaf salt v1"


def salt_secret(private_key: bytes) -> bytes:
    """The node's salt secret, derived from its private key (no second secret to keep)."""
    return keccak(SALT_DOMAIN + private_key)


def leaf_salt(secret: bytes, leaf: bytes) -> bytes:
    """The salt of one leaf: only its node can make it, and it is given with the reading."""
    return keccak(secret + leaf)


def salt_packed(
    packed: bytes | bytearray, secret: bytes, pause: Callable[[], None] = no_pause
) -> bytes:
    """Leaves given end to end (32 bytes each), each replaced by `hash_pair(leaf, salt)`."""
    out = bytearray()
    n = len(packed) // 32
    for start in range(0, n, 2 * PAUSE_EVERY):
        for i in range(start, min(n, start + 2 * PAUSE_EVERY)):
            leaf = bytes(packed[32 * i : 32 * i + 32])
            out += hash_pair(leaf, keccak(secret + leaf))
        pause()
    return bytes(out)


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
