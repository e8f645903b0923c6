"""The community registry contract over web3: deploy it, record allocation keys, read them back;
grant, revoke and read data access grants.

Synchronous web3, like `daisee_node.ledger.chain`. Transactions are run as a call first, so a
refusal says why in one line and nothing is sent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from eth_utils import keccak, to_checksum_address
from web3.logs import DISCARD

from daisee_node.ledger import chain
from daisee_node.ledger.chain import ChainError, artifact

if TYPE_CHECKING:
    from eth_account.signers.local import LocalAccount
    from web3 import Web3
    from web3.types import BlockIdentifier

NAME = "CommunityRegistry"
ERROR_TEXT = {
    "OnlyGovernance": "only the ledger's governance account may record a key",
    "ZeroHash": "the key hash is zero",
    "TooLate": "a key may only be recorded for a start not yet reached by the chain's clock, "
    "and not before the last recorded key's start",
    "NoKey": "no key is recorded for that time",
    "NotMember": "only a node the ledger registers may grant access to its data",
    "BadRole": "no such data role",
    "ZeroRecipient": "the recipient is the zero address",
    "PastUntil": "a grant must end after the chain's clock",
    "NoGrant": "there is no such grant to revoke",
}

#: data roles as the contract numbers them (see CommunityRegistry.sol)
ROLES = {"own": 1, "supplier": 2, "grid": 3}


@dataclass(frozen=True)
class KeyRecord:
    """One recorded key: the sha256 of its file (0x hex) and the first period's start (ms)."""

    index: int
    key_hash: str
    from_ms: int


@dataclass(frozen=True)
class Grant:
    """A member's grant of a data role to a recipient, until `until_ms` (exclusive; 0: none)."""

    member: str
    recipient: str
    role: str
    until_ms: int


def role_number(role: str) -> int:
    try:
        return ROLES[role]
    except KeyError:
        raise ChainError(f"no data role {role!r}: one of {', '.join(ROLES)}") from None


def deploy(w3: Web3, account: LocalAccount, ledger_address: str) -> str:
    """Deploy a registry beside the ledger at `ledger_address`; its address."""
    ledger = chain.Ledger(w3, ledger_address)
    ledger.check_deployed()
    args = w3.codec.encode(["address"], [ledger.address])
    receipt = chain.send(w3, account, {"data": artifact(NAME)["bytecode"] + args.hex()})
    return str(receipt["contractAddress"])


class Registry:
    """The deployed community registry at `address`."""

    def __init__(self, w3: Web3, address: str) -> None:
        self.w3 = w3
        self.address = to_checksum_address(address)
        self.contract = w3.eth.contract(address=self.address, abi=artifact(NAME)["abi"])

    def check_deployed(self) -> None:
        if not self.w3.eth.get_code(self.address):
            raise ChainError(f"no community registry at {self.address}")
        try:
            self.contract.functions.keyCount().call()
        except Exception:
            raise ChainError(f"{self.address} is not a community registry") from None

    def ledger_address(self) -> str:
        return str(self.contract.functions.ledger().call())

    def records(self, block: BlockIdentifier = "latest") -> list[KeyRecord]:
        """Every recorded key, oldest start first, as of `block`."""
        fns = self.contract.functions
        count = int(fns.keyCount().call(block_identifier=block))
        found = []
        for i in range(count):
            key_hash, from_ms = fns.keyAt(i).call(block_identifier=block)
            found.append(KeyRecord(i, "0x" + bytes(key_hash).hex(), int(from_ms)))
        return found

    def key_for(self, t_ms: int, block: BlockIdentifier = "latest") -> KeyRecord | None:
        """The record that applies to the period starting at `t_ms` (None before the first)."""
        try:
            key_hash, from_ms, index = self.contract.functions.keyFor(t_ms).call(
                block_identifier=block
            )
        except Exception as exc:
            from daisee_node.ledger.market import revert_data

            if revert_data(exc) == _selector("NoKey()"):
                return None
            raise
        return KeyRecord(int(index), "0x" + bytes(key_hash).hex(), int(from_ms))

    def record_key(self, account: LocalAccount, key_hash: str, from_ms: int) -> KeyRecord:
        """Record `key_hash` (0x + 64 hex) from `from_ms` on; the record as the chain holds it."""
        digest = bytes.fromhex(key_hash.removeprefix("0x"))
        receipt = self._send(account, self.contract.functions.recordKey(digest, from_ms))
        (event,) = self.contract.events.KeyRecorded().process_receipt(receipt, errors=DISCARD)
        args: dict[str, Any] = dict(event["args"])
        return KeyRecord(int(args["index"]), "0x" + bytes(args["keyHash"]).hex(), args["fromMs"])

    # -- data access grants ----------------------------------------------------------------

    def grant(self, account: LocalAccount, recipient: str, role: str, until_ms: int) -> Grant:
        """`account` (a registered node's key) grants `recipient` `role` until `until_ms`."""
        call = self.contract.functions.grant(
            to_checksum_address(recipient), role_number(role), until_ms
        )
        receipt = self._send(account, call)
        (event,) = self.contract.events.Granted().process_receipt(receipt, errors=DISCARD)
        args = event["args"]
        return Grant(args["member"], args["recipient"], role, int(args["untilMs"]))

    def revoke(self, account: LocalAccount, recipient: str, role: str) -> None:
        """End `account`'s grant of `role` to `recipient` now."""
        call = self.contract.functions.revoke(to_checksum_address(recipient), role_number(role))
        self._send(account, call)

    def grant_until(
        self, member: str, recipient: str, role: str, block: BlockIdentifier = "latest"
    ) -> Grant:
        """The grant as the chain holds it at `block` (`until_ms` 0: none, or revoked)."""
        member, recipient = to_checksum_address(member), to_checksum_address(recipient)
        until = self.contract.functions.grantUntil(member, recipient, role_number(role)).call(
            block_identifier=block
        )
        return Grant(member, recipient, role, int(until))

    def grant_in_force(
        self, member: str, recipient: str, role: str, block: BlockIdentifier = "latest"
    ) -> bool:
        """True while the grant's end lies after the chain's clock (at `block`)."""
        fn = self.contract.functions.grantInForce(
            to_checksum_address(member), to_checksum_address(recipient), role_number(role)
        )
        return bool(fn.call(block_identifier=block))

    def _send(self, account: LocalAccount, call: Any) -> Any:
        """Run `call` as a call first (a refusal says why, nothing sent), then send it."""
        try:
            call.call({"from": account.address})
        except Exception as exc:
            from daisee_node.ledger.market import revert_data

            data = revert_data(exc)
            if data is None:
                raise
            raise ChainError(_explain(data)) from None
        return chain.send(
            self.w3, account, {"to": self.address, "data": call._encode_transaction_data()}
        )


def _selector(signature: str) -> bytes:
    return bytes(keccak(text=signature)[:4])


def _explain(data: bytes) -> str:
    for name, text in ERROR_TEXT.items():
        if bytes(data[:4]) == _selector(f"{name}()"):
            return text
    return f"the registry refused (0x{data.hex()[:72]})"
