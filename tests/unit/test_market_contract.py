"""The energy market contract on py-evm: orders, offers, GRID and LINE settlement, disputes,
refunds, and the attacks the issue names (forged and foreign proofs, double settlement,
reentrancy, overflow). Expected figures are worked out here from the rules, by hand."""

from __future__ import annotations

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from web3.logs import DISCARD

from daisee_node.ledger import build, chain, merkle
from tests.support.market import (
    ACCEPTED,
    CANCELLED,
    CAPACITY_W,
    CLOSED,
    DISPUTE_MS,
    EXPIRED,
    GRACE_MS,
    LINE,
    LINE_SLACK_MS,
    PERIOD_MS,
    REFUSED,
    Market,
    Recorded,
    Row,
    deploy_market,
    new_market,
    selector,
    window_start,
)

PRICE = 123_456_789_012_345  # credit base units per kWh: makes every floor visible
ZERO = b"\0" * 32
ANYONE = "0x" + "00" * 20


def cost(wh: int, price: int = PRICE) -> int:
    """What the order rule says `wh` costs: floor(wh × price / 1000)."""
    return wh * price // 1000


@pytest.fixture
def m() -> Market:
    return new_market()


def period(t0: int, k: int) -> tuple[int, int]:
    return t0 + k * PERIOD_MS, t0 + (k + 1) * PERIOD_MS


# -- orders and offers ---------------------------------------------------------------------


def test_open_accept_refuse_cancel_and_expire_move_the_escrow_exactly(m: Market) -> None:
    fn = m.market.functions
    t0 = window_start(m)
    start = m.balance(m.buyer)
    a = m.open(m.buyer, m.seller, 1000, PRICE, t0, t0 + 4 * PERIOD_MS)
    assert m.balance(m.buyer) == start - cost(1000)
    assert m.balance(m.market.address) == cost(1000)
    assert m.order(a)["state"] == 1 and fn.escrowOf(a).call() == cost(1000)
    m.reverts(m.other, fn.accept(a), "NotSeller")
    m.reverts(m.buyer, fn.accept(a), "NotSeller")
    m.reverts(m.seller, fn.cancel(a), "NotBuyer")
    m.reverts(m.other, fn.expire(a), "TooEarly")
    m.send(m.buyer, fn.cancel(a))  # before acceptance: all of it back
    assert m.order(a)["state"] == CANCELLED and m.balance(m.buyer) == start
    m.reverts(m.seller, fn.accept(a), "BadState")

    b = m.open(m.buyer, m.seller, 500, PRICE, t0, t0 + PERIOD_MS)
    m.send(m.seller, fn.refuse(b))
    assert m.order(b)["state"] == REFUSED and m.balance(m.buyer) == start

    c = m.open(m.buyer, m.seller, 700, PRICE, t0, t0 + PERIOD_MS)
    receipt = m.send(m.seller, fn.accept(c))
    assert (
        m.market.events.OrderAccepted().process_receipt(receipt, errors=DISCARD)[0]["args"]["id"]
        == c
    )
    assert m.order(c)["state"] == ACCEPTED
    m.reverts(m.buyer, fn.cancel(c), "BadState")  # accepted: no cancelling
    m.reverts(m.seller, fn.refuse(c), "BadState")
    assert fn.activeOrders(m.seller.address, True).call() == [c]
    assert fn.activeOrders(m.buyer.address, False).call() == [c]

    # bad terms are refused at the door
    m.approve(m.buyer, 10**30)
    bad = [
        (m.buyer.address, 1, PRICE, t0, t0 + 1, 0, ZERO, ZERO),  # to oneself
        (m.seller.address, 0, PRICE, t0, t0 + 1, 0, ZERO, ZERO),  # nothing
        (m.seller.address, 1, PRICE, t0, t0, 0, ZERO, ZERO),  # empty window
        (m.seller.address, 1, PRICE, t0, t0 + 1, 0, b"\1" * 32, ZERO),  # GRID with a channel
        (m.seller.address, 1, PRICE, t0, t0 + 1, LINE, b"\1" * 32, ZERO),  # LINE without one
    ]
    for args, error in zip(bad, ["BadOrder"] * 3 + ["WrongMode"] * 2, strict=True):
        m.reverts(m.buyer, fn.open(*args), error)
    m.reverts(m.buyer, fn.open(m.seller.address, 1, PRICE, 1000, 2000, 0, ZERO, ZERO), "TooLate")


