"""What `community allocate | bill` writes: the allocation-key CSV operators send to the grid
operator, one 15-minute CSV per member, a readable statement per member (self-contained HTML),
and the digest that lets two readers see at a glance that they computed the same thing.

Columns are documented in docs/community.md. CSV files are UTF-8, comma-separated, one header
line, `\\n` line ends, Wh as integers, times in UTC.
"""

from __future__ import annotations

import hashlib
import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import ROUND_FLOOR, Decimal
from pathlib import Path
from typing import IO

from daisee_node.community.billing import (
    Bill,
    CommunityData,
    MemberMonth,
    PeriodResult,
    credits_text,
    kwh_text,
    utc_text,
)

KEYS_HEADER = "timestamp,member,share,status\n"
MEMBER_HEADER = (
    "timestamp,consumption_wh,allocated_wh,p2p_bought_wh,grid_import_wh,"
    "production_wh,p2p_sold_wh,surplus_wh,status\n"
)
#: decimals of a share in the keys CSV (rounded down, so shares never add up to more than 1)
SHARE_DECIMALS = 6
_SHARE_STEP = Decimal(1).scaleb(-SHARE_DECIMALS)


def share_text(local_wh: int, production_wh: int) -> str:
    """A member's share of the period's production, `local_wh / production_wh`, rounded down."""
    if production_wh <= 0 or local_wh <= 0:
        return "0"
    value = (Decimal(local_wh) / Decimal(production_wh)).quantize(_SHARE_STEP, ROUND_FLOOR)
    return format(value.normalize(), "f")


@dataclass
class PeriodWriter:
    """Receives each period's result (`monthly(…, sink=writer)`): writes the CSV files asked
    for and the digest of every member-period."""

    data: CommunityData
    keys_csv: IO[str] | None = None
    member_csv: dict[int, IO[str]] = field(default_factory=dict)
    rows: list[str] | None = None
    _digest: hashlib._Hash = field(default_factory=hashlib.sha256)

    def __post_init__(self) -> None:
        if self.keys_csv is not None:
            self.keys_csv.write(KEYS_HEADER)
        for out in self.member_csv.values():
            out.write(MEMBER_HEADER)

    def __call__(self, r: PeriodResult) -> None:
        a = r.allocation
        stamp = utc_text(r.t0)
        total_production = sum(a.production)
        names = self.data.names
        for i, member in enumerate(a.members):
            status = r.status(i)
            missing = status == "missing"
            values = (
                a.consumption[i],
                a.allocated[i],
                a.p2p_bought[i],
                a.grid_import[i],
                a.production[i],
                a.p2p_sold[i],
                a.surplus[i],
            )
            figures = ",".join("" if missing else str(v) for v in values)
            line = f"{stamp},{figures},{status}\n"
            self._digest.update(f"{member},{line}".encode())
            if self.rows is not None:
                self.rows.append(f"{stamp},{names.get(member, member)},{figures},{status}")
            out = self.member_csv.get(i)
            if out is not None:
                out.write(line)
            if self.keys_csv is not None:
                share = (
                    ""
                    if missing
                    else share_text(a.allocated[i] + a.p2p_bought[i], total_production)
                )
                self.keys_csv.write(f"{stamp},{names.get(member, member)},{share},{status}\n")

    def digest(self) -> str:
        """sha256 over every member-period line (member address, then its 15-minute CSV line),
        members in address order, periods in time order."""
        return "0x" + self._digest.hexdigest()


# -- the statement (HTML) ------------------------------------------------------------------------

