"""`daisee-node market …`: the operator's view of, and hand on, the energy market.

Amounts are typed with their unit (`500Wh`, `0.5kWh`), prices in credits per kWh (`0.2`), times
as ISO 8601 with a zone or relative to the chain's clock (`+15min`, `+2h`), from 1970 to 9999.
Every refusal is one line and a non-zero exit: the market's wrapper runs each transaction as a
call first and says why the contract would refuse it. A transaction that went through is
reported as done (exit 0), even when what it did cannot be read back; and times on the chain are
shown whatever a buyer put there (beyond the calendar, as their year).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daisee_node.errors import DaiseeError
from daisee_node.ledger.cli_errors import chain_errors

if TYPE_CHECKING:
    from eth_account.signers.local import LocalAccount
    from web3 import Web3

    from daisee_node.config import Config
    from daisee_node.ledger.market import Market, Order, Settlement

EXIT_OK = 0
DEFAULT_PERIOD_S = 900
_AMOUNT = re.compile(r"^\s*([-+]?(?:\d+(?:\.\d*)?|\.\d+))\s*(wh|kwh|mwh)\s*$", re.IGNORECASE)
#: an argument like -5Wh or -0.2 is a (bad) value, not an option: let its parser say why
_NEGATIVE = re.compile(r"^-\.?\d")
#: the last time the calendar holds (9999-12-31 23:59:59.999 UTC): orders end before it
MAX_TIME_MS = 253_402_300_799_999
_RELATIVE = re.compile(r"^\+\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|d)\s*$", re.IGNORECASE)
_UNIT_MS = {"s": 1000, "sec": 1000, "m": 60_000, "min": 60_000, "h": 3_600_000, "d": 86_400_000}
_WH_PER = {"wh": 1, "kwh": 1000, "mwh": 1_000_000}


def add_parsers(sub: Any) -> None:
    """Register `market` and its actions on the main parser's subparsers."""
    market = sub.add_parser(
        "market",
        help="buy and sell energy with neighbours: offers, orders, settlement, credits",
        description="Orders and offers of the community's energy market, paid in energy "
        "credits held in escrow and settled from both nodes' committed periods. The chain, the "
        "market and the node key come from -c CONFIG ([chain], [market]) or the options.",
    )
    actions = market.add_subparsers(title="actions", metavar="ACTION", required=True)

    def action(name: str, help_text: str, func: Callable[[argparse.Namespace], int]) -> Any:
        p = actions.add_parser(name, help=help_text, description=help_text)
        p.add_argument(
            "-c", "--config", type=Path, default=None, help="the node's config ([chain], [market])"
        )
        p.add_argument("--rpc", default=None, help="JSON-RPC URL of a chain node (over the config)")
        p.add_argument("--market", default=None, help="the market's address (over the config)")
        p.add_argument("--keystore", type=Path, default=None, help="the node key's keystore")
        p.add_argument("--password-file", type=Path, default=None, help="its password file")
        p.set_defaults(func=chain_errors(func))
        # argparse takes `-5Wh` for an unknown option ("amount is required"); none of ours
        # starts with a digit, so such an argument goes to the amount's parser instead.
        p._negative_number_matcher = _NEGATIVE
        return p

    def window(p: Any) -> None:
        p.add_argument("--price", required=True, help="credits per kWh, e.g. 0.2")
        p.add_argument(
            "--start",
            required=True,
            help="start of delivery: ISO time with zone (2026-11-22T10:00Z) or +15min, +2h …; "
            "GRID windows are rounded up to whole periods",
        )
        p.add_argument("--end", required=True, help="end of delivery, as --start")
        p.add_argument(
            "--mode",
            choices=("grid", "line"),
            default="grid",
            help="grid: through the shared grid, matched per period (default); line: a direct "
            "line metered at both ends",
        )

    deploy = action("deploy", "deploy the market beside a ledger (the governance account)", _deploy)
    deploy.add_argument("--ledger", default=None, help="the ledger's address (over the config)")
    deploy.add_argument("--grace-h", type=float, default=2.0, help="hours settlement stays open")
    deploy.add_argument("--dispute-h", type=float, default=24.0, help="hours to decide a dispute")
    deploy.add_argument(
        "--line-slack-s", type=float, default=60.0, help="seconds the ends' line readings may part"
    )
    deploy.add_argument(
        "--tolerance-bps", type=int, default=200, help="LINE disagreement allowed (200 = 2 %%)"
    )

    offers = action("offers", "list the offers buyers can take", _offers)
    offers.add_argument("--all", action="store_true", help="also offers whose window has begun")
    offers.add_argument("--json", action="store_true", help="JSON instead of a table")

    offer = action("offer", "offer energy for buyers to take (an accepted order at once)", _offer)
    offer.add_argument("amount", help="energy offered: 500Wh, 0.5kWh")
    window(offer)
    offer.add_argument("--min", default=None, help="smallest part a buyer may take (500Wh)")
    offer.add_argument("--to", default=None, help="only this peer may take it (id or address)")
    offer.add_argument("--channel", default=None, help="LINE: this node's line counter channel")

    buy = action("buy", "order energy from a peer, its price escrowed in credits", _buy)
    buy.add_argument("peer", help="the seller: a [[peers]] id of the config, or its address")
    buy.add_argument("amount", help="energy ordered: 500Wh, 0.5kWh")
    window(buy)
    buy.add_argument("--channel", default=None, help="LINE: this node's line counter channel")
    buy.add_argument("--seller-channel", default=None, help="LINE: the seller's counter channel")

    take = action("take", "take (part of) an offer: an accepted order, escrowed at once", _take)
    take.add_argument("offer_id", type=int, help="the offer's id (`market offers`)")
    take.add_argument("amount", nargs="?", default=None, help="how much (default: all left)")
    take.add_argument("--channel", default=None, help="LINE: this node's line counter channel")

    for name, help_text, func in (
        ("accept", "accept an order this node sells, before its window starts", _accept),
        ("refuse", "refuse an order this node sells: its escrow returns to the buyer", _refuse),
    ):
        p = action(name, help_text, func)
        p.add_argument("order_id", type=int, help="the order's id (`market orders`)")
    cancel = action("cancel", "withdraw an order not yet accepted (or --offer an offer)", _cancel)
    cancel.add_argument("order_id", type=int, help="the order's (or with --offer the offer's) id")
    cancel.add_argument("--offer", action="store_true", help="withdraw the offer with this id")

    orders = action("orders", "this node's orders, bought and sold", _orders)
    orders.add_argument("--all", action="store_true", help="also closed, refused, expired …")
    orders.add_argument("--node", default=None, help="another node's address (no key needed)")
    orders.add_argument("--json", action="store_true", help="JSON instead of a table")

    settle = action("settle", "pay an order's delivered energy from both nodes' periods", _settle)
    settle.add_argument("order_id", type=int, help="the order's id")
    settle.add_argument(
        "--period", default=None, help="only the period holding this time (default: every one)"
    )
    settle.add_argument("--seller-proof", type=Path, default=None, help="LINE: `prove` file")
    settle.add_argument("--buyer-proof", type=Path, default=None, help="LINE: `prove` file")

    refund = action("refund", "return an order's undelivered escrow after its grace time", _refund)
    refund.add_argument("order_id", type=int, help="the order's id")

    dispute = action("dispute", "list LINE disputes; --resolve (governance) or --close", _dispute)
    dispute.add_argument("order_id", type=int, nargs="?", default=None, help="only this order's")
    dispute.add_argument("--resolve", type=int, default=None, metavar="ID", help="decide one")
    dispute.add_argument("--wh", default=None, help="with --resolve: the Wh delivered (12.5)")
    dispute.add_argument("--close", type=int, default=None, metavar="ID", help="after deadline")
    dispute.add_argument("--json", action="store_true", help="JSON instead of a table")

    balance = action("balance", "this node's credits: held, and escrowed in its orders", _balance)
    balance.add_argument("--node", default=None, help="another node's address (no key needed)")
    balance.add_argument("--json", action="store_true", help="JSON instead of text")