def test_an_order_nobody_accepted_expires_at_t0_and_anyone_returns_its_escrow(m: Market) -> None:
    fn = m.market.functions
    t0 = window_start(m)
    start = m.balance(m.buyer)
    a = m.open(m.buyer, m.seller, 400, PRICE, t0, t0 + PERIOD_MS)
    m.travel_to(t0)
    m.reverts(m.seller, fn.accept(a), "TooLate")
    receipt = m.send(m.other, fn.expire(a))  # a stranger may return it
    (ev,) = m.market.events.Refunded().process_receipt(receipt, errors=DISCARD)
    assert ev["args"]["amount"] == cost(400)
    assert m.order(a)["state"] == EXPIRED and m.balance(m.buyer) == start
    assert m.balance(m.market.address) == 0
    m.reverts(m.other, fn.expire(a), "BadState")  # once only
    m.reverts(m.other, fn.refund(a), "BadState")


def test_an_offer_taken_in_parts_is_an_accepted_order(m: Market) -> None:
    fn = m.market.functions
    t0 = window_start(m)
    receipt = m.send(m.seller, fn.postOffer(1000, 300, PRICE, t0, t0 + PERIOD_MS, 0, ZERO, ANYONE))
    (posted,) = m.market.events.OfferPosted().process_receipt(receipt, errors=DISCARD)
    offer = posted["args"]["offerId"]
    # an offer reserved for the buyer: nobody else takes it
    receipt = m.send(
        m.seller, fn.postOffer(50, 0, PRICE, t0, t0 + PERIOD_MS, 0, ZERO, m.buyer.address)
    )
    reserved = m.market.events.OfferPosted().process_receipt(receipt, errors=DISCARD)[0]["args"][
        "offerId"
    ]
    m.approve(m.other, 10**30)
    m.reverts(m.other, fn.takeOffer(reserved, 50, ZERO), "NotBuyer")
    m.reverts(m.seller, fn.takeOffer(offer, 10, ZERO), "NotBuyer")

    start = m.balance(m.buyer)
    m.approve(m.buyer, 10**30)
    receipt = m.send(m.buyer, fn.takeOffer(offer, 600, ZERO))
    (taken,) = m.market.events.OfferTaken().process_receipt(receipt, errors=DISCARD)
    order = taken["args"]["orderId"]
    o = m.order(order)
    assert (o["state"], o["amountWh"], o["seller"], o["buyer"]) == (
        ACCEPTED,
        600,
        m.seller.address,
        m.buyer.address,
    )
    assert m.balance(m.buyer) == start - cost(600)
    assert m.market.functions.offers(offer).call()[1] == 400  # what is left
    m.reverts(m.buyer, fn.takeOffer(offer, 401, ZERO), "BadOrder")  # more than is left
    m.reverts(m.buyer, fn.takeOffer(offer, 299, ZERO), "BadOrder")  # less than the minimum
    m.reverts(m.buyer, fn.takeOffer(offer, 300, b"\1" * 32), "WrongMode")  # GRID: no channel
    m.send(m.other, fn.takeOffer(offer, 300, ZERO))
    m.send(m.other, fn.takeOffer(offer, 100, ZERO))  # below the minimum, but all that is left
    assert m.market.functions.offers(offer).call()[1] == 0
    m.reverts(m.other, fn.takeOffer(offer, 1, ZERO), "BadOrder")
    m.reverts(m.buyer, fn.withdrawOffer(offer), "NotSeller")
    m.send(m.seller, fn.withdrawOffer(offer))
    m.reverts(m.buyer, fn.takeOffer(offer, 1, ZERO), "BadState")
    m.travel_to(t0)
    m.reverts(m.buyer, fn.takeOffer(reserved, 50, ZERO), "TooLate")


