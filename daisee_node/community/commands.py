"""`daisee-node community …`: the community's allocation and bills, from the chain alone.

`allocate` and `bill` read the members' committed period totals, the market's settlements and
the keys the registry records (an RPC URL and three addresses: any node, or an auditor with no
node), check each key file given against the hash recorded for it, and print the same result
wherever they run, with a digest to compare. `key record | show` and `deploy` are governance's.
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import ExitStack
from dataclasses import asdict
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daisee_node.errors import DaiseeError
from daisee_node.ledger.cli_errors import chain_errors

if TYPE_CHECKING:
    from daisee_node.community.billing import Bill, CommunityData, KeyInForce, MemberMonth
    from daisee_node.community.chaindata import ChainRead
    from daisee_node.community.files import MembersFile, Tariff
    from daisee_node.community.registry import KeyRecord

EXIT_OK = 0
DEFAULT_PERIOD_S = 900


def add_parsers(sub: Any) -> None:
    """Register `community` and its actions on the main parser's subparsers."""
    community = sub.add_parser(
        "community",
        help="the community's allocation of local energy and its bills, from the chain alone",
        description="Allocate the community's local production period by period with the key "
        "governance recorded, and bill each member, from the members' committed period totals "
        "on the chain: any node, or an auditor with no node, gets the same figures.",
    )
    actions = community.add_subparsers(title="actions", metavar="ACTION", required=True)

    def chain_options(p: argparse.ArgumentParser, *, registry: bool = True) -> None:
        p.add_argument(
            "-c",
            "--config",
            type=Path,
            default=None,
            help="take --rpc and --ledger from this node config's [chain] section",
        )
        p.add_argument("--rpc", default=None, help="JSON-RPC URL of a node of the chain")
        p.add_argument("--ledger", default=None, help="the ledger's address")
        if registry:
            p.add_argument("--registry", required=True, help="the community registry's address")

    def accounts(name: str, help_text: str, func: Any) -> argparse.ArgumentParser:
        p = actions.add_parser(name, help=help_text, description=help_text)
        chain_options(p)
        p.add_argument("--members", type=Path, required=True, help="members file (TOML)")
        p.add_argument(
            "--key",
            type=Path,
            action="append",
            default=[],
            help="an allocation key file; give the file of every key recorded for the range "
            "(repeatable); one whose hash the registry does not record is refused",
        )
        p.add_argument(
            "--market",
            default=None,
            help="the energy market's address: its "
            "settlements are peer-to-peer purchases and sales",
        )
        p.add_argument(
            "--from",
            dest="start",
            default=None,
            help="first instant: ISO time with zone, a date (UTC) or ms",
        )
        p.add_argument("--to", dest="end", default=None, help="end (excluded), as --from")
        p.add_argument(
            "--period-s",
            type=int,
            default=DEFAULT_PERIOD_S,
            help=f"the community's settlement period (default {DEFAULT_PERIOD_S})",
        )
        p.add_argument("--from-block", type=int, default=0, help="first block to read events from")
        p.add_argument(
            "--block",
            type=int,
            default=None,
            help="read as of this block "
            "(default: the latest; give the same one to compare results)",
        )
        p.add_argument(
            "--keys-csv",
            type=Path,
            default=None,
            help="write the allocation keys (timestamp, member, share) here",
        )
        p.add_argument(
            "--periods-csv",
            type=Path,
            default=None,
            metavar="DIR",
            help="write each member's period CSV here (DIR/<member>.csv)",
        )
        p.add_argument(
            "--reports",
            type=Path,
            default=None,
            metavar="DIR",
            help="conformity report proofs (`conformity --prove` files, *.json): each is "
            "checked against the chain, and the member-periods of a failed one are flagged",
        )
        p.add_argument("--json", action="store_true", help="JSON instead of text")
        p.set_defaults(func=chain_errors(func))
        return p

    accounts(
        "allocate",
        "per period and member: consumption, local energy allocated, grid import, surplus",
        cmd_allocate,
    )
    bill = accounts("bill", "each member's monthly bill, from a tariff file", cmd_bill)
    bill.add_argument("--tariff", type=Path, required=True, help="tariff file (TOML)")
    bill.add_argument(
        "--month",
        default=None,
        help="one month, YYYY-MM in the tariff's time zone (instead of --from/--to)",
    )
    bill.add_argument(
        "--html",
        type=Path,
        default=None,
        metavar="DIR",
        help="write each member's statement here (DIR/<member>.html)",
    )
    bill.add_argument("--member", default=None, help="only this member (name or address)")

    deploy = actions.add_parser("deploy", help="deploy the community registry beside a ledger")
    chain_options(deploy, registry=False)
    _key_options(deploy)
    deploy.set_defaults(func=chain_errors(cmd_deploy))

    key = actions.add_parser("key", help="allocation keys recorded on chain (governance)")
    key_actions = key.add_subparsers(title="actions", metavar="ACTION", required=True)
    record = key_actions.add_parser(
        "record",
        help="record a key file's hash and the first period it applies to (governance)",
        description="Record the sha256 of a key file's canonical form with the start of the "
        "first period it applies to; it applies until the next key's start.",
    )
    record.add_argument("file", type=Path, help="the key file")
    chain_options(record)
    _key_options(record)
    record.add_argument(
        "--from",
        dest="start",
        default=None,
        help="start of the first period "
        "(ISO time with zone, date or ms; default: the next period's start)",
    )
    record.add_argument("--period-s", type=int, default=DEFAULT_PERIOD_S)
    record.add_argument(
        "--members",
        type=Path,
        default=None,
        help="check first that the key names only these members",
    )
    record.set_defaults(func=chain_errors(cmd_key_record))
    show = key_actions.add_parser("show", help="the recorded keys, and which file is which")
    chain_options(show)
    show.add_argument("--key", type=Path, action="append", default=[], help="key files to match")
    show.add_argument("--at", default=None, help="only the key that applies at this time")
    show.add_argument("--json", action="store_true", help="JSON instead of text")
    show.set_defaults(func=chain_errors(cmd_key_show))


