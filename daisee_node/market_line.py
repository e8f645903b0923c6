"""LINE orders settled by the two nodes themselves, with no one trusted in between.

A LINE order is paid from the line's counter at both ends (`[market] line_meter`): the seller's
end counts what left, the buyer's what arrived. After the window each node proves two readings
of its own end against the commitments it recorded on chain (`daisee_node.ledger.proofs`): the
last one at or before the window's start (the *anchor*: the counter before the relays closed) and
the last one inside the window (the *end*). It publishes both, retained, on

    <base_topic>/<own id>/market/line/<order id>

    {"type": "daisee.line.v1", "order": 7, "node": "0x…", "anchor": {…}, "end": {…}}

where `anchor` and `end` are proofs exactly as `daisee-node prove` writes them. The other end
does the same; each node subscribes its peers' topics, and once it holds both ends it anchors the
line (`anchorLine`) and settles it (`settleLine`) in one go. Either side may get there first: the
contract settles an interval once, and the other node's attempt is refused as a call before any
transaction is sent. A message needs no signature of its own: every proof is checked on chain
against the commitment its node signed, so a forged or foreign one only makes a call fail. The
receiver still refuses what cannot belong to the order (wrong node, wrong channel, oversized,
malformed) before it reaches the chain, and says why.

Proofs need the periods holding both readings to be on chain, so the first attempts after the
window usually find them not yet committed; they are tried again on every settlement round until
the grace time ends, after which the buyer's node takes back whatever was not paid.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from daisee_node import safejson

if TYPE_CHECKING:
    from daisee_node.ledger.market import Order

MESSAGE_TYPE = "daisee.line.v1"
#: the topic after `<base_topic>/<node id>/`, before `/<order id>`
TOPIC = "market/line"
#: two proofs of a few KB each; anything much larger is not a proof pair
MAX_MESSAGE_BYTES = 64_000


class LineMessageError(ValueError):
    """A line message that cannot be this order's proofs from that end."""


@dataclass(frozen=True)
class EndProofs:
    """One end's two proven readings of an order's line counter: the window's start and end."""

    node: str  # the end's node address
    anchor: dict[str, Any]  # a proof as `build_proof` writes it
    end: dict[str, Any]

    def as_args(self) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        """The anchor's and the end's `LineProof` tuples, as the contract takes them."""
        return _line_proof(self.anchor), _line_proof(self.end)


def _line_proof(proof: dict[str, Any]) -> tuple[Any, ...]:
    from daisee_node.ledger.proofs import parse_proof

    p = parse_proof(json.dumps(proof))
    return (p.commitment.as_tuple(), p.batch_proof, p.reading, p.proof)


def message(order_id: int, ends: EndProofs) -> str:
    """The retained message that carries this node's proofs of an order's line readings."""
    body = {
        "type": MESSAGE_TYPE,
        "order": order_id,
        "node": ends.node,
        "anchor": ends.anchor,
        "end": ends.end,
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":"))


def parse_message(payload: bytes, order: Order, side: str) -> EndProofs:
    """The proofs of `side` ("seller" or "buyer") of `order` in `payload`; LineMessageError
    says why they cannot be."""
    from daisee_node.errors import DaiseeError
    from daisee_node.ledger.proofs import parse_proof

    if len(payload) > MAX_MESSAGE_BYTES:
        raise LineMessageError(f"{len(payload)} bytes: more than {MAX_MESSAGE_BYTES}")
    try:
        body = safejson.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise LineMessageError(f"not JSON: {exc}") from None
    if not isinstance(body, dict) or body.get("type") != MESSAGE_TYPE:
        raise LineMessageError(f"not a {MESSAGE_TYPE} message")
    if body.get("order") != order.id:
        raise LineMessageError(f"about order {body.get('order')!r}, not {order.id}")
    expected = order.seller if side == "seller" else order.buyer
    channel = order.seller_channel if side == "seller" else order.buyer_channel
    node = body.get("node")
    if not isinstance(node, str) or node.lower() != expected.lower():
        raise LineMessageError(f"from {node!r}, not the order's {side} {expected}")
    times = []
    for key in ("anchor", "end"):
        proof = body.get(key)
        if not isinstance(proof, dict):
            raise LineMessageError(f"no {key} proof")
        try:
            p = parse_proof(json.dumps(proof))
        except DaiseeError as exc:
            raise LineMessageError(f"{key}: {exc}") from None
        if p.commitment.node.lower() != expected.lower():
            raise LineMessageError(f"{key}: a commitment of {p.commitment.node}, not of {expected}")
        if p.reading[0] != channel:
            raise LineMessageError(f"{key}: not the order's line channel at the {side}'s end")
        times.append(p.reading[1])
    if times[0] >= times[1]:
        raise LineMessageError("the anchor reading is not older than the end reading")
    return EndProofs(node=expected, anchor=body["anchor"], end=body["end"])