def test_a_node_holds_at_most_eight_grid_orders_until_their_settlement_time_is_over(
    m: Market,
) -> None:
    fn = m.market.functions
    assert fn.MAX_ACTIVE().call() == 8
    t0 = window_start(m)
    later = t0 + PERIOD_MS + GRACE_MS + PERIOD_MS  # a window opening after the first ones closed
    first = [m.open(m.buyer, m.seller, 10, PRICE, t0, t0 + PERIOD_MS) for _ in range(8)]
    for order in first:
        m.send(m.seller, fn.accept(order))
    ninth = m.open(m.other, m.seller, 10, PRICE, later, later + PERIOD_MS)
    m.reverts(m.seller, fn.accept(ninth), "TooManyOrders")
    # one millisecond before the first orders' last period stops being settleable: still full
    m.travel_to(t0 + PERIOD_MS + GRACE_MS - 1000)
    m.reverts(m.seller, fn.accept(ninth), "TooManyOrders")
    m.travel_to(t0 + PERIOD_MS + GRACE_MS)
    m.send(m.seller, fn.accept(ninth))
    assert fn.activeOrders(m.seller.address, True).call() == [ninth]
    assert fn.activeOrders(m.buyer.address, False).call() == first  # pruned only on insertion


# -- GRID settlement -------------------------------------------------------------------------


def test_grid_partial_delivery_pays_per_period_then_the_rest_returns_after_grace(
    m: Market,
) -> None:
    fn = m.market.functions
    t0 = window_start(m)
    t1 = t0 + 4 * PERIOD_MS
    buyer0, seller0 = m.balance(m.buyer), m.balance(m.seller)
    order = m.open(m.buyer, m.seller, 1000, PRICE, t0, t1)
    m.send(m.seller, fn.accept(order))
    # period 0: the seller exported 300, the buyer imported 250 → 250 matched
    # period 1: exported 400, imported 500 → 400 matched; nothing else was committed
    s0, b0 = m.commit((m.seller, *period(t0, 0), 0, 300, []), (m.buyer, *period(t0, 0), 250, 0, []))
    s1, b1 = m.commit((m.seller, *period(t0, 1), 0, 400, []), (m.buyer, *period(t0, 1), 500, 0, []))
    credits_minted = 300 * 10**15  # the ledger mints for the seller's committed export
    m.reverts(m.other, fn.settleGrid(order, *s0.args, *b0.args), "TooEarly")  # period not over
    m.travel_to(period(t0, 1)[1])
    receipt = m.settle_grid(order, s0, b0)
    (ev,) = m.market.events.Settled().process_receipt(receipt, errors=DISCARD)
    assert (ev["args"]["deliveredWh"], ev["args"]["paid"]) == (250, cost(250))
    m.settle_grid(order, s1, b1)
    assert m.order(order)["deliveredWh"] == 650
    assert m.balance(m.seller) == seller0 + credits_minted + 400 * 10**15 + cost(650)
    assert fn.escrowOf(order).call() == cost(1000) - cost(650)

    m.travel_to(t1 + GRACE_MS - 1000)
    m.reverts(m.other, fn.refund(order), "TooEarly")
    m.travel_to(t1 + GRACE_MS)
    receipt = m.send(m.other, fn.refund(order))
    assert m.market.events.Refunded().process_receipt(receipt, errors=DISCARD)[0]["args"][
        "amount"
    ] == (cost(1000) - cost(650))
    # the buyer paid exactly for 650 Wh; nothing is left in the market
    assert m.balance(m.buyer) == buyer0 - cost(650)
    assert m.balance(m.market.address) == 0
    assert m.order(order)["state"] == CLOSED
    m.reverts(m.other, fn.refund(order), "BadState")


def test_a_grid_period_is_settled_once_and_delivery_never_exceeds_the_order(m: Market) -> None:
    fn = m.market.functions
    t0 = window_start(m)
    order = m.open(m.buyer, m.seller, 500, PRICE, t0, t0 + 2 * PERIOD_MS)
    m.send(m.seller, fn.accept(order))
    s0, b0 = m.commit((m.seller, *period(t0, 0), 0, 400, []), (m.buyer, *period(t0, 0), 400, 0, []))
    s1, b1 = m.commit((m.seller, *period(t0, 1), 0, 400, []), (m.buyer, *period(t0, 1), 400, 0, []))
    m.travel_to(t0 + 2 * PERIOD_MS)
    m.settle_grid(order, s0, b0)
    m.reverts(m.other, fn.settleGrid(order, *s0.args, *b0.args), "AlreadySettled")
    receipt = m.settle_grid(order, s1, b1)
    # 400 then min(400, 500 − 400) = 100: the order's 500 Wh, not 800
    assert (
        m.market.events.Settled().process_receipt(receipt, errors=DISCARD)[0]["args"]["deliveredWh"]
        == 100
    )
    assert m.order(order)["deliveredWh"] == 500 and fn.escrowOf(order).call() == 0
    m.reverts(m.other, fn.settleGrid(order, *s1.args, *b1.args), "AlreadySettled")