def _key_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--keystore", type=Path, default=None, help="the governance account's keystore")
    p.add_argument("--password-file", type=Path, default=None)


# -- inputs ----------------------------------------------------------------------------------------


def parse_time(text: str, what: str) -> int:
    """ms since the epoch, an ISO 8601 time with its zone, or a date (its midnight, UTC)."""
    text = text.strip()
    if text.isdigit():
        return int(text)
    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            return int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp() * 1000)
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise DaiseeError(
            f"{what} {text!r}: give an ISO time with its zone (2026-11-01T00:00:00Z), a date "
            "(2026-11-01) or ms since the epoch"
        ) from None
    if when.tzinfo is None:
        raise DaiseeError(f"{what} {text!r}: give a time zone (e.g. 'Z' or '+01:00')")
    return int(when.timestamp() * 1000)


def _month_range(text: str, tariff: Tariff) -> tuple[int, int]:
    try:
        year, month = (int(part) for part in text.split("-"))
        start = datetime(year, month, 1, tzinfo=tariff.zone)
    except ValueError:
        raise DaiseeError(f"--month {text!r}: give a month as YYYY-MM") from None
    year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    end = datetime(year, month, 1, tzinfo=tariff.zone)
    return int(start.timestamp() * 1000), int(end.timestamp() * 1000)


def _chain_of(args: argparse.Namespace) -> tuple[str, str | None]:
    rpc, ledger = args.rpc, args.ledger
    if args.config is not None:
        from daisee_node.config import load_config

        config = load_config(args.config)
        if config.chain is None:
            raise DaiseeError(f"{args.config} has no [chain] section")
        rpc = rpc or config.chain.rpc_url
        ledger = ledger or config.chain.ledger_address
    if rpc is None:
        raise DaiseeError("give --rpc URL (or -c CONFIG with a [chain] section)")
    return rpc, ledger


def _address(text: str | None, what: str) -> str:
    from eth_utils import is_address, to_checksum_address

    if text is None:
        raise DaiseeError(f"give {what} ADDRESS")
    if not is_address(text.strip()):
        raise DaiseeError(f"{what} {text!r} is not an address (0x and 40 hex digits)")
    return to_checksum_address(text.strip())


def _account(args: argparse.Namespace) -> Any:
    from daisee_node.ledger.keys import load_account

    keystore = args.keystore
    if keystore is None and args.config is not None:
        from daisee_node.config import load_config

        config = load_config(args.config)
        if config.chain is not None:
            keystore = config.chain.keystore_path(config.data_dir)
            password = args.password_file or config.chain.password_path(config.data_dir)
            return load_account(keystore, password)
    if keystore is None:
        raise DaiseeError("give --keystore (the governance account's) and --password-file")
    return load_account(keystore, args.password_file or keystore.with_suffix(".pass"))


