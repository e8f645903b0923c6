"""`daisee-node market …` on py-evm: the operator's commands against the real market contract.

The chain is an embedded one kept in the test's folder, so the commands (run in-process through
the CLI's `main`) and the test share it; the test moves the chain's clock and records the
nodes' periods with the real ledger code.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount

from daisee_node import cli
from daisee_node.ledger import chain, embedded, market, merkle
from tests.conftest import write_config
from tests.support.market import CAPACITY_W, PERIOD_MS, Market, Recorded

UNIT = 10**18  # credit base units (18 decimals)
FUNDS_WH = 10_000  # each node's starting export: 10 credits at 1000 Wh a credit


def _keystore(folder: Path, name: str, account: LocalAccount) -> tuple[Path, Path]:
    """A keystore as `keys new` writes one, but quick to decrypt (few PBKDF2 rounds)."""
    keystore, password = folder / f"{name}.json", folder / f"{name}.pass"
    password.write_text("secret\n")
    data = Account.encrypt(account.key, "secret", kdf="pbkdf2", iterations=2)
    keystore.write_text(json.dumps(data))
    for path in (keystore, password):
        os.chmod(path, 0o600)
    return keystore, password


@dataclass
class Scene:
    """A kept embedded chain with a ledger, a market and two registered nodes with credits."""

    m: Market
    address: str
    keys: dict[str, tuple[Path, Path]]
    tmp: Path
    capsys: pytest.CaptureFixture[str]

    def run(self, *args: str, who: str = "buyer") -> tuple[int, str, str]:
        """`daisee-node market ACTION …` as node `who`: (exit code, stdout, stderr)."""
        self.capsys.readouterr()
        keystore, password = self.keys[who]
        options = ["--rpc", "embedded", "--market", self.address]
        options += ["--keystore", str(keystore), "--password-file", str(password)]
        code = cli.main(["market", args[0], *options, *args[1:]])
        out, err = self.capsys.readouterr()
        return code, out, err

    def credits(self, who: LocalAccount) -> int:
        return self.m.balance(who)


def _build(folder: Path, capsys: pytest.CaptureFixture[str] | None) -> Scene:
    embedded.keep_in(folder / "chain")
    w3 = chain.connect(chain.EMBEDDED)
    gov = Account.from_key(chain.TESTER_KEYS[0])
    ledger = chain.Ledger(w3, chain.deploy(w3, gov, None, 1000))
    address = market.deploy(w3, gov, ledger.address)
    wrapper = market.Market(w3, address)
    seller, buyer, other = Account.create(), Account.create(), Account.create()
    for node in (seller, buyer):
        ledger.set_node(gov, node.address, capacity_w=CAPACITY_W)
        chain.fund(w3, gov, node.address, 10**19)
    m = Market(w3, gov, ledger, ledger.credit(), wrapper.contract, seller, buyer, other)
    m.commit(*[(node, 0, PERIOD_MS, 0, FUNDS_WH, []) for node in (seller, buyer)])
    named = (("seller", seller), ("buyer", buyer), ("gov", gov))
    keys = {name: _keystore(folder, name, node) for name, node in named}
    return Scene(m, address, keys, folder, capsys)  # type: ignore[arg-type]


@pytest.fixture
def scene(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Iterator[Scene]:
    try:
        yield _build(tmp_path, capsys)
    finally:
        embedded.keep_in(None)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Scene, int]]:
    """One chain for the refusals (none of which changes it): an open order 1 and an offer 1
    whose window starts at the period boundary it gives."""
    try:
        s = _build(tmp_path_factory.mktemp("refusals"), None)
        s.capsys = _Capture()  # type: ignore[assignment]
        t0 = _start(s)
        window = ["--start", _iso(t0), "--end", _iso(t0 + PERIOD_MS)]
        _ok(s.run("buy", s.m.seller.address, "100Wh", "--price", "0.5", *window))
        _ok(s.run("offer", "1kWh", "--price", "0.5", *window, who="seller"))
        yield s, t0
    finally:
        embedded.keep_in(None)


class _Capture:
    """Until a test hands its capsys over: output goes nowhere."""

    def readouterr(self) -> tuple[str, str]:
        return "", ""


def _ok(result: tuple[int, str, str]) -> str:
    code, out, err = result
    assert code == 0, err
    return out


def _refused(result: tuple[int, str, str], words: str) -> str:
    """The command failed with one line naming `words`, and no traceback."""
    code, _, err = result
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("daisee-node: error: ")
    assert words in lines[0], lines[0]
    assert "Traceback" not in err
    return lines[0]


def _start(s: Scene, hours: int = 1) -> int:
    """A period boundary `hours` after the chain's clock (rounded up)."""
    return -(-(s.m.now_ms() + hours * 3_600_000) // PERIOD_MS) * PERIOD_MS


def _iso(t_ms: int) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(t_ms / 1000, UTC).isoformat()


def test_buy_accept_settle_refund_moves_what_the_rule_says(scene: Scene) -> None:
    s, m = scene, scene.m
    t0 = _start(s)
    t1 = t0 + 4 * PERIOD_MS
    buyer0, seller0 = s.credits(m.buyer), s.credits(m.seller)
    out = _ok(
        s.run(
            "buy",
            m.seller.address,
            "0.5kWh",
            "--price",
            "0.2",
            "--start",
            _iso(t0),
            "--end",
            _iso(t1),
        )
    )
    assert out.startswith("order 1 opened: 500 Wh from") and "0.1 credits escrowed" in out
    # 500 Wh at 0.2 credits per kWh: 0.1 credits, escrowed
    assert s.credits(m.buyer) == buyer0 - UNIT // 10
    balance = json.loads(_ok(s.run("balance", "--json")))
    assert balance["escrowed"] == "0.1" and balance["node"] == m.buyer.address
    assert int(balance["balance_units"]) == buyer0 - UNIT // 10

    out = _ok(s.run("accept", "1", who="seller"))
    assert out.startswith("order 1 accepted: deliver 500 Wh")
    m.travel_to(t1 + 1000)
    _refused(s.run("settle", "1"), "no period of order 1's window")

    # Four periods: the seller exported 100, 50, 0, 80 Wh, the buyer imported 120, 40, 30, 200.
    exports, imports = [100, 50, 0, 80], [120, 40, 30, 200]
    for i in range(4):
        p0 = t0 + i * PERIOD_MS
        m.commit(
            (m.seller, p0, p0 + PERIOD_MS, 0, exports[i], []),
            (m.buyer, p0, p0 + PERIOD_MS, imports[i], 0, []),
        )
    out = _ok(s.run("settle", "1", who="seller"))
    # Per period min(export, import): 100 + 40 + 0 + 80 = 220 Wh, paid 220 × 0.2 / 1000 credits
    assert "220 Wh of 500 Wh delivered" in out
    assert out.count("delivered, ") == 4 and "40 Wh delivered, 0.008 credits paid" in out
    paid = 220 * (UNIT // 5) // 1000
    # the seller's commitments minted 230 Wh of credits as well (1000 Wh a credit)
    assert s.credits(m.seller) == seller0 + paid + 230 * UNIT // 1000
    _refused(s.run("settle", "1"), "are settled")
    _refused(s.run("refund", "1"), "too early: order 1's escrow returns after")

    m.travel_to(t1 + market.GRACE_MS)
    out = _ok(s.run("refund", "1"))
    assert "220 Wh of 500 Wh delivered; 0.056 credits returned" in out
    assert s.credits(m.buyer) == buyer0 - paid
    events = market.Market(m.w3, s.address).events()
    names = [e.name for e in events]
    assert names == ["ToleranceSet", "OrderOpened", "OrderAccepted", *["Settled"] * 4, "Refunded"]
    assert [e.args["deliveredWh"] for e in events if e.name == "Settled"] == [100, 40, 0, 80]
    listed = json.loads(_ok(s.run("orders", "--all", "--json")))
    assert listed == [
        {
            "id": 1,
            "role": "buyer",
            "peer": m.seller.address,
            "amount_wh": 500,
            "delivered_wh": 220,
            "price_per_kwh": "0.2",
            "t0_ms": t0,
            "t1_ms": t1,
            "mode": "grid",
            "state": "closed",
            "escrow": "0",
        }
    ]
    table = _ok(s.run("orders", "--all", who="seller")).splitlines()
    assert table[0].split() == [
        "id",
        "role",
        "peer",
        "amount",
        "delivered",
        "price",
        "window",
        "state",
    ]
    assert table[1].split()[:6] == ["1", "seller", m.buyer.address, "500", "Wh", "220"]
    assert _ok(s.run("orders")).startswith("no open or accepted orders")
    assert json.loads(_ok(s.run("balance", "--json")))["escrowed"] == "0"


def test_a_period_only_one_node_committed_waits_for_the_other(scene: Scene) -> None:
    s, m = scene, scene.m
    t0 = _start(s)
    _ok(
        s.run(
            "buy",
            m.seller.address,
            "300Wh",
            "--price",
            "1",
            "--start",
            _iso(t0),
            "--end",
            _iso(t0 + 2 * PERIOD_MS),
        )
    )
    _ok(s.run("accept", "1", who="seller"))
    m.travel_to(t0 + 2 * PERIOD_MS)
    m.commit((m.seller, t0, t0 + PERIOD_MS, 0, 200, []), (m.buyer, t0, t0 + PERIOD_MS, 90, 0, []))
    m.commit((m.seller, t0 + PERIOD_MS, t0 + 2 * PERIOD_MS, 0, 200, []))
    second = _iso(t0 + PERIOD_MS + 60_000)
    _refused(s.run("settle", "1", "--period", second), "not yet committed by the buyer")
    out = _ok(s.run("settle", "1"))
    assert "90 Wh delivered, 0.09 credits paid" in out
    assert "waiting: period" in out and "not yet committed by the buyer" in out
    _refused(s.run("settle", "1"), "nothing to settle: period")
    _refused(s.run("settle", "1", "--period", _iso(t0 + 5 * PERIOD_MS)), "outside order 1's")
    m.commit((m.buyer, t0 + PERIOD_MS, t0 + 2 * PERIOD_MS, 500, 0, []))
    out = _ok(s.run("settle", "1", "--period", second))
    # the 300 Wh ordered cap the second period at 210 of its 200 / 500 Wh
    assert "200 Wh delivered" in out and "290 Wh of 300 Wh delivered" in out


def test_a_period_past_its_grace_time_is_too_late_to_settle(scene: Scene) -> None:
    s, m = scene, scene.m
    t0 = _start(s)
    window = ["--start", _iso(t0), "--end", _iso(t0 + PERIOD_MS)]
    _ok(s.run("buy", m.seller.address, "100Wh", "--price", "1", *window))
    _ok(s.run("accept", "1", who="seller"))
    m.travel_to(t0 + PERIOD_MS)
    m.commit((m.seller, t0, t0 + PERIOD_MS, 0, 50, []), (m.buyer, t0, t0 + PERIOD_MS, 50, 0, []))
    m.travel_to(t0 + PERIOD_MS + market.GRACE_MS)
    _refused(s.run("settle", "1"), "too late: period")
    assert "0 Wh of 100 Wh" in _ok(s.run("refund", "1"))


@pytest.mark.parametrize(
    ("args", "who", "words"),
    [
        (["buy", "0x" + "ab" * 20, "500Wh"], "buyer", "is not registered in the ledger"),
        (["buy", "bob", "500Wh"], "buyer", "unknown peer 'bob'"),
        (["buy", "SELLER", "5000kWh", "--price", "3"], "buyer", "insufficient credits"),
        (["buy", "SELLER", "500"], "buyer", "give energy with its unit"),
        (["buy", "SELLER", "0.0001kWh"], "buyer", "not a whole number of Wh"),
        (["buy", "SELLER", "500Wh", "--price", "cheap"], "buyer", "not a number of credits"),
        (["buy", "SELLER", "500Wh", "--start", "2020-01-01T00:00Z"], "buyer", "expired order"),
        (["buy", "SELLER", "500Wh", "--start", "tomorrow"], "buyer", "give an ISO time"),
        (["buy", "SELLER", "500Wh", "--mode", "line"], "buyer", "wrong mode"),
        (["buy", "SELLER", "500Wh", "--channel", "grid.import_wh"], "buyer", "wrong mode"),
        (["accept", "1"], "buyer", "not the seller"),
        (["accept", "7"], "seller", "no order 7 in the market (1 so far)"),
        (["refuse", "0"], "seller", "no order 0"),
        (["cancel", "1"], "seller", "not the buyer"),
        (["cancel", "3", "--offer"], "seller", "no offer 3"),
        (["take", "1", "--channel", "grid.import_wh"], "buyer", "wrong mode"),
        (["take", "1", "2kWh"], "buyer", "bad terms"),
        (["settle", "1"], "buyer", "order 1 is open: only accepted orders settle"),
        (["dispute", "--close", "1"], "buyer", "no dispute 1"),
        (["balance", "--market", "0x" + "00" * 19 + "01"], "buyer", "no market contract at"),
        (["offers", "--market", "LEDGER"], "buyer", "is not an energy market"),
        (["orders", "--market", "0x12"], "buyer", "--market '0x12' is not an address"),
    ],
)
def test_every_bad_input_is_one_clear_line(
    shared: tuple[Scene, int],
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    who: str,
    words: str,
) -> None:
    s, t0 = shared
    embedded.keep_in(s.tmp / "chain")
    s.capsys = capsys
    named = {"SELLER": s.m.seller.address, "LEDGER": s.m.ledger.address}
    args = [named.get(a, a) for a in args]
    if args[0] == "buy":
        given = {a for a in args if a.startswith("--")}
        defaults = {"--price": "0.5", "--start": _iso(t0), "--end": _iso(t0 + PERIOD_MS)}
        args += [x for k, v in defaults.items() if k not in given for x in (k, v)]
    before = s.m.w3.eth.block_number
    _refused(s.run(*args, who=who), words)
    assert s.m.w3.eth.block_number == before  # nothing was sent


def test_an_order_not_accepted_in_time_expires_and_acceptance_is_refused(scene: Scene) -> None:
    s, m = scene, scene.m
    t0 = _start(s)
    held = s.credits(m.buyer)
    out = _ok(
        s.run("buy", m.seller.address, "1kWh", "--price", "2", "--start", "+1h", "--end", "+2h")
    )
    assert "2 credits escrowed" in out
    order = market.Market(m.w3, s.address).order(1)
    assert order.t0 % PERIOD_MS == 0 and order.t0 >= t0 - PERIOD_MS  # rounded up to a period
    _refused(s.run("refund", "1"), "too early: order 1 may still be accepted until")
    m.travel_to(order.t0)
    _refused(s.run("accept", "1", who="seller"), "expired order: order 1's window began at")
    _refused(s.run("cancel", "1", who="seller"), "not the buyer")
    out = _ok(s.run("refund", "1", who="seller"))  # anyone returns an expired escrow
    assert out.startswith("order 1 expired: 2 credits returned to " + m.buyer.address)
    assert s.credits(m.buyer) == held
    _refused(s.run("refund", "1"), "order 1 is expired: cannot refund it")


def test_offers_are_listed_taken_in_parts_and_withdrawn(scene: Scene) -> None:
    s, m = scene, scene.m
    t0 = _start(s, 2)
    window = ["--start", _iso(t0), "--end", _iso(t0 + 4 * PERIOD_MS)]
    out = _ok(s.run("offer", "2kWh", "--price", "0.25", "--min", "500Wh", *window, who="seller"))
    assert out.startswith("offer 1 posted: 2000 Wh at 0.25/kWh")
    offers = json.loads(_ok(s.run("offers", "--json")))
    assert [(o["id"], o["amount_wh"], o["min_wh"], o["price_per_kwh"]) for o in offers] == [
        (1, 2000, 500, "0.25")
    ]
    _refused(s.run("take", "1", "100Wh"), "bad terms")
    held = s.credits(m.buyer)
    out = _ok(s.run("take", "1", "0.8kWh"))
    assert out.startswith("order 1 accepted: 800 Wh of offer 1") and "0.2 credits escrowed" in out
    assert s.credits(m.buyer) == held - UNIT // 5
    table = _ok(s.run("offers")).splitlines()
    assert table[0].split()[:4] == ["id", "seller", "left", "min"]
    assert table[1].split()[:4] == ["1", m.seller.address, "1200", "Wh"]
    orders = json.loads(_ok(s.run("orders", "--json", who="seller")))
    assert [(o["id"], o["role"], o["state"]) for o in orders] == [(1, "seller", "accepted")]
    _refused(s.run("cancel", "1", "--offer"), "not the seller")
    assert _ok(s.run("cancel", "1", "--offer", who="seller")) == "offer 1 withdrawn\n"
    assert _ok(s.run("offers")).startswith("no offers open to take")
    _refused(s.run("take", "1"), "no offer 1")


def test_a_config_names_the_market_and_peers_by_id(scene: Scene) -> None:
    s, m = scene, scene.m
    keystore, password = s.keys["buyer"]
    config = write_config(
        s.tmp / "buyer.toml",
        {
            "node": {"id": "buyer", "data_dir": str(s.tmp / "data")},
            "chain": {
                "rpc_url": "embedded",
                "keystore": str(keystore),
                "password_file": str(password),
            },
            "market": {"address": s.address},
            "mqtt": {"host": "127.0.0.1"},
            "peers": [{"id": "seller", "address": m.seller.address}],
        },
    )
    t0 = _start(s)
    code = cli.main(
        [
            "market",
            "buy",
            "-c",
            str(config),
            "seller",
            "250Wh",
            "--price",
            "4",
            "--start",
            _iso(t0),
            "--end",
            _iso(t0 + PERIOD_MS),
        ]
    )
    assert code == 0
    assert market.Market(m.w3, s.address).order(1).seller == m.seller.address
    s.capsys.readouterr()
    assert cli.main(["market", "balance", "-c", str(config)]) == 0
    out = s.capsys.readouterr().out
    # 10 credits minted, 250 Wh at 4 credits a kWh escrowed
    assert out.splitlines()[1:] == [
        "  balance   9 credits",
        "  escrowed  1 credits (in open orders)",
    ]
    code = cli.main(
        [
            "market",
            "buy",
            "-c",
            str(config),
            "carol",
            "250Wh",
            "--price",
            "4",
            "--start",
            _iso(t0),
            "--end",
            _iso(t0 + PERIOD_MS),
        ]
    )
    assert code == 1 and "unknown peer 'carol': neither a [[peers]] id (seller)" in (
        s.capsys.readouterr().err
    )
    bad = s.tmp / "bad.toml"
    bad.write_text(config.read_text().replace(s.address, "0x1234"))
    assert cli.main(["market", "orders", "-c", str(bad)]) == 2
    assert "market.address" in s.capsys.readouterr().err


def test_deploy_puts_the_market_beside_the_ledger(tmp_path: Path) -> None:
    embedded.keep_in(tmp_path / "chain")
    try:
        w3 = chain.connect(chain.EMBEDDED)
        gov = Account.create()
        chain.fund(w3, Account.from_key(chain.TESTER_KEYS[0]), gov.address, 10**19)
        keystore, password = _keystore(tmp_path, "gov", gov)
        argv = ["deploy", "--rpc", "embedded", "--keystore", str(keystore)]
        argv += ["--password-file", str(password), "--market"]
        assert cli.main(argv) == 0
        deployed = market.Market(w3, embedded.create_address(gov.address, 1))
        assert deployed.ledger.address == embedded.create_address(gov.address, 0)
        assert deployed.governance() == gov.address
        assert deployed.grace_ms() == market.GRACE_MS
    finally:
        embedded.keep_in(None)


def _proof_file(path: Path, rec: Recorded, index: int) -> str:
    """A reading's proof as `prove` writes it (the fields `settle` reads)."""
    channel, t_ms, micro, quality = rec.rows[index]
    data = {
        "commitment": rec.c.to_json(),
        "channel_id": "0x" + channel.hex(),
        "t_ms": t_ms,
        "value_micro": micro,
        "quality": quality,
        "proof": ["0x" + p.hex() for p in merkle.proof(rec.tree, index)],
        "batch_proof": ["0x" + p.hex() for p in rec.batch_proof],
    }
    path.write_text(json.dumps(data))
    return str(path)


def test_a_line_order_settles_from_proven_readings_and_a_dispute_is_decided(scene: Scene) -> None:
    s, m = scene, scene.m
    t0 = _start(s)
    line = ["--mode", "line", "--channel", "line.import_wh", "--seller-channel", "line.export_wh"]
    _ok(
        s.run(
            "buy",
            m.seller.address,
            "1kWh",
            "--price",
            "1",
            "--start",
            _iso(t0),
            "--end",
            _iso(t0 + PERIOD_MS),
            *line,
        )
    )
    _ok(s.run("accept", "1", who="seller"))
    _refused(s.run("settle", "1"), "give --seller-proof and --buyer-proof")
    m.travel_to(t0 + PERIOD_MS + 1000)
    # Each end's line counter (Wh) at +10 s, +10 min and +14 min.
    times = [t0 + 10_000, t0 + 600_000, t0 + 840_000]
    sold, bought = merkle.channel_id("line.export_wh"), merkle.channel_id("line.import_wh")
    seller_rows = [
        (sold, t, wh * 10**6, 0) for t, wh in zip(times, [1000, 1100, 1300], strict=True)
    ]
    buyer_rows = [(bought, t, wh * 10**6, 0) for t, wh in zip(times, [500, 598, 648], strict=True)]
    rec_s, rec_b = m.commit(
        (m.seller, t0, t0 + PERIOD_MS, 0, 0, seller_rows),
        (m.buyer, t0, t0 + PERIOD_MS, 0, 0, buyer_rows),
    )

    def settle(i: int) -> tuple[int, str, str]:
        sp = _proof_file(s.tmp / f"s{i}.json", rec_s, i)
        bp = _proof_file(s.tmp / f"b{i}.json", rec_b, i)
        return s.run("settle", "1", "--seller-proof", sp, "--buyer-proof", bp)

    assert _ok(settle(0)) == "order 1: line anchored at both ends\n"
    # 100 Wh sent, 98 Wh received: within the 2 % tolerance, the lower counts
    assert "98 Wh of 1000 Wh delivered" in _ok(settle(1))
    # 200 Wh sent, 50 Wh received: a dispute, which governance decides at 150 Wh
    assert "dispute 1 opened" in _ok(settle(2))
    listed = json.loads(_ok(s.run("dispute", "1", "--json")))
    assert [(d["id"], d["low_wh"], d["high_wh"], d["open"]) for d in listed] == [
        (1, 50.0, 200.0, True)
    ]
    _refused(s.run("dispute", "--resolve", "1", "--wh", "150"), "only the ledger's governance")
    _ok(s.run("dispute", "--resolve", "1", "--wh", "150", who="gov"))
    assert market.Market(m.w3, s.address).order(1).delivered_wh == 98 + 150


def test_amounts_prices_and_times_read_as_people_write_them() -> None:
    from daisee_node.ledger.market_commands import parse_amount, parse_price, parse_time

    assert [parse_amount(t) for t in ("500Wh", "0.5kWh", " 2 MWh ", "1.25kwh")] == [
        500,
        500,
        2_000_000,
        1250,
    ]
    assert parse_price("0.2", 18) == UNIT // 5 and parse_price("3/kWh", 18) == 3 * UNIT
    assert parse_time("+15min", 1_000, "--start") == 901_000
    assert parse_time("+2h", 0, "--start") == 7_200_000
    assert parse_time("2026-11-22T10:00:00Z", 0, "--start") == 1_795_341_600_000
    assert market.credits(123 * 10**15) == "0.123" and market.credits(5 * UNIT) == "5"