def test_forged_and_foreign_commitments_settle_nothing(m: Market) -> None:
    fn = m.market.functions
    t0 = window_start(m)
    order = m.open(m.buyer, m.seller, 1000, PRICE, t0, t0 + PERIOD_MS)
    m.send(m.seller, fn.accept(order))
    s, b, o = m.commit(
        (m.seller, *period(t0, 0), 0, 100, []),
        (m.buyer, *period(t0, 0), 100, 0, []),
        (m.other, *period(t0, 0), 900, 900, []),
    )
    m.travel_to(t0 + PERIOD_MS)
    # forged: totals the seller never committed, or a proof of another commitment
    inflated = s.c.with_(export_wh=1000).as_tuple()
    m.reverts(m.other, fn.settleGrid(order, inflated, s.batch_proof, *b.args), "NotProven")
    m.reverts(m.other, fn.settleGrid(order, s.c.as_tuple(), o.batch_proof, *b.args), "NotProven")
    m.reverts(m.other, fn.settleGrid(order, s.c.as_tuple(), [], *b.args), "NotProven")
    # foreign: another node's recorded commitment in place of the seller's or the buyer's
    m.reverts(m.other, fn.settleGrid(order, *o.args, *b.args), "WrongNode")
    m.reverts(m.other, fn.settleGrid(order, *s.args, *o.args), "WrongNode")
    m.reverts(m.other, fn.settleGrid(order, *b.args, *s.args), "WrongNode")
    # another node's commitment relabelled as the seller's: not what was recorded
    relabelled = o.c.with_(node=m.seller.address).as_tuple()
    m.reverts(m.other, fn.settleGrid(order, relabelled, o.batch_proof, *b.args), "NotProven")
    assert m.balance(m.market.address) == cost(1000)
    m.settle_grid(order, s, b)  # the genuine pair still settles
    assert m.order(order)["deliveredWh"] == 100


def test_commitments_outside_the_window_or_of_other_periods_are_refused(m: Market) -> None:
    fn = m.market.functions
    t0 = window_start(m)
    # the window holds periods 1 and 2 and half of period 3; period 0 is before it
    half = PERIOD_MS // 2
    order = m.open(m.buyer, m.seller, 1000, PRICE, t0 + PERIOD_MS, t0 + 4 * PERIOD_MS - half)
    m.send(m.seller, fn.accept(order))
    both: list[tuple[LocalAccount, int, int, int, int, list[Row]]] = []
    for k in range(4):
        both += [(m.seller, *period(t0, k), 0, 50, []), (m.buyer, *period(t0, k), 50, 0, [])]
    s0, b0, s1, b1, s2, b2, s3, b3 = m.commit(*both)
    m.travel_to(t0 + 4 * PERIOD_MS)
    m.reverts(m.other, fn.settleGrid(order, *s0.args, *b0.args), "OutsideWindow")
    m.reverts(m.other, fn.settleGrid(order, *s3.args, *b3.args), "OutsideWindow")
    # both inside the window, but not the same period
    m.reverts(m.other, fn.settleGrid(order, *s1.args, *b2.args), "PeriodMismatch")
    m.reverts(m.other, fn.settleGrid(order, *s2.args, *b1.args), "PeriodMismatch")
    m.settle_grid(order, s1, b1)
    # a period can be settled until its end + grace, not after
    m.travel_to(period(t0, 2)[1] + GRACE_MS)
    m.reverts(m.other, fn.settleGrid(order, *s2.args, *b2.args), "TooLate")
    assert m.order(order)["deliveredWh"] == 50


