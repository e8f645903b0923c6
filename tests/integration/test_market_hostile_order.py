"""A hostile buyer on anvil cannot halt a seller's market: an order in year 275817 (the contract
takes any uint64 time) is refused by the seller's running daemon with its reason, an order the
operator accepted there by hand does not trip the day's sum, the normal order placed after them
is still accepted, and the operator's commands show all of them without a traceback. The same
commands refuse times and durations no calendar holds in one line, before any transaction."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daisee_node.cli import main
from daisee_node.ledger import market as marketlib
from daisee_node.ledger.keys import load_account
from tests.conftest import db_rows, wait_for
from tests.support.broker import Broker
from tests.support.chains import AnvilLedger
from tests.support.market_nodes import earn_credits, make_keys, node_config

# Waits on anvil's blocks and a daemon more than it computes: run beside the rest of the suite.
pytestmark = [pytest.mark.slow, pytest.mark.beside]

DAY_MS = 86_400_000
PERIOD_MS = 10_000  # the node config's 10 s periods
FAR = 100_000_000 * DAY_MS  # what `--start +100000000d` asks, from now


@pytest.fixture
def seller_broker(tmp_path: Path) -> Iterator[Broker]:
    b = Broker(tmp_path, node_logins=("seller",))
    b.start()
    yield b
    b.stop()


def one_line_refusal(done: subprocess.CompletedProcess[str], words: str) -> None:
    """Exit 1, one line on stderr naming the problem, no traceback."""
    assert done.returncode == 1, done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], done.stderr


def test_a_far_future_order_is_refused_and_the_market_goes_on(
    tmp_path: Path,
    anvil: AnvilLedger,
    seller_broker: Broker,
    daemon: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    keys = make_keys(tmp_path, anvil, ("seller", "buyer"))
    seller_address, buyer_address = keys["seller"][2], keys["buyer"][2]
    earn_credits(anvil, *keys["buyer"][:2], export_wh=1000)  # 1 credit
    address = marketlib.deploy(anvil.w3, anvil.gov, anvil.ledger.address)
    from_block = int(anvil.w3.eth.block_number)
    config = node_config(
        tmp_path,
        "seller",
        chain=anvil,
        broker=seller_broker,
        key=keys["seller"],
        simulation={"pv_peak_w": 0, "load_base_w": 100},
        market={
            "address": address,
            "from_block": from_block,
            "accept_from": ["buyer"],
            "min_price": 0.1,
            "max_wh_per_day": 10_000,
            "seller_meter": "grid.export_wh",
            "poll_s": 0.5,
        },
        peers={"buyer": buyer_address},
    )
    on_chain = marketlib.Market(anvil.w3, address)
    buyer = load_account(*keys["buyer"][:2])
    price = marketlib.parse_credits("0.2")

    def cli(*argv: str) -> subprocess.CompletedProcess[str]:
        """`daisee-node ARGV…` in this process (web3 imported once); exit code and output."""
        capsys.readouterr()
        code = main(list(argv))
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(argv, code, out, err)

    # The hostile orders: the contract takes a window starting 100 million days ahead.
    now = on_chain.now_ms()
    far = on_chain.open(buyer, seller_address, 100, price, now + FAR, now + FAR + DAY_MS)
    by_hand = on_chain.open(buyer, seller_address, 200, price, now + FAR, now + FAR + DAY_MS)
    assert (far, by_hand) == (1, 2)
    start, end = marketlib.utc_text(now + FAR), marketlib.utc_text(now + FAR + DAY_MS)
    assert start.startswith("year 2758")  # 275817 from late 2026
    # Its operator accepts one by hand: the transaction went through, and it says so (exit 0).
    accepted = cli("market", "accept", "-c", str(config), "2")
    assert accepted.returncode == 0, accepted.stderr
    assert accepted.stdout == f"order 2 accepted: deliver 200 Wh, {start}–{end} UTC\n"
    assert on_chain.order(2).state_name == "accepted"

    seller = daemon(config)
    refused = wait_for(lambda: on_chain.order(1).state_name == "refused", timeout=30, every=0.2)
    assert refused
    # A normal order after them is still accepted by the same daemon.
    t0 = -(-(on_chain.now_ms() + 20_000) // PERIOD_MS) * PERIOD_MS
    normal = on_chain.open(buyer, seller_address, 100, price, t0, t0 + PERIOD_MS)
    assert wait_for(lambda: on_chain.order(normal).state_name == "accepted", timeout=20, every=0.2)
    assert seller.proc.poll() is None

    def market_events() -> dict[str, tuple[str, str]]:
        rows = db_rows(
            tmp_path / "seller-data" / "node.db",
            "SELECT name, state, reason FROM events WHERE kind = 'market'",
        )
        return {name: (state, why) for name, state, why in rows}

    # the store writes its events a moment after the decision reached the chain
    events = wait_for(lambda: (e := market_events()) and f"order.{normal}" in e and e)
    assert events["order.1"] == (
        "refused",
        f"its window starts too far ahead: 100,000,000 days from now ({start}); orders are "
        "accepted up to 366 days ahead",
    ), events
    assert events[f"order.{normal}"] == ("accepted", "accepted by policy")
    assert "out of range" not in seller.output()

    listed = cli("market", "orders", "-c", str(config), "--all")
    assert listed.returncode == 0 and listed.stderr == "", listed.stderr
    rows = [line.split() for line in listed.stdout.splitlines()[1:]]
    assert [(r[0], r[-2]) for r in rows] == [("1", "refused"), ("2", "accepted"), ("3", "accepted")]
    assert f"{start}–{end} UTC" in listed.stdout.splitlines()[1]
    status = cli("status", "-c", str(config))
    assert status.returncode == 0 and "out of range" not in status.stdout, status.stdout
    assert "too far ahead" in status.stdout

    # Times and durations no calendar (or uint64) holds: one line each, nothing sent.
    buy = ["market", "buy", "-c", str(config), buyer_address]
    one_line_refusal(
        cli(*buy, "500Wh", "--price", "0.2", "--start", "+100000000d", "--end", "+100000001d"),
        "--start '+100000000d' is out of range: give a time between 1970 and 9999",
    )
    one_line_refusal(
        cli(*buy, "500Wh", "--price", "0.2", "--start", "99999999999999999999999", "--end", "1"),
        "--start '99999999999999999999999' is out of range",
    )
    one_line_refusal(
        cli(*buy, "-5Wh", "--price", "0.2", "--start", "+1h", "--end", "+2h"),
        "amount '-5Wh': give more than 0 Wh",
    )
    deploy = ["market", "deploy", "-c", str(config), "--ledger", anvil.ledger.address]
    for value in ("nan", "inf", "-1"):
        done = cli(*deploy, "--grace-h", value)
        one_line_refusal(done, "give a finite number, 0 or more")
        assert "--grace-h" in done.stderr
    assert on_chain.order_count() == 3
