"""`daisee-node conformity`: a sealed period's conformity report, its verdict, and its proof.

The report shown is the one stored when the period was sealed, whose digest is a leaf of the root
the node signed (see daisee_node/conformity.py). Without the chain, the command checks that the
stored report still hashes to that leaf and that the leaf, with the readings in the buffer, gives
the signed root; with `--prove` it also asks the ledger contract to accept the leaf against the
commitment on chain, and `-o FILE` writes that proof for anyone to check with `daisee-node verify`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from daisee_node.errors import DaiseeError
from daisee_node.ledger.cli_errors import chain_errors

if TYPE_CHECKING:
    from daisee_node.config import Config
    from daisee_node.ledger.outbox import Entry, Outbox
    from daisee_node.store import Store

EXIT_OK, EXIT_FAILED = 0, 1


def add_parser(sub: Any, default_config: Path) -> None:
    """Register `conformity` on the main parser's subparsers."""
    from daisee_node.demo import DEMO_DATA_DIR

    p = sub.add_parser(
        "conformity",
        help="a sealed period's conformity report (completeness, gaps, spikes …), as signed",
        description="Show the conformity report the node made and signed when it sealed a "
        "period: completeness per channel, gaps, spikes, counter resets, flat lines, wall-clock "
        "steps, late readings, import and export at once; the verdict and its reasons. The "
        "report's digest is a leaf of the period's Merkle root: --prove checks it against the "
        "commitment on chain. Exit 0 when the period passed (and its proof holds), 1 otherwise.",
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "-c",
        "--config",
        type=Path,
        default=None,
        help=f"the node's config (default {default_config}, or the demo's data dir when that "
        "file does not exist)",
    )
    where.add_argument(
        "--data-dir", type=Path, default=None, help=f"a demo's data dir (default ./{DEMO_DATA_DIR})"
    )
    p.add_argument(
        "--period",
        type=period_arg,
        default=("last", 0),
        help="which period: 'last' (default), 'seq:N', or a time inside it (ISO 8601 with its "
        "zone, or ms since the epoch)",
    )
    p.add_argument(
        "--prove",
        action="store_true",
        help="also check against the chain that the commitment holds this report's digest",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "-o",
        "--output",
        type=Path,
        default=None,
        help="with --prove: write the report's proof here (`daisee-node verify FILE` checks it)",
    )
    p.set_defaults(func=cmd_conformity, default_config=default_config)


#: the largest seq or time (ms) the node's buffer can hold: SQLite's INTEGER is 64-bit
MAX_STORED: Final = 2**63 - 1


def _bounded(kind: str, digits: str) -> tuple[str, int]:
    value = int(digits) if len(digits) <= 40 else MAX_STORED + 1  # 5,000 digits: not parsed
    if value > MAX_STORED:
        shown = digits if len(digits) <= 30 else digits[:27] + "..."
        what = "seq" if kind == "seq" else "time"
        raise argparse.ArgumentTypeError(
            f"{what} {shown} is out of range: at most {MAX_STORED}"
            + ("" if kind == "seq" else " ms since the epoch")
        )
    return (kind, value)


def period_arg(text: str) -> tuple[str, int]:
    """`--period`: ("last", 0), ("seq", N) or ("at", ms)."""
    from daisee_node.clock import zoned_ms

    if text == "last":
        return ("last", 0)
    if text.startswith("seq:") and text[4:].isdigit():
        return _bounded("seq", text[4:])
    if text.isdigit():
        return _bounded("at", text)
    hint = "give 'last', 'seq:N', an ISO time with its zone or ms since the epoch"
    ms = zoned_ms(text, repr(text), hint, argparse.ArgumentTypeError)
    if ms < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: before 1970, when no node stored anything")
    return ("at", ms)


