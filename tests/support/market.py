"""The energy market on py-evm: a ledger with registered nodes, the market beside it, commitments
signed and batched by the real ledger code, and the chain's clock moved by hand."""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from typing import Any

from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_hash.auto import keccak
from eth_tester.exceptions import TransactionFailed
from web3 import Web3
from web3.contract import Contract
from web3.exceptions import ContractCustomError, ContractLogicError
from web3.logs import DISCARD

from daisee_node.ledger import chain, merkle
from daisee_node.ledger.commitment import Commitment, sign

WH_PER_CREDIT = 1000
#: large enough for funding commitments (W): 4 GW carries 1e9 Wh in 15 minutes
CAPACITY_W = 4_000_000_000
PERIOD_MS = 900_000
GRACE_MS = 2 * 3_600_000
DISPUTE_MS = 24 * 3_600_000
LINE_SLACK_MS = 60_000
TOLERANCE_BPS = 200  # 2 %
GRID, LINE = 0, 1
#: Order.state values
OPEN, ACCEPTED, REFUSED, CANCELLED, EXPIRED, CLOSED = 1, 2, 3, 4, 5, 6
UNIT = 10**15  # credit base units minted per exported Wh (18 decimals, 1000 Wh a credit)

Row = tuple[bytes, int, int, int]


def selector(signature: str) -> str:
    """The 4-byte selector of a custom error, as hex with 0x."""
    return "0x" + keccak(signature.encode())[:4].hex()


@dataclass
class Recorded:
    """A commitment the ledger recorded, its batch proof and its readings' tree."""

    c: Commitment
    batch_proof: list[bytes]
    rows: list[Row]
    tree: list[list[bytes]]

    @property
    def args(self) -> tuple[Any, list[bytes]]:
        """(commitment tuple, batch proof): what settleGrid takes for one side."""
        return self.c.as_tuple(), self.batch_proof

    def line_proof(self, index: int) -> tuple[Any, ...]:
        """A LineProof tuple of the reading at `index` (in leaf order)."""
        return (
            self.c.as_tuple(),
            self.batch_proof,
            self.rows[index],
            merkle.proof(self.tree, index),
        )


