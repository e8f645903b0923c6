"""What signs with the node key leaves the chain thread for the node key's one sender, and
`chain.send` hands such a transaction to that sender instead of picking a nonce itself."""

from __future__ import annotations

import threading
from typing import Any

from eth_account import Account

from daisee_node.ledger import chain as chainlib
from daisee_node.ledger.worker import ChainThread


async def test_a_call_given_the_node_key_goes_to_the_sender_not_the_chain_thread() -> None:
    worker = ChainThread()
    key = Account.create()
    routed: list[tuple[Any, ...]] = []

    async def sends(fn: Any, *args: Any) -> Any:
        routed.append((fn.__name__, *args))
        return "sent"

    worker.signer, worker.sends = key, sends

    def reads(address: str) -> str:
        return threading.current_thread().name

    def accept(account: Any, order_id: int) -> str:
        return "not through the sender"

    assert await worker.call(reads, key.address) == "chain"  # an address is not the key
    assert await worker.call(accept, key, 7) == "sent"
    assert routed == [("accept", key, 7)]
    other = Account.create()
    assert await worker.call(accept, other, 8) == "not through the sender"


def test_send_hands_the_node_keys_transactions_to_the_sender_it_runs_under() -> None:
    key, other = Account.create(), Account.create()
    given: list[dict[str, Any]] = []

    def route(tx: dict[str, Any]) -> str:
        given.append(tx)
        return "receipt"

    token = chainlib.NODE_SENDER.set((key.address, route))
    try:
        # No chain is reachable: only the route can answer.
        assert chainlib.send(None, key, {"to": other.address, "data": "0x"}) == "receipt"  # type: ignore[arg-type]
        assert given == [{"to": other.address, "data": "0x"}]
        try:
            chainlib.send(None, other, {"to": key.address})  # type: ignore[arg-type]
        except AttributeError:
            pass  # another key sends as before: it needed the (absent) chain
        else:
            raise AssertionError("another key's transaction went to the node key's sender")
    finally:
        chainlib.NODE_SENDER.reset(token)
    assert chainlib.NODE_SENDER.get() is None