def _three_orders_on_one_export(settle_order: list[int]) -> tuple[list[int], list[int]]:
    """Three buyers order 100, 200 and 400 Wh of one seller for the same period; the seller
    exports 10 Wh and each buyer imports plenty. Settles them in `settle_order` (indexes)."""
    m = new_market()
    buyers = [m.buyer, m.other, Account.create()]
    m.ledger.set_node(m.gov, buyers[2].address, capacity_w=CAPACITY_W)
    chain.fund(m.w3, m.gov, buyers[2].address, 10**19)
    m.commit((buyers[2], 0, PERIOD_MS, 0, 10_000_000, []))
    t0 = window_start(m)
    ids = [
        m.open(b, m.seller, wh, PRICE, t0, t0 + PERIOD_MS)
        for b, wh in zip(buyers, (100, 200, 400), strict=True)
    ]
    for i in ids:
        m.send(m.seller, m.market.functions.accept(i))
    s, *bs = m.commit(
        (m.seller, *period(t0, 0), 0, 10, []),
        *[(b, *period(t0, 0), 1000, 0, []) for b in buyers],
    )
    m.travel_to(t0 + PERIOD_MS)
    for k in settle_order:
        m.settle_grid(ids[k], s, bs[k])
    delivered = [m.order(i)["deliveredWh"] for i in ids]
    return delivered, [m.balance(b) for b in buyers]


def test_two_orders_on_one_export_share_it_whatever_the_settlement_order() -> None:
    # pro rata of the ordered Wh, floored: 10·100/700 = 1.43 → 1, 10·200/700 = 2.86 → 2,
    # 10·400/700 = 5.71 → 5; the 10 − 8 = 2 Wh left go one each to the two lowest order ids
    expected = [1 + 1, 2 + 1, 5]
    first, balances_a = _three_orders_on_one_export([0, 1, 2])
    second, balances_b = _three_orders_on_one_export([2, 0, 1])
    assert first == second == expected
    assert sum(expected) == 10  # never more than the seller exported
    assert [a - b for a, b in zip(balances_a, balances_b, strict=True)] == [0, 0, 0]


def test_a_buyers_import_is_shared_among_its_sellers_orders(m: Market) -> None:
    fn = m.market.functions
    t0 = window_start(m)
    # the buyer orders 300 Wh from the seller and 100 Wh from the other node, imports only 40:
    # 40·300/400 = 30 and 40·100/400 = 10, so both sellers together are paid for 40 Wh
    a = m.open(m.buyer, m.seller, 300, PRICE, t0, t0 + PERIOD_MS)
    b = m.open(m.buyer, m.other, 100, PRICE, t0, t0 + PERIOD_MS)
    m.send(m.seller, fn.accept(a))
    m.send(m.other, fn.accept(b))
    s, o, buyer = m.commit(
        (m.seller, *period(t0, 0), 0, 500, []),
        (m.other, *period(t0, 0), 0, 500, []),
        (m.buyer, *period(t0, 0), 40, 0, []),
    )
    m.travel_to(t0 + PERIOD_MS)
    m.settle_grid(b, o, buyer)
    m.settle_grid(a, s, buyer)
    assert (m.order(a)["deliveredWh"], m.order(b)["deliveredWh"]) == (30, 10)
    assert fn.shareOf(a, False, *period(t0, 0), 40).call() == 30


# -- LINE settlement -----------------------------------------------------------------------

SELLER_CH = merkle.channel_id("line.export_wh")
BUYER_CH = merkle.channel_id("line.import_wh")


def _line_order(m: Market, amount_wh: int = 1000) -> tuple[int, int, list[Recorded]]:
    """A LINE order over one period whose line counters were read at its start, at 10 and at
    14 minutes: the seller's end counted 0 → 500 → 800 Wh, the buyer's 0 → 495 → 600 Wh.
    Returns (order, t0, [seller's, buyer's commitment])."""
    t0 = window_start(m)
    order = m.open(
        m.buyer, m.seller, amount_wh, PRICE, t0, t0 + PERIOD_MS, LINE, (SELLER_CH, BUYER_CH)
    )
    m.send(m.seller, m.market.functions.accept(order))
    times = [t0, t0 + 600_000, t0 + 840_000]
    seller_rows = [
        (SELLER_CH, t, wh * 10**6, 0) for t, wh in zip(times, (0, 500, 800), strict=True)
    ]
    buyer_rows = [(BUYER_CH, t, wh * 10**6, 0) for t, wh in zip(times, (0, 495, 600), strict=True)]
    # another channel on the same commitments, to check a reading of it is refused
    seller_rows.append((merkle.channel_id("grid.power_w"), t0 + 1000, 7 * 10**6, 0))
    recs = m.commit(
        (m.seller, *period(t0, 0), 0, 800, seller_rows),
        (m.buyer, *period(t0, 0), 600, 0, buyer_rows),
    )
    m.travel_to(t0 + PERIOD_MS)
    return order, t0, recs