@chain_errors
def cmd_conformity(args: argparse.Namespace) -> int:
    from daisee_node.export import output_path, write_output
    from daisee_node.ledger.commands import _node_config

    if args.output is not None and not args.prove:
        raise DaiseeError("-o/--output writes the proof: give --prove too")
    if args.output is not None:
        output_path(args.output)  # refused before any work, not after it
    config, kept = _node_config(args)
    result = asyncio.run(show(config, args.period, args.prove, kept))
    if args.output is not None and result.get("proof") is not None:
        write_output(args.output, json.dumps(result["proof"], indent=2) + "\n")
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        print(render(result))
    ok = result["report"]["passed"] and result["signed"]
    if args.prove:
        ok = ok and result["chain"]["valid"]
    return EXIT_OK if ok else EXIT_FAILED


async def show(
    config: Config, period: tuple[str, int], prove: bool, keep_in: Path | None = None
) -> dict[str, Any]:
    """Everything the command prints: the report, whether it is the signed one, what the
    buffer holds since, and with `prove` the chain's answer."""
    from daisee_node.conformity import digest
    from daisee_node.ledger.keys import keystore_address
    from daisee_node.ledger.outbox import Outbox
    from daisee_node.ledger.proofs import (
        build_report_proof,
        check_proof,
        parse_proof,
        unlock_salt_secret,
    )
    from daisee_node.store import Store, db_path

    assert config.chain is not None
    node = keystore_address(config.chain.keystore_path(config.data_dir))
    store = Store(db_path(config.data_dir), read_only=True)
    await store.open()
    try:
        outbox = Outbox(store)
        entry = await _entry(store, outbox, node, period)
        c = entry.commitment
        stored = await outbox.report(node, c.seq)
        if stored is None:
            raise DaiseeError(
                f"period seq {c.seq} was sealed without a conformity report (the node did not "
                "make reports then)"
            )
        report = stored.report()
        secret, locked = unlock_salt_secret(config)
        signed, why = await _signed(store, node, entry, secret, locked)
        since = await _since_sealing(store, c.t0, c.t1, c.count)
        proof = None
        if prove:
            proof = await build_report_proof(config, store, node, entry, keep_in=keep_in)
    finally:
        await store.close()
    result: dict[str, Any] = {
        "node": node,
        "seq": c.seq,
        "t0": c.t0,
        "t1": c.t1,
        "state": entry.state,
        "digest": "0x" + stored.digest.hex(),
        "report_matches_digest": digest(report) == stored.digest,
        "signed": signed and digest(report) == stored.digest,
        "signed_check": why,
        "since_sealing": since,
        "report": report,
        "proof": proof,
        "chain": None,
    }
    if proof is not None:
        assert config.chain is not None
        text = json.dumps(proof)
        result["chain"] = check_proof(
            parse_proof(text),
            config.chain.rpc_url,
            keep_in=keep_in,
            fallback_urls=config.chain.rpc_fallback_urls,
        )
    return result


async def _entry(store: Store, outbox: Outbox, node: str, period: tuple[str, int]) -> Entry:
    from daisee_node.ledger.proofs import human_time

    kind, value = period
    if kind == "last":
        entry = await outbox.last_own()
        if entry is None:
            raise DaiseeError("this node has sealed no period yet")
        return entry
    if kind == "seq":
        entry = await outbox.get(node, value)
        if entry is None:
            raise DaiseeError(f"no sealed period seq {value} of this node")
        return entry
    entry = await outbox.covering(node, value)
    if entry is not None:
        return entry
    rows = await store.query("SELECT 1 FROM readings WHERE t_ms <= ? LIMIT 1", (value,))
    last = await outbox.last_own()
    if last is None or value >= last.commitment.t1:
        raise DaiseeError(f"the period of {human_time(value)} is not sealed yet")
    if not rows:
        raise DaiseeError(f"no readings at or before {human_time(value)}: nothing was sealed")
    raise DaiseeError(
        f"no sealed period holds {human_time(value)}: the node stored no readings then "
        "(a period without readings is not sealed)"
    )


