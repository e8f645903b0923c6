"""The community's accounts: periods laid out from commitments, the key recorded for each period,
monthly bills worked by hand, the registry contract on py-evm, the accounts read from the chain
alone (commitments, a peer-to-peer settlement, recorded keys), and the command's refusals.

Hand-worked cases write the arithmetic in comments; the expected numbers come from it.
"""

from __future__ import annotations

import csv
import io
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from web3.logs import DISCARD

from daisee_node.community import key_hash, parse_key
from daisee_node.community.billing import (
    BillLine,
    Committed,
    CommunityError,
    KeyInForce,
    Settlement,
    bill,
    flag_failed,
    gather,
    monthly,
    period_range,
    periods,
    translate_key,
)
from daisee_node.community.chaindata import read_all
from daisee_node.community.commands import keys_in_force
from daisee_node.community.files import load_members, load_tariff
from daisee_node.community.outputs import PeriodWriter, share_text, statement_html
from daisee_node.community.registry import Registry, deploy
from daisee_node.errors import ConfigError, DaiseeError
from daisee_node.ledger.chain import ChainError
from tests.conftest import run_cli
from tests.support.community import write_members
from tests.support.market import PERIOD_MS, Market, new_market, window_start

ALICE, BOB, SOL = "0x" + "a1" * 20, "0x" + "b2" * 20, "0x" + "c3" * 20
NAMES = {ALICE: "alice", BOB: "bob", SOL: "sol"}
PRORATA = parse_key({"kind": "prorata"})
# 2026-01-31 22:45 UTC is 23:45 in Paris (January); the next period starts at midnight in Paris.
T0 = 1_769_899_500_000
UNIT = 10**18


def prorata_from(t: int) -> KeyInForce:
    return KeyInForce(t, key_hash(PRORATA), PRORATA)


def tariff_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tariff.toml"
    path.write_text(text)
    return path


TARIFF = """
version = 1
currency = "EUR"
timezone = "Europe/Paris"
local_price = 0.15
producer_price = "0.10"
surplus_price = 0.04
monthly_fee = 2
credit_price = "0.5"
"""


def three_periods() -> list[Committed]:
    """Period 0 (January in Paris): alice 30000, bob 10000 Wh imported, sol 20000 exported.
    Period 1 (February): alice 25000, bob 15000, sol exports 50000. Period 2: alice 10000,
    sol 9000; bob committed nothing."""
    p = [T0 + k * PERIOD_MS for k in range(3)]
    return [
        Committed(ALICE, p[0], p[0] + PERIOD_MS, 30_000, 0),
        Committed(BOB, p[0], p[0] + PERIOD_MS, 10_000, 0),
        Committed(SOL, p[0], p[0] + PERIOD_MS, 0, 20_000),
        Committed(ALICE, p[1], p[1] + PERIOD_MS, 25_000, 0),
        Committed(BOB, p[1], p[1] + PERIOD_MS, 15_000, 0),
        Committed(SOL, p[1], p[1] + PERIOD_MS, 0, 50_000),
        Committed(ALICE, p[2], p[2] + PERIOD_MS, 10_000, 0),
        Committed(SOL, p[2], p[2] + PERIOD_MS, 0, 9_000),
    ]


