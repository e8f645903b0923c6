"""Hostile input to the data-access and proof commands: tampered export files, tampered proof
files, out-of-range times and unusable output paths. Each gets one clear line (or, for a file
being checked, INVALID with every problem named) and a non-zero exit, never a traceback; a
malformed field is named before anything reaches the chain.

The commands run in this process through `cli.main` (an exception escaping it fails the test);
checks that need a ledger run on py-evm."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount

from daisee_node import export
from daisee_node.cli import main
from daisee_node.community.registry import Registry, deploy
from daisee_node.conformity_command import period_arg
from daisee_node.errors import DaiseeError
from daisee_node.ledger import chain as chainlib
from daisee_node.ledger import merkle
from daisee_node.ledger.proofs import check_proof, human_time, parse_proof
from tests.support.market import Market, new_market, window_start
from tests.unit import test_export as base

#: an RPC URL where nothing answers: a check that asks the chain would fail on it
DEAD_RPC = "http://127.0.0.1:9"
UINT64 = "(0 to 18446744073709551615)"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """`daisee-node ARGV…` in this process: exit code, stdout, stderr."""
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse's usage errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    """The single line a refused command prints (fails the test if it printed more)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("daisee-node: error: "), err
    return lines[0]


@dataclass
class Granted:
    """A ledger on py-evm with two committed periods of a node, its grant, and their export."""

    m: Market
    node: LocalAccount
    data: dict[str, Any]


@pytest.fixture(scope="module")
def granted() -> Iterator[Granted]:
    m = new_market()
    reg = Registry(m.w3, deploy(m.w3, m.gov, m.ledger.address))
    recipient = Account.create().address
    made = base.commit_periods(m, m.seller, window_start(m, -1), 2)
    reg.grant(m.seller, recipient, "own", m.now_ms() + 3_600_000)
    data = base.make_export(m, reg, m.seller, recipient, "own", made)
    assert export.verify_export(copy.deepcopy(data), m.w3)["valid"]
    yield Granted(m, m.seller, data)


def reading(d: dict[str, Any]) -> dict[str, Any]:
    return d["periods"][0]["readings"][0]


def commitment(d: dict[str, Any]) -> dict[str, Any]:
    return d["periods"][0]["commitment"]


# (what is changed, the change, a problem it must give, whether the chain may be asked)
TAMPERED: list[tuple[str, Callable[[dict[str, Any]], None], str, bool]] = [
    ("chain_id 1e400", lambda d: d.update(chain_id=math.inf), "chain_id: a number too", False),
    ("from_ms 1e400", lambda d: d.update(from_ms=math.inf), "from_ms: a number too large", False),
    ("missing 'abc'", lambda d: d.update(missing="abc"), "missing: is neither null nor", False),
    ("to_ms -1", lambda d: d.update(to_ms=-1), f"to_ms: -1 is out of range {UINT64}", False),
    ("role 7", lambda d: d.update(role=7), "role: 7 is not one of own, supplier, grid", False),
    ("node cut", lambda d: d.update(node="0x12"), "node: '0x12' is not an address", False),
    (
        "commitment t0 1e400",
        lambda d: commitment(d).update(t0=math.inf),
        "period 1: commitment.t0: a number too large for a float",
        True,
    ),
    ("missing [1]", lambda d: d.update(missing=[1]), "missing 1: not an object", True),
    (
        "missing seq 'x'",
        lambda d: d.update(missing=[{"seq": "x"}]),
        "missing 1: seq: 'x' is not a whole number",
        True,
    ),
    (
        "proof [5]",
        lambda d: reading(d).update(proof=[5]),
        "period 1: reading 1: proof: item 1: 5 is not a hex string",
        True,
    ),
    (
        "batch_proof [7]",
        lambda d: d["periods"][0].update(batch_proof=[7]),
        "period 1: batch_proof: item 1: 7 is not a hex string",
        True,
    ),
    (
        "value_micro -2**300",
        lambda d: reading(d).update(value_micro=-(2**300)),
        "period 1: reading 1: value_micro: a number of 91 digits is out of range",
        True,
    ),
    (
        "seq -1",
        lambda d: commitment(d).update(seq=-1),
        f"period 1: commitment.seq: -1 is out of range {UINT64}",
        True,
    ),
    (
        "seq 2**70",
        lambda d: commitment(d).update(seq=2**70),
        f"period 1: commitment.seq: {2**70} is out of range {UINT64}",
        True,
    ),
    (
        "channel name removed",
        lambda d: reading(d).pop("channel"),
        "period 1: reading 1: channel: missing",
        True,
    ),
    (
        "quality 256",
        lambda d: reading(d).update(quality=256),
        "period 1: reading 1: quality: 256 is out of range (0 to 255)",
        True,
    ),
    (
        "value 1e308",
        lambda d: reading(d).update(value=1e308),
        "period 1: reading 1: value: 1e+308 is out of range",
        True,
    ),
    (
        "report body 1e400",
        lambda d: d["periods"][0].update(report={"body": {"x": math.inf}, "proof": []}),
        "period seq 2: the conformity report holds a number no report can hold",
        True,
    ),
]


