"""The node on the energy market: it watches the chain, sells by its policy, buys by its rules,
meters its accepted orders itself and settles them afterwards.

    chain events ──▶ orders of this node ──▶ seller: accept / refuse (`Policy`)
                                       └──▶ accepted: `DeliveryTracker` ──▶ market.* rule inputs
    node inputs ──▶ `[[market.buy]]` `when` (`BuyTrigger`) ──▶ open an order (escrow)
    window over ──▶ GRID: settle the periods both sides committed
                └─▶ LINE: prove this end's line readings, swap proofs over MQTT, settle
    after the grace time ──▶ refund (and close disputes past their deadline)

The chain is polled (`[market] poll_s`) on the ledger's chain thread; every poll re-reads the
last `[chain] confirmations` blocks and checks the hash of the newest block it read, so a reorg
is read again. Orders are acted on from their state as the chain holds it now (`Market.order`),
never from an event alone, so reading an event twice does nothing twice.

Switching never waits for the chain: the tracker's inputs are handed to the rules on every
reading of an order's meter and on a tick (`TICK_S`), so the rule that closes a supply relay on
`market.order_active == 1` opens it again as soon as the meter has counted the ordered Wh. The
tracker's state is kept in the store's meta table (`DELIVERY_KEY`) across restarts; what `status`
shows of the market is kept there too (`STATUS_KEY`).

LINE orders (`[market] line_meter`) are metered on the line's counter at each end and settled
from both ends' proven readings: see `daisee_node.market_line`.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from daisee_node.delivery import DeliveryTracker
from daisee_node.delivery import Order as Delivery
from daisee_node.errors import DaiseeError
from daisee_node.ledger.settings import BuyEntry, MarketSection
from daisee_node.logs import get_logger
from daisee_node.market_line import EndProofs, LineMessageError, message, parse_message
from daisee_node.readings import Reading
from daisee_node.rules.expressions import EvaluationError, Expression

if TYPE_CHECKING:
    from eth_account.signers.local import LocalAccount

    from daisee_node.clock import Clock
    from daisee_node.ledger.market import Market, Order
    from daisee_node.ledger.service import LedgerService
    from daisee_node.store import Store

#: the market's inputs are handed to the rules at least this often (s)
TICK_S = 0.25
#: meta keys: the tracker's snapshot, what `status` shows, the buy entries' open orders
DELIVERY_KEY = "market.delivery"
STATUS_KEY = "market.status"
BUYS_KEY = "market.buys"
#: an input older than this does not count for a policy or a buy condition (s)
INPUT_MAX_AGE_S = 60.0
#: after a failed purchase an entry waits this long before trying again (s)
BUY_RETRY_S = 30.0
#: settlement and refunds are tried at most this often per order: a fifth of a period, within
#: these bounds (s); a period's commitments reach the chain a submission interval after it
SETTLE_EVERY_S = (1.0, 60.0)
#: the balance and escrow shown are refreshed this often (s)
BALANCE_EVERY_S = 10.0
#: a reorg deeper than the confirmations: read this many blocks again
REORG_REREAD = 64
#: a closed order's delivery is kept (for `status`) this long after its window (ms)
FORGET_AFTER_MS = 86_400_000
#: the most line messages kept from peers before they are matched to an order
LINE_HEARD_MAX = 256
#: contract states and modes (daisee_node.ledger.market, not imported before the chain is used)
OPEN, ACCEPTED, GRID, LINE = 1, 2, 0, 1
STATES = ("none", "open", "accepted", "refused", "cancelled", "expired", "closed")
DAY_MS = 86_400_000
#: the seller's node refuses an order whose window starts further ahead of the chain's clock
#: than this, or lasts longer: the contract takes any uint64 time (up to year 584 million)
MAX_LEAD_MS = 366 * DAY_MS
MAX_WINDOW_MS = 31 * DAY_MS
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def credit_units(credits: float, decimals: int) -> int:
    """Credits (per kWh) as the token's base units, exactly as the decimal number reads;
    ValueError for a value that is not a finite number."""
    if not math.isfinite(credits):
        raise ValueError(f"{credits} credits is not a finite number")
    return int(Decimal(str(credits)) * 10**decimals)


def _fresh(r: Reading | None, now_ms: int) -> bool:
    return (
        r is not None
        and r.good
        and math.isfinite(r.value)
        and now_ms - r.t_ms <= INPUT_MAX_AGE_S * 1000
    )


def channel_id(name: str) -> bytes:
    """A line counter's id as orders and commitments name it (keccak of its name)."""
    from daisee_node.ledger import merkle

    return merkle.channel_id(name)


