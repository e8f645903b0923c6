"""Data access: a node's signed export of its data to a recipient it granted, and its check.

`daisee-node export --role own|supplier|grid --recipient 0x… --from T --to T -o FILE` first asks
the community registry whether the node (its key is the member) granted that recipient that role
and the grant is in force; it refuses otherwise. The file holds, for the node's periods on chain
that overlap [from, to):

- role `own`: every reading of the range (optionally of some channels), each with its Merkle
  proof to its period's commitment, the commitment with its batch proof, and the period's
  conformity report with the proof of its leaf;
- roles `supplier` and `grid`: each period's commitment (its import and export totals) with its
  batch proof, and the totals over the range.

The node signs the canonical JSON of everything but `sig` (EIP-191, as peer messages are signed).
`daisee-node verify-export FILE --rpc URL` checks the signature, each commitment against the
ledger, each reading's proof against its commitment's root, the periods' completeness, and that
the grant is in force now; it lists every problem. The file format is in docs/community.md.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from daisee_node.errors import DaiseeError
from daisee_node.ledger.cli_errors import chain_errors

if TYPE_CHECKING:
    from eth_account.signers.local import LocalAccount
    from web3 import Web3

    from daisee_node.community.registry import Registry
    from daisee_node.config import Config
    from daisee_node.ledger import chain as chainlib
    from daisee_node.ledger.commitment import Commitment
    from daisee_node.ledger.outbox import Entry, Outbox
    from daisee_node.store import Store

FORMAT: Final = "daisee-export/1"
#: the largest export file `verify-export` reads (and `export` writes). A year of one node's
#: 15-minute data as a supplier or grid export is 35,040 periods of about 1.1 kB (commitment,
#: tx, batch proof): about 39 MB, under a third of this. Checking a file takes four to six
#: times its size in memory (such a 39 MB file: 233 MB), so this bounds it near 800 MB. An own
#: export of per-second readings is far larger (8 channels at 1 s: about 37 MB an hour): such
#: a span is exported as several files.
MAX_EXPORT_BYTES: Final = 128 * 1024 * 1024
#: the most problems listed for one file (then how many more there are)
MAX_PROBLEMS: Final = 100
ROLES: Final = ("own", "supplier", "grid")
EXIT_OK, EXIT_INVALID = 0, 1


class ExportRefused(DaiseeError):
    """The node will not export: no grant in force, or nothing it can prove."""


def to_checksum_address(text: str) -> str:
    # eth_utils loads only when an export is made or checked, not with the command line.
    from eth_utils import to_checksum_address as checksum

    return str(checksum(text))


def is_address(text: object) -> bool:
    from eth_utils import is_address as check

    return isinstance(text, str) and bool(check(text))


# -- the signature ----------------------------------------------------------------------------


def canonical(body: dict[str, Any]) -> bytes:
    """The bytes an export's signature covers: every key but `sig`, as canonical JSON (sorted
    keys, no spaces, ASCII, no NaN)."""
    fields = {k: v for k, v in body.items() if k != "sig"}
    return json.dumps(
        fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode()


def sign(body: dict[str, Any], account: LocalAccount) -> dict[str, Any]:
    """`body` with the EIP-191 signature of its canonical JSON under `sig`."""
    from eth_account.messages import encode_defunct

    signed = account.sign_message(encode_defunct(primitive=canonical(body)))
    return {**body, "sig": "0x" + bytes(signed.signature).hex()}


def signer(body: dict[str, Any]) -> str | None:
    """The checksummed address that signed `body`, or None when `sig` is unusable."""
    from eth_account import Account
    from eth_account.messages import encode_defunct

    sig = body.get("sig")
    if not isinstance(sig, str) or len(sig) != 132 or not sig.startswith("0x"):
        return None
    try:
        raw = bytes.fromhex(sig[2:])
        address = Account.recover_message(encode_defunct(primitive=canonical(body)), signature=raw)
    except Exception:  # whatever eth_keys makes of arbitrary bytes: no signer
        return None
    return str(address)


# -- making an export -------------------------------------------------------------------------


def _hex(items: list[bytes]) -> list[str]:
    return ["0x" + p.hex() for p in items]


class _BatchProofs:
    """Batch proofs, one receipt read per batch transaction however many periods it holds."""

    def __init__(self, ledger: chainlib.Ledger) -> None:
        self.ledger = ledger
        self.trees: dict[bytes, tuple[list[bytes], list[list[bytes]]]] = {}

    def proof(self, tx_hash: bytes, commitment_hash: bytes) -> list[bytes]:
        from daisee_node.ledger import merkle

        if tx_hash not in self.trees:
            hashes = self.ledger.batch_hashes(tx_hash)
            self.trees[tx_hash] = (hashes, merkle.levels(hashes))
        hashes, tree = self.trees[tx_hash]
        if commitment_hash not in hashes:
            raise ExportRefused(f"commitment {commitment_hash.hex()} is not in tx {tx_hash.hex()}")
        return merkle.proof(tree, hashes.index(commitment_hash))


def check_grant(reg: Registry, node: str, recipient: str, role: str, block: int) -> int:
    """The grant's end (ms) when it is in force at `block`; ExportRefused, saying why, if not."""
    from daisee_node.ledger.proofs import human_time

    grant = reg.grant_until(node, recipient, role, block)
    if not reg.grant_in_force(node, recipient, role, block):
        if grant.until_ms == 0:
            why = "there is none (never granted, or revoked)"
        else:
            why = f"it ended at {human_time(grant.until_ms)}"
        raise ExportRefused(
            f"no grant in force: node {node} granting {recipient} the role {role!r} on "
            f"registry {reg.address}: {why}"
        )
    return grant.until_ms


