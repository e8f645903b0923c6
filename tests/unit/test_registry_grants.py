"""Data access grants in the community registry, on py-evm: a registered node grants a recipient
a role until a time, revokes it at once; grants expire with the chain's clock; only members grant,
and one member's grant covers nobody else's data."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from web3 import Web3
from web3.logs import DISCARD

from daisee_node.community.registry import ROLES, Registry, deploy
from daisee_node.ledger import chain
from daisee_node.ledger.chain import ChainError

HOUR_MS = 3_600_000


@dataclass
class Community:
    """A ledger on py-evm with two registered nodes, an outsider with gas, and the registry."""

    w3: Web3
    gov: LocalAccount
    reg: Registry
    a: LocalAccount
    b: LocalAccount
    outsider: LocalAccount

    def now_ms(self) -> int:
        return int(self.w3.eth.get_block("latest")["timestamp"]) * 1000

    def travel_to(self, t_ms: int) -> None:
        """Mine a block at `t_ms` or later, so calls see that clock."""
        tester = self.w3.provider.ethereum_tester  # type: ignore[attr-defined]
        tester.time_travel(-(-t_ms // 1000))
        tester.mine_blocks(1)


@pytest.fixture
def c() -> Community:
    w3 = chain.connect(chain.EMBEDDED)
    gov = Account.from_key(chain.TESTER_KEYS[0])
    ledger = chain.Ledger(w3, chain.deploy(w3, gov, None, 1000))
    a, b, outsider = (Account.create() for _ in range(3))
    for node in (a, b):
        ledger.set_node(gov, node.address)
    for who in (a, b, outsider):
        chain.fund(w3, gov, who.address, 10**18)
    return Community(w3, gov, Registry(w3, deploy(w3, gov, ledger.address)), a, b, outsider)


def test_a_member_grants_and_revokes_at_once(c: Community) -> None:
    recipient = Account.create().address
    until = c.now_ms() + HOUR_MS
    assert c.reg.grant_until(c.a.address, recipient, "own").until_ms == 0
    assert not c.reg.grant_in_force(c.a.address, recipient, "own")
    made = c.reg.grant(c.a, recipient, "own", until)
    assert (made.member, made.recipient, made.role, made.until_ms) == (
        c.a.address,
        recipient,
        "own",
        until,
    )
    assert c.reg.grant_until(c.a.address, recipient, "own").until_ms == until
    assert c.reg.grant_in_force(c.a.address, recipient, "own")
    # the role granted is the only one
    assert not c.reg.grant_in_force(c.a.address, recipient, "supplier")
    assert not c.reg.grant_in_force(c.a.address, recipient, "grid")

    c.reg.revoke(c.a, recipient, "own")
    assert c.reg.grant_until(c.a.address, recipient, "own").until_ms == 0
    assert not c.reg.grant_in_force(c.a.address, recipient, "own")
    with pytest.raises(ChainError, match="no such grant to revoke"):
        c.reg.revoke(c.a, recipient, "own")

    events = c.reg.contract.events
    granted = events.Granted().get_logs(from_block=0)
    revoked = events.Revoked().get_logs(from_block=0)
    assert [(e["args"]["member"], e["args"]["role"], e["args"]["untilMs"]) for e in granted] == [
        (c.a.address, ROLES["own"], until)
    ]
    assert [(e["args"]["member"], e["args"]["recipient"]) for e in revoked] == [
        (c.a.address, recipient)
    ]


def test_a_grant_expires_with_the_chains_clock_and_can_be_renewed(c: Community) -> None:
    recipient = Account.create().address
    until = c.now_ms() + HOUR_MS
    c.reg.grant(c.a, recipient, "supplier", until)
    c.travel_to(until - 1000)
    assert c.reg.grant_in_force(c.a.address, recipient, "supplier")
    c.travel_to(until)
    # ended: the record stays (its end is history), it is no longer in force
    assert c.reg.grant_until(c.a.address, recipient, "supplier").until_ms == until
    assert not c.reg.grant_in_force(c.a.address, recipient, "supplier")
    with pytest.raises(ChainError, match="must end after the chain's clock"):
        c.reg.grant(c.a, recipient, "supplier", c.now_ms())
    renewed = c.reg.grant(c.a, recipient, "supplier", c.now_ms() + HOUR_MS)
    assert c.reg.grant_in_force(c.a.address, recipient, "supplier")
    assert renewed.until_ms > until


def test_only_a_registered_node_grants_and_a_removed_one_can_still_revoke(c: Community) -> None:
    recipient = Account.create().address
    until = c.now_ms() + HOUR_MS
    with pytest.raises(ChainError, match="only a node the ledger registers"):
        c.reg.grant(c.outsider, recipient, "own", until)
    assert not c.reg.grant_in_force(c.outsider.address, recipient, "own")
    with pytest.raises(ChainError, match="zero address"):
        c.reg.grant(c.a, "0x" + "00" * 20, "own", until)
    with pytest.raises(ChainError, match="no data role"):
        c.reg.grant(c.a, recipient, "everything", until)
    raw = c.reg.contract.functions.grant(recipient, 4, until)
    with pytest.raises(ChainError, match="no such data role"):
        c.reg._send(c.a, raw)

    c.reg.grant(c.a, recipient, "grid", until)
    chain.Ledger(c.w3, c.reg.ledger_address()).set_node(c.gov, c.a.address, registered=False)
    with pytest.raises(ChainError, match="only a node the ledger registers"):
        c.reg.grant(c.a, recipient, "own", until)
    c.reg.revoke(c.a, recipient, "grid")
    assert not c.reg.grant_in_force(c.a.address, recipient, "grid")


def test_a_grant_by_one_member_covers_none_of_anothers_data(c: Community) -> None:
    recipient, other = Account.create().address, Account.create().address
    until = c.now_ms() + HOUR_MS
    receipt_grant = c.reg.grant(c.a, recipient, "own", until)
    assert receipt_grant.member == c.a.address
    assert c.reg.grant_in_force(c.a.address, recipient, "own")
    assert not c.reg.grant_in_force(c.b.address, recipient, "own")
    assert not c.reg.grant_in_force(c.a.address, other, "own")
    # b revoking what it never granted changes nothing of a's
    with pytest.raises(ChainError, match="no such grant"):
        c.reg.revoke(c.b, recipient, "own")
    assert c.reg.grant_in_force(c.a.address, recipient, "own")
    # b's grant to the same recipient is its own record, with its own end
    c.reg.grant(c.b, recipient, "own", until + HOUR_MS)
    c.reg.revoke(c.a, recipient, "own")
    assert not c.reg.grant_in_force(c.a.address, recipient, "own")
    assert c.reg.grant_until(c.b.address, recipient, "own").until_ms == until + HOUR_MS
    logs = c.reg.contract.events.Granted().get_logs(from_block=0)
    assert [e["args"]["member"] for e in logs] == [c.a.address, c.b.address]
    receipt = c.w3.eth.get_transaction_receipt(logs[0]["transactionHash"])
    assert c.reg.contract.events.Revoked().process_receipt(receipt, errors=DISCARD) == ()