def test_line_delivery_is_what_both_ends_agree_on_within_tolerance(m: Market) -> None:
    fn = m.market.functions
    order, _t0, (s, b) = _line_order(m)
    # leaf order: t0 (one or two rows), t0+1 s (seller's power), 10 min, 14 min
    s_at = {r[1]: i for i, r in enumerate(s.rows) if r[0] == SELLER_CH}
    b_at = {r[1]: i for i, r in enumerate(b.rows)}
    ts = sorted(s_at)
    m.reverts(
        m.other,
        fn.settleLine(order, s.line_proof(s_at[ts[1]]), b.line_proof(b_at[ts[1]])),
        "TooEarly",
    )
    # the starting readings are those at the window's start (within the slack), not later ones
    assert ts[1] - ts[0] > LINE_SLACK_MS
    late = fn.anchorLine(order, s.line_proof(s_at[ts[1]]), b.line_proof(b_at[ts[1]]))
    m.reverts(m.other, late, "OutsideWindow")
    m.send(m.other, fn.anchorLine(order, s.line_proof(s_at[ts[0]]), b.line_proof(b_at[ts[0]])))
    # foreign, wrong channel, forged
    m.reverts(
        m.other,
        fn.settleLine(order, b.line_proof(b_at[ts[1]]), b.line_proof(b_at[ts[1]])),
        "WrongNode",
    )
    power = next(i for i, r in enumerate(s.rows) if r[0] != SELLER_CH)
    m.reverts(
        m.other, fn.settleLine(order, s.line_proof(power), b.line_proof(b_at[ts[1]])), "BadReading"
    )
    c, bp, row, proof = s.line_proof(s_at[ts[1]])
    forged = (c, bp, (row[0], row[1], row[2] + 10**6, row[3]), proof)
    m.reverts(m.other, fn.settleLine(order, forged, b.line_proof(b_at[ts[1]])), "NotProven")

    # 500 against 495 Wh: 5 ≤ 2 % of 500, the lower 495 counts
    receipt = m.send(
        m.other, fn.settleLine(order, s.line_proof(s_at[ts[1]]), b.line_proof(b_at[ts[1]]))
    )
    (ev,) = m.market.events.Settled().process_receipt(receipt, errors=DISCARD)
    assert (ev["args"]["deliveredWh"], ev["args"]["paid"]) == (495, cost(495))
    # the same interval again: refused
    m.reverts(
        m.other,
        fn.settleLine(order, s.line_proof(s_at[ts[1]]), b.line_proof(b_at[ts[1]])),
        "AlreadySettled",
    )
    line = m.market.functions.lines(order).call()
    assert line[2:4] == [500 * 10**6, 495 * 10**6]


def test_a_line_dispute_decided_by_governance(m: Market) -> None:
    fn = m.market.functions
    order, t0, (s, b) = _line_order(m)
    seller0 = m.balance(m.seller)
    m.send(m.other, fn.anchorLine(order, s.line_proof(0), b.line_proof(0)))
    s_end = next(i for i, r in enumerate(s.rows) if r[1] == t0 + 840_000)
    b_end = next(i for i, r in enumerate(b.rows) if r[1] == t0 + 840_000)
    # 800 against 600 Wh: 200 > 2 % of 800 → a dispute, nothing paid yet
    receipt = m.send(m.other, fn.settleLine(order, s.line_proof(s_end), b.line_proof(b_end)))
    (opened,) = m.market.events.DisputeOpened().process_receipt(receipt, errors=DISCARD)
    dispute = opened["args"]["disputeId"]
    assert (opened["args"]["lowMicro"], opened["args"]["highMicro"]) == (600 * 10**6, 800 * 10**6)
    assert m.balance(m.seller) == seller0 and m.order(order)["openDisputes"] == 1
    m.travel_to(t0 + PERIOD_MS + GRACE_MS)
    m.reverts(m.other, fn.refund(order), "DisputesOpen")
    m.reverts(m.other, fn.resolveDispute(dispute, 700 * 10**6), "OnlyGovernance")
    m.reverts(m.gov, fn.resolveDispute(dispute, 801 * 10**6), "OutOfRange")
    m.reverts(m.gov, fn.resolveDispute(dispute, 599 * 10**6), "OutOfRange")
    m.reverts(m.other, fn.closeDispute(dispute), "TooEarly")
    receipt = m.send(m.gov, fn.resolveDispute(dispute, 750_500_000))  # 750.5 Wh → 750 whole
    (closed,) = m.market.events.DisputeClosed().process_receipt(receipt, errors=DISCARD)
    assert closed["args"]["decided"] is True
    assert m.order(order)["deliveredWh"] == 750
    assert m.balance(m.seller) == seller0 + cost(750)
    m.reverts(m.gov, fn.resolveDispute(dispute, 700 * 10**6), "BadState")
    m.send(m.other, fn.refund(order))
    assert m.balance(m.market.address) == 0