async def build_export(
    config: Config,
    account: LocalAccount,
    *,
    role: str,
    recipient: str,
    from_ms: int,
    to_ms: int,
    registry: str,
    channels: list[str] | None = None,
    keep_in: Path | None = None,
) -> dict[str, Any]:
    """The signed export of the node's data in [from_ms, to_ms) for `recipient` as `role`."""
    from daisee_node.community.registry import Registry
    from daisee_node.ledger import chain as chainlib
    from daisee_node.ledger import merkle
    from daisee_node.ledger.proofs import _channel_exists, _embedded_ledger
    from daisee_node.store import Store, db_path

    if role not in ROLES:
        raise ExportRefused(f"no data role {role!r}: one of {', '.join(ROLES)}")
    if not 0 <= from_ms < to_ms <= MAX_TIME_MS:
        raise ExportRefused(
            f"--from and --to: from 0 to {MAX_TIME_MS} ms since the epoch, --to after --from"
        )
    if channels and role != "own":
        raise ExportRefused("--channel is for the role 'own' (others receive period totals)")
    assert config.chain is not None
    node = account.address
    recipient = to_checksum_address(recipient)
    w3 = chainlib.connect(
        config.chain.rpc_url,
        config.chain.rpc_timeout_s,
        keep_in=keep_in,
        fallback_urls=config.chain.rpc_fallback_urls,
    )
    ledger = chainlib.Ledger(w3, config.chain.ledger_address or _embedded_ledger(w3))
    reg = Registry(w3, registry)
    reg.check_deployed()
    if to_checksum_address(reg.ledger_address()) != ledger.address:
        raise ExportRefused(f"registry {reg.address} is not the one of ledger {ledger.address}")
    block = int(w3.eth.block_number)
    until_ms = check_grant(reg, node, recipient, role, block)

    store = Store(db_path(config.data_dir), read_only=True)
    await store.open()
    try:
        for name in channels or []:
            await _channel_exists(store, name)  # a misspelt name is refused, not exported empty
        periods, missing = await _periods(
            store,
            ledger,
            node,
            role,
            from_ms,
            to_ms,
            sorted(set(channels or [])),
            merkle.salt_secret(bytes(account.key)),
        )
    finally:
        await store.close()
    body: dict[str, Any] = {
        "format": FORMAT,
        "role": role,
        "recipient": recipient,
        "node": node,
        "from_ms": from_ms,
        "to_ms": to_ms,
        "channels": sorted(set(channels)) if channels else None,
        "chain_id": ledger.chain_id,
        "ledger": ledger.address,
        "registry": reg.address,
        "grant": {"until_ms": until_ms, "checked_block": block},
        "created_ms": int(time.time() * 1000),
        "periods": periods,
        "missing": missing,
    }
    if role != "own":
        body["totals"] = _totals(periods)
    return sign(body, account)


def _totals(periods: list[dict[str, Any]]) -> dict[str, int]:
    return {
        "periods": len(periods),
        "import_wh": sum(int(p["commitment"]["import_wh"]) for p in periods),
        "export_wh": sum(int(p["commitment"]["export_wh"]) for p in periods),
    }