_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:2em auto;max-width:52em;
color:#222;line-height:1.4;padding:0 1em}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid
#ccc}table{border-collapse:collapse;width:100%;margin:.5em 0}th,td{padding:.25em .5em;
text-align:left;border-bottom:1px solid #eee}td.n,th.n{text-align:right;
font-variant-numeric:tabular-nums}tr.total td{font-weight:bold;border-top:2px solid #222}
.warn{background:#fff4d6;border-left:4px solid #e0a800;padding:.5em 1em}
.small{font-size:.85em;color:#555}code{font-size:.9em;word-break:break-all}
"""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


@dataclass(frozen=True)
class Provenance:
    """Where the figures come from: what a reader needs to recompute them."""

    chain_id: int
    block: int
    ledger: str
    registry: str
    market: str | None
    keys: Sequence[tuple[str, str, str]]  # (from, hash, file)
    tariff: str
    digest: str
    range_text: str


def statement_html(
    name: str, address: str, bills: Sequence[Bill], prov: Provenance, community: str = ""
) -> str:
    """One member's statement over the range: a section per month (its bill and energy
    figures), the periods missing, and how to check every number against the chain."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>Statement of {_e(name)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>Statement of {_e(name)}</h1>",
        f'<p class="small">{_e(community) + " · " if community else ""}node '
        f"<code>{_e(address)}</code> · {_e(prov.range_text)}</p>",
    ]
    for b in bills:
        acc = b.account
        parts.append(f"<h2>{_e(acc.month)}</h2>")
        if acc.missing or acc.partial or acc.no_key or acc.nonconforming:
            warn = []
            if acc.missing:
                warn.append(
                    f"{acc.missing} of {acc.periods} periods have no commitment from this node: "
                    "they count 0 Wh here, nothing was estimated"
                )
            if acc.partial:
                warn.append(f"{_count(acc.partial, 'period')} only partly committed")
            if acc.nonconforming:
                warn.append(
                    f"{_count(acc.nonconforming, 'period')} failed the conformity report this "
                    "node signed: their figures are the committed ones, to be checked"
                )
            if acc.no_key:
                warn.append(
                    f"{_count(acc.no_key, 'period')} without a recorded key: nothing allocated"
                )
            parts.append(f'<p class="warn">{_e("; ".join(warn))}.</p>')
        parts.append(
            '<table><tr><th>Line</th><th class="n">Quantity</th>'
            '<th class="n">Price</th><th class="n">Amount</th></tr>'
        )
        for line in b.lines:
            amount = "—" if line.amount is None else f"{line.amount} {b.currency}"
            parts.append(
                f"<tr><td>{_e(line.label)}</td><td class=n>{_e(line.quantity)}</td>"
                f"<td class=n>{_e(line.price)}</td><td class=n>{_e(amount)}</td></tr>"
            )
        parts.append(
            f'<tr class="total"><td>Total (positive: you pay)</td><td></td><td></td>'
            f"<td class=n>{_e(b.total)} {_e(b.currency)}</td></tr></table>"
        )
        parts.append(_energy_table(acc))
        if acc.missing_starts:
            shown = ", ".join(utc_text(t) for t in acc.missing_starts[:48])
            more = len(acc.missing_starts) - 48
            tail = f" and {more} more" if more > 0 else ""
            parts.append(f'<p class="small">Periods without a commitment: {_e(shown + tail)}</p>')
        if acc.nonconforming_starts:
            shown = ", ".join(utc_text(t) for t in acc.nonconforming_starts[:48])
            more = len(acc.nonconforming_starts) - 48
            tail = f" and {more} more" if more > 0 else ""
            parts.append(
                f'<p class="small">Periods whose conformity report failed: {_e(shown + tail)}</p>'
            )
    keys = (
        "".join(
            f"<li>from {_e(start)}: <code>{_e(h)}</code> ({_e(f)})</li>"
            for start, h, f in prov.keys
        )
        or "<li>none recorded for this range</li>"
    )
    parts.append(
        "<h2>Where these figures come from</h2>"
        f"<p>Every figure is computed from the chain alone (chain id {prov.chain_id}, as of "
        f"block {prov.block}): the committed period totals of every member's node in the ledger "
        f"<code>{_e(prov.ledger)}</code>, the allocation keys recorded in the registry "
        f"<code>{_e(prov.registry)}</code>"
        + (
            f", peer-to-peer settlements of the market <code>{_e(prov.market)}</code>"
            if prov.market
            else ""
        )
        + f", and the tariff <code>{_e(prov.tariff)}</code>.</p><p>Keys applied:</p>"
        f"<ul>{keys}</ul><p>Anyone recomputes them with <code>daisee-node community bill</code> "
        "and the same files and block; the allocation's digest must then be "
        f"<code>{_e(prov.digest)}</code>.</p></body></html>"
    )
    return "\n".join(parts) + "\n"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _energy_table(acc: MemberMonth) -> str:
    rows = [
        ("Consumption (committed import)", kwh_text(acc.consumption)),
        ("Local energy allocated by the key", kwh_text(acc.allocated)),
        ("Bought peer to peer (through the grid)", kwh_text(acc.p2p_bought)),
        ("Imported from the grid supplier", kwh_text(acc.grid_import)),
        ("Production (committed export)", kwh_text(acc.production)),
        ("Sold peer to peer (through the grid)", kwh_text(acc.p2p_sold)),
        ("Production allocated to members", kwh_text(acc.supplied)),
        ("Surplus", kwh_text(acc.surplus)),
    ]
    if acc.credits_earned is not None:
        rows.append(("Energy credits minted for your export", credits_text(acc.credits_earned)))
    body = "".join(f"<tr><td>{_e(a)}</td><td class=n>{_e(b)}</td></tr>" for a, b in rows)
    return f'<table><tr><th>Energy</th><th class="n">This month</th></tr>{body}</table>'


def safe_file_name(name: str) -> str:
    """A member name as a file name (names are letters, digits and _.:-; ':' is not portable)."""
    return name.replace(":", "_")


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(exist_ok=True)  # its own folder only: never a tree from a mistyped path
    path.write_text(text, encoding="utf-8")
