"""Proofs of single readings: from the node's buffer to a commitment on chain, and back.

`build_proof` finds a stored reading, rebuilds its period's Merkle tree, checks it against the
commitment the node signed, and adds the batch proof of that commitment's transaction; anyone
holding the result can `check_proof` it against the chain, with no node and no database.

A period sealed with a conformity report has one more leaf, the report's (see
daisee_node/conformity.py): `build_report_proof` proves it the same way, and `check_proof` of
such a proof also checks that the report it carries is the one whose digest the leaf holds.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from daisee_node import safejson
from daisee_node.errors import DaiseeError
from daisee_node.ledger import merkle

if TYPE_CHECKING:
    from daisee_node.config import Config
    from daisee_node.ledger import chain as chainlib
    from daisee_node.ledger.commitment import Commitment
    from daisee_node.ledger.outbox import Entry
    from daisee_node.store import Store


def human_time(t_ms: int) -> str:
    """A time in ms since the epoch as people write it (UTC, to the second); past the years a
    calendar holds (a uint64 goes far beyond 9999), the number of ms itself."""
    try:
        return datetime.fromtimestamp(t_ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (ValueError, OverflowError, OSError):
        return f"{t_ms} ms since the epoch"


# -- the shape of proof and export files -------------------------------------------------------
#
# Files from outside are checked field by field against the types the ledger contract takes
# before anything is hashed or sent to the chain: a number out of its ABI type's range would
# otherwise fail deep in Python's int conversions or in web3's encoder, with no word of which
# field is wrong.

UINT8_MAX: Final = 2**8 - 1
UINT32_MAX: Final = 2**32 - 1
UINT64_MAX: Final = 2**64 - 1
UINT256_MAX: Final = 2**256 - 1
INT256_MIN, INT256_MAX = -(2**255), 2**255 - 1
#: the largest value (in units) whose micro-units `merkle.value_micro` can compute
MAX_VALUE: Final = 1e300
_COMMITMENT_INTS: Final = {
    "seq": UINT64_MAX,
    "t0": UINT64_MAX,
    "t1": UINT64_MAX,
    "count": UINT32_MAX,
    "import_wh": UINT64_MAX,
    "export_wh": UINT64_MAX,
}
_COMMITMENT_HASHES: Final = ("root", "prev_hash", "rules_hash")


def shown(value: object) -> str:
    """A value from a file, short enough for one line of a message."""
    if isinstance(value, float) and math.isinf(value):
        return "a number too large for a float (e.g. 1e400)"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**30:
        return f"a number of {len(str(abs(value)))} digits"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def int_problem(value: object, lo: int, hi: int) -> str | None:
    """Why `value` is not a whole number in [lo, hi], or None."""
    if isinstance(value, bool) or not isinstance(value, int):
        return f"{shown(value)} is not a whole number"
    if not lo <= value <= hi:
        return f"{shown(value)} is out of range ({_bound(lo)} to {_bound(hi)})"
    return None


def _bound(b: int) -> str:
    """A range's end as people read it: int256's ends as powers of two, not 77 digits."""
    if abs(b) <= 2**64:
        return str(b)
    return f"-2**{(-b).bit_length() - 1}" if b < 0 else f"2**{b.bit_length()} - 1"


def bytes32_problem(value: object) -> str | None:
    """Why `value` is not 32 bytes in hex (with or without 0x), or None."""
    if not isinstance(value, str):
        return f"{shown(value)} is not a hex string"
    digits = value.removeprefix("0x")
    if len(digits) != 64 or not all(c in "0123456789abcdefABCDEF" for c in digits):
        return f"{shown(value)} is not 32 bytes in hex"
    return None


def hashes_problem(value: object) -> str | None:
    """Why `value` is not a list of 32-byte hex strings (a Merkle proof), or None."""
    if not isinstance(value, list):
        return f"{shown(value)} is not a list of hashes"
    for i, item in enumerate(value):
        if (why := bytes32_problem(item)) is not None:
            return f"item {i + 1}: {why}"
    return None


def address_problem(value: object) -> str | None:
    """Why `value` is not an address, or None."""
    from eth_utils import is_address

    if isinstance(value, str) and is_address(value):
        return None
    return f"{shown(value)} is not an address (0x and 40 hex digits)"


def commitment_problems(value: object, where: str = "commitment") -> list[str]:
    """Every field of a commitment in JSON that is missing or not of its ABI type."""
    if not isinstance(value, dict):
        return [f"{where}: {shown(value)} is not an object"]
    problems = []
    checks: list[tuple[str, str | None]] = [("node", address_problem(value.get("node")))]
    checks += [(k, int_problem(value.get(k), 0, hi)) for k, hi in _COMMITMENT_INTS.items()]
    checks += [(k, bytes32_problem(value.get(k))) for k in _COMMITMENT_HASHES]
    for key, why in checks:
        if key not in value:
            problems.append(f"{where}.{key}: missing")
        elif why is not None:
            problems.append(f"{where}.{key}: {why}")
    known = {"node", *_COMMITMENT_INTS, *_COMMITMENT_HASHES}
    problems += [f"{where}.{k}: not a field of a commitment" for k in value if k not in known]
    return problems


def value_problem(value: object) -> str | None:
    """Why a reading's readable `value` is neither null nor a number it can be in micro-units."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"{shown(value)} is not a number"
    if math.isnan(value) or not -MAX_VALUE <= value <= MAX_VALUE:
        return f"{shown(value)} is out of range"
    return None