async def _periods(
    store: Store,
    ledger: chainlib.Ledger,
    node: str,
    role: str,
    from_ms: int,
    to_ms: int,
    channels: list[str],
    secret: bytes | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The exported periods, and those of the range not (yet) on chain (`secret`: the node's
    salt secret, for periods sealed over salted leaves)."""
    from daisee_node.ledger.outbox import CONFIRMED, INCLUDED, Outbox

    outbox = Outbox(store)
    rows = []
    if await store.query("SELECT 1 FROM sqlite_master WHERE name = 'commitments'"):
        rows = await store.query(
            "SELECT seq FROM commitments WHERE node = ? AND own = 1 AND t1 > ? AND t0 < ? "
            "ORDER BY seq",
            (node, from_ms, to_ms),
        )
    proofs = _BatchProofs(ledger)
    periods, missing = [], []
    for (seq,) in rows:
        entry = await outbox.get(node, int(seq))
        assert entry is not None
        c = entry.commitment
        if entry.state not in (INCLUDED, CONFIRMED) or entry.tx_hash is None:
            missing.append({"seq": c.seq, "t0": c.t0, "t1": c.t1, "state": entry.state})
            continue
        period: dict[str, Any] = {
            "commitment": c.to_json(),
            "tx": "0x" + entry.tx_hash.hex(),
            "batch_proof": _hex(proofs.proof(entry.tx_hash, c.struct_hash())),
        }
        if role == "own":
            period.update(
                await _own_data(store, outbox, node, entry, from_ms, to_ms, channels, secret)
            )
        periods.append(period)
    return periods, missing


async def _own_data(
    store: Store,
    outbox: Outbox,
    node: str,
    entry: Entry,
    from_ms: int,
    to_ms: int,
    channels: list[str],
    secret: bytes | None,
) -> dict[str, Any]:
    """A period's readings in range, each with its proof, from one tree built for the period;
    and its conformity report with the proof of its leaf."""
    from daisee_node.conformity import report_leaf
    from daisee_node.ledger import merkle
    from daisee_node.ledger.proofs import period_tree

    c = entry.commitment
    tree = await period_tree(store, node, entry, secret)
    lo, hi = max(c.t0, from_ms), min(c.t1, to_ms)
    sql = (
        "SELECT r.t_ms, ch.name, r.value, r.quality FROM readings r JOIN channels ch "
        "ON ch.id = r.channel_id WHERE r.t_ms >= ? AND r.t_ms < ?"
    )
    params: list[Any] = [lo, hi]
    if channels:
        sql += f" AND ch.name IN ({','.join('?' * len(channels))})"
        params += channels
    node_bytes = bytes.fromhex(node[2:])
    readings = []
    for t_ms, name, value, quality in await store.query(sql + " ORDER BY r.t_ms, ch.name", params):
        cid = merkle.channel_id(name)
        micro = merkle.value_micro(value)
        leaf = merkle.reading_leaf(node_bytes, cid, t_ms, micro, quality)
        readings.append(
            {
                "channel": name,
                "channel_id": "0x" + cid.hex(),
                "t_ms": t_ms,
                "value": value,
                "value_micro": micro,
                "quality": quality,
                "proof": _hex(tree.proof(leaf)),
            }
        )
    out: dict[str, Any] = {
        "complete": not channels and from_ms <= c.t0 and c.t1 <= to_ms,
        "readings": readings,
        "report": None,
    }
    stored = await outbox.report(node, c.seq)
    if stored is not None:
        leaf = report_leaf(node_bytes, c.t1, stored.digest)
        out["report"] = {"body": stored.report(), "proof": _hex(tree.proof(leaf))}
    return out


# -- checking an export -----------------------------------------------------------------------


def verify_export(
    data: dict[str, Any],
    w3: Web3,
    *,
    registry: str | None = None,
    every_reading_on_chain: bool = False,
) -> dict[str, Any]:
    """Check an export against the chain `w3` reaches: `valid`, every `problem` found, and what
    was `checked`. The whole file's shape (every field's type and range) is checked first, so
    nothing malformed reaches the chain; a malformed period is named and the others are still
    checked."""
    checked: list[str] = []
    if data.get("format") != FORMAT:
        why = f"format is {data.get('format')!r}, not {FORMAT!r}"
        return {"valid": False, "problems": [f"not an export file ({why})"], "checked": checked}
    head, problems = _head(data)
    role = head["role"] if head is not None else data.get("role")
    periods = data["periods"] if isinstance(data.get("periods"), list) else []
    shapes = [_period_problems(period, role) for period in periods]
    seqs, missing_problems = _missing_seqs(data.get("missing"))
    if head is None:  # without a usable node, ledger and registry nothing can be asked
        problems += [f"period {i + 1}: {p}" for i, shape in enumerate(shapes) for p in shape]
        problems += missing_problems
        signed = signer(data)
        if signed is not None and is_address(data.get("node")):
            checked.append(f"the node's signature over the file ({data['node']})")
        problems.insert(0, _signature_problem(data, signed, data.get("node"), altered=True))
        return {"valid": False, "problems": _capped(problems), "checked": checked}
    node, recipient, role = head["node"], head["recipient"], head["role"]
    problems += missing_problems
    checked.append(f"the node's signature over the file ({node})")

    from daisee_node.community.registry import Registry
    from daisee_node.ledger import chain as chainlib

    ledger = chainlib.Ledger(w3, head["ledger"])
    ledger.check_deployed()
    if ledger.chain_id != head["chain_id"]:
        problems.append(f"the file is for chain {head['chain_id']}, the RPC is {ledger.chain_id}")
    reg_address = to_checksum_address(registry or head["registry"])
    if reg_address != head["registry"]:
        problems.append(f"the file names registry {head['registry']}, not {reg_address}")
    reg = Registry(w3, reg_address)
    reg.check_deployed()
    if to_checksum_address(reg.ledger_address()) != ledger.address:
        problems.append(f"registry {reg.address} is not the one of ledger {ledger.address}")
    grant_problems = _grant_problems(reg, node, recipient, role)
    problems += grant_problems
    checked.append(f"the grant of {role!r} by {node} to {recipient} on registry {reg.address}")

    counts = {"periods": 0, "readings": 0, "readings_on_chain": 0}
    for i, (period, shape) in enumerate(zip(periods, shapes, strict=True)):
        counts["periods"] += 1
        if shape:
            problems += [f"period {i + 1}: {p}" for p in shape]
            seq = _seq_of(period)
            if seq is not None:  # its place in the sequence is known: no false gap around it
                seqs.append(seq)
            continue
        try:
            where, c, found = _check_period(period, head, ledger, every_reading_on_chain)
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError, DaiseeError) as exc:
            problems.append(f"period {i + 1}: malformed ({exc})")
            continue
        seqs.append(c.seq)
        counts["readings"] += found["readings"]
        counts["readings_on_chain"] += found["on_chain"]
        problems += [f"{where}: {p}" for p in found["problems"]]
    seqs.sort()
    for a, b in itertools.pairwise(seqs):
        if b == a:
            problems.append(f"period seq {a} appears twice")
        elif b != a + 1:
            problems.append(f"periods seq {a + 1}..{b - 1} are neither exported nor listed missing")
    if role != "own" and not any(shapes) and data.get("totals") != _totals(periods):
        problems.append("the totals are not the sum of the periods' commitments")
    altered = len(problems) > len(grant_problems)
    by = signer(data)
    if by != node:
        problems.insert(0, _signature_problem(data, by, node, altered=altered))
    checked.append(f"{counts['periods']} commitments against the ledger {ledger.address}")
    if role == "own":
        checked.append(
            f"{counts['readings']} readings' proofs against their commitments' roots "
            f"({counts['readings_on_chain']} of them by the ledger's verifyReading)"
        )
    return {
        "valid": not problems,
        "problems": _capped(problems),
        "checked": checked,
        "node": node,
        "role": role,
        "recipient": recipient,
        "from_ms": head["from_ms"],
        "to_ms": head["to_ms"],
        **counts,
        "missing": len(data.get("missing") or []),
    }


def _signature_problem(data: dict[str, Any], by: str | None, node: object, *, altered: bool) -> str:
    """What a recipient should make of a signature that is not the node's.

    A signature over altered bytes still recovers to some address, one nobody holds the key
    of: when the content shows other problems, the message says the file was changed after
    signing rather than naming that meaningless address first."""
    sig = data.get("sig")
    if not (isinstance(sig, str) and len(sig) == 132 and sig.startswith("0x")):
        return "the file carries no signature of the node (sig missing, or not 65 bytes in hex)"
    if by is None:
        # the content holds what the node never signs (a number JSON cannot hold, 1e400), or
        # the signature's bytes were changed
        return (
            "the file does not match the node's signature: it was altered after the node signed it"
        )
    if altered:
        return (
            f"signed by someone other than the node {node}: the file was altered after the node "
            f"signed it, or another key signed it (the signature recovers to {by})"
        )
    return f"signed by {by}, not by the node {node}"


def _capped(problems: list[str]) -> list[str]:
    """At most MAX_PROBLEMS lines: a file broken everywhere is not printed line by line."""
    if len(problems) <= MAX_PROBLEMS:
        return problems
    more = len(problems) - MAX_PROBLEMS
    return [*problems[:MAX_PROBLEMS], f"... and {more} more problems"]


def _head(data: dict[str, Any]) -> tuple[dict[str, Any] | None, list[str]]:
    """The file's head fields checked and normalised, and every problem with them; None for
    the head when the node, the role, the ledger or the registry cannot be used."""
    from daisee_node.ledger.proofs import (
        UINT64_MAX,
        UINT256_MAX,
        address_problem,
        int_problem,
        shown,
    )

    problems: list[str] = []

    def field(key: str, why: str | None) -> None:
        if key not in data:
            problems.append(f"{key}: missing")
        elif why is not None:
            problems.append(f"{key}: {why}")

    if data.get("role") not in ROLES:
        field("role", f"{shown(data.get('role'))} is not one of {', '.join(ROLES)}")
    for key in ("node", "recipient", "ledger", "registry"):
        field(key, address_problem(data.get(key)))
    field("chain_id", int_problem(data.get("chain_id"), 1, UINT256_MAX))
    for key in ("from_ms", "to_ms"):
        field(key, int_problem(data.get(key), 0, UINT64_MAX))
    if not isinstance(data.get("periods"), list):
        field("periods", "is not a list")
    if data.get("missing") is not None and not isinstance(data["missing"], list):
        problems.append("missing: is neither null nor a list")
    channels = data.get("channels")
    if channels is not None and not (
        isinstance(channels, list) and all(isinstance(c, str) for c in channels)
    ):
        problems.append("channels: is neither null nor a list of names")
    if problems:
        return None, problems
    if data["to_ms"] <= data["from_ms"]:
        problems.append("to_ms is not after from_ms")
    return {
        "role": data["role"],
        "node": to_checksum_address(data["node"]),
        "recipient": to_checksum_address(data["recipient"]),
        "ledger": to_checksum_address(data["ledger"]),
        "registry": to_checksum_address(data["registry"]),
        "chain_id": data["chain_id"],
        "from_ms": data["from_ms"],
        "to_ms": data["to_ms"],
        "channels": channels,
    }, problems


def _period_problems(period: object, role: object) -> list[str]:
    """Every field of one exported period that is missing or not of its type."""
    from daisee_node.ledger.proofs import commitment_problems, hashes_problem, reading_problems

    if not isinstance(period, dict):
        return ["not an object"]
    if "commitment" not in period:
        problems = ["commitment: missing"]
    else:
        problems = commitment_problems(period["commitment"])
    if "batch_proof" not in period:
        problems.append("batch_proof: missing")
    elif (why := hashes_problem(period["batch_proof"])) is not None:
        problems.append(f"batch_proof: {why}")
    if role != "own":
        return problems
    readings = period.get("readings")
    if not isinstance(readings, list):
        problems.append("readings: missing or not a list")
        readings = []
    for j, reading in enumerate(readings):
        if not isinstance(reading, dict):
            problems.append(f"reading {j + 1}: not an object")
        else:
            problems += reading_problems(reading, f"reading {j + 1}: ", named=True)
    if not isinstance(period.get("complete", False), bool):
        problems.append("complete: is neither true nor false")
    report = period.get("report")
    if report is not None:
        if not isinstance(report, dict) or not isinstance(report.get("body"), dict):
            problems.append("report: is neither null nor an object with its body")
        elif (why := hashes_problem(report.get("proof"))) is not None:
            problems.append(f"report.proof: {why}")
    return problems


def _seq_of(period: object) -> int | None:
    """A malformed period's seq, when that field at least is a valid one."""
    from daisee_node.ledger.proofs import UINT64_MAX, int_problem

    c = period.get("commitment") if isinstance(period, dict) else None
    seq = c.get("seq") if isinstance(c, dict) else None
    if isinstance(seq, int) and int_problem(seq, 0, UINT64_MAX) is None:
        return seq
    return None