def test_monthly_bills_worked_by_hand(tmp_path: Path) -> None:
    # In period 1 sol sold bob 10000 Wh peer to peer (GRID) for 2 credits.
    p1 = T0 + PERIOD_MS
    trade = Settlement(7, "grid", BOB, SOL, p1, p1 + PERIOD_MS, 10_000, 2 * UNIT)
    starts = period_range(T0, T0 + 3 * PERIOD_MS, PERIOD_MS)
    data = gather(
        [ALICE, BOB, SOL], NAMES, PERIOD_MS, starts, three_periods(), [trade], [prorata_from(0)]
    )
    data.wh_per_credit = 1000
    tariff = load_tariff(tariff_file(tmp_path, TARIFF))
    months = monthly(data, tariff.zone)
    assert list(months) == ["2026-01", "2026-02"]
    jan, feb = ({a.name: a for a in months[m]} for m in ("2026-01", "2026-02"))

    # January, period 0: P = 20000 < C = 40000 → alice 20000·30000/40000 = 15000, bob 5000.
    assert (jan["alice"].allocated, jan["alice"].grid_import) == (15_000, 15_000)
    assert (jan["bob"].allocated, jan["bob"].grid_import) == (5_000, 5_000)
    assert (jan["sol"].supplied, jan["sol"].surplus) == (20_000, 0)
    # February. Period 1: the trade first (bob 15000 → 5000 left, sol 50000 → 40000 left); the
    # key: C = 25000 + 5000 = 30000 ≤ P = 40000, everyone in full; surplus 10000.
    # Period 2: bob is missing (0 Wh, flagged); C = 10000, P = 9000 → alice 9000.
    assert (feb["alice"].consumption, feb["alice"].allocated, feb["alice"].grid_import) == (
        35_000,
        34_000,
        1_000,
    )
    assert (feb["bob"].p2p_bought, feb["bob"].allocated, feb["bob"].grid_import) == (
        10_000,
        5_000,
        0,
    )
    assert (feb["bob"].missing, feb["bob"].missing_starts) == (1, [T0 + 2 * PERIOD_MS])
    assert (feb["sol"].production, feb["sol"].p2p_sold, feb["sol"].surplus) == (
        59_000,
        10_000,
        10_000,
    )
    assert feb["sol"].supplied == 59_000 - 10_000 - 10_000
    assert feb["sol"].credits_earned == 59 * UNIT  # 1000 Wh a credit
    assert (feb["bob"].settled_paid, feb["sol"].settled_received) == (2 * UNIT, 2 * UNIT)

    def amounts(account: object) -> tuple[list[Decimal | None], Decimal]:
        b = bill(account, tariff)  # type: ignore[arg-type]
        return [line.amount for line in b.lines], b.total

    # Lines: local energy, production supplied, surplus, P2P bought, P2P sold, fee. The fee is
    # pro rata of the month's periods in the range: 1 of January's 31 × 96 in Paris, 2 of
    # February's 28 × 96: 2 × 1/2976 and 2 × 2/2688 round to 0.00.
    # alice, January: 15 kWh × 0.15 = 2.25.
    assert amounts(jan["alice"]) == ([Decimal("2.25"), 0, 0, 0, 0, 0], Decimal("2.25"))
    # sol, January: 20 kWh × 0.10 = 2.00 paid to sol.
    assert amounts(jan["sol"]) == ([0, Decimal("-2.00"), 0, 0, 0, 0], Decimal("-2.00"))
    assert bill(jan["sol"], tariff).lines[-1].quantity == "0.01 of 31 days"
    # alice, February: 34 kWh × 0.15 = 5.10.
    assert amounts(feb["alice"])[1] == Decimal("5.10")
    # bob, February: 5 kWh × 0.15 = 0.75; 2 credits × 0.5 = 1.00 bought → 1.75.
    assert amounts(feb["bob"]) == ([Decimal("0.75"), 0, 0, Decimal("1.00"), 0, 0], Decimal("1.75"))
    # sol, February: 39 kWh × 0.10 = 3.90 and 10 kWh × 0.04 = 0.40 surplus and 1.00 of
    # credits from bob paid to sol: −5.30 (sol is paid).
    assert amounts(feb["sol"]) == (
        [0, Decimal("-3.90"), Decimal("-0.40"), 0, Decimal("-1.00"), 0],
        Decimal("-5.30"),
    )


