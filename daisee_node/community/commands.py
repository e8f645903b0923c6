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
from collections import Counter
from collections.abc import Iterable, Mapping
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daisee_node.errors import DaiseeError
from daisee_node.ledger.cli_errors import chain_errors

if TYPE_CHECKING:
    from web3 import Web3

    from daisee_node.community.billing import (
        Bill,
        Committed,
        CommunityData,
        KeyInForce,
        MemberMonth,
    )
    from daisee_node.community.chaindata import ChainRead
    from daisee_node.community.files import MembersFile, Tariff
    from daisee_node.community.registry import KeyRecord

EXIT_OK = 0
DEFAULT_PERIOD_S = 900
#: periods one `allocate` or `bill` computes at most
MAX_PERIODS = 200_000
#: the longest settlement period a command takes (31 days)
MAX_PERIOD_S = 31 * 86_400
#: the instants a command takes: from 1970 to the end of year 9999 (what a date can name, and
#: well inside the registry's uint64 ms)
MAX_TIME_MS = 253_402_300_800_000


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
    """ms since the epoch, an ISO 8601 time with its zone, or a date (its midnight, UTC); between
    1970 and the end of year 9999."""
    from daisee_node.clock import zoned_ms

    text = text.strip()
    shown = text if len(text) <= 40 else text[:37] + "..."
    if text.isascii() and text.isdigit():
        # Its length first: int() of a very long string is itself slow.
        t_ms = int(text) if len(text) <= 20 else MAX_TIME_MS
    else:
        hint = (
            "give an ISO time with its zone (2026-11-01T00:00:00Z), a date (2026-11-01) or ms "
            "since the epoch"
        )
        t_ms = zoned_ms(text, f"{what} {shown!r}", hint, DaiseeError, dates=True)
    if not 0 <= t_ms < MAX_TIME_MS:
        raise DaiseeError(
            f"{what} {shown!r} is out of range: give a time from 1970-01-01T00:00:00Z to the end "
            f"of 9999 (ms below {MAX_TIME_MS})"
        )
    return t_ms


def _check_period_s(period_s: int) -> int:
    """The settlement period in ms, once `--period-s` is known to be a sensible one."""
    if not 1 <= period_s <= MAX_PERIOD_S:
        raise DaiseeError(
            f"--period-s {period_s}: give a period of 1 to {MAX_PERIOD_S} s (31 days); the "
            f"community's is usually {DEFAULT_PERIOD_S}"
        )
    return period_s * 1000


def _check_blocks(args: argparse.Namespace) -> None:
    for option, block in (("--from-block", args.from_block), ("--block", args.block)):
        if block is not None and block < 0:
            raise DaiseeError(f"{option} {block}: a block number is 0 or more")


def _month_range(text: str, tariff: Tariff) -> tuple[int, int]:
    shown = text if len(text) <= 40 else text[:37] + "..."
    try:
        year, month = (int(part) for part in text.split("-"))
        start = datetime(year, month, 1, tzinfo=tariff.zone)
        year, month = (year + 1, 1) if month == 12 else (year, month + 1)
        end = datetime(year, month, 1, tzinfo=tariff.zone)
        t_from, t_to = int(start.timestamp() * 1000), int(end.timestamp() * 1000)
    except (ValueError, OverflowError):
        raise DaiseeError(
            f"--month {shown!r}: give a month as YYYY-MM, from 1970-01 to 9999-11"
        ) from None
    if t_from < 0 or t_to > MAX_TIME_MS:
        raise DaiseeError(f"--month {shown!r}: give a month from 1970-01 to 9999-11")
    return t_from, t_to


@dataclass(frozen=True)
class _Chain:
    """Where the chain is: the RPC URL, the ledger's address if known, and, when the URL comes
    from a node config, the config's fallback URLs and timeout."""

    rpc: str
    ledger: str | None
    fallback_urls: tuple[str, ...] = ()
    timeout_s: float = 10.0

    def connect(self) -> Web3:
        from daisee_node.ledger import chain

        return chain.connect(self.rpc, self.timeout_s, fallback_urls=self.fallback_urls)