def _missing_seqs(missing: object) -> tuple[list[int], list[str]]:
    """The seqs of the periods listed missing, and every problem with that list."""
    from daisee_node.ledger.proofs import UINT64_MAX, int_problem

    if not isinstance(missing, list):
        return [], []  # absent or null: none missing (another type is a head problem)
    seqs, problems = [], []
    for j, item in enumerate(missing):
        if not isinstance(item, dict):
            problems.append(f"missing {j + 1}: not an object")
            continue
        bad = False
        for key in ("seq", "t0", "t1"):
            if key not in item and key != "seq":
                continue
            why = "missing" if key not in item else int_problem(item[key], 0, UINT64_MAX)
            if why is not None:
                problems.append(f"missing {j + 1}: {key}: {why}")
                bad = bad or key == "seq"
        if not bad:
            seqs.append(item["seq"])
    return seqs, problems


def _grant_problems(reg: Registry, node: str, recipient: str, role: str) -> list[str]:
    """Nothing when the grant is in force now; else why not (revoked, ended, never made)."""
    from daisee_node.ledger.proofs import human_time

    if reg.grant_in_force(node, recipient, role):
        return []
    grant = reg.grant_until(node, recipient, role)
    what = f"the grant of {role!r} by {node} to {recipient}"
    if grant.until_ms:
        return [f"{what} ended at {human_time(grant.until_ms)}"]
    revoked = reg.contract.events.Revoked().get_logs(
        argument_filters={"member": node, "recipient": recipient}, from_block=0
    )
    from daisee_node.community.registry import ROLES as ROLE_NUMBERS

    if any(ev["args"]["role"] == ROLE_NUMBERS[role] for ev in revoked):
        return [f"{what} was revoked (block {revoked[-1]['blockNumber']})"]
    return [f"{what} was never made"]