@pytest.mark.parametrize(
    ("zone", "month", "periods", "days"),
    [
        ("UTC", (2026, 1), 31 * 96, "31"),
        # the change to summer time makes it an hour short: 743 hours
        ("Europe/Paris", (2026, 3), 743 * 4, "30.96"),
        ("UTC", (2028, 2), 29 * 96, "29"),
    ],
)
def test_the_monthly_fee_is_whole_for_a_whole_month_and_shared_by_the_bills_that_split_one(
    tmp_path: Path, zone: str, month: tuple[int, int], periods: int, days: str
) -> None:
    tz = ZoneInfo(zone)
    first = int(datetime(*month, 1, tzinfo=tz).timestamp() * 1000)
    after = int(datetime(month[0], month[1] + 1, 1, tzinfo=tz).timestamp() * 1000)
    assert (after - first) // PERIOD_MS == periods
    tariff = load_tariff(
        tariff_file(tmp_path, f'timezone = "{zone}"\nlocal_price = 1\nmonthly_fee = "9.99"\n')
    )

    def fee(start: int, end: int) -> BillLine:
        starts = period_range(start, end, PERIOD_MS)
        commitments = [Committed(ALICE, t, t + PERIOD_MS, 0, 0) for t in starts]
        data = gather([ALICE], NAMES, PERIOD_MS, starts, commitments, [], [prorata_from(0)])
        (months,) = monthly(data, tariff.zone).values()
        return bill(months[0], tariff).lines[-1]

    whole = fee(first, after)
    assert (whole.quantity, whole.amount) == ("1 month", Decimal("9.99"))
    # split after the 10th day: 10/n and (n − 10)/n of the fee, each rounded half up
    cut = first + 10 * 96 * PERIOD_MS
    a, b = fee(first, cut), fee(cut, after)
    assert a.quantity == f"10 of {days} days"
    assert b.quantity.endswith(f" of {days} days") and b.quantity != a.quantity
    share = Decimal("9.99") * 960 / periods
    assert a.amount == share.quantize(Decimal("0.01"), ROUND_HALF_UP)
    assert a.amount is not None and b.amount is not None
    assert abs(a.amount + b.amount - Decimal("9.99")) <= Decimal("0.01")


