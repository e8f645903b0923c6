"""The energy market contract over web3: deploy, orders and offers, settlement, views, events.

Like `chain.py`, everything here is synchronous web3 (the daemon calls it through
`asyncio.to_thread`). Every transaction is first run as a call: a refusal raises `MarketError`
with one line saying why in words (an expired order, the wrong mode, insufficient credits …),
and nothing is sent. Amounts are Wh, prices credit base units per kWh and times ms since the
epoch, as the contract counts them; `credits()` and `parse_credits()` convert to and from the
token's human units.

A GRID settlement needs each side's `Commitment` struct, which the ledger keeps only in the
`commitBatch` transaction that carried it (its `Committed` event holds only the hash):
`recorded()` decodes it from that transaction's input and adds its batch proof.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from eth_account.signers.local import LocalAccount
from eth_utils import keccak, to_checksum_address
from hexbytes import HexBytes
from web3 import Web3
from web3.contract import Contract
from web3.logs import DISCARD

from daisee_node.ledger import chain
from daisee_node.ledger.chain import ChainError, Ledger, artifact
from daisee_node.ledger.commitment import Commitment

GRID, LINE = 0, 1
MODES = ("grid", "line")
STATES = ("none", "open", "accepted", "refused", "cancelled", "expired", "closed")
OPEN, ACCEPTED = 1, 2
ZERO32 = b"\0" * 32
ZERO_ADDRESS = "0x" + "00" * 20
#: deployment defaults: settlement stays open 2 h after a period (nodes batch an hour of periods
#: per transaction), disputes last a day, line readings may be a minute apart, 2 % tolerance
GRACE_MS = 2 * 3_600_000
DISPUTE_MS = 24 * 3_600_000
LINE_SLACK_MS = 60_000
TOLERANCE_BPS = 200

#: the contract's (and the credit token's) custom errors, in words
ERROR_TEXT = {
    "OnlyGovernance": "only the ledger's governance account may do this",
    "NotBuyer": "not the buyer: only the order's buyer (or the buyer an offer names) may do this",
    "NotSeller": "not the seller: only the seller may do this",
    "BadOrder": "bad terms: the amount must be above zero (and at least the offer's minimum), "
    "the window must end after it starts, and the seller cannot be the buyer",
    "BadState": "the order (or offer) is not in a state that allows this",
    "TooLate": "expired order: its delivery window has begun (or its settlement time is over)",
    "TooEarly": "too early: wait until the window (or the period) is over",
    "TooManyOrders": "the node already has the most accepted GRID orders it may hold at once (8)",
    "WrongMode": "wrong mode: LINE orders name a line channel at each end, GRID orders none",
    "NotProven": "the ledger does not confirm a commitment (or reading) given for settlement",
    "WrongNode": "a commitment given for settlement is not from the order's seller or buyer",
    "OutsideWindow": "the period lies outside the order's delivery window",
    "PeriodMismatch": "the seller's and the buyer's periods do not match",
    "AlreadySettled": "this period of the order is already settled",
    "BadReading": "a line reading does not belong to the order's channel or goes backwards",
    "DisputesOpen": "a dispute of the order is still open",
    "OutOfRange": "the value is out of range",
    "ERC20InsufficientAllowance": "insufficient credits: the market may not take the escrow",
    "ERC20InsufficientBalance": "insufficient credits for the escrow",
}


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def utc_datetime(t_ms: int) -> datetime | None:
    """A time in ms since the epoch as a UTC datetime; None beyond the calendar (years 1 to
    9999): an order's times are any uint64 a buyer chose."""
    try:
        return _EPOCH + timedelta(milliseconds=t_ms)
    except (OverflowError, ValueError, TypeError):
        return None


