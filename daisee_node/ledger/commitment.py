"""The signed commitment of one period, exactly as the ledger contract hashes and checks it."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from typing import Any

from eth_hash.auto import keccak

from daisee_node import safejson
from daisee_node.errors import DaiseeError

DOMAIN_NAME = "DAISEE"
DOMAIN_VERSION = "1"
COMMITMENT_TYPE = (
    "Commitment(address node,uint64 seq,uint64 t0,uint64 t1,bytes32 root,uint32 count,"
    "uint64 importWh,uint64 exportWh,bytes32 prevHash,bytes32 rulesHash)"
)
COMMITMENT_TYPEHASH = keccak(COMMITMENT_TYPE.encode())
#: the default capacity of a node (W): the largest French household connection (36 kVA)
DEFAULT_CAPACITY_W = 36_000
MS_PER_HOUR = 3_600_000
_DOMAIN_TYPEHASH = keccak(
    b"EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"
)


class CommitmentError(DaiseeError):
    """A commitment or its signature is malformed."""


def _word(value: int) -> bytes:
    return value.to_bytes(32, "big")


def _address_word(address: str) -> bytes:
    return b"\x00" * 12 + bytes.fromhex(address.removeprefix("0x"))


@dataclass(frozen=True)
class Commitment:
    """One period of one node: `[t0, t1)` in ms, the Merkle root of its readings and totals."""

    node: str  # checksum address
    seq: int
    t0: int
    t1: int
    root: bytes
    count: int
    import_wh: int
    export_wh: int
    prev_hash: bytes
    rules_hash: bytes

    def struct_hash(self) -> bytes:
        """EIP-712 `hashStruct`: also the hash the next commitment's `prev_hash` names."""
        return keccak(
            COMMITMENT_TYPEHASH
            + _address_word(self.node)
            + _word(self.seq)
            + _word(self.t0)
            + _word(self.t1)
            + self.root
            + _word(self.count)
            + _word(self.import_wh)
            + _word(self.export_wh)
            + self.prev_hash
            + self.rules_hash
        )

    def digest(self, chain_id: int, contract: str) -> bytes:
        """The EIP-712 digest the node signs for this commitment on a given ledger."""
        return keccak(b"\x19\x01" + domain_separator(chain_id, contract) + self.struct_hash())

    def as_tuple(self) -> tuple[Any, ...]:
        """The ABI tuple for contract calls."""
        return (
            self.node,
            self.seq,
            self.t0,
            self.t1,
            self.root,
            self.count,
            self.import_wh,
            self.export_wh,
            self.prev_hash,
            self.rules_hash,
        )

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("root", "prev_hash", "rules_hash"):
            out[key] = "0x" + out[key].hex()
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Commitment:
        try:
            fields = dict(data)
            for key in ("root", "prev_hash", "rules_hash"):
                raw = bytes.fromhex(str(fields[key]).removeprefix("0x"))
                if len(raw) != 32:
                    raise ValueError(f"{key} is not 32 bytes")
                fields[key] = raw
            for key in ("seq", "t0", "t1", "count", "import_wh", "export_wh"):
                fields[key] = int(fields[key])
            return cls(**fields)
        except (KeyError, TypeError, ValueError) as exc:
            raise CommitmentError(f"malformed commitment: {exc}") from exc

    def with_(self, **changes: Any) -> Commitment:
        return replace(self, **changes)


def capacity_wh(capacity_w: int, t0: int, t1: int) -> int:
    """The most whole Wh a `capacity_w` connection carries over [t0, t1) ms, as the ledger
    contract counts it (it refuses a commitment claiming more)."""
    return capacity_w * max(0, t1 - t0) // MS_PER_HOUR


def domain_separator(chain_id: int, contract: str) -> bytes:
    return keccak(
        _DOMAIN_TYPEHASH
        + keccak(DOMAIN_NAME.encode())
        + keccak(DOMAIN_VERSION.encode())
        + _word(chain_id)
        + _address_word(contract)
    )


def sign(commitment: Commitment, private_key: bytes, chain_id: int, contract: str) -> bytes:
    """A 65-byte (r, s, v) signature of the commitment's EIP-712 digest."""
    # eth-account is imported when the node first signs, not when it starts: hundreds of ms
    from eth_account import Account

    signed = Account.unsafe_sign_hash(commitment.digest(chain_id, contract), private_key)
    return bytes(signed.signature)


def signer(commitment: Commitment, signature: bytes, chain_id: int, contract: str) -> str | None:
    """The address that signed, or None when the signature is not a valid one."""
    if len(signature) != 65:
        return None
    from eth_keys import keys as eth_keys

    v = signature[64]
    v = v - 27 if v >= 27 else v
    try:
        sig = eth_keys.Signature(signature[:64] + bytes([v]))
        key = sig.recover_public_key_from_msg_hash(commitment.digest(chain_id, contract))
    except Exception:
        return None
    return key.to_checksum_address()


def signed_to_json(commitment: Commitment, signature: bytes) -> str:
    return json.dumps({"commitment": commitment.to_json(), "signature": "0x" + signature.hex()})


def signed_from_json(text: str | bytes) -> tuple[Commitment, bytes]:
    try:
        data = safejson.loads(text)
        signature = bytes.fromhex(str(data["signature"]).removeprefix("0x"))
        return Commitment.from_json(data["commitment"]), signature
    except (KeyError, TypeError, ValueError) as exc:
        raise CommitmentError(f"malformed signed commitment: {exc}") from exc
