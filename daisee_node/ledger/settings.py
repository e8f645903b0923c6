"""`[chain]`: where the node commits its periods, with which key, how often."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from daisee_node.models import NAME_PATTERN, StrictModel, not_empty_path

ADDRESS_PATTERN = r"^0x[0-9a-fA-F]{40}$"
#: geth takes the network id as a 64-bit number, and SQLite keeps signed 64-bit integers
MAX_CHAIN_ID = 2**63 - 1
#: credits per kWh; far above any real price, far below the market's uint128 in base units
MAX_PRICE = 1_000_000.0


def http_url_problem(url: str) -> str | None:
    """Why `url` is not an http(s) URL of a host a node could reach, or None."""
    if any(c.isspace() for c in url):
        return "a URL has no spaces"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        return "use an http(s):// JSON-RPC URL"
    try:
        parts.port  # noqa: B018 (raises on a port that is not a number from 0 to 65535)
    except ValueError:
        return "the port is not a number from 1 to 65535"
    if not parts.hostname:
        return "the URL names no host, e.g. http://10.0.0.2:8545"
    return None


def _http_url(url: str) -> str:
    problem = http_url_problem(url)
    if problem is not None:
        raise PydanticCustomError("http_url", problem)
    return url


class ChainSection(StrictModel):
    """`[chain]`: the PoA chain, the ledger contract and the node key."""

    rpc_url: str = Field(
        description="JSON-RPC URL of a chain node, or 'embedded' for an in-process chain"
    )
    rpc_fallback_urls: list[Annotated[str, AfterValidator(_http_url)]] = Field(
        default_factory=list,
        description=(
            "other chain nodes' JSON-RPC URLs (the community's other signers or followers), "
            "used in this order while the node at rpc_url does not answer; the node goes back "
            "to rpc_url once it answers and has caught up"
        ),
    )
    ledger_address: str | None = Field(
        None, pattern=ADDRESS_PATTERN, description="the deployed ledger (not for 'embedded')"
    )
    chain_id: int | None = Field(
        None,
        ge=1,
        le=MAX_CHAIN_ID,
        description="lets the node seal before it has ever reached the chain",
    )
    keystore: Path | None = Field(None, description="default: <data_dir>/node-key.json")
    password_file: Path | None = Field(None, description="default: <data_dir>/node-key.pass")
    period_s: int = Field(900, ge=10, le=86_400, description="settlement period")
    seal_delay_s: float = Field(
        10.0, ge=0, le=3600, description="a period is sealed this long after it ends"
    )
    import_channel: str | None = Field(None, description="cumulative Wh imported, for totals")
    export_channel: str | None = Field(None, description="cumulative Wh exported (credits)")
    capacity_w: int = Field(
        36_000,
        gt=0,
        le=2**32 - 1,
        description=(
            "the most power (W) this node's connection can import or export; no period total "
            "claims more than capacity_w × period (default 36,000 W: the largest French "
            "household connection). Governance registers the same figure on chain, where a "
            "commitment claiming more is refused"
        ),
    )
    submit: bool = Field(True, description="false: sign and publish only, for a relay to submit")
    relay_peers: bool = Field(False, description="also submit peers' signed commitments")
    submit_interval_s: float = Field(
        3600.0,
        gt=0,
        le=86_400,
        description=(
            "own commitments wait until together they cover this long, or until the oldest "
            "period ended this long ago, and then share one transaction (default: an hour, "
            "four 15-minute periods a transaction, under 5 gas a reading); the first batch "
            "after a start, and commitments sent before, go at once"
        ),
    )
    batch_max: int = Field(100, ge=1, le=2_000)
    confirmations: int = Field(2, ge=0, le=1_000)
    stuck_after_s: float = Field(120.0, gt=0, le=86_400, description="then resend with a fee bump")
    fee_bump: float = Field(1.25, ge=1.1, le=10.0)
    retry_max_s: float = Field(60.0, gt=0, le=3_600, description="longest wait between retries")
    rpc_timeout_s: float = Field(10.0, gt=0, le=600)

    _not_empty = field_validator("keystore", "password_file", mode="before")(not_empty_path)

    @field_validator("rpc_fallback_urls")
    @classmethod
    def _fallbacks_need_a_node(cls, urls: list[str], info: ValidationInfo) -> list[str]:
        if urls and info.data.get("rpc_url") == "embedded":
            raise PydanticCustomError("embedded_fallbacks", "an embedded chain has no other node")
        return urls

    def keystore_path(self, data_dir: Path) -> Path:
        return self.keystore or data_dir / "node-key.json"

    def password_path(self, data_dir: Path) -> Path:
        return self.password_file or data_dir / "node-key.pass"


class BuyEntry(StrictModel):
    """`[[market.buy]]`: an order the node opens by itself while `when` holds."""

    name: str = Field(pattern=NAME_PATTERN, description="names the entry in logs and status")
    when: str = Field(description="a condition over the node's inputs, as in rules")
    seller: str = Field(description="the [[peers]] id of the seller")
    amount_wh: int = Field(gt=0, le=10_000_000)
    max_price: float = Field(
        gt=0, le=MAX_PRICE, description="the price offered, in credits per kWh"
    )
    window_min: float = Field(gt=0, le=7 * 24 * 60, description="the delivery window's length")
    lead_s: float = Field(
        60.0,
        ge=0,
        le=86_400,
        description="the window starts at the first period boundary this long after the order "
        "is opened (the seller's node needs a few blocks to accept)",
    )
    mode: Literal["grid", "line"] = Field(
        "grid",
        description="'grid': delivered through the shared grid, matched from both nodes' "
        "committed totals; 'line': over the direct line, metered at both ends on the line's "
        "counter (needs market.line_meter)",
    )
    seller_line_meter: str | None = Field(
        None,
        description="'line' orders: the line's counter at the seller's end (default: the same "
        "name as this node's market.line_meter)",
    )


class MarketSection(StrictModel):
    """`[market]`: the energy market contract the node buys and sells on (needs `[chain]`)."""

    address: str = Field(pattern=ADDRESS_PATTERN, description="the deployed EnergyMarket")
    from_block: int = Field(
        0,
        ge=0,
        le=2**63 - 1,
        description="the block the market (or the ledger) was deployed in: logs are read from "
        "there, so long chains are not searched from the start",
    )
    accept_from: list[str] = Field(
        default_factory=list,
        description="the buyers this node sells to: [[peers]] ids or addresses (empty: nobody, "
        "so every order is refused)",
    )
    min_price: float = Field(
        0.0, ge=0, le=MAX_PRICE, description="the lowest price accepted, in credits per kWh"
    )
    keep_battery_above_pct: float | None = Field(
        None, ge=0, le=100, description="refuse orders while the battery is below this level"
    )
    battery_channel: str | None = Field(
        None, description="the battery's state of charge in %, e.g. 'battery.soc_pct'"
    )
    max_wh_per_day: int | None = Field(
        None,
        gt=0,
        le=10**12,
        description="the most Wh accepted for delivery windows starting on one day",
    )
    seller_meter: str | None = Field(
        None, description="the counter that meters what this node sells, e.g. 'grid.export_wh'"
    )
    buyer_meter: str | None = Field(
        None, description="the counter that meters what this node buys, e.g. 'grid.import_wh'"
    )
    line_meter: str | None = Field(
        None,
        description="the counter (Wh) of the direct line to the neighbours, e.g. "
        "'line.energy_wh': LINE orders name it at this node's end; the node meters them on it, "
        "anchors and settles them with proofs of its readings",
    )
    poll_s: float = Field(1.0, gt=0, le=60, description="how often the market's events are read")
    heartbeat_s: float = Field(
        10.0, gt=0, le=3600, description="a peer silent this long pauses its orders' flow"
    )
    buy: list[BuyEntry] = Field(
        default_factory=list, description="[[market.buy]]: orders the node places by itself"
    )