@pytest.mark.parametrize(
    ("change", "problem", "asks_chain"),
    [pytest.param(c, p, a, id=name) for name, c, p, a in TAMPERED],
)
def test_a_tampered_field_is_named_and_the_file_reported_invalid(
    granted: Granted,
    change: Callable[[dict[str, Any]], None],
    problem: str,
    asks_chain: bool,
) -> None:
    tampered = copy.deepcopy(granted.data)
    change(tampered)
    # a file whose head is unusable is refused without a word to the chain
    w3 = granted.m.w3 if asks_chain else chainlib.connect(DEAD_RPC)
    result = export.verify_export(tampered, w3)
    assert not result["valid"]
    assert any(problem in p for p in result["problems"]), result["problems"]
    # the content changed after signing: said so, not "signed by <a meaningless address>"
    assert "altered after the node signed it" in result["problems"][0]


def test_a_malformed_period_does_not_hide_the_problems_of_the_others(granted: Granted) -> None:
    tampered = copy.deepcopy(granted.data)
    commitment(tampered)["seq"] = -1
    second = tampered["periods"][1]["readings"][2]
    second["value"] += 100
    second["value_micro"] = merkle.value_micro(second["value"])
    seq2 = tampered["periods"][1]["commitment"]["seq"]
    problems = export.verify_export(tampered, granted.m.w3)["problems"]
    assert problems[1:] == [
        f"period 1: commitment.seq: -1 is out of range {UINT64}",
        f"period seq {seq2}: reading {second['channel']} at {second['t_ms']}: not a leaf of the "
        "commitment's root (value or proof altered)",
    ]
    assert problems[0].startswith(f"signed by someone other than the node {granted.node.address}")


def test_a_file_broken_everywhere_lists_its_first_problems_and_counts_the_rest(
    granted: Granted,
) -> None:
    tampered = copy.deepcopy(granted.data)
    for r in tampered["periods"][0]["readings"]:
        r.update(t_ms="now", quality=-1, proof="none")
    tampered["missing"] = [{"seq": -k} for k in range(1, 200)]
    problems = export.verify_export(tampered, granted.m.w3)["problems"]
    assert len(problems) == export.MAX_PROBLEMS + 1
    assert problems[-1] == f"... and {1 + 6 * 3 + 199 - export.MAX_PROBLEMS} more problems"