def utc_text(t_ms: int, fmt: str = "%Y-%m-%d %H:%M:%S UTC") -> str:
    """A time in ms since the epoch as people write it (UTC); beyond the calendar, its year
    ("year 275817"). Never raises, whatever the chain holds."""
    when = utc_datetime(t_ms)
    if when is not None:
        return when.strftime(fmt)
    # The calendar repeats every 400 years (146097 days): find the day in the first cycles.
    cycles, day = divmod(t_ms // 86_400_000, 146_097)
    return f"year {(_EPOCH + timedelta(days=day)).year + 400 * cycles}"


class MarketError(ChainError):
    """The market (or the ledger) refuses what was asked; `str()` says why in one line."""


@dataclass(frozen=True)
class Order:
    """One order as the contract keeps it (`orders(id)`)."""

    id: int
    buyer: str
    amount_wh: int
    mode: int
    state: int
    seller: str
    t0: int
    t1: int
    price: int
    delivered_wh: int
    open_disputes: int
    seller_channel: bytes
    buyer_channel: bytes

    @property
    def exists(self) -> bool:
        return self.state != 0

    @property
    def state_name(self) -> str:
        return STATES[self.state]

    @property
    def mode_name(self) -> str:
        return MODES[self.mode]


@dataclass(frozen=True)
class Offer:
    """One posted offer (`offers(id)`); a withdrawn one has no seller."""

    id: int
    seller: str
    amount_wh: int
    mode: int
    buyer: str
    t0: int
    t1: int
    price: int
    min_wh: int
    seller_channel: bytes

    @property
    def exists(self) -> bool:
        return self.seller != ZERO_ADDRESS

    @property
    def mode_name(self) -> str:
        return MODES[self.mode]


@dataclass(frozen=True)
class Dispute:
    """A LINE disagreement beyond tolerance (`disputes(id)`), values in micro-Wh."""

    id: int
    order_id: int
    low_micro: int
    high_micro: int
    deadline: int
    t0: int
    t1: int
    open: bool


@dataclass(frozen=True)
class Recorded:
    """A commitment the ledger recorded, with its proof within its batch transaction."""

    commitment: Commitment
    batch_proof: list[bytes]
    tx_hash: bytes

    def args(self) -> tuple[tuple[Any, ...], list[bytes]]:
        return self.commitment.as_tuple(), self.batch_proof


@dataclass(frozen=True)
class PeriodPair:
    """One period of a GRID order both its seller and its buyer recorded."""

    seller: Recorded
    buyer: Recorded
    settled: bool

    @property
    def t0(self) -> int:
        return self.seller.commitment.t0

    @property
    def t1(self) -> int:
        return self.seller.commitment.t1


@dataclass(frozen=True)
class Periods:
    """What `Market.periods` found: periods both sides recorded, and (t0, t1, side) of those
    that `side` has not recorded yet while the other side has."""

    both: list[PeriodPair]
    missing: list[tuple[int, int, str]]


@dataclass(frozen=True)
class MarketEvent:
    """One event of the market contract, its arguments as web3 decoded them."""

    name: str
    args: dict[str, Any]
    block_number: int
    tx_hash: bytes
    log_index: int


@dataclass(frozen=True)
class Settlement:
    """One GRID period settled: the Wh it added and the credit base units paid for them."""

    order_id: int
    t0: int
    t1: int
    delivered_wh: int
    paid: int


def deploy(
    w3: Web3,
    account: LocalAccount,
    ledger_address: str,
    *,
    grace_ms: int = GRACE_MS,
    dispute_ms: int = DISPUTE_MS,
    line_slack_ms: int = LINE_SLACK_MS,
    tolerance_bps: int = TOLERANCE_BPS,
) -> str:
    """Deploy a market beside the ledger at `ledger_address`; its address. Its governance is
    the ledger's (who resolves disputes and sets the tolerance)."""
    if not 0 <= tolerance_bps <= 10_000:
        raise MarketError(f"tolerance {tolerance_bps} bps: give 0 to 10000 (100 %)")
    for name, value in (("grace", grace_ms), ("dispute", dispute_ms), ("slack", line_slack_ms)):
        if not 0 <= value < 2**64:
            raise MarketError(f"{name} time {value} ms is out of range")
    ledger = Ledger(w3, ledger_address)
    ledger.check_deployed()
    args = w3.codec.encode(
        ["address", "uint64", "uint64", "uint64", "uint16"],
        [ledger.address, grace_ms, dispute_ms, line_slack_ms, tolerance_bps],
    )
    receipt = chain.send(w3, account, {"data": artifact("EnergyMarket")["bytecode"] + args.hex()})
    return str(receipt["contractAddress"])


def revert_data(exc: BaseException) -> bytes | None:
    """The revert data of a refused call: py-evm raises it as bytes (in a message), web3 over
    JSON-RPC as hex; None when the exception carries none (the chain could not be reached)."""
    seen: BaseException | None = exc
    while seen is not None:
        data = getattr(seen, "data", None)
        if isinstance(data, str) and data.startswith("0x"):
            return bytes.fromhex(data[2:])
        arg = seen.args[0] if seen.args else None
        if isinstance(arg, bytes):
            return arg
        if isinstance(arg, str) and arg.startswith("execution reverted: b"):
            try:
                value = ast.literal_eval(arg.removeprefix("execution reverted: "))
            except (ValueError, SyntaxError):
                return None
            return bytes(value) if isinstance(value, bytes) else None
        seen = seen.__cause__ or seen.__context__
    return None


def credits(base_units: int, decimals: int = 18) -> str:
    """Credit base units as people read them: `12.5`, `0.001`, `0`."""
    text = format(Decimal(base_units).scaleb(-decimals), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def parse_credits(text: str, decimals: int = 18) -> int:
    """`0.25` credits in base units; ValueError when it is not an exact, non-negative amount."""
    try:
        value = Decimal(text.strip())
    except ArithmeticError:
        raise ValueError(f"{text!r} is not a number of credits") from None
    if not value.is_finite() or value < 0:
        raise ValueError(f"{text!r}: give a number of credits, 0 or more")
    units = value.scaleb(decimals)
    if units != units.to_integral_value():
        raise ValueError(f"{text!r} has more than {decimals} decimals")
    return int(units)


def channel_id(name: str) -> bytes:
    """A LINE order's channel: the ledger's id of the counter channel named (keccak of it)."""
    return bytes(keccak(text=name))


class Market:
    """The deployed market at `address`, with its ledger and credit token."""

    def __init__(self, w3: Web3, address: str) -> None:
        self.w3 = w3
        self.address = to_checksum_address(address)
        self.contract: Contract = w3.eth.contract(
            address=self.address, abi=artifact("EnergyMarket")["abi"]
        )
        self._ledger: Ledger | None = None
        self._credit: Contract | None = None
        self._errors: dict[bytes, tuple[str, list[str]]] | None = None
        self._decoded: dict[bytes, list[dict[str, Any]]] = {}

    def check_deployed(self) -> None:
        if not self.w3.eth.get_code(self.address):
            raise MarketError(f"no market contract at {self.address}")
        try:
            self.ledger.check_deployed()
        except Exception as exc:  # a contract that is not a market has no `ledger()`
            raise MarketError(f"{self.address} is not an energy market: {exc}") from None

    @property
    def ledger(self) -> Ledger:
        if self._ledger is None:
            self._ledger = Ledger(self.w3, self.contract.functions.ledger().call())
        return self._ledger

    @property
    def credit(self) -> Contract:
        if self._credit is None:
            address = self.contract.functions.credit().call()
            self._credit = self.w3.eth.contract(
                address=address, abi=artifact("EnergyCredit")["abi"]
            )
        return self._credit

    # -- views ---------------------------------------------------------------------------

    def now_ms(self) -> int:
        """The chain's clock (the latest block's time), as the contract's `_nowMs`."""
        return int(self.w3.eth.get_block("latest")["timestamp"]) * 1000

    def grace_ms(self) -> int:
        return int(self.contract.functions.graceMs().call())

    def governance(self) -> str:
        return str(self.ledger.contract.functions.governance().call())

    def cost(self, amount_wh: int, price: int) -> int:
        """Credit base units escrowed for `amount_wh` at `price` base units per kWh."""
        return amount_wh * price // 1000

    def order(self, order_id: int) -> Order:
        """Order `order_id` (`exists` is False when there is none)."""
        v = self.contract.functions.orders(order_id).call()
        return Order(
            order_id,
            buyer=str(v[0]),
            amount_wh=int(v[1]),
            mode=int(v[2]),
            state=int(v[3]),
            seller=str(v[4]),
            t0=int(v[5]),
            t1=int(v[6]),
            price=int(v[7]),
            delivered_wh=int(v[8]),
            open_disputes=int(v[9]),
            seller_channel=bytes(v[10]),
            buyer_channel=bytes(v[11]),
        )

    def existing_order(self, order_id: int) -> Order:
        """Order `order_id`, or MarketError saying there is none."""
        if order_id < 1:
            raise MarketError(f"no order {order_id}: order ids start at 1")
        order = self.order(order_id)
        if not order.exists:
            count = self.order_count()
            raise MarketError(
                f"no order {order_id} in the market ({count} so far)"
                if count
                else f"no order {order_id}: the market has no orders yet"
            )
        return order

    def offer(self, offer_id: int) -> Offer:
        v = self.contract.functions.offers(offer_id).call()
        return Offer(
            offer_id,
            seller=str(v[0]),
            amount_wh=int(v[1]),
            mode=int(v[2]),
            buyer=str(v[3]),
            t0=int(v[4]),
            t1=int(v[5]),
            price=int(v[6]),
            min_wh=int(v[7]),
            seller_channel=bytes(v[8]),
        )

    def dispute(self, dispute_id: int) -> Dispute:
        v = self.contract.functions.disputes(dispute_id).call()
        return Dispute(
            dispute_id, int(v[0]), int(v[1]), int(v[2]), int(v[3]), int(v[4]), int(v[5]), bool(v[6])
        )

    def order_count(self) -> int:
        return int(self.contract.functions.orderCount().call())

    def offer_count(self) -> int:
        return int(self.contract.functions.offerCount().call())

    def dispute_count(self) -> int:
        return int(self.contract.functions.disputeCount().call())

    def escrow_of(self, order_id: int) -> int:
        return int(self.contract.functions.escrowOf(order_id).call())

    def active_orders(self, node: str, selling: bool) -> list[int]:
        """The accepted GRID orders `node` sells (or buys) whose periods may still settle."""
        ids = self.contract.functions.activeOrders(to_checksum_address(node), selling).call()
        return [int(i) for i in ids]

    def line_anchored(self, order_id: int) -> bool:
        """True once a LINE order's starting readings are fixed (`anchorLine`)."""
        return int(self.contract.functions.lines(order_id).call()[0]) != 0

    def line_position(self, order_id: int) -> tuple[int, int]:
        """A LINE order's last settled reading time at the seller's and the buyer's end (ms;
        zeros before `anchorLine`)."""
        line = self.contract.functions.lines(order_id).call()
        return int(line[0]), int(line[1])

    def line_slack_ms(self) -> int:
        """How far a line reading may lie from the window's ends, and the two ends' readings
        from each other (ms)."""
        return int(self.contract.functions.lineSlackMs().call())

    def period_settled(self, order_id: int, t0: int) -> bool:
        return bool(self.contract.functions.periodSettled(order_id, t0).call())

    def balance(self, node: str) -> int:
        return int(self.credit.functions.balanceOf(to_checksum_address(node)).call())

    def decimals(self) -> int:
        return int(self.credit.functions.decimals().call())

    def symbol(self) -> str:
        return str(self.credit.functions.symbol().call())

    def is_registered(self, node: str) -> bool:
        return self.ledger.head(node).registered

    def orders_of(self, node: str, from_block: int = 0) -> list[Order]:
        """Every order `node` buys or sells, oldest first (from the `OrderOpened` events)."""
        node = to_checksum_address(node)
        ids: set[int] = set()
        event = self.contract.events.OrderOpened()
        for role in ("buyer", "seller"):
            for log in event.get_logs(argument_filters={role: node}, from_block=from_block):
                if log["args"][role] == node:
                    ids.add(int(log["args"]["id"]))
        return [self.order(i) for i in sorted(ids)]

    def escrowed(self, node: str, from_block: int = 0) -> int:
        """Credit base units `node` has escrowed in its open and accepted orders as buyer."""
        node = to_checksum_address(node)
        return sum(
            self.escrow_of(o.id)
            for o in self.orders_of(node, from_block)
            if o.buyer == node and o.state in (OPEN, ACCEPTED)
        )

    def offers(self) -> list[Offer]:
        """Every offer not withdrawn and not wholly taken, oldest first."""
        found = [self.offer(i) for i in range(1, self.offer_count() + 1)]
        return [f for f in found if f.exists and f.amount_wh > 0]

    def disputes_of(self, order_id: int | None = None) -> list[Dispute]:
        """Every dispute (of order `order_id` only, when given), oldest first."""
        found = [self.dispute(i) for i in range(1, self.dispute_count() + 1)]
        return [d for d in found if order_id is None or d.order_id == order_id]

    def events(
        self, from_block: int = 0, to_block: int | str = "latest", names: Iterable[str] = ()
    ) -> list[MarketEvent]:
        """The market's events in [from_block, to_block], in chain order (all, or `names`)."""
        wanted = set(names)
        abi: list[dict[str, Any]] = list(self.contract.abi)  # type: ignore[arg-type]
        by_topic = {}
        for entry in abi:
            if entry["type"] == "event" and (not wanted or entry["name"] in wanted):
                types = ",".join(_abi_type(i) for i in entry["inputs"])
                topic = keccak(text=f"{entry['name']}({types})")
                by_topic[bytes(topic)] = entry["name"]
        logs = self.w3.eth.get_logs(
            {"address": self.address, "fromBlock": from_block, "toBlock": to_block}  # type: ignore[typeddict-item]
        )
        found = []
        for log in logs:
            name = by_topic.get(bytes(log["topics"][0])) if log["topics"] else None
            if name is None:
                continue
            ev = self.contract.events[name]().process_log(log)
            found.append(
                MarketEvent(
                    name,
                    dict(ev["args"]),
                    int(log["blockNumber"]),
                    bytes(log["transactionHash"]),
                    int(log["logIndex"]),
                )
            )
        return sorted(found, key=lambda e: (e.block_number, e.log_index))

    # -- commitments for settlement ---------------------------------------------------------

    def recorded(self, node: str, t0: int, t1: int, from_block: int = 0) -> list[Recorded]:
        """`node`'s commitments the ledger recorded whose periods lie within [t0, t1), with
        their batch proofs, oldest first. Read from the newest back: periods follow `seq`."""
        node = to_checksum_address(node)
        logs = self.ledger.contract.events.Committed().get_logs(
            argument_filters={"node": node}, from_block=from_block
        )
        logs = [ev for ev in logs if ev["args"]["node"] == node]
        logs.sort(key=lambda ev: int(ev["args"]["seq"]))
        found: list[Recorded] = []
        for ev in reversed(logs):
            tx_hash = bytes(ev["transactionHash"])
            wanted = bytes(ev["args"]["commitmentHash"])
            commitment = next((c for c in self._batch(tx_hash) if c.struct_hash() == wanted), None)
            if commitment is None:  # a batch sent through another contract: not readable here
                continue
            if commitment.t1 <= t0:
                break
            if commitment.t0 >= t0 and commitment.t1 <= t1:
                proof = self.ledger.batch_proof(tx_hash, wanted)
                found.append(Recorded(commitment, proof, tx_hash))
        return found[::-1]

    def periods(self, order: Order, from_block: int = 0) -> Periods:
        """The periods of a GRID order's window as both sides recorded them: those both
        recorded (settled or not), and those only one side has recorded so far."""
        window = (order.t0, order.t1, from_block)
        sellers = {r.commitment.t0: r for r in self.recorded(order.seller, *window)}
        buyers = {r.commitment.t0: r for r in self.recorded(order.buyer, *window)}
        both, missing = [], []
        for t0 in sorted(sellers.keys() | buyers.keys()):
            s, b = sellers.get(t0), buyers.get(t0)
            if s is not None and b is not None:
                settled = self.period_settled(order.id, t0)
                both.append(PeriodPair(s, b, settled))
            else:
                have = s or b
                assert have is not None
                side = "buyer" if b is None else "seller"
                missing.append((have.commitment.t0, have.commitment.t1, side))
        return Periods(both, missing)

    def _batch(self, tx_hash: bytes) -> list[Commitment]:
        """The commitments a `commitBatch` transaction carried (accepted or not)."""
        if tx_hash not in self._decoded:
            tx = self.w3.eth.get_transaction(HexBytes(tx_hash))
            items: list[dict[str, Any]] = []
            if tx.get("to") == self.ledger.address:
                try:
                    fn, params = self.ledger.contract.decode_function_input(tx["input"])
                except ValueError:
                    fn, params = None, {}
                if fn is not None and fn.fn_name == "commitBatch":
                    items = list(params["cs"])
            self._decoded[tx_hash] = items
        return [decoded_commitment(item) for item in self._decoded[tx_hash]]

    # -- transactions ----------------------------------------------------------------------

    def approve(self, account: LocalAccount, amount: int) -> None:
        """Let the market take `amount` credit base units (unless it already may)."""
        allowed = self.credit.functions.allowance(account.address, self.address).call()
        if int(allowed) >= amount:
            return
        self._transact(account, self.credit.functions.approve(self.address, amount), "approve")

    def open(
        self,
        account: LocalAccount,
        seller: str,
        amount_wh: int,
        price: int,
        t0: int,
        t1: int,
        mode: int = GRID,
        channels: tuple[bytes, bytes] = (ZERO32, ZERO32),
    ) -> int:
        """Escrow the price and open an order to `seller`; its id."""
        # Checked here as well as by the contract: the escrow is approved before `open` runs.
        if amount_wh <= 0 or t1 <= t0 or to_checksum_address(seller) == account.address:
            raise MarketError(ERROR_TEXT["BadOrder"])
        if t0 <= self.now_ms():
            raise MarketError(f"expired order: its window would begin at {utc_text(t0)}, past")
        if (mode == LINE) != (channels[0] != ZERO32) or (mode == LINE) != (channels[1] != ZERO32):
            raise MarketError(ERROR_TEXT["WrongMode"])
        self._check_funds(account, self.cost(amount_wh, price))
        self.approve(account, self.cost(amount_wh, price))
        call = self.contract.functions.open(
            to_checksum_address(seller), amount_wh, price, t0, t1, mode, *channels
        )
        receipt = self._transact(account, call, "open the order")
        (event,) = self.contract.events.OrderOpened().process_receipt(receipt, errors=DISCARD)
        return int(event["args"]["id"])

    def accept(self, account: LocalAccount, order_id: int) -> None:
        self._on_order(account, order_id, "accept", "seller", self.contract.functions.accept)

    def refuse(self, account: LocalAccount, order_id: int) -> None:
        self._on_order(account, order_id, "refuse", "seller", self.contract.functions.refuse)

    def cancel(self, account: LocalAccount, order_id: int) -> None:
        self._on_order(account, order_id, "cancel", "buyer", self.contract.functions.cancel)

    def expire(self, account: LocalAccount, order_id: int) -> None:
        self._on_order(account, order_id, "expire", None, self.contract.functions.expire)

    def refund(self, account: LocalAccount, order_id: int) -> int:
        """Return the undelivered rest of an order's escrow to its buyer; the amount."""
        receipt = self._on_order(account, order_id, "refund", None, self.contract.functions.refund)
        events = self.contract.events.Refunded().process_receipt(receipt, errors=DISCARD)
        return sum(int(ev["args"]["amount"]) for ev in events)

    def post_offer(
        self,
        account: LocalAccount,
        amount_wh: int,
        price: int,
        t0: int,
        t1: int,
        mode: int = GRID,
        min_wh: int = 0,
        seller_channel: bytes = ZERO32,
        buyer: str | None = None,
    ) -> int:
        """Offer `amount_wh` (taken in parts of at least `min_wh`), to `buyer` only if given."""
        call = self.contract.functions.postOffer(
            amount_wh,
            min_wh,
            price,
            t0,
            t1,
            mode,
            seller_channel,
            to_checksum_address(buyer) if buyer else ZERO_ADDRESS,
        )
        receipt = self._transact(account, call, "post the offer")
        (event,) = self.contract.events.OfferPosted().process_receipt(receipt, errors=DISCARD)
        return int(event["args"]["offerId"])

    def withdraw_offer(self, account: LocalAccount, offer_id: int) -> None:
        offer = self.offer(offer_id)
        if not offer.exists:
            raise MarketError(f"no offer {offer_id} (never posted, or withdrawn)")
        if offer.seller != account.address:
            raise MarketError(
                f"not the seller: offer {offer_id} is {_short(offer.seller)}'s, "
                f"not {_short(account.address)}'s"
            )
        self._transact(account, self.contract.functions.withdrawOffer(offer_id), "withdraw")

    def take_offer(
        self,
        account: LocalAccount,
        offer_id: int,
        amount_wh: int | None = None,
        buyer_channel: bytes = ZERO32,
    ) -> int:
        """Take `amount_wh` (default: all that is left) of an offer; the accepted order's id."""
        offer = self.offer(offer_id)
        if not offer.exists:
            raise MarketError(f"no offer {offer_id} (never posted, or withdrawn)")
        if offer.amount_wh == 0:
            raise MarketError(f"offer {offer_id} is wholly taken")
        amount = offer.amount_wh if amount_wh is None else amount_wh
        if not 0 < amount <= offer.amount_wh or (
            amount < offer.min_wh and amount != offer.amount_wh
        ):
            raise MarketError(
                f"bad terms: offer {offer_id} has {offer.amount_wh} Wh left, taken in parts of "
                f"at least {min(offer.min_wh, offer.amount_wh)} Wh"
            )
        if (offer.mode == LINE) != (buyer_channel != ZERO32):
            raise MarketError(
                f"wrong mode: offer {offer_id} is a {offer.mode_name.upper()} offer; "
                + (
                    "name your end's line counter channel"
                    if offer.mode == LINE
                    else "a GRID order names no line channel"
                )
            )
        if self.now_ms() >= offer.t0:
            raise MarketError(
                f"expired offer: offer {offer_id}'s window began at {utc_text(offer.t0)}"
            )
        self._check_funds(account, self.cost(amount, offer.price))
        self.approve(account, self.cost(amount, offer.price))
        call = self.contract.functions.takeOffer(offer_id, amount, buyer_channel)
        receipt = self._transact(account, call, "take the offer")
        (event,) = self.contract.events.OfferTaken().process_receipt(receipt, errors=DISCARD)
        return int(event["args"]["orderId"])

    def settle_grid(
        self, account: LocalAccount, order_id: int, seller: Recorded, buyer: Recorded
    ) -> Settlement:
        """Settle one period of a GRID order from both sides' recorded commitments."""
        call = self.contract.functions.settleGrid(order_id, *seller.args(), *buyer.args())
        receipt = self._transact(account, call, "settle", order_id)
        (event,) = self.contract.events.Settled().process_receipt(receipt, errors=DISCARD)
        a = event["args"]
        return Settlement(order_id, a["t0"], a["t1"], a["deliveredWh"], a["paid"])

    def anchor_line(
        self, account: LocalAccount, order_id: int, seller: tuple[Any, ...], buyer: tuple[Any, ...]
    ) -> None:
        """Fix each end's first line reading (`LineProof` tuples: commitment, batch proof,
        reading, reading proof)."""
        call = self.contract.functions.anchorLine(order_id, seller, buyer)
        self._transact(account, call, "anchor the line", order_id)

    def settle_line(
        self, account: LocalAccount, order_id: int, seller: tuple[Any, ...], buyer: tuple[Any, ...]
    ) -> int:
        """Settle the line up to these readings; the dispute opened (0 when both agreed)."""
        call = self.contract.functions.settleLine(order_id, seller, buyer)
        receipt = self._transact(account, call, "settle", order_id)
        opened = self.contract.events.DisputeOpened().process_receipt(receipt, errors=DISCARD)
        return int(opened[0]["args"]["disputeId"]) if opened else 0

    def resolve_dispute(self, account: LocalAccount, dispute_id: int, micro_wh: int) -> None:
        call = self.contract.functions.resolveDispute(dispute_id, micro_wh)
        self._transact(account, call, "resolve the dispute")

    def close_dispute(self, account: LocalAccount, dispute_id: int) -> None:
        call = self.contract.functions.closeDispute(dispute_id)
        self._transact(account, call, "close the dispute")

    # -- internals -------------------------------------------------------------------------

    def _check_funds(self, account: LocalAccount, needed: int) -> None:
        held = self.balance(account.address)
        if held < needed:
            raise MarketError(
                f"insufficient credits: the escrow is {credits(needed)} credits, "
                f"{_short(account.address)} holds {credits(held)}"
            )

    def _on_order(
        self, account: LocalAccount, order_id: int, action: str, role: str | None, fn: Any
    ) -> Any:
        """Check what can be said in words before the contract refuses, then send."""
        order = self.existing_order(order_id)
        if role is not None and getattr(order, role) != account.address:
            raise MarketError(
                f"not the {role}: order {order_id}'s {role} is {_short(getattr(order, role))}, "
                f"not {_short(account.address)}"
            )
        return self._transact(account, fn(order_id), action, order_id)

    def _transact(
        self, account: LocalAccount, call: Any, action: str, order_id: int | None = None
    ) -> Any:
        """Run `call` as a call first (a refusal says why and sends nothing), then send it."""
        try:
            call.call({"from": account.address})
        except Exception as exc:
            data = revert_data(exc)
            if data is None:
                raise
            raise MarketError(self._explain(data, action, order_id)) from None
        tx = {"to": call.address, "data": call._encode_transaction_data()}
        return chain.send(self.w3, account, tx)

    def _explain(self, data: bytes, action: str, order_id: int | None) -> str:
        """One line for a revert: the error's meaning, with what the order says about it."""
        if self._errors is None:
            self._errors = _error_table([self.contract, self.credit, self.ledger.contract])
        name, types = self._errors.get(bytes(data[:4]), ("", []))
        if not name:
            return f"cannot {action}: the contract refused (0x{data.hex()[:72]})"
        text = ERROR_TEXT.get(name, name)
        order = self.order(order_id) if order_id else None
        if name == "TooLate" and order is not None:
            if order.state == OPEN:
                text = f"expired order: order {order_id}'s window began at {utc_text(order.t0)}"
            else:
                until = utc_text(order.t1 + self.grace_ms())
                text = f"too late: order {order_id} could be settled until {until}"
        elif name == "TooEarly" and order is not None and action == "refund":
            until = utc_text(order.t1 + self.grace_ms())
            text = f"too early: order {order_id}'s escrow returns after {until}"
        elif name == "TooEarly" and order is not None and action == "expire":
            text = f"too early: order {order_id} may still be accepted until {utc_text(order.t0)}"
        elif name == "BadState" and order is not None:
            text = f"order {order_id} is {order.state_name}: cannot {action} it"
        elif name == "WrongMode" and order is not None:
            text = f"wrong mode: order {order_id} is a {order.mode_name.upper()} order"
        elif name.startswith("ERC20Insufficient") and len(types) == 3:
            _, have, need = self.w3.codec.decode(types, bytes(data[4:]))
            text += f" ({credits(int(need))} needed, {credits(int(have))} available)"
        return text


def _short(address: str) -> str:
    return address[:10] + "…"


def _abi_type(entry: dict[str, Any]) -> str:
    """The canonical type of an ABI input (tuples spelled out), as selectors hash it."""
    kind = str(entry["type"])
    if kind.startswith("tuple"):
        inner = ",".join(_abi_type(c) for c in entry["components"])
        return f"({inner}){kind[5:]}"
    return kind


def _error_table(contracts: Sequence[Contract]) -> dict[bytes, tuple[str, list[str]]]:
    table = {}
    for contract in contracts:
        abi: list[dict[str, Any]] = list(contract.abi)  # type: ignore[arg-type]
        for entry in abi:
            if entry["type"] == "error":
                types = [_abi_type(i) for i in entry["inputs"]]
                selector = bytes(keccak(text=f"{entry['name']}({','.join(types)})")[:4])
                table[selector] = (str(entry["name"]), types)
    return table


def decoded_commitment(item: Any) -> Commitment:
    """A decoded `Commitment` struct (a dict by field name, or a tuple) as the ledger's type."""
    if isinstance(item, dict):
        fields = [
            item[k]
            for k in (
                "node",
                "seq",
                "t0",
                "t1",
                "root",
                "count",
                "importWh",
                "exportWh",
                "prevHash",
                "rulesHash",
            )
        ]
    else:
        fields = list(item)
    node, seq, t0, t1, root, count, imp, exp, prev, rules = fields
    return Commitment(
        to_checksum_address(node),
        int(seq),
        int(t0),
        int(t1),
        bytes(root),
        int(count),
        int(imp),
        int(exp),
        bytes(prev),
        bytes(rules),
    )