# -- connection, key, inputs -------------------------------------------------------------------


@dataclass
class Session:
    """The market a command acts on, the config it came from and the node key's files."""

    w3: Web3
    market: Market
    config: Config | None
    keystore: Path | None
    password: Path | None
    from_block: int

    def account(self) -> LocalAccount:
        from daisee_node.ledger.keys import load_account

        if self.keystore is None:
            raise DaiseeError("give the node key: -c CONFIG (its [chain] keystore) or --keystore")
        password = self.password or self.keystore.with_suffix(".pass")
        return load_account(self.keystore, password)

    def address(self, given: str | None = None) -> str:
        """`given` (an address), else the node key's address (its keystore, no password)."""
        from eth_utils import to_checksum_address

        if given is not None:
            return to_checksum_address(_address(given, "--node"))
        if self.keystore is None:
            raise DaiseeError("give the node: -c CONFIG, --keystore or --node ADDRESS")
        from daisee_node.ledger.keys import keystore_address

        return to_checksum_address(keystore_address(self.keystore))

    def period_ms(self) -> int:
        chain = self.config.chain if self.config else None
        return (chain.period_s if chain else DEFAULT_PERIOD_S) * 1000


def _session(args: argparse.Namespace, *, ledger: bool = False) -> Session:
    """Connect to the chain and the market that `args` (or the config) name."""
    from daisee_node.ledger import chain, embedded
    from daisee_node.ledger.market import Market
    from daisee_node.paths import DEFAULT_CONFIG_PATH

    config = None
    path = args.config
    if path is None and (args.rpc is None or args.market is None or args.keystore is None):
        path = DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.exists() else None
    if path is not None:
        from daisee_node.config import load_config

        config = load_config(path)
    section = config.chain if config else None
    rpc = args.rpc or (section.rpc_url if section else None)
    if rpc is None:
        raise DaiseeError("give --rpc URL, or -c CONFIG with a [chain] section")
    keep_in = None
    if rpc == chain.EMBEDDED:
        if config is not None and embedded.is_kept(config.data_dir):
            keep_in = embedded.chain_dir(config.data_dir)
        elif embedded.default_dir() is None:
            raise DaiseeError("an 'embedded' chain lives only in its process: nothing to trade on")
    # Without --rpc the node's own chain node is asked, and its fallbacks while it is down.
    fallbacks = section.rpc_fallback_urls if section is not None and not args.rpc else ()
    w3 = chain.connect(
        rpc, section.rpc_timeout_s if section else 10.0, keep_in=keep_in, fallback_urls=fallbacks
    )
    keystore = args.keystore or (
        section.keystore_path(config.data_dir) if config and section else None
    )
    password = args.password_file or (
        section.password_path(config.data_dir) if config and section and not args.keystore else None
    )
    from_block = config.market.from_block if config and config.market else 0
    if ledger:  # `deploy`: the market does not exist yet
        return Session(w3, None, config, keystore, password, from_block)  # type: ignore[arg-type]
    address = args.market or (config.market.address if config and config.market else None)
    if address is None:
        raise DaiseeError("give --market ADDRESS, or -c CONFIG with a [market] section")
    market = Market(w3, _address(address, "--market"))
    market.check_deployed()
    return Session(w3, market, config, keystore, password, from_block)