def keys_in_force(
    records: list[KeyRecord],
    files: list[Path],
    members: MembersFile,
    starts: list[int],
) -> list[KeyInForce]:
    """The recorded keys the range needs, each with the file whose hash it records (translated
    to member addresses). A file whose hash the registry does not record, or a needed record
    with no file, is refused."""
    from daisee_node.community.billing import KeyInForce, translate_key, utc_text
    from daisee_node.community.keys import key_hash, load_key

    by_hash: dict[str, tuple[Path, Any]] = {}
    recorded = {r.key_hash for r in records}
    for path in files:
        key = load_key(path)
        digest = key_hash(key)
        if digest not in recorded:
            listed = ", ".join(f"{r.key_hash} from {utc_text(r.from_ms)}" for r in records)
            raise DaiseeError(
                f"key file {path}: its hash {digest} is not one the registry records "
                f"({listed or 'no key recorded yet'}); it is not the file governance recorded"
            )
        by_hash[digest] = (path, key)
    if not starts:
        return []
    first, end = starts[0], starts[-1] + 1
    needed = [
        r
        for i, r in enumerate(records)
        if r.from_ms < end and (i + 1 == len(records) or records[i + 1].from_ms > first)
    ]
    out = []
    for r in needed:
        if r.key_hash not in by_hash:
            raise DaiseeError(
                f"the key recorded from {utc_text(r.from_ms)} (hash {r.key_hash}) applies to this "
                "range: give its file with --key FILE"
            )
        path, key = by_hash[r.key_hash]
        translated = translate_key(key, members.address_of, str(path))
        out.append(KeyInForce(r.from_ms, r.key_hash, translated, str(path)))
    return out


def _range(args: argparse.Namespace, tariff: Tariff | None = None) -> tuple[int, int]:
    if getattr(args, "month", None):
        if args.start or args.end:
            raise DaiseeError("give --month or --from/--to, not both")
        assert tariff is not None
        return _month_range(args.month, tariff)
    if not args.start or not args.end:
        raise DaiseeError("give the range: --from and --to" + (" (or --month)" if tariff else ""))
    t_from, t_to = parse_time(args.start, "--from"), parse_time(args.end, "--to")
    if t_to <= t_from:
        raise DaiseeError("--to must come after --from")
    return t_from, t_to


def _prepare(
    args: argparse.Namespace, tariff: Tariff | None = None
) -> tuple[CommunityData, ChainRead, MembersFile]:
    """Check the files, read the chain, lay the data out."""
    from daisee_node.community import chaindata
    from daisee_node.community.billing import gather, period_range
    from daisee_node.community.files import load_members
    from daisee_node.community.keys import load_key

    members = load_members(args.members)
    for path in args.key:  # a file that cannot be read is said before the chain is asked
        load_key(path)
    if args.period_s <= 0:
        raise DaiseeError("--period-s must be at least 1")
    t_from, t_to = _range(args, tariff)
    starts = period_range(t_from, t_to, args.period_s * 1000)
    if len(starts) > 200_000:
        raise DaiseeError(f"the range holds {len(starts)} periods; give at most 200,000")
    rpc, ledger = _chain_of(args)
    read = chaindata.read_all(
        rpc,
        _address(ledger, "--ledger"),
        _address(args.registry, "--registry"),
        members.members,
        market_address=_address(args.market, "--market") if args.market else None,
        from_block=args.from_block,
        block=args.block,
    )
    keys = keys_in_force(read.keys, args.key, members, starts)
    data = gather(
        list(members.members),
        members.members,
        args.period_s * 1000,
        starts,
        read.commitments,
        read.settlements,
        keys,
    )
    data.wh_per_credit = read.wh_per_credit
    if args.reports is not None:
        _flag_nonconforming(args.reports, rpc, data)
    data.credit_decimals = read.credit_decimals
    if read.unreadable:
        shown = ", ".join(f"{n} seq {s}" for n, s in read.unreadable[:5])
        print(
            f"note: {len(read.unreadable)} commitments' totals are not readable from their "
            f"transactions (sent through another contract): {shown}; those periods show as "
            "missing",
            file=sys.stderr,
        )
    return data, read, members