@dataclass
class Market:
    """A ledger, its credit, a market and three funded, registered nodes."""

    w3: Web3
    gov: LocalAccount
    ledger: chain.Ledger
    credit: Contract
    market: Contract
    seller: LocalAccount
    buyer: LocalAccount
    other: LocalAccount
    prev: dict[str, tuple[int, bytes]] = field(default_factory=dict)
    gas: dict[str, int] = field(default_factory=dict)

    # -- time ----------------------------------------------------------------------------

    def now_ms(self) -> int:
        return int(self.w3.eth.get_block("latest")["timestamp"]) * 1000

    def travel_to(self, t_ms: int) -> None:
        """The next blocks are at t_ms or later (a block is mined there, so calls see it)."""
        tester = self.w3.provider.ethereum_tester  # type: ignore[attr-defined]
        target = -(-t_ms // 1000)
        if target > int(self.w3.eth.get_block("latest")["timestamp"]):
            tester.time_travel(target)
        tester.mine_blocks(1)

    # -- ledger ----------------------------------------------------------------------------

    def commit(self, *items: tuple[LocalAccount, int, int, int, int, list[Row]]) -> list[Recorded]:
        """Sign and record, in one batch, commitments (node, t0, t1, importWh, exportWh, rows)
        as each node's next seq."""
        signed, made = [], []
        for node, t0, t1, import_wh, export_wh, rows in items:
            seq, prev = self.prev.get(node.address, (0, b"\0" * 32))
            addr = bytes.fromhex(node.address[2:])
            rows = sorted(rows, key=lambda r: (r[1], r[0]))
            tree = merkle.levels([merkle.reading_leaf(addr, *r) for r in rows])
            c = Commitment(
                node.address,
                seq + 1,
                t0,
                t1,
                tree[-1][0],
                len(rows),
                import_wh,
                export_wh,
                prev,
                keccak(b"rules"),
            )
            self.prev[node.address] = (seq + 1, c.struct_hash())
            signed.append((c, sign(c, node.key, self.ledger.chain_id, self.ledger.address)))
            made.append((c, rows, tree))
        receipt = chain.send(
            self.w3, self.gov, {"to": self.ledger.address, "data": self.ledger.batch_data(signed)}
        )
        ok, rejected = self.ledger.outcome(receipt)
        assert rejected == [] and len(ok) == len(items)
        tx = bytes(receipt["transactionHash"])
        return [
            Recorded(c, self.ledger.batch_proof(tx, c.struct_hash()), rows, tree)
            for c, rows, tree in made
        ]

    def balance(self, who: LocalAccount | str) -> int:
        address = who if isinstance(who, str) else who.address
        return int(self.credit.functions.balanceOf(address).call())

    # -- market ----------------------------------------------------------------------------

    def send(self, account: LocalAccount, call: Any, label: str | None = None) -> Any:
        """Send a market call from `account`; keep its gas under `label`."""
        receipt = chain.send(
            self.w3,
            account,
            {"to": call.address, "data": call._encode_transaction_data(), "gas": 3_000_000},
        )
        if label is not None:
            self.gas[label] = int(receipt["gasUsed"])
        return receipt

    def reverts(self, account: LocalAccount | str, call: Any, error: str) -> None:
        """`call` from `account` reverts with the custom error `error` ("Name" or
        "Name(types)")."""
        sender = account if isinstance(account, str) else account.address
        want = selector(error if "(" in error else error + "()")
        try:
            call.call({"from": sender})
        except (TransactionFailed, ContractCustomError, ContractLogicError) as exc:
            got = revert_data(exc)
            assert got[:4].hex() == want[2:], f"{error} expected, reverted with 0x{got.hex()}"
            return
        raise AssertionError(f"{error} expected, the call succeeded")

    def approve(self, account: LocalAccount, amount: int) -> None:
        self.send(account, self.credit.functions.approve(self.market.address, amount))

    def open(
        self,
        buyer: LocalAccount,
        seller: LocalAccount,
        amount_wh: int,
        price: int,
        t0: int,
        t1: int,
        mode: int = GRID,
        channels: tuple[bytes, bytes] = (b"\0" * 32, b"\0" * 32),
        label: str | None = None,
    ) -> int:
        """Approve the escrow and open an order; its id."""
        self.approve(buyer, amount_wh * price // 1000)
        call = self.market.functions.open(seller.address, amount_wh, price, t0, t1, mode, *channels)
        receipt = self.send(buyer, call, label)
        (event,) = self.market.events.OrderOpened().process_receipt(receipt, errors=DISCARD)
        return int(event["args"]["id"])

    def order(self, order_id: int) -> dict[str, Any]:
        names = [o["name"] for o in _outputs(self.market, "orders")]
        return dict(zip(names, self.market.functions.orders(order_id).call(), strict=True))

    def settle_grid(
        self, order_id: int, seller: Recorded, buyer: Recorded, label: str | None = None
    ) -> Any:
        call = self.market.functions.settleGrid(order_id, *seller.args, *buyer.args)
        return self.send(self.gov, call, label)


def revert_data(exc: BaseException) -> bytes:
    """The revert data of a failed call: py-evm raises it as bytes, web3 as hex text."""
    seen: BaseException | None = exc
    while seen is not None:
        arg = seen.args[0] if seen.args else None
        if isinstance(arg, bytes):
            return arg
        if isinstance(arg, str) and arg.startswith("execution reverted: b"):
            return bytes(ast.literal_eval(arg.removeprefix("execution reverted: ")))
        data = getattr(seen, "data", None)
        if isinstance(data, str) and data.startswith("0x"):
            return bytes.fromhex(data[2:])
        seen = seen.__context__
    raise AssertionError(f"no revert data in {exc!r}")


def _outputs(contract: Contract, name: str) -> list[dict[str, Any]]:
    abi: list[dict[str, Any]] = list(contract.abi)  # type: ignore[arg-type]
    (entry,) = [e for e in abi if e.get("name") == name and e["type"] == "function"]
    return list(entry["outputs"])


def deploy_market(
    w3: Web3,
    gov: LocalAccount,
    ledger_address: str,
    grace_ms: int = GRACE_MS,
    dispute_ms: int = DISPUTE_MS,
    line_slack_ms: int = LINE_SLACK_MS,
    tolerance_bps: int = TOLERANCE_BPS,
) -> Contract:
    art = chain.artifact("EnergyMarket")
    args = w3.codec.encode(
        ["address", "uint64", "uint64", "uint64", "uint16"],
        [ledger_address, grace_ms, dispute_ms, line_slack_ms, tolerance_bps],
    )
    receipt = chain.send(w3, gov, {"data": art["bytecode"] + args.hex()})
    return w3.eth.contract(address=receipt["contractAddress"], abi=art["abi"])


def new_market(fund_wh: int = 10_000_000, **params: int) -> Market:
    """A fresh chain: ledger, market, seller / buyer / other nodes registered, funded with gas,
    and each holding `fund_wh` Wh worth of credits, minted by a committed export long before
    any window the tests use."""
    w3 = chain.connect(chain.EMBEDDED)
    gov = Account.from_key(chain.TESTER_KEYS[0])
    ledger = chain.Ledger(w3, chain.deploy(w3, gov, None, WH_PER_CREDIT))
    market = deploy_market(w3, gov, ledger.address, **params)
    nodes = [Account.create() for _ in range(3)]
    for node in nodes:
        ledger.set_node(gov, node.address, capacity_w=CAPACITY_W)
        chain.fund(w3, gov, node.address, 10**19)
    m = Market(w3, gov, ledger, ledger.credit(), market, *nodes)
    m.commit(*[(node, 0, PERIOD_MS, 0, fund_wh, []) for node in nodes])
    return m


def window_start(m: Market, hours_ahead: int = 2) -> int:
    """A period boundary (ms) some hours after the chain's clock."""
    return (m.now_ms() + hours_ahead * 3_600_000) // PERIOD_MS * PERIOD_MS