def _address(text: str, what: str) -> str:
    from eth_utils import is_address, to_checksum_address

    if not is_address(text.strip()):
        raise DaiseeError(f"{what} {text!r} is not an address (0x and 40 hex digits)")
    return to_checksum_address(text.strip())


def parse_amount(text: str) -> int:
    """`500Wh`, `0.5kWh`, `2MWh` as whole Wh."""
    match = _AMOUNT.match(text)
    if match is None:
        raise DaiseeError(f"amount {text!r}: give energy with its unit, like 500Wh or 0.5kWh")
    wh = Decimal(match.group(1)) * _WH_PER[match.group(2).lower()]
    if wh != wh.to_integral_value():
        raise DaiseeError(f"amount {text!r} is not a whole number of Wh ({wh} Wh)")
    if not 0 < wh < 2**64:
        raise DaiseeError(f"amount {text!r}: give more than 0 Wh (and less than 2^64)")
    return int(wh)


def parse_price(text: str, decimals: int) -> int:
    """Credits per kWh as credit base units per kWh."""
    from daisee_node.ledger.market import parse_credits

    try:
        price = parse_credits(text.removesuffix("/kWh"), decimals)
    except ValueError as exc:
        raise DaiseeError(f"--price: {exc} (credits per kWh, e.g. 0.2)") from None
    if price >= 2**128:
        raise DaiseeError(f"--price {text!r} is too large")
    return price


def parse_time(text: str, now_ms: int, what: str) -> int:
    """An ISO 8601 time with its zone, ms since the epoch, or `+15min` from `now_ms`."""
    from daisee_node.clock import zoned_ms

    text = text.strip()
    relative = _RELATIVE.match(text)
    if relative:
        t_ms = now_ms + int(Decimal(relative.group(1)) * _UNIT_MS[relative.group(2).lower()])
    elif text.isdigit():
        t_ms = int(text)
    else:
        hint = (
            "give an ISO time with its zone (2026-11-22T10:00:00Z) or a time from now (+15min, "
            "+2h, +1d)"
        )
        t_ms = zoned_ms(text, f"{what} {text!r}", hint, DaiseeError)
    return _in_calendar(t_ms, f"{what} {text!r}")