def _flag_nonconforming(folder: Path, rpc: str, data: CommunityData) -> None:
    """Check each conformity report proof in `folder` against the chain; flag the member-periods
    of those that prove and failed. One that does not prove is said and left out."""
    from daisee_node.community.billing import flag_failed
    from daisee_node.ledger.proofs import check_proof, parse_proof

    if not folder.is_dir():
        raise DaiseeError(f"--reports: {folder} is not a folder")
    failed, proven, refused = [], 0, []
    for path in sorted(folder.glob("*.json")):
        try:
            proof = parse_proof(path.read_text())
            report = proof.data.get("report")
            if not isinstance(report, dict):
                raise DaiseeError("not a conformity report proof")
            checked = check_proof(proof, rpc)
        except (DaiseeError, OSError) as exc:
            refused.append(f"{path.name}: {exc}")
            continue
        if not checked["valid"]:
            refused.append(f"{path.name}: {'; '.join(checked['problems'])}")
            continue
        proven += 1
        if not report.get("passed", False):
            c = proof.commitment
            failed.append((c.node, c.t0, c.t1))
    marked = flag_failed(data, failed)
    print(
        f"conformity: {proven} reports proven against the chain, {len(failed)} failed "
        f"({marked} member-periods flagged nonconforming)",
        file=sys.stderr,
    )
    for line in refused:
        print(f"conformity report left out, {line}", file=sys.stderr)


def _writer(args: argparse.Namespace, data: CommunityData, stack: ExitStack, rows: bool) -> Any:
    from daisee_node.community.outputs import PeriodWriter, safe_file_name

    keys_csv = None
    if args.keys_csv is not None:
        args.keys_csv.parent.mkdir(parents=True, exist_ok=True)
        keys_csv = stack.enter_context(args.keys_csv.open("w", encoding="utf-8", newline=""))
    member_csv = {}
    if args.periods_csv is not None:
        args.periods_csv.mkdir(parents=True, exist_ok=True)
        for i, m in enumerate(data.members):
            path = args.periods_csv / f"{safe_file_name(data.names.get(m, m))}.csv"
            member_csv[i] = stack.enter_context(path.open("w", encoding="utf-8", newline=""))
    return PeriodWriter(data, keys_csv, member_csv, [] if rows else None)


def _header(read: ChainRead, data: CommunityData, keys: list[KeyInForce]) -> dict[str, Any]:
    from daisee_node.community.billing import utc_text

    return {
        "chain_id": read.chain_id,
        "block": read.block,
        "ledger": read.ledger,
        "registry": read.registry,
        "market": read.market,
        "from": utc_text(data.starts[0]) if data.starts else None,
        "to": utc_text(data.starts[-1] + data.period_ms) if data.starts else None,
        "period_s": data.period_ms // 1000,
        "members": len(data.members),
        "keys": [{"from": utc_text(k.from_ms), "hash": k.key_hash, "file": k.source} for k in keys],
        "misaligned": [{"node": n, "t0": t0, "t1": t1} for n, t0, t1 in data.misaligned],
    }


def _print_header(head: dict[str, Any]) -> None:
    print(
        f"chain {head['chain_id']} at block {head['block']}; ledger {head['ledger']}; "
        f"registry {head['registry']}" + (f"; market {head['market']}" if head["market"] else "")
    )
    print(
        f"{head['members']} members, periods of {head['period_s']} s from {head['from']} to "
        f"{head['to']}"
    )
    for k in head["keys"] or [{"from": "-", "hash": "none recorded", "file": "-"}]:
        print(f"key from {k['from']}: {k['hash']} ({k['file']})")
    for m in head["misaligned"]:
        print(
            f"note: commitment of {m['node']} over [{m['t0']}, {m['t1']}) spans two periods: "
            "not used"
        )


# -- allocate / bill -----------------------------------------------------------------------------


class _Checked:
    """A period sink that also runs the community checks on each period's allocation
    (allocations sum to production, nobody beyond its consumption) before passing it on."""

    def __init__(self, sink: Any) -> None:
        from daisee_node.conformity import check_allocation

        self.sink = sink
        self.check = check_allocation
        self.periods = 0
        self.failed: list[str] = []

    def __call__(self, result: Any) -> None:
        self.periods += 1
        verdict = self.check(result.allocation)
        if not verdict.passed:
            from daisee_node.community.billing import utc_text

            self.failed.append(f"{utc_text(result.t0)}: {'; '.join(verdict.reasons)}")
        self.sink(result)

    def report(self) -> None:
        """One line on stderr: how many periods passed the community checks, and any that
        did not (which would be a fault of this program: say so loudly)."""
        if not self.failed:
            print(f"community checks: {self.periods} periods, all passed", file=sys.stderr)
            return
        print(f"community checks FAILED in {len(self.failed)} periods:", file=sys.stderr)
        for line in self.failed[:20]:
            print(f"  {line}", file=sys.stderr)