def _check_period(
    period: dict[str, Any],
    head: dict[str, Any],
    ledger: chainlib.Ledger,
    every_reading_on_chain: bool,
) -> tuple[str, Commitment, dict[str, Any]]:
    """(where, commitment, what was found) for one exported period."""
    from daisee_node.ledger.commitment import Commitment

    c = Commitment.from_json(period["commitment"])
    batch = [bytes.fromhex(p.removeprefix("0x")) for p in period["batch_proof"]]
    where = f"period seq {c.seq}"
    problems = []
    if to_checksum_address(c.node) != head["node"]:
        problems.append(f"the commitment is {c.node}'s, not the node's")
    if c.t1 <= head["from_ms"] or c.t0 >= head["to_ms"]:
        problems.append("the period lies outside the exported range")
    if not ledger.verify_commitment(c, batch):
        problems.append("the ledger did not record this commitment (or not with this proof)")
    found = {"problems": problems, "readings": 0, "on_chain": 0}
    if head["role"] != "own":
        if "readings" in period:
            problems.append(f"readings in a {head['role']!r} export")
        return where, c, found
    _check_readings(period, head, c, batch, ledger, every_reading_on_chain, found)
    return where, c, found


def _check_readings(
    period: dict[str, Any],
    head: dict[str, Any],
    c: Commitment,
    batch: list[bytes],
    ledger: chainlib.Ledger,
    every_reading_on_chain: bool,
    found: dict[str, Any],
) -> None:
    """Each reading's proof against the commitment's root (locally: the ledger's own leaf and
    sorted-pair hashing; on chain for the first one, or all with `every_reading_on_chain`), and
    a complete period's readings (and report) against the commitment's count."""
    from daisee_node.conformity import digest, report_leaf
    from daisee_node.ledger import merkle

    problems: list[str] = found["problems"]
    node_bytes = bytes.fromhex(head["node"][2:])
    lo, hi = max(c.t0, head["from_ms"]), min(c.t1, head["to_ms"])
    seen: set[bytes] = set()
    for r in period["readings"]:
        found["readings"] += 1
        reading = (
            bytes.fromhex(r["channel_id"].removeprefix("0x")),
            int(r["t_ms"]),
            int(r["value_micro"]),
            int(r["quality"]),
        )
        proof = [bytes.fromhex(p.removeprefix("0x")) for p in r["proof"]]
        at = f"reading {r['channel']} at {reading[1]}"
        if merkle.channel_id(str(r["channel"])) != reading[0]:
            problems.append(f"{at}: channel name does not match channel_id")
        if r.get("value") is not None and merkle.value_micro(float(r["value"])) != reading[2]:
            problems.append(f"{at}: value does not match value_micro")
        if not lo <= reading[1] < hi:
            problems.append(f"{at}: outside the exported range")
        if head["channels"] and r["channel"] not in head["channels"]:
            problems.append(f"{at}: a channel the export does not name")
        leaf = merkle.reading_leaf(node_bytes, *reading)
        if leaf in seen:
            problems.append(f"{at}: exported twice")
        seen.add(leaf)
        if not merkle.verify(proof, c.root, leaf):
            problems.append(f"{at}: not a leaf of the commitment's root (value or proof altered)")
        elif every_reading_on_chain or found["on_chain"] == 0:
            found["on_chain"] += 1
            if not ledger.verify_reading(c, batch, reading, proof):
                problems.append(f"{at}: the ledger does not accept this reading and proof")
    report = period.get("report")
    if report is not None:
        proof = [bytes.fromhex(p.removeprefix("0x")) for p in report["proof"]]
        try:
            leaf = report_leaf(node_bytes, c.t1, digest(report["body"]))
        except ValueError:  # a number JSON cannot hold (1e400 reads as infinity)
            problems.append("the conformity report holds a number no report can hold")
        else:
            if not merkle.verify(proof, c.root, leaf):
                problems.append("the conformity report is not the one the commitment holds")
    if period.get("complete"):
        if head["channels"] or head["from_ms"] > c.t0 or c.t1 > head["to_ms"]:
            problems.append("marked complete, but the export covers only part of it")
        # `count` is the period's readings; a conformity report's leaf is not one of them
        if len(seen) != c.count:
            problems.append(f"{len(seen)} readings exported of the {c.count} the commitment counts")