def test_verify_export_prints_invalid_for_a_file_with_numbers_json_cannot_hold(
    granted: Granted, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = json.dumps(granted.data)
    chain_id = f'"chain_id": {granted.data["chain_id"]}'
    assert chain_id in text
    file = tmp_path / "tampered.json"
    file.write_text(text.replace(chain_id, '"chain_id": 1e400'))
    code, out, err = run(capsys, "verify-export", str(file), "--rpc", DEAD_RPC)
    assert code == export.EXIT_INVALID and err == ""
    lines = out.splitlines()
    assert lines[-1] == "INVALID"
    assert "  chain_id: a number too large for a float (e.g. 1e400) is not a whole number" in lines


def test_an_export_file_over_the_size_limit_is_refused_unread(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    big = tmp_path / "big.json"
    with big.open("wb") as f:  # sparse: no disk space, and nothing is read from it
        f.truncate(export.MAX_EXPORT_BYTES + 1)
    code, _, err = run(capsys, "verify-export", str(big), "--rpc", DEAD_RPC)
    assert code == 1
    line = one_error_line(err)
    assert str(big) in line and "larger than the 128 MiB an export file may be" in line


def test_a_file_that_is_not_there_or_a_folder_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "verify-export", str(tmp_path / "none.json"), "--rpc", DEAD_RPC)
    assert code == 1 and "No such file or directory" in one_error_line(err)
    code, _, err = run(capsys, "verify-export", str(tmp_path), "--rpc", DEAD_RPC)
    assert code == 1 and "Is a directory" in one_error_line(err)


# -- proof files ------------------------------------------------------------------------------


def proof_file() -> dict[str, Any]:
    """A proof with the shape `prove` writes (it proves nothing: the shape is what counts)."""
    zero = "0x" + "00" * 32
    return {
        "node": Account.create().address,
        "channel": "grid.power_w",
        "channel_id": "0x" + merkle.channel_id("grid.power_w").hex(),
        "t_ms": 1_700_000_000_000,
        "value": 1.5,
        "value_micro": 1_500_000,
        "quality": 0,
        "proof": [zero],
        "commitment": {
            "node": Account.create().address,
            "seq": 1,
            "t0": 0,
            "t1": 1,
            "root": zero,
            "count": 1,
            "import_wh": 0,
            "export_wh": 0,
            "prev_hash": zero,
            "rules_hash": zero,
        },
        "tx": zero,
        "batch_proof": [],
        "ledger": Account.create().address,
        "chain_id": 1,
    }


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("t_ms", "1e400", "t_ms: a number too large for a float (e.g. 1e400) is not a whole"),
        ("t_ms", '"5"', "t_ms: '5' is not a whole number"),
        ("t_ms", str(2**64), f"t_ms: 18446744073709551616 is out of range {UINT64}"),
        (
            "value_micro",
            str(2**300),
            "value_micro: a number of 91 digits is out of range (-2**255 to 2**255 - 1)",
        ),
        ("quality", "-1", "quality: -1 is out of range (0 to 255)"),
        ("proof", "[5]", "proof: item 1: 5 is not a hex string"),
        ("batch_proof", "[7]", "batch_proof: item 1: 7 is not a hex string"),
        ("channel_id", '"0x12"', "channel_id: '0x12' is not 32 bytes in hex"),
        ("value", "1e400", "value: a number too large for a float (e.g. 1e400) is out of range"),
        ("ledger", "5", "ledger: 5 is not an address"),
        ("commitment", "[]", "commitment: [] is not an object"),
    ],
)
def test_a_tampered_proof_file_is_refused_naming_its_field(
    field: str, value: str, problem: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = proof_file()
    text = json.dumps({**good, field: "@@"}).replace('"@@"', value)
    with pytest.raises(DaiseeError, match="not a proof written by `prove`") as caught:
        parse_proof(text)
    assert problem in str(caught.value)
    # and the command says it in one line, without asking the chain
    file = tmp_path / "p.json"
    file.write_text(text)
    code, _, err = run(capsys, "verify", str(file), "--rpc", DEAD_RPC)
    assert code == 1 and problem in one_error_line(err)


def test_a_commitment_time_out_of_range_in_a_proof_is_named() -> None:
    good = proof_file()
    text = json.dumps(good).replace('"t0": 0', '"t0": 1e400')
    with pytest.raises(DaiseeError, match=r"commitment\.t0: a number too large"):
        parse_proof(text)
    parse_proof(json.dumps(good))  # the untouched file parses


def test_a_proof_without_the_fields_verify_reads_is_refused_before_the_chain() -> None:
    good = proof_file()
    del good["node"], good["ledger"], good["channel"]
    parsed = parse_proof(json.dumps(good))  # a line proof in a message may leave them out
    with pytest.raises(DaiseeError, match="node, channel, ledger: missing"):
        check_proof(parsed, DEAD_RPC)


def test_a_time_beyond_the_calendar_is_shown_as_its_number() -> None:
    assert human_time(2**64 - 1) == f"{2**64 - 1} ms since the epoch"
    assert human_time(1_700_000_000_000) == "2023-11-14 22:13:20 UTC"


# -- times and output paths on the command line -------------------------------------------------

HUGE = "99999999999999999999999"
ADDRESS = "0x" + "11" * 20


def node_args(*more: str) -> list[str]:
    return ["-c", "/nonexistent.toml", "--registry", ADDRESS, "--recipient", ADDRESS, *more]


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (
            ["export", *node_args("--role", "own", "--from", "0", "--to", HUGE, "-o", "x.json")],
            f"argument --to: '{HUGE}' is out of range: from 0 (1970-01-01) to 9223372036854775807",
        ),
        (
            ["export", *node_args("--role", "own", "--from", "1" * 5000, "--to", "1", "-o", "x")],
            f"argument --from: '{'1' * 27}...' is out of range",
        ),
        (
            ["grant", *node_args("--role", "own", "--until", HUGE)],
            f"argument --until: '{HUGE}' is out of range: from 0 (1970-01-01) to "
            "18446744073709551615 ms",
        ),
        (
            ["grant", *node_args("--role", "own", "--until", "1969-12-31T00:00:00Z")],
            "argument --until: '1969-12-31T00:00:00Z' is out of range",
        ),
        (
            ["conformity", "-c", "/nonexistent.toml", "--period", HUGE],
            f"argument --period: time {HUGE} is out of range: at most 9223372036854775807 ms",
        ),
        (
            ["conformity", "-c", "/nonexistent.toml", "--period", f"seq:{HUGE}"],
            f"argument --period: seq {HUGE} is out of range: at most 9223372036854775807",
        ),
    ],
)
def test_an_out_of_range_time_is_refused_by_the_command_line(
    argv: list[str], said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert said in err.strip().splitlines()[-1], err


def test_the_largest_times_are_still_taken() -> None:
    assert export.time_arg(str(2**63 - 1)) == 2**63 - 1
    assert export.until_arg(str(2**64 - 1)) == 2**64 - 1
    assert period_arg(f"seq:{2**63 - 1}") == ("seq", 2**63 - 1)


@pytest.mark.parametrize(
    ("where", "reason"),
    [
        ("/proc/x.json", "No such file or directory"),
        ("{tmp}", "it is a folder (give a file name)"),
        ("{tmp}/no/such/x.json", "there is no folder {tmp}/no/such"),
    ],
)
def test_an_output_that_cannot_be_written_is_refused_before_any_work(
    where: str, reason: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, why = where.format(tmp=tmp_path), reason.format(tmp=tmp_path)
    # the config named does not exist: the path is refused before it is even read
    argv = node_args("--role", "own", "--from", "0", "--to", "1", "-o", path)
    code, _, err = run(capsys, "export", *argv)
    assert code == 1 and one_error_line(err).endswith(f"cannot write {path}: {why}")
    code, _, err = run(capsys, "conformity", "-c", "/nonexistent.toml", "--prove", "-o", path)
    assert code == 1 and one_error_line(err).endswith(f"cannot write {path}: {why}")


def test_a_write_is_whole_or_leaves_the_old_file(tmp_path: Path) -> None:
    out = tmp_path / "export.json"
    out.write_text("the previous export\n")
    export.write_output(out, "the new one\n")
    assert out.read_text() == "the new one\n"
    assert [p.name for p in tmp_path.iterdir()] == ["export.json"]  # no part file left
    with pytest.raises(DaiseeError, match=r"cannot write /proc/x\.json: No such file"):
        export.write_output(Path("/proc/x.json"), "x")