def cmd_allocate(args: argparse.Namespace) -> int:
    from daisee_node.community.billing import monthly

    data, read, _ = _prepare(args)
    with ExitStack() as stack:
        writer = _writer(args, data, stack, rows=True)
        checks = _Checked(writer)
        months = monthly(data, sink=checks)
    checks.report()
    head = _header(read, data, data.keys)
    head["digest"] = writer.digest()
    totals = _totals(months)
    missing = sum(acc["missing"] for acc in totals.values())
    if args.json:
        head["periods"] = [_row_json(row) for row in writer.rows]
        head["totals"] = totals
        print(json.dumps(head))
        return EXIT_OK
    _print_header(head)
    print(
        "timestamp,member,consumption_wh,allocated_wh,p2p_bought_wh,grid_import_wh,"
        "production_wh,p2p_sold_wh,surplus_wh,status"
    )
    for row in writer.rows:
        print(row)
    print("totals (Wh): member consumption allocated grid_import production surplus missing")
    for name, acc in totals.items():
        print(
            f"  {name} {acc['consumption']} {acc['allocated']} {acc['grid_import']} "
            f"{acc['production']} {acc['surplus']} {acc['missing']}"
        )
    print(f"member-periods without a commitment: {missing}")
    print(f"digest {head['digest']}")
    return EXIT_OK


_ROW_FIELDS = (
    "consumption_wh",
    "allocated_wh",
    "p2p_bought_wh",
    "grid_import_wh",
    "production_wh",
    "p2p_sold_wh",
    "surplus_wh",
)


def _row_json(row: str) -> dict[str, Any]:
    stamp, member, *values, status = row.split(",")
    out: dict[str, Any] = {"timestamp": stamp, "member": member, "status": status}
    for name, value in zip(_ROW_FIELDS, values, strict=True):
        out[name] = int(value) if value else None
    return out


def _totals(months: dict[str, list[MemberMonth]]) -> dict[str, dict[str, int]]:
    totals: dict[str, dict[str, int]] = {}
    for accounts in months.values():
        for acc in accounts:
            t = totals.setdefault(
                acc.name,
                dict.fromkeys(
                    (
                        "consumption",
                        "allocated",
                        "p2p_bought",
                        "grid_import",
                        "production",
                        "p2p_sold",
                        "surplus",
                        "missing",
                        "nonconforming",
                    ),
                    0,
                ),
            )
            for f in t:
                t[f] += getattr(acc, f)
    return totals


def cmd_bill(args: argparse.Namespace) -> int:
    from daisee_node.community.billing import bill, monthly, utc_text
    from daisee_node.community.files import load_tariff
    from daisee_node.community.outputs import (
        Provenance,
        safe_file_name,
        statement_html,
        write_text,
    )

    tariff = load_tariff(args.tariff)
    members = None
    if args.member is not None:
        from daisee_node.community.files import load_members

        members = load_members(args.members)
        if members.address_of(args.member) is None:
            raise DaiseeError(f"--member {args.member!r} is not in {args.members}")
    data, read, members = _prepare(args, tariff)
    with ExitStack() as stack:
        writer = _writer(args, data, stack, rows=False)
        checks = _Checked(writer)
        months = monthly(data, tariff.zone, sink=checks)
    checks.report()
    only = members.address_of(args.member) if args.member else None
    bills: dict[str, list[Bill]] = {}
    for accounts in months.values():
        for acc in accounts:
            if only is None or acc.member == only:
                bills.setdefault(acc.member, []).append(bill(acc, tariff, data.credit_decimals))
    head = _header(read, data, data.keys)
    head["digest"] = writer.digest()
    head["tariff"] = str(args.tariff)
    if args.html is not None:
        prov = Provenance(
            read.chain_id,
            read.block,
            read.ledger,
            read.registry,
            read.market,
            [(utc_text(k.from_ms), k.key_hash, k.source) for k in data.keys],
            str(args.tariff),
            head["digest"],
            f"{head['from']} to {head['to']}",
        )
        for member, member_bills in bills.items():
            name = data.names.get(member, member)
            text = statement_html(name, member, member_bills, prov, members.name)
            write_text(args.html / f"{safe_file_name(name)}.html", text)
    if args.json:
        head["bills"] = [_bill_json(b) for member_bills in bills.values() for b in member_bills]
        print(json.dumps(head))
        return EXIT_OK
    _print_header(head)
    print(f"tariff {args.tariff} ({tariff.currency}; positive totals: the member pays)")
    for member_bills in bills.values():
        for b in member_bills:
            acc = b.account
            missing = f" ({acc.missing} of {acc.periods} periods without a commitment)"
            failed = f" ({acc.nonconforming} periods failed their conformity report)"
            print(
                f"{acc.month} {acc.name}: total {b.total} {b.currency}"
                + (missing * bool(acc.missing))
                + (failed * bool(acc.nonconforming))
            )
            for line in b.lines:
                if line.amount is None:
                    print(f"  {line.label}: {line.quantity} (paid in credits, not in the total)")
                else:
                    amount = f"{line.amount} {b.currency}"
                    print(f"  {line.label}: {line.quantity} at {line.price} = {amount}")
    print(f"digest {head['digest']}")
    return EXIT_OK