async def _signed(
    store: Store, node: str, entry: Entry, secret: bytes | None, locked: str | None = None
) -> tuple[bool, str]:
    """Whether the report's leaf and the buffer's readings give the root the node signed
    (`locked`: why the node key could not be unlocked, said if the root needs its salts)."""
    from daisee_node.ledger.proofs import period_tree

    try:
        await period_tree(store, node, entry, secret, locked=locked)
    except DaiseeError as exc:
        return False, str(exc)
    return True, "the report's digest and the buffer's readings give the signed root"


async def _since_sealing(store: Store, t0: int, t1: int, committed: int) -> dict[str, int]:
    """What the buffer holds of the period now (not part of the signed report)."""
    from daisee_node.readings import Quality

    rows = await store.query(
        "SELECT count(*), coalesce(sum(quality = ?), 0) FROM readings WHERE t_ms >= ? AND t_ms < ?",
        (int(Quality.LATE), t0, t1),
    )
    now, late = rows[0]
    return {
        "readings_now": int(now),
        "committed": committed,
        "stored_after_sealing": max(0, int(now) - committed),
        "marked_late": int(late),
    }


# -- text ---------------------------------------------------------------------------------------


def render(result: dict[str, Any]) -> str:
    """The report for a terminal."""
    from daisee_node.conformity import CHECKS, describe
    from daisee_node.ledger.proofs import human_time

    report = result["report"]
    verdict = "PASS" if report["passed"] else "FAIL"
    lines = [
        f"conformity      period seq {result['seq']}: {human_time(result['t0'])} to "
        f"{human_time(result['t1'])}",
        f"node            {result['node']}",
        f"verdict         {verdict}",
    ]
    lines += [f"  - {reason}" for reason in report["reasons"]]
    lines += ["", _table_of_channels(report), ""]
    rows = [("CHECK", "RESULT", "FOUND", "FIRST")]
    for check in CHECKS:
        c = report.get("checks", {}).get(check)
        if c is None:
            continue
        result_word = "pass" if c["passed"] else c["severity"].replace("fail", "FAIL")
        first = describe(check, c["findings"][0]) if c["findings"] else ""
        rows.append((check, result_word, str(c["count"]), first))
    lines += _table(rows)
    lines.append("")
    lines.append(f"readings        {report['readings']:,} committed; commitment {result['state']}")
    lines.append(f"digest          {result['digest']}")
    signed = "yes" if result["signed"] else "NO"
    lines.append(f"signed          {signed}: {result['signed_check']}")
    chain = result.get("chain")
    if chain is None:
        lines.append("on chain        not checked (--prove checks it)")
    elif chain["valid"]:
        proof = result["proof"]
        lines.append(
            f"on chain        yes: the ledger accepts the report's leaf (tx {proof['tx']}, "
            f"chain {proof['chain_id']})"
        )
    else:
        lines.append(f"on chain        NO: {'; '.join(chain['problems'])}")
    since = result["since_sealing"]
    if since["stored_after_sealing"] or since["marked_late"]:
        lines.append(
            f"since sealing   {since['stored_after_sealing']} reading(s) of this period stored "
            f"after it was sealed, {since['marked_late']} marked late (not in the commitment, "
            "not in the signed report)"
        )
    return "\n".join(lines)


def _table_of_channels(report: dict[str, Any]) -> str:
    rows = [("CHANNEL", "INTERVAL", "EXPECTED", "USABLE", "PRESENT", "FLAGGED")]
    for name, ch in sorted(report.get("channels", {}).items()):
        interval = "-" if ch["interval_ms"] is None else f"{ch['interval_ms'] / 1000:g} s"
        if ch["interval_from"] != "config" and ch["interval_ms"] is not None:
            interval += " (seen)"
        flagged = ", ".join(f"{q} {n}" for q, n in ch["qualities"].items() if q != "GOOD")
        expected = "-" if ch["expected"] is None else f"{ch['expected']:,}"
        rows.append(
            (name, interval, expected, f"{ch['usable']:,}", f"{ch['present']:,}", flagged or "-")
        )
    return "\n".join(_table(rows))


def _table(rows: Sequence[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows]