def test_a_line_dispute_timed_out_leaves_the_lower_value(m: Market) -> None:
    fn = m.market.functions
    order, t0, (s, b) = _line_order(m)
    m.send(m.other, fn.anchorLine(order, s.line_proof(0), b.line_proof(0)))
    s_end = next(i for i, r in enumerate(s.rows) if r[1] == t0 + 840_000)
    b_end = next(i for i, r in enumerate(b.rows) if r[1] == t0 + 840_000)
    receipt = m.send(m.other, fn.settleLine(order, s.line_proof(s_end), b.line_proof(b_end)))
    (opened,) = m.market.events.DisputeOpened().process_receipt(receipt, errors=DISCARD)
    dispute, deadline = opened["args"]["disputeId"], opened["args"]["deadline"]
    assert deadline >= t0 + PERIOD_MS + DISPUTE_MS
    m.travel_to(deadline)
    m.reverts(m.gov, fn.resolveDispute(dispute, 700 * 10**6), "TooLate")
    buyer0, seller0 = m.balance(m.buyer), m.balance(m.seller)
    receipt = m.send(m.other, fn.closeDispute(dispute))
    assert (
        m.market.events.DisputeClosed().process_receipt(receipt, errors=DISCARD)[0]["args"][
            "decided"
        ]
        is False
    )
    assert m.order(order)["deliveredWh"] == 600  # the buyer's lower count stands
    m.send(m.other, fn.refund(order))
    assert m.balance(m.seller) == seller0 + cost(600)
    assert m.balance(m.buyer) == buyer0 + cost(1000) - cost(600)


# -- overflow and reentrancy ---------------------------------------------------------------


def test_huge_amount_times_price_neither_overflows_nor_escrows_what_is_not_there(
    m: Market,
) -> None:
    fn = m.market.functions
    top_wh, top_price = 2**64 - 1, 2**128 - 1
    exact = top_wh * top_price // 1000  # about 2^182: far inside 256 bits
    assert fn.cost(top_wh, top_price).call() == exact
    t0 = window_start(m)
    m.approve(m.buyer, 2**256 - 1)
    # the escrow is computed exactly and then refused for want of credits, not wrapped
    held = m.balance(m.buyer)
    m.reverts(
        m.buyer,
        fn.open(m.seller.address, top_wh, top_price, t0, t0 + PERIOD_MS, 0, ZERO, ZERO),
        "ERC20InsufficientBalance(address,uint256,uint256)",
    )
    assert m.balance(m.buyer) == held
    # far-future windows: t1 + grace is added in 256 bits, so no time overflows either
    far = 2**64 - 2
    order = m.open(m.buyer, m.seller, 1, PRICE, far, far + 1)
    m.reverts(m.other, fn.refund(order), "BadState")
    m.send(m.seller, fn.accept(order))
    m.reverts(m.other, fn.refund(order), "TooEarly")


def test_line_counters_spanning_all_of_int256_pay_no_more_than_the_order(m: Market) -> None:
    fn = m.market.functions
    t0 = window_start(m)
    order = m.open(m.buyer, m.seller, 1000, PRICE, t0, t0 + PERIOD_MS, LINE, (SELLER_CH, BUYER_CH))
    m.send(m.seller, fn.accept(order))
    low, high = -(2**255), 2**255 - 1  # the widest int256 counters
    s, b = m.commit(
        (
            m.seller,
            *period(t0, 0),
            0,
            0,
            [(SELLER_CH, t0, low, 0), (SELLER_CH, t0 + 60_000, high, 0)],
        ),
        (m.buyer, *period(t0, 0), 0, 0, [(BUYER_CH, t0, low, 0), (BUYER_CH, t0 + 60_000, high, 0)]),
    )
    m.travel_to(t0 + PERIOD_MS)
    m.send(m.other, fn.anchorLine(order, s.line_proof(0), b.line_proof(0)))
    m.send(m.other, fn.settleLine(order, s.line_proof(1), b.line_proof(1)))
    # 2^256 − 1 micro-Wh at each end (more than int256 holds): measured exactly, the ends agree,
    # and no more than the 1000 Wh ordered is paid
    assert m.market.functions.lines(order).call()[4] == 2**256 - 1
    assert m.order(order)["deliveredWh"] == 1000
    assert fn.escrowOf(order).call() == 0