def reading_problems(data: dict[str, Any], where: str = "", *, named: bool = False) -> list[str]:
    """Every field of a reading with its proof (as `prove` and `export` write them) that is
    missing or not of its type: the fields the ledger's leaf is made of within their ABI types
    (`named`: the channel's name is required too, as an export's readings carry it)."""
    checks = {
        "channel_id": bytes32_problem(data.get("channel_id")),
        "t_ms": int_problem(data.get("t_ms"), 0, UINT64_MAX),
        "value_micro": int_problem(data.get("value_micro"), INT256_MIN, INT256_MAX),
        "quality": int_problem(data.get("quality"), 0, UINT8_MAX),
        "proof": hashes_problem(data.get("proof")),
    }
    problems = []
    for key, why in checks.items():
        if key not in data:
            problems.append(f"{where}{key}: missing")
        elif why is not None:
            problems.append(f"{where}{key}: {why}")
    # the channel's name is for people (the leaf holds its id): it may be left out, but a
    # name given must be one
    if "channel" in data and not isinstance(data["channel"], str):
        problems.append(f"{where}channel: {shown(data['channel'])} is not a name")
    elif named and "channel" not in data:
        problems.append(f"{where}channel: missing")
    if (why := value_problem(data.get("value"))) is not None:
        problems.append(f"{where}value: {why}")
    return problems


