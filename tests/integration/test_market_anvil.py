"""On anvil, as operators would: two nodes' keys, registered; the market deployed beside the
ledger; the buyer orders, the seller accepts, both nodes commit real periods (readings in a Merkle
tree, signed, each node sending its own batch); the order is settled and the rest refunded with
`daisee-node market …` (run in this process, the set-up and the last look as processes), and
the balances are what the contract's rule gives, worked out here by hand."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_hash.auto import keccak

from daisee_node.cli import main
from daisee_node.ledger import chain as chainlib
from daisee_node.ledger import merkle
from daisee_node.ledger.commitment import Commitment, sign
from daisee_node.ledger.keys import load_account, new_keystore
from daisee_node.ledger.market import Market
from tests.conftest import run_cli
from tests.support.chains import ANVIL_KEY, AnvilLedger

pytestmark = pytest.mark.slow

PERIOD_MS = 900_000
HOUR_MS = 3_600_000
UNIT = 10**18  # credit base units: 18 decimals, one credit per 1000 Wh exported


@pytest.fixture
def anvil(tmp_path: Path) -> Iterator[AnvilLedger]:
    chain = AnvilLedger(tmp_path, block_time_s=0)  # a block per transaction
    yield chain
    chain.anvil.stop()


def cli(*args: str) -> str:
    """`daisee-node ARGS…` that must succeed; its standard output."""
    done = run_cli(*args)
    assert done.returncode == 0, done.stderr
    return done.stdout


def refused(done: subprocess.CompletedProcess[str], words: str) -> None:
    """Exit 1 with one line saying `words`, no traceback."""
    assert done.returncode == 1, done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], done.stderr


class Node:
    """A node's key and the chain of commitments it signs and submits itself."""

    def __init__(self, account: LocalAccount, chain: AnvilLedger) -> None:
        self.account, self.chain = account, chain
        self.seq, self.prev = 0, b"\0" * 32

    def commit(self, periods: list[tuple[int, int, int]]) -> None:
        """Sign (t0, import Wh, export Wh) periods over their counters' readings; one batch."""
        ledger, node = self.chain.ledger, bytes.fromhex(self.account.address[2:])
        items = []
        for t0, import_wh, export_wh in periods:
            rows = [
                (merkle.channel_id(name), t0 + dt, value * 1_000_000, 0)
                for dt in (0, PERIOD_MS // 2, PERIOD_MS - 1000)
                for name, value in (("grid.import_wh", import_wh), ("grid.export_wh", export_wh))
            ]
            rows.sort(key=lambda r: (r[1], r[0]))
            root = merkle.root([merkle.reading_leaf(node, *r) for r in rows])
            self.seq += 1
            c = Commitment(
                self.account.address,
                self.seq,
                t0,
                t0 + PERIOD_MS,
                root,
                len(rows),
                import_wh,
                export_wh,
                self.prev,
                keccak(b"rules"),
            )
            self.prev = c.struct_hash()
            items.append((c, sign(c, self.account.key, ledger.chain_id, ledger.address)))
        receipt = chainlib.send(
            self.chain.w3, self.account, {"to": ledger.address, "data": ledger.batch_data(items)}
        )
        ok, rejected = ledger.outcome(receipt)
        assert rejected == [] and len(ok) == len(items)


def set_time(chain: AnvilLedger, t_ms: int) -> None:
    """Mine a block at `t_ms` (rounded up to the second): the chain's clock moves there."""
    chain.anvil.call("evm_setNextBlockTimestamp", [-(-t_ms // 1000)])
    chain.anvil.call("evm_mine")


def chain_ms(chain: AnvilLedger) -> int:
    return int(chain.w3.eth.get_block("latest")["timestamp"]) * 1000


def test_buy_accept_commit_settle_refund_as_operators_do(
    tmp_path: Path, anvil: AnvilLedger, capsys: pytest.CaptureFixture[str]
) -> None:
    url, ledger = anvil.anvil.url, anvil.ledger.address
    gov_key = tmp_path / "gov.json"
    gov_key.write_text(json.dumps(Account.encrypt(ANVIL_KEY, "gov", kdf="pbkdf2", iterations=1000)))
    gov_key.chmod(0o600)
    (tmp_path / "gov.pass").write_text("gov\n")
    (tmp_path / "gov.pass").chmod(0o600)
    gov = ["--keystore", str(gov_key), "--password-file", str(tmp_path / "gov.pass")]

    keys: dict[str, list[str]] = {}
    nodes: dict[str, Node] = {}
    for name in ("seller", "buyer"):
        keystore, password = tmp_path / f"{name}.json", tmp_path / f"{name}.pass"
        address = new_keystore(keystore, password)  # what `keys new` does
        registered = json.loads(
            cli("register-node", address, "--rpc", url, "--ledger", ledger, *gov, "--fund-eth", "1")
        )
        assert registered["registered"] is True
        keys[name] = ["--keystore", str(keystore), "--password-file", str(password)]
        nodes[name] = Node(load_account(keystore, password), anvil)
    seller, buyer = nodes["seller"], nodes["buyer"]

    deployed = json.loads(cli("market", "deploy", "--rpc", url, "--ledger", ledger, *gov))
    assert deployed["ledger"] == ledger and deployed["governance"] == anvil.gov.address
    on = ["--rpc", url, "--market", deployed["market"]]

    def market(action: str, *args: str, who: str = "buyer") -> subprocess.CompletedProcess[str]:
        """`daisee-node market …` in this process (the same `main`; web3 imported once)."""
        argv = ["market", action, *on, *keys[who], *args]
        capsys.readouterr()
        code = main(argv)
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(argv, code, out, err)

    def balance(who: str) -> dict[str, Any]:
        done = market("balance", "--json", who=who)
        assert done.returncode == 0, done.stderr
        return dict(json.loads(done.stdout))

    # The buyer earns 4 credits: 4000 Wh exported in a period already past.
    now = chain_ms(anvil)
    buyer.commit([(now // PERIOD_MS * PERIOD_MS - 2 * HOUR_MS, 0, 4000)])
    credit = anvil.ledger.credit().functions
    assert credit.balanceOf(buyer.account.address).call() == 4 * UNIT

    # 1 kWh at 0.5 credits a kWh over an hour, from 30 minutes on (whole periods): 0.5 escrowed.
    terms = ["--price", "0.5", "--start", "+30min", "--end", "+90min"]
    done = market("buy", seller.account.address, "1kWh", *terms)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("order 1 opened") and "0.5 credits escrowed" in done.stdout
    late = market("buy", seller.account.address, "200Wh", *terms)
    assert late.returncode == 0 and late.stdout.startswith("order 2 opened"), late.stderr
    assert credit.balanceOf(buyer.account.address).call() == 4 * UNIT - 6 * UNIT // 10
    accepted = market("accept", "1", who="seller")
    assert accepted.returncode == 0, accepted.stderr

    order = Market(anvil.w3, deployed["market"]).order(1)
    t0, t1 = order.t0, order.t1
    assert t1 - t0 == HOUR_MS and t0 % PERIOD_MS == 0 and order.state_name == "accepted"

    set_time(anvil, t1 + 10_000)
    refused(market("accept", "2", who="seller"), "expired order: order 2's window began")
    # The seller's node sends its hour of periods (one transaction); the buyer's has not yet.
    exports, imports = [300, 200, 0, 400], [250, 300, 100, 600]
    seller.commit([(t0 + i * PERIOD_MS, 0, exports[i]) for i in range(4)])
    refused(market("settle", "1"), "not yet committed by the buyer")
    buyer.commit([(t0 + i * PERIOD_MS, imports[i], 0) for i in range(4)])

    settled = market("settle", "1", who="seller")
    assert settled.returncode == 0, settled.stderr
    # min(export, import) per period: 250 + 200 + 0 + 400 = 850 Wh of the 1000 ordered
    assert "850 Wh of 1000 Wh delivered" in settled.stdout
    paid = 850 * (UNIT // 2) // 1000  # floor(delivered × price / 1000): 0.425 credits

    set_time(anvil, t1 + 2 * HOUR_MS)
    refunded = market("refund", "1")
    assert refunded.returncode == 0, refunded.stderr
    assert "0.075 credits returned" in refunded.stdout
    expired = market("refund", "2", who="seller")  # anyone returns an unaccepted escrow
    assert expired.returncode == 0 and "0.1 credits returned" in expired.stdout, expired.stderr

    buyer_end, seller_end = balance("buyer"), balance("seller")
    assert int(buyer_end["balance_units"]) == 4 * UNIT - paid  # 3.575 credits
    assert buyer_end["escrowed"] == "0"
    # paid, plus the credits minted for the 900 Wh it exported: 1.325 credits
    assert int(seller_end["balance_units"]) == paid + 900 * UNIT // 1000
    final = json.loads(cli("market", "orders", *on, *keys["seller"], "--all", "--json"))
    assert [(o["id"], o["role"], o["delivered_wh"], o["state"]) for o in final] == [
        (1, "seller", 850, "closed"),
        (2, "seller", 0, "expired"),
    ]