def _chain_of(args: argparse.Namespace) -> _Chain:
    rpc, ledger = args.rpc, args.ledger
    if args.config is not None:
        from daisee_node.config import load_config

        config = load_config(args.config)
        if config.chain is None:
            raise DaiseeError(f"{args.config} has no [chain] section")
        if rpc is None:
            from daisee_node import logs

            # A switch to a fallback is said on stderr: stdout carries the results (--json).
            logs.configure("warning", config.log.format)
            # The config's fallbacks are for its own URL, not for one given with --rpc.
            return _Chain(
                config.chain.rpc_url,
                ledger or config.chain.ledger_address,
                tuple(config.chain.rpc_fallback_urls),
                config.chain.rpc_timeout_s,
            )
        ledger = ledger or config.chain.ledger_address
    if rpc is None:
        raise DaiseeError("give --rpc URL (or -c CONFIG with a [chain] section)")
    return _Chain(rpc, ledger)


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
    from daisee_node.community.billing import gather, period_range, translate_key
    from daisee_node.community.files import load_members
    from daisee_node.community.keys import load_key

    # Everything that can be refused without the chain is, before the chain is asked.
    members = load_members(args.members)
    for path in args.key:  # unknown members and a member named twice too
        translate_key(load_key(path), members.address_of, str(path))
    period_ms = _check_period_s(args.period_s)
    _check_blocks(args)
    t_from, t_to = _range(args, tariff)
    count = -(-(t_to - t_from // period_ms * period_ms) // period_ms)
    if count > MAX_PERIODS:
        raise DaiseeError(f"the range holds {count} periods; give at most {MAX_PERIODS:,}")
    _check_outputs(args)
    where = _chain_of(args)
    ledger = _address(where.ledger, "--ledger")
    registry = _address(args.registry, "--registry")
    market = _address(args.market, "--market") if args.market else None
    starts = period_range(t_from, t_to, period_ms)
    read = chaindata.read_all(
        where.rpc,
        ledger,
        registry,
        members.members,
        market_address=market,
        from_block=args.from_block,
        block=args.block,
        w3=where.connect(),
    )
    check_period_grid(read.commitments, members.members, starts, period_ms)
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
        _flag_nonconforming(args.reports, where.rpc, data, where.fallback_urls)
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


def _seconds(ms: int) -> str:
    return f"{ms // 1000}" if ms % 1000 == 0 else f"{ms / 1000:g}"


def check_period_grid(
    commitments: Iterable[Committed], names: Mapping[str, str], starts: list[int], period_ms: int
) -> None:
    """Refuse a range in which most of a member node's commitments do not fit the periods of
    `--period-s` (a commitment fits when it ends on a period's end and is no longer than a
    period): its node commits periods of another length, or off the grid. Computed anyway,
    nearly every member-period would come out `partial` or `no-key` and the bills be wrong.
    A few that do not fit (a period changed once, an older hour-long commitment) are left to
    `gather`, which reports them."""
    from daisee_node.community.billing import utc_text

    if not starts:
        return
    first, end = starts[0], starts[-1] + period_ms
    lengths: dict[str, Counter[int]] = {}
    misfits: dict[str, list[Committed]] = {}
    for c in commitments:
        node = c.node.lower()
        if node not in names or c.t1 <= first or c.t0 >= end:
            continue
        lengths.setdefault(node, Counter())[c.t1 - c.t0] += 1
        if c.t1 % period_ms or c.t1 - c.t0 > period_ms:
            misfits.setdefault(node, []).append(c)
    for node, off in sorted(misfits.items()):
        if 2 * len(off) <= lengths[node].total():
            continue
        length = lengths[node].most_common(1)[0][0]
        who = f"node {node} ({names[node]})"
        if length != period_ms and length <= MAX_PERIOD_S * 1000:
            raise DaiseeError(
                f"{who} commits {_seconds(length)}-s periods, not the {_seconds(period_ms)}-s "
                f"periods of --period-s; give --period-s {_seconds(length)}"
            )
        c = off[0]
        raise DaiseeError(
            f"{who} commits periods off the grid of --period-s {_seconds(period_ms)} (periods "
            f"start at multiples of it since 1970-01-01T00:00:00Z), e.g. from {utc_text(c.t0)} "
            f"to {utc_text(c.t1)}; give the period its node commits"
        )


def _flag_nonconforming(
    folder: Path, rpc: str, data: CommunityData, fallback_urls: tuple[str, ...] = ()
) -> None:
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
            checked = check_proof(proof, rpc, fallback_urls=fallback_urls)
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


def _check_outputs(args: argparse.Namespace) -> None:
    """Refuse, before the chain is read, a path the results could not be written to: a file
    whose folder is missing, a folder whose parent is missing. Only the last folder of a DIR is
    made: a mistyped path never creates a tree of folders."""
    if args.reports is not None and not args.reports.is_dir():
        why = "does not exist" if not args.reports.exists() else "is not a folder"
        raise DaiseeError(f"--reports {args.reports}: {why} (give the folder of report proofs)")
    if args.keys_csv is not None:
        _check_output(args.keys_csv, "--keys-csv", folder=False)
    if args.periods_csv is not None:
        _check_output(args.periods_csv, "--periods-csv", folder=True)
    if getattr(args, "html", None) is not None:
        _check_output(args.html, "--html", folder=True)


def _check_output(path: Path, option: str, *, folder: bool) -> None:
    """Refuse `path` for `option` (a file, or a folder when `folder`) unless it can be written."""
    if folder and path.exists() and not path.is_dir():
        raise DaiseeError(f"{option} {path}: is not a folder")
    if not folder and path.is_dir():
        raise DaiseeError(f"{option} {path}: is a folder (give a file name)")
    parent = path.parent
    if not (folder and path.is_dir()) and not parent.is_dir():
        why = "does not exist" if not parent.exists() else "is not a folder"
        raise DaiseeError(f"{option} {path}: the folder {parent} {why}")
    # Try it (and leave nothing behind): permissions, a read-only or special file system.
    try:
        if folder and not path.exists():
            path.mkdir()
            path.rmdir()
        elif not folder and not path.exists():
            path.open("x").close()
            path.unlink()
        elif not folder:
            path.open("a").close()  # an existing file is kept as it is until it is rewritten
    except OSError as exc:
        raise DaiseeError(f"{option} {path}: {exc.strerror or exc}") from None


def output_folder(path: Path, option: str) -> Path:
    """`path`, made if missing (its parent must exist); one line naming it if it cannot be."""
    try:
        path.mkdir(exist_ok=True)
    except OSError as exc:
        raise DaiseeError(f"{option} {path}: {exc.strerror or exc}") from None
    return path


def _open(path: Path, option: str, stack: ExitStack) -> Any:
    try:
        return stack.enter_context(path.open("w", encoding="utf-8", newline=""))
    except OSError as exc:
        raise DaiseeError(f"{option} {path}: {exc.strerror or exc}") from None


def _writer(args: argparse.Namespace, data: CommunityData, stack: ExitStack, rows: bool) -> Any:
    from daisee_node.community.outputs import PeriodWriter, safe_file_name

    keys_csv = None
    if args.keys_csv is not None:
        keys_csv = _open(args.keys_csv, "--keys-csv", stack)
    member_csv = {}
    if args.periods_csv is not None:
        folder = output_folder(args.periods_csv, "--periods-csv")
        for i, m in enumerate(data.members):
            path = folder / f"{safe_file_name(data.names.get(m, m))}.csv"
            member_csv[i] = _open(path, "--periods-csv", stack)
    return PeriodWriter(data, keys_csv, member_csv, [] if rows else None)


def _computed(args: argparse.Namespace, data: CommunityData, compute: Any, rows: bool) -> Any:
    """Run `compute(sink)` (the monthly accounts) with the CSV files written as it goes; a file
    that cannot be written is one line naming the option."""
    with ExitStack() as stack:
        writer = _writer(args, data, stack, rows)
        checks = _Checked(writer)
        try:
            months = compute(checks)
            stack.close()  # a full disk may only show when the files are flushed
        except OSError as exc:
            where = exc.filename or "the CSV files"
            raise DaiseeError(f"writing {where}: {exc.strerror or exc}") from None
    checks.report()
    return writer, months


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
    writer, months = _computed(args, data, lambda sink: monthly(data, sink=sink), rows=True)
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
    writer, months = _computed(
        args, data, lambda sink: monthly(data, tariff.zone, sink=sink), rows=False
    )
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
        folder = output_folder(args.html, "--html")
        for member, member_bills in bills.items():
            name = data.names.get(member, member)
            text = statement_html(name, member, member_bills, prov, members.name)
            path = folder / f"{safe_file_name(name)}.html"
            try:
                write_text(path, text)
            except OSError as exc:
                raise DaiseeError(f"--html {path}: {exc.strerror or exc}") from None
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

    where = _chain_of(args)
    ledger = _address(where.ledger, "--ledger")
    account = _account(args)
    address = registry.deploy(where.connect(), account, ledger)
    print(json.dumps({"registry": address, "ledger": ledger}))
    return EXIT_OK


def cmd_key_record(args: argparse.Namespace) -> int:
    from daisee_node.community.billing import translate_key, utc_text
    from daisee_node.community.keys import is_address, key_hash, load_key, named_members
    from daisee_node.community.registry import Registry

    # Every refusal that needs no chain comes before anything is sent.
    key = load_key(args.file)
    if args.members is not None:
        from daisee_node.community.files import load_members

        translate_key(key, load_members(args.members).address_of, str(args.file))
    else:
        named = named_members(key)
        if any(map(is_address, named)) and not all(map(is_address, named)):
            raise DaiseeError(
                f"{args.file}: the key names members both by name and by address: give "
                "--members FILE, so that a member named twice is refused before it is recorded"
            )
    period = _check_period_s(args.period_s)
    start = None
    if args.start is not None:
        start = parse_time(args.start, "--from")
        if start % period:
            before, after = start // period * period, (start // period + 1) * period
            raise DaiseeError(
                f"--from {args.start}: {utc_text(start)} is not the start of a period of "
                f"{args.period_s} s (periods start at multiples of --period-s since "
                f"1970-01-01T00:00:00Z: {utc_text(before)} or {utc_text(after)})"
            )
    registry = _address(args.registry, "--registry")
    account = _account(args)
    w3 = _chain_of(args).connect()
    reg = Registry(w3, registry)
    reg.check_deployed()
    if start is None:
        now_ms = int(w3.eth.get_block("latest")["timestamp"]) * 1000
        start = (now_ms // period + 1) * period
    record = reg.record_key(account, key_hash(key), start)
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

    files = {key_hash(load_key(path)): str(path) for path in args.key}
    at = parse_time(args.at, "--at") if args.at is not None else None
    registry = _address(args.registry, "--registry")
    reg = Registry(_chain_of(args).connect(), registry)
    reg.check_deployed()
    if at is not None:
        found = reg.key_for(at)
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
