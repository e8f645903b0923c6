"""What a community's accounts are made of, read from the chain alone: no node, no database.

- Commitments: the ledger's `Committed` events of the members' nodes name each accepted
  commitment by its hash; its totals are in the `commitBatch` transaction that carried it,
  decoded from the transaction's input and checked against that hash.
- Peer-to-peer settlements: the market's `Settled` events, with each order's buyer, seller and
  mode.
- Keys: the community registry's records.

Everything is read as of one block (`block`, default the latest), so two readers given the
same block read the same thing.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from eth_utils import keccak, to_checksum_address
from hexbytes import HexBytes

from daisee_node.community.billing import GRID, LINE, Committed, Settlement
from daisee_node.community.registry import KeyRecord, Registry
from daisee_node.ledger import chain
from daisee_node.ledger.commitment import Commitment
from daisee_node.ledger.market import decoded_commitment

if TYPE_CHECKING:
    from web3 import Web3

#: blocks per `eth_getLogs` request: some clients refuse wider ranges
LOG_CHUNK = 10_000


@dataclass
class ChainRead:
    """Everything read, and where from."""

    block: int
    chain_id: int
    ledger: str
    registry: str
    market: str | None
    commitments: list[Committed] = field(default_factory=list)
    #: accepted commitments whose totals could not be read (sent through another contract):
    #: (node, seq)
    unreadable: list[tuple[str, int]] = field(default_factory=list)
    settlements: list[Settlement] = field(default_factory=list)
    keys: list[KeyRecord] = field(default_factory=list)
    wh_per_credit: int | None = None
    credit_decimals: int = 18


def _topic(address: str) -> str:
    return "0x" + "00" * 12 + address.lower().removeprefix("0x")


def _event_topic(contract: Any, name: str) -> str:
    entry = next(e for e in contract.abi if e.get("type") == "event" and e["name"] == name)
    types = ",".join(i["type"] for i in entry["inputs"])
    return "0x" + keccak(text=f"{name}({types})").hex()


def _logs(w3: Web3, address: str, topics: list[Any], from_block: int, to_block: int) -> list[Any]:
    found: list[Any] = []
    start = from_block
    while start <= to_block:
        end = min(to_block, start + LOG_CHUNK - 1)
        found += w3.eth.get_logs(
            {"address": address, "fromBlock": start, "toBlock": end, "topics": topics}  # type: ignore[typeddict-item]
        )
        start = end + 1
    return sorted(found, key=lambda log: (int(log["blockNumber"]), int(log["logIndex"])))


def read_commitments(
    ledger: chain.Ledger, nodes: Iterable[str], from_block: int, to_block: int
) -> tuple[list[Committed], list[tuple[str, int]]]:
    """The nodes' accepted commitments (totals read from their transactions) and those whose
    totals could not be read."""
    w3 = ledger.w3
    wanted = sorted({_topic(n) for n in nodes})
    if not wanted:
        return [], []
    event = ledger.contract.events.Committed()
    topic0 = _event_topic(ledger.contract, "Committed")
    logs = _logs(w3, ledger.address, [topic0, wanted], from_block, to_block)
    by_tx: dict[bytes, list[Any]] = {}
    for log in logs:
        by_tx.setdefault(bytes(log["transactionHash"]), []).append(event.process_log(log))
    found: list[Committed] = []
    unreadable: list[tuple[str, int]] = []
    for tx_hash, events in by_tx.items():
        carried = {c.struct_hash(): c for c in _batch(ledger, tx_hash)}
        for ev in events:
            c = carried.get(bytes(ev["args"]["commitmentHash"]))
            if c is None:
                unreadable.append((str(ev["args"]["node"]).lower(), int(ev["args"]["seq"])))
                continue
            found.append(Committed(c.node.lower(), c.t0, c.t1, c.import_wh, c.export_wh))
    return found, unreadable


def _batch(ledger: chain.Ledger, tx_hash: bytes) -> list[Commitment]:
    """The commitments a `commitBatch` transaction to the ledger carried (accepted or not)."""
    tx = ledger.w3.eth.get_transaction(HexBytes(tx_hash))
    if tx.get("to") != ledger.address:
        return []
    try:
        fn, params = ledger.contract.decode_function_input(tx["input"])
    except ValueError:
        return []
    if fn.fn_name != "commitBatch":
        return []
    return [decoded_commitment(item) for item in params["cs"]]


def read_settlements(
    w3: Web3, market_address: str, from_block: int, to_block: int
) -> list[Settlement]:
    """Every `Settled` event of the market, with its order's buyer, seller and mode."""
    contract = w3.eth.contract(
        address=to_checksum_address(market_address), abi=chain.artifact("EnergyMarket")["abi"]
    )
    event = contract.events.Settled()
    logs = _logs(w3, contract.address, [_event_topic(contract, "Settled")], from_block, to_block)
    orders: dict[int, tuple[str, str, str]] = {}
    found = []
    for log in logs:
        args = event.process_log(log)["args"]
        oid = int(args["id"])
        if oid not in orders:
            v = contract.functions.orders(oid).call(block_identifier=to_block)
            # (buyer, amountWh, mode, state, seller, …) as `Market.order` reads it
            orders[oid] = (str(v[0]).lower(), str(v[4]).lower(), LINE if int(v[2]) else GRID)
        buyer, seller, mode = orders[oid]
        found.append(
            Settlement(
                oid,
                mode,
                buyer,
                seller,
                int(args["t0"]),
                int(args["t1"]),
                int(args["deliveredWh"]),
                int(args["paid"]),
            )
        )
    return found


def read_all(
    rpc_url: str,
    ledger_address: str,
    registry_address: str,
    nodes: Iterable[str],
    *,
    market_address: str | None = None,
    from_block: int = 0,
    block: int | None = None,
    timeout_s: float = 10.0,
    w3: Web3 | None = None,
) -> ChainRead:
    """Read the members' commitments, the market's settlements and the recorded keys as of
    `block` (default: the latest)."""
    w3 = w3 or chain.connect(rpc_url, timeout_s)
    ledger = chain.Ledger(w3, ledger_address)
    ledger.check_deployed()
    registry = Registry(w3, registry_address)
    registry.check_deployed()
    if to_checksum_address(registry.ledger_address()) != ledger.address:
        raise chain.ChainError(
            f"the registry {registry.address} belongs to the ledger {registry.ledger_address()}, "
            f"not {ledger.address}"
        )
    head = int(w3.eth.block_number)
    at = head if block is None else block
    if at > head:
        raise chain.ChainError(f"block {at} is beyond the chain's head ({head})")
    read = ChainRead(at, ledger.chain_id, ledger.address, registry.address, None)
    read.commitments, read.unreadable = read_commitments(ledger, nodes, from_block, at)
    read.keys = registry.records(at)
    credit = ledger.credit()
    read.wh_per_credit = int(credit.functions.whPerCredit().call(block_identifier=at))
    read.credit_decimals = int(credit.functions.decimals().call(block_identifier=at))
    if market_address:
        from daisee_node.ledger.market import Market

        market = Market(w3, market_address)
        market.check_deployed()
        if market.ledger.address != ledger.address:
            raise chain.ChainError(f"the market {market.address} trades on another ledger")
        read.market = market.address
        read.settlements = read_settlements(w3, market.address, from_block, at)
    return read