def _in_calendar(t_ms: int, what: str) -> int:
    """`t_ms`, if a calendar (and the contract's uint64) holds it."""
    if not 0 <= t_ms <= MAX_TIME_MS:
        raise DaiseeError(f"{what} is out of range: give a time between 1970 and 9999")
    return t_ms


def _window(args: argparse.Namespace, s: Session, mode: int) -> tuple[int, int]:
    """The delivery window [t0, t1) in ms: in the future, GRID ends on period boundaries."""
    from daisee_node.ledger.market import GRID

    now = s.market.now_ms()
    t0 = parse_time(args.start, now, "--start")
    t1 = parse_time(args.end, now, "--end")
    if mode == GRID:  # only periods wholly inside the window settle
        period = s.period_ms()
        t0, t1 = -(-t0 // period) * period, -(-t1 // period) * period
        _in_calendar(t1, f"--end {args.end!r} (rounded up to a whole period)")
    if t0 <= now:
        raise DaiseeError(
            f"expired order: --start {args.start!r} ({_time(t0)}) is not in the future "
            f"(the chain's clock reads {_time(now)})"
        )
    if t1 <= t0:
        raise DaiseeError(f"--end {_time(t1)} is not after --start {_time(t0)}")
    return t0, t1


def _peer(text: str, s: Session) -> str:
    """A [[peers]] id of the config or an address, registered in the ledger."""
    from eth_utils import is_address, to_checksum_address

    peers = {p.id: p.address for p in s.config.peers} if s.config else {}
    if text in peers:
        address = to_checksum_address(peers[text])
    elif is_address(text):
        address = to_checksum_address(text)
    else:
        known = f" ({', '.join(sorted(peers))})" if peers else ""
        raise DaiseeError(f"unknown peer {text!r}: neither a [[peers]] id{known} nor an address")
    if not s.market.is_registered(address):
        raise DaiseeError(
            f"unknown peer {text!r}: {address} is not registered in the ledger "
            f"{s.market.ledger.address}"
        )
    return address


def _channels(args: argparse.Namespace, mode: int, *, seller: bool) -> tuple[bytes, bytes]:
    """(seller channel, buyer channel) of an order, checked against its mode."""
    from daisee_node.ledger.market import LINE, ZERO32, channel_id

    own, other = args.channel, getattr(args, "seller_channel", None)
    if mode != LINE:
        if own or other:
            raise DaiseeError("wrong mode: a GRID order names no line channel (--mode line?)")
        return ZERO32, ZERO32
    if seller:
        if not own:
            raise DaiseeError("wrong mode: a LINE offer needs --channel (this node's counter)")
        return channel_id(own), ZERO32
    if not own or not other:
        raise DaiseeError("wrong mode: a LINE order needs --channel and --seller-channel")
    return channel_id(other), channel_id(own)


def _time(t_ms: int) -> str:
    """A time as the tables show it; any uint64 (an order's times are a buyer's choice)."""
    from daisee_node.ledger.market import utc_text

    return utc_text(t_ms, "%Y-%m-%d %H:%M UTC")


def _span(t0: int, t1: int) -> str:
    """A window `t0`–`t1` (the end's day only when it differs); any uint64 at either end."""
    from daisee_node.ledger.market import utc_datetime, utc_text

    # seconds only when a bound has them (short periods): "15:18–15:18" says nothing
    clock = "%H:%M" if t0 % 60_000 == 0 and t1 % 60_000 == 0 else "%H:%M:%S"
    start, end = utc_datetime(t0), utc_datetime(t1)
    if start is None or end is None:
        return f"{utc_text(t0, '%Y-%m-%d ' + clock)}–{utc_text(t1, '%Y-%m-%d ' + clock)} UTC"
    tail = end.strftime(clock if end.date() == start.date() else "%Y-%m-%d " + clock)
    return f"{start.strftime('%Y-%m-%d ' + clock)}–{tail} UTC"


def _said(describe: Callable[[], str], done: str) -> int:
    """Print what a transaction that went through did. It went through: if its details cannot
    be read back or shown, `done` is said all the same, and the exit is still 0."""
    try:
        text = describe()
    except Exception as exc:
        why = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        text = f"{done} (its details could not be read back: {why})"
    print(text)
    return EXIT_OK


def _duration_ms(value: float, unit_ms: int, option: str) -> int:
    """An option's duration (hours, seconds …) in ms, finite, at least 0, within a uint64."""
    if not math.isfinite(value) or value < 0:
        raise DaiseeError(f"{option} {value}: give a finite number, 0 or more")
    ms = int(value * unit_ms)
    if ms >= 2**64:
        raise DaiseeError(f"{option} {value:g} is too long")
    return ms


def _cr(s: Session, base_units: int) -> str:
    from daisee_node.ledger.market import credits

    return f"{credits(base_units, s.market.decimals())} credits"


def _price(s: Session, price: int) -> str:
    from daisee_node.ledger.market import credits

    return f"{credits(price, s.market.decimals())}/kWh"


def _wh(wh: int) -> str:
    return f"{wh} Wh" if wh < 10_000 else f"{wh / 1000:g} kWh"


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    head = "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))
    return "\n".join(line.rstrip() for line in [head, *lines])


# -- actions -----------------------------------------------------------------------------------


def _deploy(args: argparse.Namespace) -> int:
    from daisee_node.ledger import market

    s = _session(args, ledger=True)
    section = s.config.chain if s.config else None
    ledger = args.ledger or (section.ledger_address if section else None)
    if ledger is None:
        raise DaiseeError("give --ledger ADDRESS, or -c CONFIG with chain.ledger_address")
    grace_ms = _duration_ms(args.grace_h, 3_600_000, "--grace-h")
    dispute_ms = _duration_ms(args.dispute_h, 3_600_000, "--dispute-h")
    line_slack_ms = _duration_ms(args.line_slack_s, 1000, "--line-slack-s")
    w3 = s.w3
    account = s.account()
    address = market.deploy(
        w3,
        account,
        _address(ledger, "--ledger"),
        grace_ms=grace_ms,
        dispute_ms=dispute_ms,
        line_slack_ms=line_slack_ms,
        tolerance_bps=args.tolerance_bps,
    )

    def describe() -> str:
        m = market.Market(w3, address)
        out = {
            "market": address,
            "ledger": m.ledger.address,
            "credit": m.credit.address,
            "governance": m.governance(),
            "block": w3.eth.block_number,
        }
        return json.dumps(out)

    return _said(describe, json.dumps({"market": address}))


def _offers(args: argparse.Namespace) -> int:
    s = _session(args)
    now = s.market.now_ms()
    found = [f for f in s.market.offers() if args.all or f.t0 > now]
    if args.json:
        print(json.dumps([_offer_json(s, f) for f in found]))
        return EXIT_OK
    if not found:
        print("no offers" + ("" if args.all else " open to take (--all: also past ones)"))
        return EXIT_OK
    rows = [
        [
            str(f.id),
            f.seller,
            _wh(f.amount_wh),
            _wh(f.min_wh),
            _price(s, f.price),
            _span(f.t0, f.t1),
            f.mode_name,
            "anyone" if int(f.buyer, 16) == 0 else f.buyer,
        ]
        for f in found
    ]
    print(_table(rows, ["id", "seller", "left", "min", "price", "window", "mode", "for"]))
    return EXIT_OK


def _offer_json(s: Session, f: Any) -> dict[str, Any]:
    from daisee_node.ledger.market import credits

    return {
        "id": f.id,
        "seller": f.seller,
        "amount_wh": f.amount_wh,
        "min_wh": f.min_wh,
        "price_per_kwh": credits(f.price, s.market.decimals()),
        "t0_ms": f.t0,
        "t1_ms": f.t1,
        "mode": f.mode_name,
        "buyer": None if int(f.buyer, 16) == 0 else f.buyer,
    }


def _offer(args: argparse.Namespace) -> int:
    from daisee_node.ledger.market import MODES

    s = _session(args)
    mode = MODES.index(args.mode)
    amount = parse_amount(args.amount)
    min_wh = parse_amount(args.min) if args.min else 0
    if min_wh > amount:
        raise DaiseeError(f"--min {_wh(min_wh)} is more than the offer ({_wh(amount)})")
    price = parse_price(args.price, s.market.decimals())
    seller_channel, _ = _channels(args, mode, seller=True)
    buyer = _peer(args.to, s) if args.to else None
    t0, t1 = _window(args, s, mode)
    offer_id = s.market.post_offer(
        s.account(), amount, price, t0, t1, mode, min_wh, seller_channel, buyer
    )
    return _said(
        lambda: (
            f"offer {offer_id} posted: {_wh(amount)} at {_price(s, price)}, "
            f"{_span(t0, t1)}, {args.mode.upper()}" + (f", for {buyer}" if buyer else "")
        ),
        f"offer {offer_id} posted",
    )


def _buy(args: argparse.Namespace) -> int:
    from daisee_node.ledger.market import MODES

    s = _session(args)
    mode = MODES.index(args.mode)
    amount = parse_amount(args.amount)
    price = parse_price(args.price, s.market.decimals())
    channels = _channels(args, mode, seller=False)
    seller = _peer(args.peer, s)
    t0, t1 = _window(args, s, mode)
    account = s.account()
    if seller == account.address:
        raise DaiseeError("the seller is this node itself")
    order_id = s.market.open(account, seller, amount, price, t0, t1, mode, channels)
    return _said(
        lambda: (
            f"order {order_id} opened: {_wh(amount)} from {seller} at {_price(s, price)}, "
            f"{_span(t0, t1)}, {args.mode.upper()}; {_cr(s, s.market.cost(amount, price))} escrowed"
        ),
        f"order {order_id} opened",
    )


def _take(args: argparse.Namespace) -> int:
    from daisee_node.ledger.market import channel_id

    s = _session(args)
    amount = parse_amount(args.amount) if args.amount else None
    channel = channel_id(args.channel) if args.channel else b"\0" * 32
    order_id = s.market.take_offer(s.account(), args.offer_id, amount, channel)

    def describe() -> str:
        order = s.market.order(order_id)
        return (
            f"order {order_id} accepted: {_wh(order.amount_wh)} of offer {args.offer_id} from "
            f"{order.seller}; {_cr(s, s.market.cost(order.amount_wh, order.price))} escrowed"
        )

    return _said(describe, f"order {order_id} accepted (offer {args.offer_id} taken)")


def _accept(args: argparse.Namespace) -> int:
    s = _session(args)
    s.market.accept(s.account(), args.order_id)

    def describe() -> str:
        order = s.market.order(args.order_id)
        return f"order {order.id} accepted: deliver {_wh(order.amount_wh)}, " + _span(
            order.t0, order.t1
        )

    return _said(describe, f"order {args.order_id} accepted")


def _refuse(args: argparse.Namespace) -> int:
    s = _session(args)
    s.market.refuse(s.account(), args.order_id)
    print(f"order {args.order_id} refused: its escrow returned to the buyer")
    return EXIT_OK


def _cancel(args: argparse.Namespace) -> int:
    s = _session(args)
    if args.offer:
        s.market.withdraw_offer(s.account(), args.order_id)
        print(f"offer {args.order_id} withdrawn")
        return EXIT_OK
    s.market.cancel(s.account(), args.order_id)
    print(f"order {args.order_id} cancelled: its escrow returned")
    return EXIT_OK


def _orders(args: argparse.Namespace) -> int:
    from daisee_node.ledger.market import ACCEPTED, OPEN, credits

    s = _session(args)
    node = s.address(args.node)
    found = [
        o for o in s.market.orders_of(node, s.from_block) if args.all or o.state in (OPEN, ACCEPTED)
    ]
    decimals = s.market.decimals()
    items: list[dict[str, Any]] = []
    for o in found:
        role = "buyer" if o.buyer == node else "seller"
        items.append(
            {
                "id": o.id,
                "role": role,
                "peer": o.seller if role == "buyer" else o.buyer,
                "amount_wh": o.amount_wh,
                "delivered_wh": o.delivered_wh,
                "price_per_kwh": credits(o.price, decimals),
                "t0_ms": o.t0,
                "t1_ms": o.t1,
                "mode": o.mode_name,
                "state": o.state_name,
                "escrow": credits(s.market.escrow_of(o.id), decimals),
            }
        )
    if args.json:
        print(json.dumps(items))
        return EXIT_OK
    if not items:
        print(f"no {'' if args.all else 'open or accepted '}orders of {node}")
        return EXIT_OK
    rows = [
        [
            str(i["id"]),
            str(i["role"]),
            str(i["peer"]),
            _wh(int(i["amount_wh"])),
            _wh(int(i["delivered_wh"])),
            f"{i['price_per_kwh']}/kWh",
            _span(int(i["t0_ms"]), int(i["t1_ms"])),
            f"{i['state']} ({i['mode']})",
        ]
        for i in items
    ]
    header = ["id", "role", "peer", "amount", "delivered", "price", "window", "state"]
    print(_table(rows, header))
    return EXIT_OK


def _settle(args: argparse.Namespace) -> int:
    from daisee_node.ledger.market import ACCEPTED, LINE

    s = _session(args)
    order = s.market.existing_order(args.order_id)
    if order.mode == LINE:
        return _settle_line(args, s, order)
    if args.seller_proof or args.buyer_proof:
        raise DaiseeError(f"wrong mode: order {order.id} is a GRID order, settled from periods")
    if order.state != ACCEPTED:
        raise DaiseeError(f"order {order.id} is {order.state_name}: only accepted orders settle")
    periods = s.market.periods(order, s.from_block)
    todo = [p for p in periods.both if not p.settled]
    missing = periods.missing
    if args.period is not None:
        at = parse_time(args.period, s.market.now_ms(), "--period")
        if not order.t0 <= at < order.t1:
            raise DaiseeError(
                f"--period {_time(at)} is outside order {order.id}'s window "
                f"{_span(order.t0, order.t1)}"
            )
        todo = [p for p in todo if p.t0 <= at < p.t1]
        missing = [m for m in missing if m[0] <= at < m[1]]
        if not todo:
            if any(p.t0 <= at < p.t1 for p in periods.both):
                raise DaiseeError(f"the period holding {_time(at)} of order {order.id} is settled")
            if missing:
                t0, t1, side = missing[0]
                raise DaiseeError(_not_committed(order, t0, t1, side))
            raise DaiseeError(
                f"the period holding {_time(at)} is not yet committed by the seller "
                f"({order.seller}) nor the buyer ({order.buyer})"
            )
    if not todo:
        if missing:
            t0, t1, side = missing[0]
            raise DaiseeError("nothing to settle: " + _not_committed(order, t0, t1, side))
        if periods.both:
            raise DaiseeError(
                f"nothing to settle: the {len(periods.both)} recorded period(s) of order "
                f"{order.id} are settled"
            )
        raise DaiseeError(
            f"nothing to settle: no period of order {order.id}'s window "
            f"({_span(order.t0, order.t1)}) is committed by both nodes yet"
        )
    # Past its end + grace a period can no longer be settled: say so rather than stop there.
    now, grace = s.market.now_ms(), s.market.grace_ms()
    late = [p for p in todo if now >= p.t1 + grace]
    todo = [p for p in todo if now < p.t1 + grace]
    if not todo:
        p = late[0]
        raise DaiseeError(
            f"too late: period {_span(p.t0, p.t1)} of order {order.id} could be settled until "
            f"{_time(p.t1 + grace)}"
        )
    account = s.account()
    for p in late:
        print(f"too late: period {_span(p.t0, p.t1)} (settlement closed {_time(p.t1 + grace)})")
    for pair in todo:
        done = s.market.settle_grid(account, order.id, pair.seller, pair.buyer)
        _said(functools.partial(_settled, s, done), f"order {order.id}: a period settled")
    for t0, t1, side in missing:
        print(f"waiting: {_not_committed(order, t0, t1, side)}")
    return _delivered(s, order.id)


def _settled(s: Session, done: Settlement) -> str:
    return (
        f"order {done.order_id}, {_span(done.t0, done.t1)}: {_wh(done.delivered_wh)} delivered, "
        f"{_cr(s, done.paid)} paid"
    )


def _delivered(s: Session, order_id: int) -> int:
    """After a settlement went through: how much of the order is delivered now."""

    def describe() -> str:
        after = s.market.order(order_id)
        return f"order {order_id}: {_wh(after.delivered_wh)} of {_wh(after.amount_wh)} delivered"

    return _said(describe, f"order {order_id}: settled")


def _not_committed(order: Order, t0: int, t1: int, side: str) -> str:
    who = order.buyer if side == "buyer" else order.seller
    return f"period {_span(t0, t1)} of order {order.id} is not yet committed by the {side} ({who})"


def _settle_line(args: argparse.Namespace, s: Session, order: Order) -> int:
    """A LINE order: the first pair of proofs anchors the line, each later pair settles it."""
    from daisee_node.ledger.proofs import parse_proof

    if args.seller_proof is None or args.buyer_proof is None:
        raise DaiseeError(
            f"order {order.id} is a LINE order: give --seller-proof and --buyer-proof, the "
            "line counter's readings as `prove` writes them at each end"
        )
    pair = []
    for path in (args.seller_proof, args.buyer_proof):
        try:
            p = parse_proof(path.read_text())
        except OSError as exc:
            raise DaiseeError(f"cannot read {path}: {exc.strerror}") from None
        pair.append((p.commitment.as_tuple(), p.batch_proof, p.reading, p.proof))
    account = s.account()
    if not s.market.line_anchored(order.id):
        s.market.anchor_line(account, order.id, pair[0], pair[1])
        print(f"order {order.id}: line anchored at both ends")
        return EXIT_OK
    dispute = s.market.settle_line(account, order.id, pair[0], pair[1])
    if dispute:
        print(f"order {order.id}: the ends disagree beyond tolerance; dispute {dispute} opened")
    return _delivered(s, order.id)


def _refund(args: argparse.Namespace) -> int:
    from daisee_node.ledger.market import OPEN

    s = _session(args)
    order = s.market.existing_order(args.order_id)
    before = s.market.escrow_of(order.id)
    account = s.account()
    if order.state == OPEN:
        s.market.expire(account, order.id)
        return _said(
            lambda: f"order {order.id} expired: {_cr(s, before)} returned to {order.buyer}",
            f"order {order.id} expired: its escrow returned to {order.buyer}",
        )
    amount = s.market.refund(account, order.id)
    return _said(
        lambda: (
            f"order {order.id} closed: {_wh(order.delivered_wh)} of "
            f"{_wh(order.amount_wh)} delivered; {_cr(s, amount)} returned to {order.buyer}"
        ),
        f"order {order.id} closed: the rest of its escrow returned to {order.buyer}",
    )


def _dispute(args: argparse.Namespace) -> int:
    s = _session(args)
    if args.resolve is not None and args.close is not None:
        raise DaiseeError("give --resolve or --close, not both")
    if args.resolve is not None:
        if args.wh is None:
            raise DaiseeError("--resolve needs --wh: the energy delivered over the interval")
        try:
            micro = Decimal(args.wh) * 1_000_000
        except InvalidOperation:
            raise DaiseeError(f"--wh {args.wh!r} is not a number of Wh") from None
        _open_dispute(s, args.resolve)
        s.market.resolve_dispute(s.account(), args.resolve, int(micro))
        print(f"dispute {args.resolve} resolved: {args.wh} Wh delivered")
        return EXIT_OK
    if args.close is not None:
        _open_dispute(s, args.close)
        s.market.close_dispute(s.account(), args.close)
        print(f"dispute {args.close} closed: the lower value stands")
        return EXIT_OK
    if args.order_id is not None:
        s.market.existing_order(args.order_id)
    found = s.market.disputes_of(args.order_id)
    items = [
        {
            "id": d.id,
            "order": d.order_id,
            "low_wh": d.low_micro / 1e6,
            "high_wh": d.high_micro / 1e6,
            "deadline_ms": d.deadline,
            "open": d.open,
        }
        for d in found
    ]
    if args.json:
        print(json.dumps(items))
    elif not items:
        print("no disputes" + (f" of order {args.order_id}" if args.order_id else ""))
    else:
        rows = [
            [
                str(i["id"]),
                str(i["order"]),
                f"{i['low_wh']:g}–{i['high_wh']:g} Wh",
                _time(int(i["deadline_ms"])),
                "open" if i["open"] else "closed",
            ]
            for i in items
        ]
        print(_table(rows, ["id", "order", "delivered", "deadline", "state"]))
    return EXIT_OK


def _open_dispute(s: Session, dispute_id: int) -> None:
    if not 1 <= dispute_id <= s.market.dispute_count():
        raise DaiseeError(f"no dispute {dispute_id}")


def _balance(args: argparse.Namespace) -> int:
    from daisee_node.ledger.market import credits

    s = _session(args)
    node = s.address(args.node)
    decimals = s.market.decimals()
    held = s.market.balance(node)
    escrowed = s.market.escrowed(node, s.from_block)
    if args.json:
        print(
            json.dumps(
                {
                    "node": node,
                    "balance": credits(held, decimals),
                    "escrowed": credits(escrowed, decimals),
                    "balance_units": str(held),
                    "escrowed_units": str(escrowed),
                    "symbol": s.market.symbol(),
                }
            )
        )
        return EXIT_OK
    print(f"{node}\n  balance   {_cr(s, held)}\n  escrowed  {_cr(s, escrowed)} (in open orders)")
    return EXIT_OK