def _bill_json(b: Bill) -> dict[str, Any]:
    acc = asdict(b.account)
    acc.pop("missing_starts")
    acc.pop("nonconforming_starts")
    return {
        **acc,
        "currency": b.currency,
        "total": str(b.total),
        "lines": [
            {
                "label": line.label,
                "quantity": line.quantity,
                "price": line.price,
                "amount": None if line.amount is None else str(line.amount),
            }
            for line in b.lines
        ],
    }


# -- governance ----------------------------------------------------------------------------------


def cmd_deploy(args: argparse.Namespace) -> int:
    from daisee_node.community import registry
    from daisee_node.ledger import chain

    rpc, ledger = _chain_of(args)
    w3 = chain.connect(rpc)
    account = _account(args)
    address = registry.deploy(w3, account, _address(ledger, "--ledger"))
    print(json.dumps({"registry": address, "ledger": _address(ledger, "--ledger")}))
    return EXIT_OK


def cmd_key_record(args: argparse.Namespace) -> int:
    from daisee_node.community.billing import translate_key, utc_text
    from daisee_node.community.keys import key_hash, load_key
    from daisee_node.community.registry import Registry
    from daisee_node.ledger import chain

    key = load_key(args.file)
    if args.members is not None:
        from daisee_node.community.files import load_members

        translate_key(key, load_members(args.members).address_of, str(args.file))
    rpc, _ = _chain_of(args)
    w3 = chain.connect(rpc)
    reg = Registry(w3, _address(args.registry, "--registry"))
    reg.check_deployed()
    if args.start is None:
        now_ms = int(w3.eth.get_block("latest")["timestamp"]) * 1000
        period = args.period_s * 1000
        start = (now_ms // period + 1) * period
    else:
        start = parse_time(args.start, "--from")
    record = reg.record_key(_account(args), key_hash(key), start)
    print(
        json.dumps(
            {
                "index": record.index,
                "hash": record.key_hash,
                "from_ms": record.from_ms,
                "from": utc_text(record.from_ms),
                "file": str(args.file),
            }
        )
    )
    return EXIT_OK


def cmd_key_show(args: argparse.Namespace) -> int:
    from daisee_node.community.billing import utc_text
    from daisee_node.community.keys import key_hash, load_key
    from daisee_node.community.registry import Registry
    from daisee_node.ledger import chain

    files = {key_hash(load_key(path)): str(path) for path in args.key}
    rpc, _ = _chain_of(args)
    reg = Registry(chain.connect(rpc), _address(args.registry, "--registry"))
    reg.check_deployed()
    if args.at is not None:
        found = reg.key_for(parse_time(args.at, "--at"))
        if found is None:
            raise DaiseeError(f"no key is recorded for {args.at}")
        records = [found]
    else:
        records = reg.records()
    rows = [
        {
            "index": r.index,
            "from_ms": r.from_ms,
            "from": utc_text(r.from_ms),
            "hash": r.key_hash,
            "file": files.get(r.key_hash),
        }
        for r in records
    ]
    unmatched = sorted(set(files) - {r.key_hash for r in reg.records()})
    if args.json:
        print(
            json.dumps(
                {
                    "registry": reg.address,
                    "keys": rows,
                    "unrecorded_files": [files[h] for h in unmatched],
                }
            )
        )
    else:
        if not rows:
            print("no key recorded")
        for row in rows:
            print(
                f"{row['index']}: from {row['from']} {row['hash']}"
                + (f" = {row['file']}" if row["file"] else "")
            )
        for h in unmatched:
            print(f"{files[h]}: hash {h} is not recorded")
    return EXIT_OK if not unmatched else 1