def test_each_line_rounds_half_up_and_credits_stay_credits_without_a_credit_price(
    tmp_path: Path,
) -> None:
    tariff = load_tariff(tariff_file(tmp_path, 'local_price = "0.125"\ndecimals = 2\n'))
    starts = period_range(T0, T0 + PERIOD_MS, PERIOD_MS)
    commitments = [
        Committed(BOB, T0, T0 + PERIOD_MS, 5_000, 0),
        Committed(SOL, T0, T0 + PERIOD_MS, 0, 5_000),
    ]
    trade = Settlement(1, "line", BOB, SOL, T0, T0 + 60_000, 100, UNIT // 4)
    data = gather([BOB, SOL], NAMES, PERIOD_MS, starts, commitments, [trade], [prorata_from(0)])
    accounts = {a.name: a for a in monthly(data)["2026-01"]}
    b = bill(accounts["bob"], tariff)
    # 5 kWh × 0.125 = 0.625 → 0.63 (half up, not half even); the LINE purchase is not taken
    # off the grid totals (its energy went over its own line) and is shown in credits only.
    assert b.lines[0].amount == Decimal("0.63")
    assert (b.lines[3].amount, b.lines[3].quantity) == (None, "0.100 kWh, 0.25 credits")
    assert accounts["bob"].p2p_bought == 0 and accounts["bob"].allocated == 5_000
    # The producer price defaults to the local price: 5 kWh × 0.125 paid to sol.
    assert bill(accounts["sol"], tariff).total == Decimal("-0.63")


def test_gather_adds_short_commitments_and_flags_partial_missing_and_misaligned() -> None:
    starts = period_range(T0, T0 + 2 * PERIOD_MS, PERIOD_MS)
    half = PERIOD_MS // 2
    commitments = [
        Committed(ALICE, T0, T0 + half, 100, 0),  # two halves: one whole period
        Committed(ALICE, T0 + half, T0 + PERIOD_MS, 50, 7),
        Committed(BOB, T0, T0 + half, 40, 0),  # only half of it
        Committed(SOL, T0 + half, T0 + PERIOD_MS + half, 0, 999),  # straddles two periods
        Committed("0x" + "dd" * 20, T0, T0 + PERIOD_MS, 5, 5),  # not a member
    ]
    data = gather([ALICE, BOB, SOL], NAMES, PERIOD_MS, starts, commitments, [], [prorata_from(0)])
    assert data.members == (ALICE, BOB, SOL)
    assert data.consumption[0] == [150, 40, 0] and data.production[0] == [7, 0, 0]
    assert data.missing == {0: frozenset({2}), 1: frozenset({0, 1, 2})}
    assert data.partial == {0: frozenset({1})}
    assert data.misaligned == [(SOL, T0 + half, T0 + PERIOD_MS + half)]
    first = next(periods(data))
    assert [first.status(i) for i in range(3)] == ["incomplete", "partial", "missing"]


def test_failed_conformity_reports_flag_their_member_periods_in_allocation_and_bills() -> None:
    starts = period_range(T0, T0 + 3 * PERIOD_MS, PERIOD_MS)
    commitments = [Committed(m, t, t + PERIOD_MS, 10, 0) for m in (ALICE, BOB, SOL) for t in starts]
    data = gather([ALICE, BOB, SOL], NAMES, PERIOD_MS, starts, commitments, [], [prorata_from(0)])
    # bob's report of his second period failed; a report of a stranger's node changes nothing
    marked = flag_failed(
        data, [(BOB, T0 + PERIOD_MS, T0 + 2 * PERIOD_MS), ("0x" + "dd" * 20, T0, T0 + PERIOD_MS)]
    )
    assert marked == 1
    results = list(periods(data))
    assert [[r.status(i) for i in range(3)] for r in results] == [
        ["ok", "ok", "ok"],
        ["ok", "nonconforming", "ok"],
        ["ok", "ok", "ok"],
    ]
    (month,) = monthly(data).values()
    assert [acc.nonconforming for acc in month] == [0, 1, 0]
    assert month[1].nonconforming_starts == [T0 + PERIOD_MS]
    # the figures are the committed ones: flagged, never changed
    plain = gather([ALICE, BOB, SOL], NAMES, PERIOD_MS, starts, commitments, [], [prorata_from(0)])
    (unflagged,) = monthly(plain).values()
    assert [a.consumption for a in month] == [a.consumption for a in unflagged]


def test_each_period_takes_the_key_recorded_for_it_and_none_before_the_first() -> None:
    starts = period_range(T0, T0 + 3 * PERIOD_MS, PERIOD_MS)
    commitments = [
        c
        for k in range(3)
        for c in (
            Committed(ALICE, T0 + k * PERIOD_MS, T0 + (k + 1) * PERIOD_MS, 300, 0),
            Committed(BOB, T0 + k * PERIOD_MS, T0 + (k + 1) * PERIOD_MS, 100, 0),
            Committed(SOL, T0 + k * PERIOD_MS, T0 + (k + 1) * PERIOD_MS, 0, 200),
        )
    ]
    equal = parse_key({"kind": "equal"})
    keys = [
        KeyInForce(T0 + PERIOD_MS, key_hash(PRORATA), PRORATA),
        KeyInForce(T0 + 2 * PERIOD_MS, key_hash(equal), equal),
    ]
    data = gather([ALICE, BOB, SOL], NAMES, PERIOD_MS, starts, commitments, [], keys)
    results = list(periods(data))
    # Period 0: no key yet → nothing allocated, all of sol's export is surplus.
    assert results[0].key is None and results[0].allocation.allocated == (0, 0, 0)
    assert results[0].allocation.surplus == (0, 0, 200) and results[0].status(0) == "no-key"
    # Period 1, prorata: 200·300/400 = 150 and 50. Period 2, equal: 100 each (bob's 100 fits).
    assert results[1].allocation.allocated == (150, 50, 0)
    assert results[2].allocation.allocated == (100, 100, 0)
    assert [r.key.key_hash if r.key else None for r in results] == [
        None,
        key_hash(PRORATA),
        key_hash(equal),
    ]


def test_keys_are_matched_to_their_recorded_hash_and_a_different_file_is_refused(
    tmp_path: Path,
) -> None:
    from daisee_node.community.registry import KeyRecord

    members = load_members(write_members(tmp_path / "members.toml", NAMES))
    static = tmp_path / "static.toml"
    static.write_text('kind = "static"\n[coefficients]\nalice = "1/2"\nbob = "25%"\n')
    other = tmp_path / "other.toml"
    other.write_text('kind = "static"\n[coefficients]\nalice = "1/2"\nbob = "26%"\n')
    from daisee_node.community import load_key

    recorded = [KeyRecord(0, key_hash(load_key(static)), T0)]
    starts = period_range(T0, T0 + PERIOD_MS, PERIOD_MS)
    (k,) = keys_in_force(recorded, [static], members, starts)
    # Named by member name in the file; by address once translated (the hash stays the file's).
    assert k.key_hash == recorded[0].key_hash
    assert set(k.key.coefficients) == {ALICE, BOB}  # type: ignore[union-attr]
    with pytest.raises(DaiseeError, match="is not one the registry records"):
        keys_in_force(recorded, [other], members, starts)
    with pytest.raises(DaiseeError, match="give its file with --key"):
        keys_in_force(recorded, [], members, starts)
    stranger = parse_key({"kind": "tiers", "tiers": [["alice", "zoe"]]})
    with pytest.raises(CommunityError, match="unknown member 'zoe'"):
        translate_key(stranger, members.address_of, "tiers.toml")


def test_tariff_and_members_files_list_every_problem_with_its_path(tmp_path: Path) -> None:
    bad = tariff_file(tmp_path, 'local_price = -1\ntimezone = "Mars/Olympus"\ncolour = 1\n')
    with pytest.raises(ConfigError) as err:
        load_tariff(bad)
    paths = {p.path for p in err.value.problems}
    assert paths == {"local_price", "timezone", "colour"}
    members = tmp_path / "members.toml"
    members.write_text(f'[members]\n"{ALICE}" = "alice"\n"{BOB}" = "alice"\n"0x12" = "x"\n')
    with pytest.raises(ConfigError) as err:
        load_members(members)
    message = str(err.value)
    assert "name 'alice' is given to" in message and "'0x12' is not a node address" in message


def test_outputs_share_and_statement() -> None:
    # alice took 1/3 of 30000 Wh: 0.333333 (rounded down); nothing produced: 0.
    assert share_text(10_000, 30_000) == "0.333333"
    assert share_text(5, 0) == "0" and share_text(30_000, 30_000) == "1"
    starts = period_range(T0, T0 + 3 * PERIOD_MS, PERIOD_MS)
    data = gather([ALICE, BOB, SOL], NAMES, PERIOD_MS, starts, three_periods(), [], [])
    data.keys = [prorata_from(0)]
    keys_csv = io.StringIO()
    bob_csv = io.StringIO()
    writer = PeriodWriter(data, keys_csv, {1: bob_csv}, [])
    months = monthly(data, sink=writer)
    keys_rows = list(csv.DictReader(io.StringIO(keys_csv.getvalue())))
    assert keys_rows[0] == {
        "timestamp": "2026-01-31T22:45:00Z",
        "member": "alice",
        "share": "0.75",  # 15000 of sol's 20000 Wh
        "status": "ok",
    }
    bob_rows = list(csv.DictReader(io.StringIO(bob_csv.getvalue())))
    assert bob_rows[2]["status"] == "missing" and bob_rows[2]["consumption_wh"] == ""
    assert bob_rows[0]["allocated_wh"] == "5000" and bob_rows[0]["status"] == "ok"
    assert writer.digest().startswith("0x") and len(writer.digest()) == 66
    from daisee_node.community.files import Tariff
    from daisee_node.community.outputs import Provenance

    tariff = Tariff(local_price=Decimal("0.15"))
    bills = [bill(a, tariff) for m in months.values() for a in m if a.name == "bob"]
    prov = Provenance(1, 2, "0xL", "0xR", None, [], "t.toml", writer.digest(), "range")
    page = statement_html("bob", BOB, bills, prov)
    assert "no commitment from this node" in page and "<script" not in page
    assert "http" not in page  # self-contained: no external asset


# -- on py-evm: the registry and the chain reader ---------------------------------------------


@pytest.fixture
def m() -> Market:
    return new_market()


def test_registry_records_keys_in_order_and_answers_which_applies(m: Market) -> None:
    reg = Registry(m.w3, deploy(m.w3, m.gov, m.ledger.address))
    start = window_start(m)
    h1, h2, h3 = ("0x" + f"{i:02x}" * 32 for i in (1, 2, 3))
    assert reg.key_for(start) is None and reg.records() == []
    with pytest.raises(ChainError, match="only the ledger's governance"):
        reg.record_key(m.seller, h1, start)
    with pytest.raises(ChainError, match="not yet reached"):
        reg.record_key(m.gov, h1, m.now_ms() - 1000)
    first = reg.record_key(m.gov, h1, start)
    assert (first.index, first.key_hash, first.from_ms) == (0, h1, start)
    reg.record_key(m.gov, h2, start)  # same start, not yet reached: replaces it
    reg.record_key(m.gov, h3, start + 4 * PERIOD_MS)
    with pytest.raises(ChainError, match="not before the last"):
        reg.record_key(m.gov, h1, start + PERIOD_MS)
    assert [(r.key_hash, r.from_ms) for r in reg.records()] == [
        (h2, start),
        (h3, start + 4 * PERIOD_MS),
    ]
    assert reg.key_for(start - 1) is None
    assert reg.key_for(start + 4 * PERIOD_MS - 1).key_hash == h2  # type: ignore[union-attr]
    assert reg.key_for(start + 4 * PERIOD_MS).key_hash == h3  # type: ignore[union-attr]
    events = reg.contract.events.KeyRecorded().get_logs(from_block=0)
    assert [(e["args"]["index"], e["args"]["fromMs"]) for e in events] == [
        (0, start),
        (0, start),
        (1, start + 4 * PERIOD_MS),
    ]


def test_bill_from_the_chain_alone_with_a_peer_to_peer_settlement(
    m: Market, tmp_path: Path
) -> None:
    """seller, buyer and other commit two periods; the buyer bought 300 Wh of the seller's
    export peer to peer in period 0; the registry records the prorata key before them."""
    reg = Registry(m.w3, deploy(m.w3, m.gov, m.ledger.address))
    t0 = window_start(m)
    reg.record_key(m.gov, key_hash(PRORATA), t0)
    price = 200 * 10**15  # 0.2 credits per kWh
    order = m.open(m.buyer, m.seller, 1000, price, t0, t0 + 2 * PERIOD_MS)
    m.send(m.seller, m.market.functions.accept(order))
    # Period 0: seller exports 900, buyer imports 500, other imports 700.
    # Period 1: seller exports 100, buyer imports 200, other commits nothing.
    s0, b0, _ = m.commit(
        (m.seller, t0, t0 + PERIOD_MS, 0, 900, []),
        (m.buyer, t0, t0 + PERIOD_MS, 500, 0, []),
        (m.other, t0, t0 + PERIOD_MS, 700, 0, []),
    )
    m.commit(
        (m.seller, t0 + PERIOD_MS, t0 + 2 * PERIOD_MS, 0, 100, []),
        (m.buyer, t0 + PERIOD_MS, t0 + 2 * PERIOD_MS, 200, 0, []),
    )
    m.travel_to(t0 + PERIOD_MS)
    receipt = m.settle_grid(order, s0, b0)
    (ev,) = m.market.events.Settled().process_receipt(receipt, errors=DISCARD)
    # The order's share of each side is all of it (one order): min(900, 500, 1000) = 500.
    assert ev["args"]["deliveredWh"] == 500 and ev["args"]["paid"] == 500 * price // 1000
    names = {m.seller.address: "seller", m.buyer.address: "buyer", m.other.address: "other"}
    read = read_all(
        "unused",
        m.ledger.address,
        reg.address,
        names,
        market_address=m.market.address,
        w3=m.w3,
    )
    assert len(read.settlements) == 1 and read.unreadable == []
    assert read.wh_per_credit == 1000
    starts = period_range(t0, t0 + 2 * PERIOD_MS, PERIOD_MS)
    keys = [KeyInForce(r.from_ms, r.key_hash, PRORATA) for r in read.keys]
    data = gather(list(names), names, PERIOD_MS, starts, read.commitments, read.settlements, keys)
    data.wh_per_credit = read.wh_per_credit
    (accounts,) = monthly(data).values()
    by = {a.name: a for a in accounts}
    # Period 0: P2P 500 first (buyer 0 left, seller 400 left); key: other 700 > 400 → 400.
    # Period 1: other missing; buyer 200 > seller's 100 → 100 allocated.
    assert (by["buyer"].p2p_bought, by["buyer"].allocated, by["buyer"].grid_import) == (
        500,
        100,
        100,
    )
    assert (by["other"].allocated, by["other"].grid_import, by["other"].missing) == (400, 300, 1)
    assert (by["seller"].p2p_sold, by["seller"].supplied, by["seller"].surplus) == (500, 500, 0)
    tariff = load_tariff(tariff_file(tmp_path, 'local_price = "0.2"\ncredit_price = "2"\n'))
    b = bill(by["buyer"], tariff)
    # 100 Wh × 0.2 = 0.02; 500 Wh at 0.2 credits/kWh = 0.1 credits × 2 EUR = 0.20 → 0.22.
    assert b.lines[3].quantity == "0.500 kWh, 0.1 credits"
    assert b.total == Decimal("0.22")


# -- the command's refusals: one line, no traceback -------------------------------------------


@pytest.mark.slow  # four command processes
def test_bad_inputs_are_one_clear_line(tmp_path: Path) -> None:
    members = write_members(tmp_path / "members.toml", NAMES)
    tariff = tariff_file(tmp_path, TARIFF)
    base = [
        "community",
        "bill",
        "--rpc",
        "http://127.0.0.1:9",  # nothing listens on the discard port
        "--ledger",
        ALICE,
        "--registry",
        BOB,
        "--members",
        str(members),
        "--month",
        "2026-02",
    ]
    base += ["--tariff", str(tariff)]
    unreachable = run_cli(*base)
    assert unreachable.returncode == 1
    assert unreachable.stderr.startswith("daisee-node: error: cannot reach the chain")
    assert "Traceback" not in unreachable.stderr and unreachable.stderr.count("\n") == 1

    bad_tariff = tmp_path / "bad.toml"
    bad_tariff.write_text("local_price = 'cheap'\n")
    result = run_cli(*base[:-2], "--tariff", str(bad_tariff))
    assert result.returncode == 2 and "local_price" in result.stderr
    assert "Traceback" not in result.stderr

    unknown = run_cli(*base, "--member", "zoe")
    assert unknown.returncode == 1 and "--member 'zoe' is not in" in unknown.stderr
    assert unknown.stderr.count("\n") == 1

    month = run_cli(*base, "--month", "2026-13")
    assert month.returncode == 1 and "YYYY-MM" in month.stderr