async def _channel_exists(store: Store, channel: str) -> None:
    names = [n for (n,) in await store.query("SELECT name FROM channels ORDER BY name")]
    if channel in names:
        return
    close = difflib.get_close_matches(channel, names, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise DaiseeError(f"no channel {channel!r} in the buffer; {hint}channels: {', '.join(names)}")


async def _newest_on_chain_ms(store: Store, node: str) -> int:
    """The last ms of the newest own period the chain holds."""
    from daisee_node.ledger.outbox import CONFIRMED, INCLUDED

    rows = []
    if await store.query("SELECT 1 FROM sqlite_master WHERE name = 'commitments'"):
        rows = await store.query(
            "SELECT max(t1) FROM commitments WHERE node = ? AND own = 1 AND state IN (?, ?)",
            (node, INCLUDED, CONFIRMED),
        )
    if not rows or rows[0][0] is None:
        raise DaiseeError(
            "no period of this node is on the chain yet (`status` shows when one is), so no "
            "reading can be proven yet"
        )
    return int(rows[0][0]) - 1


async def build_proof(
    config: Config, channel: str, at_ms: int | None = None, *, keep_in: Path | None = None
) -> dict[str, Any]:
    """The reading of `channel` at or before `at_ms` (default: the newest one on the chain),
    its Merkle proof and its batch proof. `keep_in`: the folder of a kept embedded chain."""
    from daisee_node.ledger.keys import keystore_address
    from daisee_node.ledger.outbox import CONFIRMED, INCLUDED, Outbox
    from daisee_node.store import Store, db_path

    if config.chain is None:
        raise DaiseeError("the config has no [chain] section")
    node = keystore_address(config.chain.keystore_path(config.data_dir))
    # Read-only: a live node may be writing beside it; nothing here may change its file.
    store = Store(db_path(config.data_dir), read_only=True)
    await store.open()
    try:
        await _channel_exists(store, channel)
        if at_ms is None:
            at_ms = await _newest_on_chain_ms(store, node)
        rows = await store.query(
            "SELECT r.t_ms, r.value, r.quality FROM readings r JOIN channels c "
            "ON c.id = r.channel_id WHERE c.name = ? AND r.t_ms <= ? ORDER BY r.t_ms DESC LIMIT 1",
            (channel, at_ms),
        )
        if not rows:
            raise DaiseeError(
                f"no reading of {channel!r} at or before {human_time(at_ms)} in the buffer"
            )
        t_ms, value, quality = rows[0]
        entry = await Outbox(store).covering(node, t_ms)
        if entry is None:
            raise DaiseeError(
                f"the period of that reading ({channel} at {human_time(t_ms)}) is not sealed yet"
            )
        if entry.state not in (INCLUDED, CONFIRMED) or entry.tx_hash is None:
            raise DaiseeError(
                f"that period (seq {entry.commitment.seq}) is {entry.state}, not on the chain yet"
            )
        secret, locked = unlock_salt_secret(config)
        tree = await period_tree(store, node, entry, secret, locked=locked)
    finally:
        await store.close()
    node_bytes = bytes.fromhex(node[2:])
    cid = merkle.channel_id(channel)
    micro = merkle.value_micro(value)
    leaf = merkle.reading_leaf(node_bytes, cid, t_ms, micro, quality)
    reading = (channel, cid, t_ms, value, micro, quality)
    return _proof_file(config, node, entry, tree, leaf, reading, keep_in)


def _proof_file(
    config: Config,
    node: str,
    entry: Entry,
    tree: PeriodTree,
    leaf: bytes,
    reading: tuple[str, bytes, int, float | None, int, int],
    keep_in: Path | None,
) -> dict[str, Any]:
    """What `prove` writes: a leaf's reading (channel, channel id, t_ms, value, micro, quality),
    its proof in the period's tree, and its commitment with its proof within its batch."""
    channel, cid, t_ms, value, micro, quality = reading
    assert entry.tx_hash is not None
    ledger, batch_proof = _batch_proof(config, entry, keep_in)
    return {
        "node": node,
        "channel": channel,
        "channel_id": "0x" + cid.hex(),
        "t_ms": t_ms,
        "value": value,
        "value_micro": micro,
        "quality": quality,
        "proof": ["0x" + p.hex() for p in tree.proof(leaf)],
        "commitment": entry.commitment.to_json(),
        "tx": "0x" + entry.tx_hash.hex(),
        "batch_proof": ["0x" + p.hex() for p in batch_proof],
        "ledger": ledger.address,
        "chain_id": ledger.chain_id,
    }


@dataclass
class PeriodTree:
    """A sealed period's tree, rebuilt: its leaves (as the ledger computes them from readings),
    its levels, and the salt secret when the tree is over salted leaves."""

    leaves: list[bytes]
    tree: list[list[bytes]]
    secret: bytes | None
    _index: dict[bytes, int] = field(default_factory=dict, repr=False)

    def proof(self, leaf: bytes) -> list[bytes]:
        """The proof of `leaf`: its salt first when salted, then the siblings to the root."""
        if not self._index:  # built once: an export proves every reading of a period
            self._index.update((x, i) for i, x in enumerate(self.leaves))
        path = merkle.proof(self.tree, self._index[leaf])
        return path if self.secret is None else [merkle.leaf_salt(self.secret, leaf), *path]


def salt_secret_of(config: Config) -> bytes | None:
    """The node's salt secret, from its key (None when the key cannot be unlocked here: then
    only periods sealed without salt can be proven)."""
    return unlock_salt_secret(config)[0]


def unlock_salt_secret(config: Config) -> tuple[bytes | None, str | None]:
    """The node's salt secret and None, or None and why the node key cannot be unlocked here
    (its password file open to others, missing, unreadable or wrong): the reason a period
    sealed over salted leaves cannot be rebuilt."""
    from daisee_node.ledger.keys import load_account

    chain = config.chain
    if chain is None:
        return None, "the config has no [chain] section"
    try:
        account = load_account(
            chain.keystore_path(config.data_dir), chain.password_path(config.data_dir)
        )
    except (DaiseeError, ValueError) as exc:  # KeyStoreError is a DaiseeError
        return None, str(exc)
    except OSError as exc:
        return None, f"{exc.filename or 'the node key'}: {exc.strerror or exc}"
    return merkle.salt_secret(bytes(account.key)), None


async def period_tree(
    store: Store,
    node: str,
    entry: Entry,
    secret: bytes | None = None,
    *,
    locked: str | None = None,
) -> PeriodTree:
    """A sealed period's Merkle tree, rebuilt from the buffer (and the conformity report sealed
    with it) and checked against the commitment's root: over salted leaves with `secret` when
    that gives the root, else over plain ones (periods sealed before salting). `locked`: why
    there is no `secret`, named when the plain leaves do not give the root."""
    from daisee_node.conformity import leaf_entry
    from daisee_node.ledger.outbox import Outbox, period_leaves

    c = entry.commitment
    period = await store.query(
        "SELECT r.t_ms, ch.name, r.value, r.quality FROM readings r JOIN channels ch "
        "ON ch.id = r.channel_id WHERE r.t_ms >= ? AND r.t_ms < ?",
        (c.t0, c.t1),
    )
    report = await Outbox(store).report(node, c.seq)
    extra = None if report is None else leaf_entry(c.t1, report.digest)
    leaves = period_leaves(bytes.fromhex(node[2:]), period, extra=extra)
    if secret is not None:
        salted = merkle.salt_packed(b"".join(leaves), secret)
        tree = merkle.levels([salted[i : i + 32] for i in range(0, len(salted), 32)])
        if tree[-1][0] == c.root:
            return PeriodTree(leaves, tree, secret)
    tree = merkle.levels(leaves)  # built once: it gives both the root and the proofs
    if tree[-1][0] != c.root:
        if secret is None and locked is not None:
            # Most likely sealed over salted leaves: the key is what is missing, not readings.
            raise DaiseeError(
                f"cannot unlock the node key to rebuild salted leaves: {locked}; without it "
                f"the buffer's plain leaves do not give commitment {c.seq}'s root"
            )
        hint = "" if secret is not None else " or the node key is needed to prove its salted leaves"
        raise DaiseeError(
            f"the buffer no longer matches commitment {c.seq} (readings removed?{hint})"
        )
    return PeriodTree(leaves, tree, None)


def _batch_proof(
    config: Config, entry: Entry, keep_in: Path | None
) -> tuple[chainlib.Ledger, list[bytes]]:
    """The node's ledger, and the proof of `entry`'s commitment in its batch on chain."""
    from daisee_node.ledger import chain as chainlib

    assert config.chain is not None and entry.tx_hash is not None
    w3 = chainlib.connect(
        config.chain.rpc_url,
        config.chain.rpc_timeout_s,
        keep_in=keep_in,
        fallback_urls=config.chain.rpc_fallback_urls,
    )
    address = config.chain.ledger_address or _embedded_ledger(w3)
    ledger = chainlib.Ledger(w3, address)
    return ledger, ledger.batch_proof(entry.tx_hash, entry.commitment.struct_hash())


async def build_report_proof(
    config: Config, store: Store, node: str, entry: Entry, *, keep_in: Path | None = None
) -> dict[str, Any]:
    """A sealed period's conformity report with the proof of its leaf: the same form as a
    reading's proof (`verify` checks it), plus the report itself."""
    from daisee_node.conformity import REPORT_CHANNEL, REPORT_CHANNEL_ID, leaf_entry, report_leaf
    from daisee_node.ledger.outbox import CONFIRMED, INCLUDED, Outbox

    c = entry.commitment
    report = await Outbox(store).report(node, c.seq)
    if report is None:
        raise DaiseeError(f"period seq {c.seq} was sealed without a conformity report")
    if entry.state not in (INCLUDED, CONFIRMED) or entry.tx_hash is None:
        raise DaiseeError(f"that period (seq {c.seq}) is {entry.state}, not on the chain yet")
    secret, locked = unlock_salt_secret(config)
    tree = await period_tree(store, node, entry, secret, locked=locked)
    t_ms, _, micro, quality = leaf_entry(c.t1, report.digest)
    leaf = report_leaf(bytes.fromhex(node[2:]), c.t1, report.digest)
    reading = (REPORT_CHANNEL, REPORT_CHANNEL_ID, t_ms, None, micro, quality)
    proof = _proof_file(config, node, entry, tree, leaf, reading, keep_in)
    return {**proof, "report": report.report()}


def report_problems(data: dict[str, Any], commitment: Commitment) -> list[str]:
    """What is wrong with the report a report proof carries (nothing for a reading's proof)."""
    from daisee_node.conformity import REPORT_CHANNEL, digest, digest_value

    if data.get("channel") != REPORT_CHANNEL:
        return []
    report = data.get("report")
    if not isinstance(report, dict):
        return ["a conformity report proof without its report"]
    problems = []
    try:
        held = digest_value(digest(report))
    except ValueError:  # a number JSON cannot hold (1e400 reads as infinity): not hashable
        held = None
    if held != data["value_micro"]:
        problems.append("the report is not the one whose digest the leaf holds")
    if data["t_ms"] != commitment.t1 - 1:
        problems.append("the report's leaf is not at the period's last millisecond")
    if (report.get("seq"), report.get("t0"), report.get("t1")) != (
        commitment.seq,
        commitment.t0,
        commitment.t1,
    ):
        problems.append("the report names another period than the commitment")
    return problems


@dataclass(frozen=True)
class ReadingProof:
    """A proof as `build_proof` writes it, parsed: the proven fields and the readable ones."""

    data: dict[str, Any]
    commitment: Commitment
    #: (channel id, t_ms, value in micro-units, quality): what the leaf is made of
    reading: tuple[bytes, int, int, int]
    proof: list[bytes]
    batch_proof: list[bytes]


def parse_proof(text: str) -> ReadingProof:
    """A proof file's text, parsed; a clear error (every problem found) for anything
    `build_proof` would not write, before anything is hashed or sent to the chain."""
    from daisee_node.ledger.commitment import Commitment

    try:
        data = safejson.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise DaiseeError(f"not a proof written by `prove` ({exc})") from exc
    if not isinstance(data, dict):
        raise DaiseeError("not a proof written by `prove` (not a JSON object)")
    problems = proof_problems(data)
    if problems:
        raise DaiseeError(f"not a proof written by `prove` ({'; '.join(problems)})")
    return ReadingProof(
        data=data,
        commitment=Commitment.from_json(data["commitment"]),
        reading=(
            bytes.fromhex(data["channel_id"].removeprefix("0x")),
            data["t_ms"],
            data["value_micro"],
            data["quality"],
        ),
        proof=[bytes.fromhex(p.removeprefix("0x")) for p in data["proof"]],
        batch_proof=[bytes.fromhex(p.removeprefix("0x")) for p in data["batch_proof"]],
    )


def proof_problems(data: dict[str, Any]) -> list[str]:
    """Every field of a proof file that is missing or not of its type (the fields `check_proof`
    reads are checked when present: a line proof carried in a message may leave them out)."""
    problems = reading_problems(data)
    problems += commitment_problems(data.get("commitment"))
    if (why := hashes_problem(data.get("batch_proof"))) is not None:
        problems.append(f"batch_proof: {why}")
    for key in ("node", "ledger"):
        if key in data and (why := address_problem(data[key])) is not None:
            problems.append(f"{key}: {why}")
    if "chain_id" in data and (why := int_problem(data["chain_id"], 0, UINT256_MAX)) is not None:
        problems.append(f"chain_id: {why}")
    if data.get("report") is not None and not isinstance(data["report"], dict):
        problems.append(f"report: {shown(data['report'])} is not an object")
    return problems


def _embedded_ledger(w3: Any) -> str:
    """The ledger of an embedded chain: the first contract its set-up account deployed."""
    from eth_account import Account

    from daisee_node.ledger import chain as chainlib
    from daisee_node.ledger import embedded

    address = embedded.first_contract(w3, Account.from_key(chainlib.TESTER_KEYS[0]).address)
    if address is None:
        raise DaiseeError("the embedded chain holds no ledger")
    return address


def check_proof(
    p: ReadingProof,
    rpc_url: str,
    *,
    keep_in: Path | None = None,
    fallback_urls: list[str] | tuple[str, ...] = (),
) -> dict[str, Any]:
    """Check a proof against the chain at `rpc_url` (`keep_in`: the folder of a kept embedded
    chain; `fallback_urls`: endpoints to use while `rpc_url` does not answer): `valid`, and the
    `problems` found."""
    from eth_utils import to_checksum_address

    from daisee_node.ledger import chain as chainlib

    data, commitment, reading = p.data, p.commitment, p.reading
    absent = [key for key in ("node", "channel", "ledger") if key not in data]
    if absent:
        raise DaiseeError(f"not a proof written by `prove` ({', '.join(absent)}: missing)")
    # The readable fields must say what the proven ones say.
    problems = []
    if merkle.channel_id(str(data["channel"])) != reading[0]:
        problems.append("channel name does not match channel_id")
    if data.get("value") is not None and merkle.value_micro(float(data["value"])) != reading[2]:
        problems.append("value does not match value_micro")
    if to_checksum_address(data["node"]) != commitment.node:
        problems.append("node is not the commitment's node")
    problems += report_problems(data, commitment)
    w3 = chainlib.connect(rpc_url, keep_in=keep_in, fallback_urls=fallback_urls)
    ledger = chainlib.Ledger(w3, data["ledger"])
    ledger.check_deployed()
    if not ledger.verify_reading(commitment, p.batch_proof, reading, p.proof):
        problems.append("the ledger does not accept this reading and proof")
    return {
        "valid": not problems,
        "problems": problems,
        "node": commitment.node,
        "seq": commitment.seq,
        "channel": data["channel"],
        "t_ms": reading[1],
        "time": human_time(reading[1]),
    }