# -- the commands -----------------------------------------------------------------------------


#: the latest time (ms since the epoch) the node's buffer can hold: SQLite's INTEGER is 64-bit
MAX_TIME_MS: Final = 2**63 - 1
#: the latest grant end the registry can hold (its `uint64 untilMs`)
MAX_UNTIL_MS: Final = 2**64 - 1


def time_arg(text: str, *, most: int = MAX_TIME_MS) -> int:
    """`--from` / `--to`: ms since the epoch (at most `most`), or ISO 8601 with its zone."""
    from daisee_node.clock import zoned_ms

    if text.isdigit():
        ms = int(text) if len(text) <= 40 else most + 1  # a 5,000-digit number is not parsed
    else:
        hint = "give an ISO time with its zone or ms since the epoch"
        ms = zoned_ms(text, repr(text), hint, argparse.ArgumentTypeError)
    if not 0 <= ms <= most:
        shown = text if len(text) <= 30 else text[:27] + "..."
        raise argparse.ArgumentTypeError(
            f"{shown!r} is out of range: from 0 (1970-01-01) to {most} ms since the epoch"
        )
    return ms


def until_arg(text: str) -> int:
    """`--until`: as `time_arg`, within the registry's `uint64` grant end."""
    return time_arg(text, most=MAX_UNTIL_MS)