HOOK_TOKEN = """
// SPDX-License-Identifier: MIT
pragma solidity 0.8.28;

interface IMarket {
    function refund(uint256 id) external;
    function orders(uint256 id) external view returns (
        address, uint64, uint8, uint8, address, uint64, uint64, uint128, uint64, uint32,
        bytes32, bytes32);
    function escrowOf(uint256 id) external view returns (uint256);
}

/// A credit whose transfers call back into the market, as an ERC-777 hook would: the real
/// EnergyCredit (a plain OpenZeppelin ERC20) has no hooks, so this is worse than it can do.
contract HookToken {
    mapping(address => uint256) public balanceOf;
    mapping(address => mapping(address => uint256)) public allowance;
    IMarket public market;
    uint256 public target;
    bytes public reentryError;
    uint8 public stateSeen;
    uint256 public escrowSeen;
    uint256 public transfers;

    function arm(IMarket market_, uint256 target_) external { market = market_; target = target_; }
    function mint(address to, uint256 v) external { balanceOf[to] += v; }
    function approve(address s, uint256 v) external returns (bool) {
        allowance[msg.sender][s] = v; return true;
    }
    function transferFrom(address f, address t, uint256 v) external returns (bool) {
        allowance[f][msg.sender] -= v; balanceOf[f] -= v; balanceOf[t] += v; return true;
    }
    function transfer(address t, uint256 v) external returns (bool) {
        balanceOf[msg.sender] -= v; balanceOf[t] += v; ++transfers;
        if (target != 0) {
            uint256 id = target;
            target = 0;
            (,,, stateSeen,,,,,,,,) = market.orders(id);
            escrowSeen = market.escrowOf(id);
            try market.refund(id) {} catch (bytes memory e) { reentryError = e; }
        }
        return true;
    }
}
"""

STUB_LEDGER = """
// SPDX-License-Identifier: MIT
pragma solidity 0.8.28;

/// Just enough of the ledger for the market's constructor and governance.
contract StubLedger {
    address public credit;
    address public governance;
    constructor(address credit_) { credit = credit_; governance = msg.sender; }
}
"""


def test_a_token_calling_back_into_the_market_cannot_withdraw_twice(m: Market) -> None:
    arts = build.compile_contracts({"HookToken": HOOK_TOKEN, "StubLedger": STUB_LEDGER})
    receipt = chain.send(m.w3, m.gov, {"data": arts["HookToken"]["bytecode"]})
    token = m.w3.eth.contract(address=receipt["contractAddress"], abi=arts["HookToken"]["abi"])
    args = m.w3.codec.encode(["address"], [token.address]).hex()
    receipt = chain.send(m.w3, m.gov, {"data": arts["StubLedger"]["bytecode"] + args})
    market = deploy_market(m.w3, m.gov, receipt["contractAddress"])
    hm = Market(m.w3, m.gov, m.ledger, token, market, m.seller, m.buyer, m.other)
    hm.send(m.gov, token.functions.mint(m.buyer.address, 10**24))
    t0 = window_start(hm)
    order = hm.open(m.buyer, m.seller, 1000, PRICE, t0, t0 + PERIOD_MS)
    hm.send(m.seller, market.functions.accept(order))
    hm.travel_to(t0 + PERIOD_MS + GRACE_MS)
    hm.send(m.gov, token.functions.arm(market.address, order))
    hm.send(m.other, market.functions.refund(order))
    # the hook ran inside the refund's transfer: the order was already closed with no escrow
    # left (state before transfer), and the nested refund was stopped by the guard
    tf = token.functions
    assert tf.stateSeen().call() == CLOSED and tf.escrowSeen().call() == 0
    error = bytes(tf.reentryError().call())
    assert error[:4].hex() == selector("ReentrancyGuardReentrantCall()")[2:]
    assert tf.transfers().call() == 1
    assert hm.balance(m.buyer) == 10**24 and hm.balance(market.address) == 0