def utc_time(t_ms: int) -> datetime | None:
    """A time in ms since the epoch as a UTC datetime; None beyond the calendar (years 1 to
    9999), where any uint64 an order carries may lie."""
    try:
        return _EPOCH + timedelta(milliseconds=t_ms)
    except (OverflowError, ValueError):
        return None


def _day(t_ms: int) -> str:
    """The UTC day of `t_ms` (2026-11-22), or its year beyond the calendar; never raises."""
    when = utc_time(t_ms)
    if when is not None:
        return when.date().isoformat()
    # The calendar repeats every 400 years (146097 days): find the day in the first cycles.
    cycles, day = divmod(t_ms // 86_400_000, 146_097)
    return f"year {(_EPOCH + timedelta(days=day)).year + 400 * cycles}"


def _days(ms: int) -> str:
    return f"{ms / DAY_MS:,.0f} days" if ms >= 2 * DAY_MS else f"{ms / 3_600_000:,.0f} h"


class Policy:
    """Whether this node, as the seller, accepts an order: `refusal` says why not, or None.

    `peers` maps the declared peers' addresses (lower case) to their ids; `accept_from` takes
    either. The battery's level is read from `latest`; an unknown or old level refuses, as a
    low one does."""

    def __init__(
        self,
        settings: MarketSection,
        peers: Mapping[str, str],
        latest: Mapping[str, Reading],
        decimals: int = 18,
    ) -> None:
        self.settings = settings
        self.peers = peers
        self.latest = latest
        self.decimals = decimals
        self.min_price = credit_units(settings.min_price, decimals)
        by_id = {pid: address for address, pid in peers.items()}
        self.allowed = {by_id.get(who, who).lower() for who in settings.accept_from}

    def refusal(
        self, order: Order, accepted_wh: int, now_ms: int, chain_now_ms: int | None = None
    ) -> str | None:
        """Why `order` is refused (None: accepted); `accepted_wh` is what this node already
        accepted to deliver in windows starting on the order's day (UTC). `now_ms` is the
        node's clock (the age of inputs), `chain_now_ms` the chain's (default: `now_ms`)."""
        s = self.settings
        buyer = order.buyer.lower()
        who = f"peer {self.peers[buyer]!r}" if buyer in self.peers else buyer
        ahead = order.t0 - (now_ms if chain_now_ms is None else chain_now_ms)
        if ahead > MAX_LEAD_MS:
            return (
                f"its window starts too far ahead: {_days(ahead)} from now ({_day(order.t0)}); "
                f"orders are accepted up to {MAX_LEAD_MS // DAY_MS} days ahead"
            )
        if order.t1 - order.t0 > MAX_WINDOW_MS:
            return (
                f"its window is too long: {_days(order.t1 - order.t0)}; windows of up to "
                f"{MAX_WINDOW_MS // DAY_MS} days are accepted"
            )
        if order.mode == LINE:
            if s.line_meter is None:
                return "a LINE order, and this node has no market.line_meter"
            if order.seller_channel != channel_id(s.line_meter):
                return f"a LINE order on a channel other than market.line_meter {s.line_meter!r}"
        if buyer not in self.allowed:
            return f"buyer {who} is not in market.accept_from"
        if order.price < self.min_price:
            price = Decimal(order.price).scaleb(-self.decimals).normalize()
            return f"price {price:f} credits/kWh is below market.min_price {s.min_price:g}"
        if s.keep_battery_above_pct is not None and s.battery_channel is not None:
            r = self.latest.get(s.battery_channel)
            if r is None or not _fresh(r, now_ms):
                return f"battery level unknown ({s.battery_channel} has no recent good reading)"
            if r.value < s.keep_battery_above_pct:
                return (
                    f"battery at {r.value:.0f} % is below market.keep_battery_above_pct "
                    f"{s.keep_battery_above_pct:g} %"
                )
        if s.max_wh_per_day is not None and accepted_wh + order.amount_wh > s.max_wh_per_day:
            return (
                f"{order.amount_wh} Wh more would exceed market.max_wh_per_day "
                f"{s.max_wh_per_day} ({accepted_wh} Wh already accepted for {_day(order.t0)})"
            )
        return None


class BuyTrigger:
    """The `[[market.buy]]` entries: which want an order now (their `when` holds over fresh
    inputs) and may place one (none of theirs is open or accepted, none failed just now)."""

    def __init__(self, entries: Sequence[BuyEntry], latest: Mapping[str, Reading]) -> None:
        self.entries = list(entries)
        self.latest = latest
        self.conditions = {e.name: Expression(e.when, result="condition") for e in entries}
        #: entry → monotonic time before which it does not try again
        self.retry_at: dict[str, float] = {}

    def holds(self, entry: BuyEntry, now_ms: int) -> bool:
        """Whether `when` holds; a missing, bad or old input makes it false."""
        condition = self.conditions[entry.name]
        values: dict[str, float] = {}
        for name in condition.names:
            r = self.latest.get(name)
            if r is None or not _fresh(r, now_ms):
                return False
            values[name] = r.value
        try:
            return condition.test(values)
        except EvaluationError:
            return False

    def due(self, busy: set[str], now_ms: int, mono: float | None = None) -> list[BuyEntry]:
        """The entries to buy for now; `busy` names those with an order open or accepted."""
        mono = time.monotonic() if mono is None else mono
        return [
            e
            for e in self.entries
            if e.name not in busy
            and self.retry_at.get(e.name, 0.0) <= mono
            and self.holds(e, now_ms)
        ]

    def failed(self, name: str, mono: float | None = None) -> None:
        self.retry_at[name] = (time.monotonic() if mono is None else mono) + BUY_RETRY_S


def buy_window(entry: BuyEntry, chain_now_ms: int, period_ms: int) -> tuple[int, int]:
    """The delivery window of a purchase: whole periods, starting `lead_s` from now at least."""
    t0 = -(-(chain_now_ms + int(entry.lead_s * 1000) + 1) // period_ms) * period_ms
    t1 = -(-(t0 + int(entry.window_min * 60_000)) // period_ms) * period_ms
    return t0, t1


@dataclass
class Known:
    """One order of this node, as the chain holds it, and what the node did with it."""

    order: Order
    role: str  # "seller" or "buyer"
    peer: str  # the other side's peer id (or its address when undeclared)
    decision: str | None = None  # why it was refused, or "accepted by policy"
    settle_at: float = 0.0  # monotonic time of the next settlement or refund attempt
    settled_all: bool = False  # every period of the window is settled


class MarketService:
    """The market inside the daemon: `run` watches the chain and acts, `tick_loop` hands the
    tracker's inputs to the rules, `on_readings` takes the meters' readings (a bus sink)."""

    def __init__(
        self,
        settings: MarketSection,
        *,
        ledger: LedgerService,
        store: Store,
        clock: Clock,
        latest: Mapping[str, Reading],
        peers: Mapping[str, str],
        deliver: Callable[[list[Reading]], None],
        peer_age_s: Callable[[str], float | None],
        period_s: int,
        confirmations: int,
        prove: Callable[[str, int], Awaitable[dict[str, Any]]] | None = None,
    ) -> None:
        self.settings = settings
        self.ledger = ledger
        self.store = store
        self.clock = clock
        self.latest = latest
        self.peers = {address.lower(): pid for address, pid in peers.items()}
        self.deliver = deliver
        self.period_ms = period_s * 1000
        self.settle_every_s = min(max(period_s / 5, SETTLE_EVERY_S[0]), SETTLE_EVERY_S[1])
        self.confirmations = confirmations
        #: a proof of this node's reading of a channel at or before a time (`build_proof`)
        self.prove = prove
        self.log = get_logger("market")
        self.tracker = DeliveryTracker(peer_age_s=peer_age_s, heartbeat_s=settings.heartbeat_s)
        self.policy = Policy(settings, self.peers, latest)
        self.trigger = BuyTrigger(settings.buy, latest)
        self.orders: dict[int, Known] = {}
        #: buy entry → the id of the order it placed last
        self.buys: dict[str, int] = {}
        self.market: Market | None = None
        self.account: LocalAccount | None = None
        self.address: str | None = None
        self.decimals = 18
        self.grace_ms = 0
        self.balance: int | None = None
        self.escrowed: int | None = None
        self.error: str | None = None
        self._next_block = settings.from_block
        self._scanned: tuple[int, bytes] | None = None
        self._restored = asyncio.Event()
        self._saved: str | None = None
        self._balance_at = 0.0
        #: LINE orders: this end's proofs, the other end's (heard over MQTT), what was published
        self.line_mine: dict[int, EndProofs] = {}
        self.line_theirs: dict[int, EndProofs] = {}
        self._line_published: set[int] = set()
        self._line_heard: dict[tuple[str, int], bytes] = {}
        self._line_unprovable: set[int] = set()
        #: order → the chain time (ms) at which its next open dispute may be closed
        self._dispute_due: dict[int, int] = {}
        #: order → the last error met reading or acting on it (logged once)
        self._order_errors: dict[int, str] = {}
        #: orders of this node whose state could not be read yet
        self._unread: set[int] = set()
        #: buy entries whose terms cannot be put to the chain (logged once)
        self._bad_buys: dict[str, str] = {}
        self.line_slack_ms = 60_000

    # -- rules' inputs ----------------------------------------------------------------------

    def on_readings(self, readings: Sequence[Reading]) -> None:
        """A bus sink: a meter's reading updates the orders' delivery, and the rules at once."""
        if not self.tracker.flows:
            return
        inputs = self.tracker.on_readings(readings, self.clock.now_ms())
        if inputs:
            self.deliver(inputs)

    async def tick_loop(self) -> None:
        """The tracker's inputs to the rules every `TICK_S` (windows open and close, peers go
        silent between readings); its state to the store when it changed."""
        await self.restore()
        last_save = 0.0
        while True:
            self.deliver(self.tracker.inputs(self.clock.now_ms()))
            if time.monotonic() - last_save >= 1.0:
                last_save = time.monotonic()
                await self.save()
            await asyncio.sleep(TICK_S)

    async def restore(self) -> None:
        if self._restored.is_set():
            return
        saved = await self.store.get_meta(DELIVERY_KEY)
        if saved:
            self.tracker.restore(json.loads(saved))
        buys = await self.store.get_meta(BUYS_KEY)
        if buys:
            self.buys = {str(k): int(v) for k, v in json.loads(buys).items()}
        self._restored.set()

    async def save(self) -> None:
        """Keep the tracker's state, the buy entries' orders and the status, if they changed."""
        text = json.dumps(
            {"delivery": self.tracker.snapshot(), "buys": self.buys, "status": self.status()},
            sort_keys=True,
        )
        if text == self._saved:
            return
        self._saved = text
        await self.store.set_meta(DELIVERY_KEY, json.dumps(self.tracker.snapshot()))
        await self.store.set_meta(BUYS_KEY, json.dumps(self.buys, sort_keys=True))
        await self.store.set_meta(STATUS_KEY, json.dumps(self.status(), sort_keys=True))

    def status(self) -> dict[str, Any]:
        """What `status` and MQTT show: each order with its role, peer, delivery and state."""
        flows = self.tracker.flows
        orders = []
        for oid, k in sorted(self.orders.items()):
            o, flow = k.order, flows.get(oid)
            orders.append(
                {
                    "id": oid,
                    "role": k.role,
                    "peer": k.peer,
                    "amount_wh": o.amount_wh,
                    "price_units": str(o.price),
                    "t0_ms": o.t0,
                    "t1_ms": o.t1,
                    "state": STATES[o.state],
                    "delivered_wh": round(flow.delivered_wh, 3) if flow else None,
                    "flow": flow.state if flow else None,
                    "decision": k.decision,
                    "settled_wh": o.delivered_wh,
                }
            )
        inputs = {r.channel: r.value for r in self.tracker.inputs(self.clock.now_ms())}
        active = [f.order.order_id for f in sorted(flows.values(), key=lambda f: f.order.order_id)]
        flowing = [oid for oid in active if flows[oid].state == "flowing"]
        return {
            "address": self.address,
            "balance_units": str(self.balance) if self.balance is not None else None,
            "escrowed_units": str(self.escrowed) if self.escrowed is not None else None,
            "decimals": self.decimals,
            "orders": orders,
            "order_active": int(inputs.get("market.order_active", 0)),
            "active_order": flowing[0] if flowing else None,
            "delivered_wh": round(inputs.get("market.delivered_wh", 0.0), 3),
            "remaining_wh": round(inputs.get("market.remaining_wh", 0.0), 3),
            "error": self.error,
        }

    # -- the chain --------------------------------------------------------------------------

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await self.ledger.worker.call(fn, *args)

    async def connect(self) -> None:
        """Wait for the ledger's chain connection and the node key; then find the market."""
        # The ledger connects (and retries) in its submitter's task; it has no event to share.
        while self.ledger.ledger is None or self.ledger.submitter is None:  # noqa: ASYNC110
            await asyncio.sleep(0.2)
        self.account = await self.ledger.unlock()
        self.address = self.account.address
        from daisee_node.ledger.market import Market

        market = Market(self.ledger.ledger.w3, self.settings.address)
        await self._call(market.check_deployed)
        self.decimals = await self._call(market.decimals)
        self.grace_ms = await self._call(market.grace_ms)
        self.line_slack_ms = await self._call(market.line_slack_ms)
        self.policy = Policy(self.settings, self.peers, self.latest, self.decimals)
        self.market = market
        self.log.info("market ready", market=market.address, node=self.address)

    async def run(self) -> None:
        """Watch the market and act, every `poll_s`; a chain that fails is retried."""
        await self.restore()
        failures = 0
        while True:
            try:
                if self.market is None:
                    await self.connect()
                await self.poll()
                if failures:
                    self.log.info("market reachable again")
                failures, self.error = 0, None
            except Exception as exc:  # the chain comes and goes; switching goes on locally
                failures += 1
                self.error = str(exc)[:200]
                log = self.log.warning if failures == 1 else self.log.debug
                log("market not readable; orders flow on as metered", error=self.error)
            await asyncio.sleep(self.settings.poll_s * min(failures + 1, 10))

    async def poll(self) -> None:
        """One look at the chain: new and changed orders, then what to do with each."""
        market = self.market
        assert market is not None and self.address is not None
        head = await self._call(market.w3.eth.get_block, "latest")
        number, chain_now = int(head["number"]), int(head["timestamp"]) * 1000
        if self._scanned is not None and self._scanned[0] <= number:
            seen = await self._call(market.w3.eth.get_block, self._scanned[0])
            if bytes(seen["hash"]) != self._scanned[1]:
                self.log.warning("chain reorganised; reading the market again", block=number)
                self._next_block = max(self.settings.from_block, self._next_block - REORG_REREAD)
        start = max(self.settings.from_block, self._next_block - self.confirmations - 1)
        events = await self._call(market.events, start, number, ("OrderOpened",))
        me = self.address.lower()
        ids = {
            int(e.args["id"])
            for e in events
            if me in (str(e.args["buyer"]).lower(), str(e.args["seller"]).lower())
        }
        ids |= {oid for oid, k in self.orders.items() if k.order.state in (OPEN, ACCEPTED)}
        ids |= self._unread
        # Each order on its own: one that cannot be read or acted on (a peer's hostile terms)
        # must not stop the others. A chain that cannot be reached stops the whole poll.
        for oid in sorted(ids):
            try:
                self._learn(await self._call(market.order, oid))
                self._unread.discard(oid)
            except OSError:
                raise
            except Exception as exc:  # its event is behind us now: read it again next time
                self._unread.add(oid)
                self._order_failed(oid, "read", exc)
        self._next_block = number + 1
        self._scanned = (number, bytes(head["hash"]))
        for oid in sorted(ids):
            known = self.orders.get(oid)
            if known is None:
                continue
            try:
                await self._act(known, chain_now)
            except OSError:
                raise
            except Exception as exc:
                self._order_failed(oid, "act on", exc)
        await self._buy(chain_now)
        if time.monotonic() >= self._balance_at:
            self._balance_at = time.monotonic() + BALANCE_EVERY_S
            self.balance = await self._call(market.balance, self.address)
            escrowed = 0
            for oid, k in self.orders.items():
                if k.role == "buyer" and k.order.state in (OPEN, ACCEPTED):
                    escrowed += await self._call(market.escrow_of, oid)
            self.escrowed = escrowed

    def _order_failed(self, order_id: int, what: str, exc: Exception) -> None:
        """Log and record an order's failure once per distinct error (it is tried again every
        poll, and the same error every `poll_s` would flood the log and the events)."""
        error = f"{type(exc).__name__}: {str(exc)[:160]}"
        if self._order_errors.get(order_id) == error:
            self.log.debug(f"cannot {what} the order", order=order_id, error=error)
            return
        self._order_errors[order_id] = error
        self.log.warning(f"cannot {what} the order; the others go on", order=order_id, error=error)
        self._event(order_id, "error", f"cannot {what} the order: {error}")

    def _learn(self, order: Order) -> None:
        assert self.address is not None
        role = "seller" if order.seller.lower() == self.address.lower() else "buyer"
        other = order.buyer if role == "seller" else order.seller
        known = self.orders.get(order.id)
        if known is None:
            known = self.orders[order.id] = Known(order, role, self.peers.get(other.lower(), other))
        known.order = order
        if order.mode == LINE:
            meter = self.settings.line_meter
        else:
            meter = self.settings.seller_meter if role == "seller" else self.settings.buyer_meter
        if order.state == ACCEPTED and meter is not None and order.id not in self.tracker.flows:
            self.tracker.add(
                Delivery(order.id, role, known.peer, order.amount_wh, order.t0, order.t1, meter)  # type: ignore[arg-type]
            )
            self.log.info("order accepted: metering it", order=order.id, role=role, meter=meter)
        elif (
            order.state not in (OPEN, ACCEPTED)
            and order.id in self.tracker.flows
            and self.clock.now_ms() >= order.t1 + FORGET_AFTER_MS
        ):
            self.tracker.remove(order.id)

    def _event(self, order_id: int, state: str, reason: str) -> None:
        self.store.put_event(
            self.clock.now_ms(), "market", f"order.{order_id}", None, state, reason
        )

    async def _act(self, known: Known, chain_now: int) -> None:
        order = known.order
        if known.role == "seller" and order.state == OPEN and known.decision is None:
            await self._decide(known, chain_now)
        elif order.state == ACCEPTED and chain_now >= order.t1:
            if time.monotonic() >= known.settle_at:
                known.settle_at = time.monotonic() + self.settle_every_s
                await self._settle(known, chain_now)
        elif (
            known.role == "buyer"
            and order.state == OPEN
            and chain_now >= order.t0
            and time.monotonic() >= known.settle_at
        ):
            known.settle_at = time.monotonic() + self.settle_every_s * 12
            await self._try(known, "expire", "escrow returned: never accepted")

    async def _decide(self, known: Known, chain_now: int) -> None:
        order, market, account = known.order, self.market, self.account
        assert market is not None and account is not None
        if chain_now >= order.t0:
            known.decision = "its window has begun: too late to accept"
            return
        day = order.t0 // DAY_MS
        accepted_wh = sum(
            k.order.amount_wh
            for k in self.orders.values()
            if k.role == "seller" and k.order.state == ACCEPTED and k.order.t0 // DAY_MS == day
        )
        reason = self.policy.refusal(order, accepted_wh, self.clock.now_ms(), chain_now)
        action = market.accept if reason is None else market.refuse
        known.decision = reason or "accepted by policy"
        try:
            await self._call(action, account, order.id)
        except Exception as exc:
            known.decision = f"{known.decision}; but the chain refused: {str(exc)[:160]}"
            self.log.warning("order decision not sent", order=order.id, error=str(exc)[:200])
            self._event(order.id, "error", known.decision)
            return
        state = "accepted" if reason is None else "refused"
        self.log.info(f"order {state}", order=order.id, buyer=known.peer, reason=known.decision)
        self._event(order.id, state, known.decision)
        self._learn(await self._call(market.order, order.id))

    async def _settle(self, known: Known, chain_now: int) -> None:
        """Settle every period both sides committed; the buyer's node refunds after grace."""
        market, account = self.market, self.account
        assert market is not None and account is not None
        order = known.order
        if order.open_disputes and chain_now >= self._dispute_due.get(order.id, 0):
            await self._close_disputes(known, chain_now)
            order = known.order
        if chain_now >= order.t1 + self.grace_ms:  # too late to settle: the rest is refunded
            if known.role == "buyer":
                await self._try(known, "refund", "undelivered escrow returned")
            return
        if known.settled_all:
            return
        if order.mode == LINE:
            await self._settle_line(known)
            return
        try:
            periods = await self._call(market.periods, order, self.settings.from_block)
        except Exception as exc:
            self.log.debug("periods not readable", order=order.id, error=str(exc)[:200])
            return
        settled = sum(p.settled for p in periods.both)
        for pair in periods.both:
            if pair.settled:
                continue
            try:
                done = await self._call(
                    market.settle_grid, account, order.id, pair.seller, pair.buyer
                )
            except Exception as exc:  # the other side may have settled it first
                self.log.debug("period not settled", order=order.id, error=str(exc)[:200])
                continue
            self.log.info(
                "period settled", order=order.id, t0=done.t0, delivered_wh=done.delivered_wh
            )
            self._event(order.id, "settled", f"{done.delivered_wh} Wh paid for {done.t0}")
            settled += 1
        known.settled_all = settled * self.period_ms >= order.t1 - order.t0
        self._learn(await self._call(market.order, order.id))

    # -- LINE orders ------------------------------------------------------------------------

    def line_messages(self) -> dict[int, str]:
        """What to publish, retained, for each LINE order: this end's proofs while the order
        is being settled, then "" once (which clears the retained message)."""
        out: dict[int, str] = {}
        for oid, ends in list(self.line_mine.items()):
            known = self.orders.get(oid)
            if known is not None and known.order.state == ACCEPTED:
                out[oid] = message(oid, ends)
            else:
                del self.line_mine[oid]
                self.line_theirs.pop(oid, None)
        for oid in self._line_published - out.keys():
            out[oid] = ""
        self._line_published = {oid for oid, text in out.items() if text}
        return out

    def on_line_message(self, peer_id: str, order_id: int, payload: bytes) -> None:
        """A peer's retained proofs of an order's line readings (checked when settling)."""
        if not payload:
            self._line_heard.pop((peer_id, order_id), None)
            return
        self._line_heard[(peer_id, order_id)] = payload
        while len(self._line_heard) > LINE_HEARD_MAX:  # a noisy peer cannot fill the memory
            del self._line_heard[next(iter(self._line_heard))]
        known = self.orders.get(order_id)
        if known is not None:
            known.settle_at = 0.0  # settle on the next poll, not a round later

    def _their_proofs(self, known: Known) -> EndProofs | None:
        """The other end's proofs of `known`, heard from that peer and fit for the order."""
        oid = known.order.id
        if oid in self.line_theirs:
            return self.line_theirs[oid]
        payload = self._line_heard.get((known.peer, oid))
        if payload is None:
            return None
        side = "buyer" if known.role == "seller" else "seller"
        try:
            ends = parse_message(payload, known.order, side)
        except LineMessageError as exc:
            del self._line_heard[(known.peer, oid)]
            self.log.warning("line proofs refused", order=oid, peer=known.peer, reason=str(exc))
            self._event(oid, "error", f"line proofs from {known.peer} refused: {exc}")
            return None
        self.line_theirs[oid] = ends
        return ends

    async def _prove_line(self, order: Order) -> EndProofs | None:
        """This end's proofs: the line counter's last reading at or before the window's start,
        and its last one inside the window; None until both periods are on chain."""
        line = self.settings.line_meter
        if self.prove is None or line is None or self.address is None:
            return None
        try:
            anchor = await self.prove(line, order.t0)
            end = await self.prove(line, order.t1 - 1)
        except DaiseeError as exc:  # mostly: the periods are not on the chain yet
            self.log.debug("line readings not provable yet", order=order.id, reason=str(exc))
            return None
        except Exception as exc:  # the chain: tried again next round
            self.log.debug("line readings not proven", order=order.id, error=str(exc)[:200])
            return None
        if not order.t0 - self.line_slack_ms <= int(anchor["t_ms"]) < int(end["t_ms"]):
            reason = (
                f"no reading of {line} within {self.line_slack_ms / 1000:g} s before the "
                "window, or none inside it: the line cannot be settled from this end"
            )
            if order.id not in self._line_unprovable:
                self._line_unprovable.add(order.id)
                self.log.warning("line not provable", order=order.id, reason=reason)
                self._event(order.id, "error", reason)
            return None
        return EndProofs(self.address, anchor, end)

    async def _settle_line(self, known: Known) -> None:
        """Prove this end (its proofs then go out over MQTT); with the other end's proofs,
        anchor the line and settle it up to the window's end."""
        market, account = self.market, self.account
        assert market is not None and account is not None
        order = known.order
        mine = self.line_mine.get(order.id)
        if mine is None:
            mine = await self._prove_line(order)
            if mine is None:
                return
            self.line_mine[order.id] = mine
            self.log.info("line readings proven; sent to the other end", order=order.id)
        theirs = self._their_proofs(known)
        if theirs is None:
            return
        seller, buyer = (mine, theirs) if known.role == "seller" else (theirs, mine)
        (s_anchor, s_end), (b_anchor, b_end) = seller.as_args(), buyer.as_args()
        end_t = int(s_end[2][1])
        try:
            seller_t, _ = await self._call(market.line_position, order.id)
            if seller_t == 0:
                await self._call(market.anchor_line, account, order.id, s_anchor, b_anchor)
                self._event(order.id, "anchored", "line readings at the window's start fixed")
            if seller_t < end_t:
                dispute = await self._call(market.settle_line, account, order.id, s_end, b_end)
                after = await self._call(market.order, order.id)
                words = (
                    f"the ends disagree beyond tolerance: dispute {dispute} opened"
                    if dispute
                    else f"{after.delivered_wh} Wh paid, as both ends of the line agree"
                )
                self.log.info("line settled", order=order.id, result=words)
                self._event(order.id, "disputed" if dispute else "settled", words)
        except Exception as exc:  # the other end may have got there first: read where it is
            self.log.debug("line not settled here", order=order.id, error=str(exc)[:200])
        seller_t, _ = await self._call(market.line_position, order.id)
        known.settled_all = seller_t >= end_t
        self._learn(await self._call(market.order, order.id))

    async def _close_disputes(self, known: Known, chain_now: int) -> None:
        """Close this order's disputes whose deadline passed undecided (the lower value
        stands), so that the rest of the escrow can return."""
        market, account = self.market, self.account
        assert market is not None and account is not None
        still_open = []
        for d in await self._call(market.disputes_of, known.order.id):
            if d.open and chain_now >= d.deadline:
                await self._try_dispute(known, d.id)
            elif d.open:
                still_open.append(d.deadline)
        # Disputes last a day by default: read them again only when the next one is due.
        self._dispute_due[known.order.id] = min(still_open, default=0)
        self._learn(await self._call(market.order, known.order.id))

    async def _try_dispute(self, known: Known, dispute_id: int) -> None:
        market, account = self.market, self.account
        assert market is not None and account is not None
        try:
            await self._call(market.close_dispute, account, dispute_id)
        except Exception as exc:
            self.log.debug("dispute not closed", dispute=dispute_id, error=str(exc)[:200])
            return
        words = f"dispute {dispute_id} closed after its deadline: the lower value stands"
        self.log.info(words, order=known.order.id)
        self._event(known.order.id, "dispute closed", words)

    async def _try(self, known: Known, action: str, words: str) -> None:
        market, account = self.market, self.account
        assert market is not None and account is not None
        try:
            await self._call(getattr(market, action), account, known.order.id)
        except Exception as exc:
            self.log.debug(f"{action} not done", order=known.order.id, error=str(exc)[:200])
            return
        self.log.info(words, order=known.order.id)
        self._event(known.order.id, action, words)
        self._learn(await self._call(market.order, known.order.id))

    async def _buy(self, chain_now: int) -> None:
        """Open an order for each `[[market.buy]]` entry whose condition holds and that has
        none open or accepted."""
        if not self.trigger.entries:
            return
        market, account = self.market, self.account
        assert market is not None and account is not None
        busy = {
            name
            for name, oid in self.buys.items()
            if oid not in self.orders or self.orders[oid].order.state in (OPEN, ACCEPTED)
        }
        by_id = {pid: address for address, pid in self.peers.items()}
        for entry in self.trigger.due(busy, self.clock.now_ms()):
            try:
                t0, t1 = buy_window(entry, chain_now, self.period_ms)
                price = credit_units(entry.max_price, self.decimals)
                seller = by_id[entry.seller]
            except (ArithmeticError, ValueError, KeyError) as exc:
                self._bad_buy(entry, exc)
                continue
            terms: tuple[Any, ...] = ()
            if entry.mode == "line" and self.settings.line_meter is not None:
                own = self.settings.line_meter
                theirs = entry.seller_line_meter or own
                terms = (LINE, (channel_id(theirs), channel_id(own)))
            try:
                oid = await self._call(
                    market.open,
                    account,
                    seller,
                    entry.amount_wh,
                    price,
                    t0,
                    t1,
                    *terms,
                )
            except Exception as exc:
                self.trigger.failed(entry.name)
                self.log.warning("order not opened", entry=entry.name, error=str(exc)[:200])
                self.store.put_event(
                    self.clock.now_ms(), "market", f"buy.{entry.name}", None, "error", str(exc)
                )
                continue
            self.buys[entry.name] = oid
            self.log.info(
                "order opened",
                entry=entry.name,
                order=oid,
                seller=entry.seller,
                amount_wh=entry.amount_wh,
                t0=t0,
                t1=t1,
            )
            self._event(oid, "opened", f"[[market.buy]] {entry.name}: {entry.when}")
            self._learn(await self._call(market.order, oid))
            await self.save()

    def _bad_buy(self, entry: BuyEntry, exc: Exception) -> None:
        """A `[[market.buy]]` entry whose terms cannot be made (a price or time no number can
        hold, an undeclared seller): skipped, logged and recorded once, tried again later."""
        self.trigger.failed(entry.name)
        error = f"{type(exc).__name__}: {str(exc)[:160]}"
        if self._bad_buys.get(entry.name) == error:
            return
        self._bad_buys[entry.name] = error
        self.log.error(
            "[[market.buy]] entry skipped: its terms are invalid", entry=entry.name, error=error
        )
        self.store.put_event(
            self.clock.now_ms(),
            "market",
            f"buy.{entry.name}",
            None,
            "error",
            f"[[market.buy]] {entry.name} skipped: {error}",
        )