def _part(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.part")


def output_path(path: Path) -> Path:
    """`-o FILE`, refused at once (before any work) when it cannot be written: a folder, a
    missing folder, or one where no file can be made (read-only, /proc)."""
    if path.is_dir():
        raise DaiseeError(f"cannot write {path}: it is a folder (give a file name)")
    if not path.parent.is_dir():
        raise DaiseeError(f"cannot write {path}: there is no folder {path.parent}")
    try:
        _part(path).touch()
        _part(path).unlink()
    except OSError as exc:
        raise DaiseeError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path


def write_output(path: Path, text: str) -> None:
    """Write `text` to `path` whole or not at all: through a file beside it, renamed over it,
    so a failed write never leaves a cut file (nor spoils one already there)."""
    output_path(path)
    part = _part(path)
    try:
        part.write_text(text)
        os.replace(part, path)
    except OSError as exc:
        part.unlink(missing_ok=True)
        raise DaiseeError(f"cannot write {path}: {exc.strerror or exc}") from None


def address_arg(text: str) -> str:
    if not is_address(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not an address (0x and 40 hex digits)")
    return to_checksum_address(text)


def add_parser(sub: Any, default_config: Path) -> None:
    """Register `export`, `verify-export`, `grant` and `revoke` on the main parser's
    subparsers."""

    def node_options(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "-c",
            "--config",
            type=Path,
            default=default_config,
            help=f"the node's config (default {default_config})",
        )
        p.add_argument(
            "--registry", type=address_arg, required=True, help="the community registry's address"
        )
        p.add_argument("--role", choices=ROLES, required=True, help="the data role")
        p.add_argument("--recipient", type=address_arg, required=True, help="who receives it")

    export = sub.add_parser(
        "export",
        help="export this node's data to a recipient it granted, signed and with proofs",
        description="Write this node's data of [--from, --to) for a recipient holding a grant in "
        "force on the community registry: role own = every reading with its Merkle proof; "
        "supplier and grid = each period's import and export totals. Each period comes with "
        "its commitment and batch proof; the node signs the file. Refused (exit 1) without a "
        "grant in force.",
    )
    node_options(export)
    export.add_argument("--from", dest="from_ms", type=time_arg, required=True, help="start")
    export.add_argument("--to", dest="to_ms", type=time_arg, required=True, help="end (excluded)")
    export.add_argument(
        "--channel", action="append", default=None, help="own: only this channel (repeatable)"
    )
    export.add_argument("-o", "--output", type=Path, required=True, help="the file to write")
    export.set_defaults(func=cmd_export)

    verify = sub.add_parser(
        "verify-export",
        help="check an export file against the chain: signature, proofs, grant",
        description="Check an export: the node's signature, each commitment against the ledger, "
        "each reading's proof against its commitment, complete periods against their counts, "
        "and that the grant is in force now. Exit 0 when valid, 1 with every problem listed.",
    )
    verify.add_argument("file", type=Path, help="the export file")
    verify.add_argument("--rpc", required=True, help="a JSON-RPC URL of the chain")
    verify.add_argument(
        "--registry", type=address_arg, default=None, help="the registry (default: the file's)"
    )
    verify.add_argument(
        "--every-reading-on-chain",
        action="store_true",
        help="ask the ledger's verifyReading for every reading, not only one per period",
    )
    verify.add_argument("--json", action="store_true", help="machine-readable output")
    verify.set_defaults(func=cmd_verify_export)

    grant = sub.add_parser(
        "grant", help="grant a recipient a data role of this node until a time, on chain"
    )
    node_options(grant)
    grant.add_argument("--until", type=until_arg, required=True, help="end of the grant")
    grant.set_defaults(func=cmd_grant)
    revoke = sub.add_parser("revoke", help="revoke this node's grant of a data role, at once")
    node_options(revoke)
    revoke.set_defaults(func=cmd_revoke)


def _size(n: int) -> str:
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n:,} bytes"


def _node(args: argparse.Namespace) -> tuple[Config, LocalAccount]:
    from daisee_node.config import load_config
    from daisee_node.ledger.keys import load_account

    config = load_config(args.config)
    if config.chain is None:
        raise DaiseeError(f"{args.config} has no [chain] section: this node commits nothing")
    chain = config.chain
    account = load_account(
        chain.keystore_path(config.data_dir), chain.password_path(config.data_dir)
    )
    return config, account


def _registry(config: Config, address: str) -> Registry:
    from daisee_node.community.registry import Registry
    from daisee_node.ledger import chain as chainlib

    assert config.chain is not None
    w3 = chainlib.connect(
        config.chain.rpc_url,
        config.chain.rpc_timeout_s,
        fallback_urls=config.chain.rpc_fallback_urls,
    )
    reg = Registry(w3, address)
    reg.check_deployed()
    return reg


@chain_errors
def cmd_export(args: argparse.Namespace) -> int:
    output_path(args.output)
    config, account = _node(args)
    data = asyncio.run(
        build_export(
            config,
            account,
            role=args.role,
            recipient=args.recipient,
            from_ms=args.from_ms,
            to_ms=args.to_ms,
            registry=args.registry,
            channels=args.channel,
        )
    )
    text = json.dumps(data, indent=1) + "\n"
    if len(text) > MAX_EXPORT_BYTES:  # json.dumps writes ASCII: one byte a character
        raise ExportRefused(
            f"the export would be {_size(len(text))}, more than the {_size(MAX_EXPORT_BYTES)} "
            "`verify-export` reads: export a shorter range"
        )
    write_output(args.output, text)
    n = sum(len(p.get("readings", ())) for p in data["periods"])
    print(
        json.dumps(
            {
                "file": str(args.output),
                "role": data["role"],
                "recipient": data["recipient"],
                "periods": len(data["periods"]),
                "readings": n,
                "missing": len(data["missing"]),
            }
        )
    )
    return EXIT_OK


@chain_errors
def cmd_verify_export(args: argparse.Namespace) -> int:
    from daisee_node import safejson

    too_big = DaiseeError(
        f"{args.file} is larger than the {_size(MAX_EXPORT_BYTES)} an export file may be "
        "(ask the node for a shorter range)"
    )
    try:
        if args.file.stat().st_size > MAX_EXPORT_BYTES:
            raise too_big
        with args.file.open("rb") as f:  # bounded: a pipe or device has no size to stat
            raw = f.read(MAX_EXPORT_BYTES + 1)
        if len(raw) > MAX_EXPORT_BYTES:
            raise too_big
        data = safejson.loads(raw)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise DaiseeError(f"cannot read the export {args.file}: {reason}") from None
    if not isinstance(data, dict):
        raise DaiseeError(f"{args.file} is not an export file")
    from daisee_node.ledger import chain as chainlib

    result = verify_export(
        data,
        chainlib.connect(args.rpc),
        registry=args.registry,
        every_reading_on_chain=args.every_reading_on_chain,
    )
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print("checked:")
        print("\n".join(f"  {line}" for line in result["checked"]))
        if result["problems"]:
            print("problems:")
            print("\n".join(f"  {line}" for line in result["problems"]))
        print("VALID" if result["valid"] else "INVALID")
    return EXIT_OK if result["valid"] else EXIT_INVALID


@chain_errors
def cmd_grant(args: argparse.Namespace) -> int:
    config, account = _node(args)
    grant = _registry(config, args.registry).grant(account, args.recipient, args.role, args.until)
    print(json.dumps(dataclasses.asdict(grant)))
    return EXIT_OK


@chain_errors
def cmd_revoke(args: argparse.Namespace) -> int:
    config, account = _node(args)
    _registry(config, args.registry).revoke(account, args.recipient, args.role)
    print(
        json.dumps({"revoked": args.role, "recipient": args.recipient, "member": account.address})
    )
    return EXIT_OK
