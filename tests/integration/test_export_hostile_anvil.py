"""Hostile input to `verify-export`, `grant`, `revoke` and `export` against a real RPC (anvil):
out-of-range fields of a tampered export are named, with every other problem of the file, and
never reach the chain's ABI encoder; and the commands reach the chain through the config's
fallback endpoints while its own endpoint does not answer."""

from __future__ import annotations

import asyncio
import copy
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount

from daisee_node import export
from daisee_node.cli import main
from daisee_node.community.registry import Registry, deploy
from daisee_node.ledger import merkle
from daisee_node.ledger.keys import load_account, new_keystore
from daisee_node.store import Store, db_path
from tests.conftest import ROOT, write_config
from tests.support.chains import AnvilLedger
from tests.support.market import Market, window_start
from tests.unit import test_export as base

pytestmark = [pytest.mark.slow, pytest.mark.beside]  # anvil and a batch of commitments

#: nothing answers here: the node's own endpoint, down
DEAD_RPC = "http://127.0.0.1:9"
UINT64 = "(0 to 18446744073709551615)"


@dataclass
class Chain:
    """anvil with the ledger and the registry; a node with two committed periods and its
    export to a recipient it granted."""

    anvil: AnvilLedger
    registry: str
    node: LocalAccount
    data: dict[str, Any]


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chain]:
    tmp_path = tmp_path_factory.mktemp("hostile")
    anvil = AnvilLedger(tmp_path, block_time_s=1)
    try:
        nodes = [Account.create() for _ in range(3)]
        for node in nodes:
            anvil.enrol(node.address)
        m = Market(anvil.w3, anvil.gov, anvil.ledger, None, None, *nodes)  # type: ignore[arg-type]
        made = base.commit_periods(m, m.seller, window_start(m, -1), 2)
        registry = deploy(anvil.w3, anvil.gov, anvil.ledger.address)
        reg = Registry(anvil.w3, registry)
        recipient = Account.create().address
        reg.grant(m.seller, recipient, "own", m.now_ms() + 3_600_000)
        data = base.make_export(m, reg, m.seller, recipient, "own", made)
        yield Chain(anvil, registry, m.seller, data)
    finally:
        anvil.anvil.stop()


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """`daisee-node ARGV…` in this process: exit code, stdout, stderr."""
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def printed_problems(out: str) -> list[str]:
    lines = out.splitlines()
    assert lines[-1] == "INVALID" and "problems:" in lines, out
    return [line.strip() for line in lines[lines.index("problems:") + 1 : -1]]


def test_out_of_range_seqs_are_named_with_every_other_problem_by_the_command(
    chain: Chain, tmp_path: Path
) -> None:
    tampered = copy.deepcopy(chain.data)
    tampered["periods"][0]["commitment"]["seq"] = 2**70
    tampered["missing"] = [{"seq": -1}]
    second = tampered["periods"][1]["readings"][0]
    second["value"] += 100
    second["value_micro"] = merkle.value_micro(second["value"])
    file = tmp_path / "tampered.json"
    file.write_text(json.dumps(tampered))
    # the command as an operator runs it, in its own process
    checked = subprocess.run(
        [
            sys.executable,
            "-m",
            "daisee_node",
            "verify-export",
            str(file),
            "--rpc",
            chain.anvil.anvil.url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert checked.returncode == 1 and checked.stderr == "", checked.stderr
    seq2 = tampered["periods"][1]["commitment"]["seq"]
    problems = printed_problems(checked.stdout)
    assert problems[1:] == [
        f"missing 1: seq: -1 is out of range {UINT64}",
        f"period 1: commitment.seq: {2**70} is out of range {UINT64}",
        f"period seq {seq2}: reading {second['channel']} at {second['t_ms']}: not a leaf of the "
        "commitment's root (value or proof altered)",
    ]
    assert problems[0].startswith("signed by someone other than the node")
    assert "altered after the node signed it" in problems[0]


@pytest.mark.parametrize(
    ("where", "field", "value", "problem"),
    [
        ("commitment", "seq", -1, f"period 1: commitment.seq: -1 is out of range {UINT64}"),
        ("commitment", "t1", 2**64, f"period 1: commitment.t1: {2**64} is out of range {UINT64}"),
        (
            "commitment",
            "count",
            2**32,
            "period 1: commitment.count: 4294967296 is out of range (0 to 4294967295)",
        ),
        ("reading", "t_ms", 2**64, f"period 1: reading 1: t_ms: {2**64} is out of range {UINT64}"),
        ("reading", "proof", [5], "period 1: reading 1: proof: item 1: 5 is not a hex string"),
        ("period", "batch_proof", [7], "period 1: batch_proof: item 1: 7 is not a hex string"),
    ],
)
def test_a_field_out_of_its_abi_type_never_reaches_the_chain(
    chain: Chain,
    where: str,
    field: str,
    value: Any,
    problem: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    tampered = copy.deepcopy(chain.data)
    period = tampered["periods"][0]
    target = {"commitment": period["commitment"], "reading": period["readings"][0]}.get(
        where, period
    )
    target[field] = value
    file = tmp_path / "tampered.json"
    file.write_text(json.dumps(tampered))
    code, out, err = run(capsys, "verify-export", str(file), "--rpc", chain.anvil.anvil.url)
    assert code == 1 and err == ""
    problems = printed_problems(out)
    assert problem in problems and not any("ABI" in p for p in problems)
    # the other period is still checked against the ledger, and holds
    assert len(problems) == 2, problems


def node_config(tmp_path: Path, chain: Chain, fallbacks: list[str]) -> tuple[Path, LocalAccount]:
    """A node's config whose own endpoint is down, with `fallbacks`; its key, enrolled."""
    data = tmp_path / "node"
    new_keystore(data / "node-key.json", data / "node-key.pass")
    key = load_account(data / "node-key.json", data / "node-key.pass")
    chain.anvil.enrol(key.address)

    async def create_store() -> None:
        store = Store(db_path(data))
        await store.open()
        await store.close()

    asyncio.run(create_store())
    section: dict[str, Any] = {"rpc_url": DEAD_RPC, "ledger_address": chain.anvil.ledger.address}
    if fallbacks:
        section["rpc_fallback_urls"] = fallbacks
    config = write_config(
        tmp_path / "node.toml", {"node": {"id": "n1", "data_dir": str(data)}, "chain": section}
    )
    return config, key


def test_grant_export_and_revoke_reach_the_chain_through_the_fallback_endpoints(
    chain: Chain,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    recipient = Account.create().address
    until = int(chain.anvil.w3.eth.get_block("latest")["timestamp"]) * 1000 + 3_600_000
    down, _ = node_config(tmp_path / "down", chain, [])
    args = ["--registry", chain.registry, "--recipient", recipient, "--role", "supplier"]
    code, _, err = run(capsys, "grant", "-c", str(down), *args, "--until", str(until))
    assert code == 1 and "cannot reach the chain" in err

    config, key = node_config(tmp_path / "up", chain, [chain.anvil.anvil.url])
    reg = Registry(chain.anvil.w3, chain.registry)
    code, _, err = run(capsys, "grant", "-c", str(config), *args, "--until", str(until))
    assert code == 0, err
    assert reg.grant_in_force(key.address, recipient, "supplier")

    out = tmp_path / "supplier.json"
    span = ["--from", "0", "--to", str(until), "-o", str(out)]
    code, printed, err = run(capsys, "export", "-c", str(config), *args, *span)
    assert code == 0, err
    # (the first line may be the warning that the own endpoint is down)
    assert json.loads(printed.splitlines()[-1])["periods"] == 0  # it committed nothing yet
    assert json.loads(out.read_text())["node"] == key.address
    # a file larger than `verify-export` reads is not written (the one there stays whole)
    before = out.read_text()
    monkeypatch.setattr(export, "MAX_EXPORT_BYTES", len(before) - 1)
    code, _, err = run(capsys, "export", "-c", str(config), *args, *span)
    assert code == 1 and out.read_text() == before
    assert err.strip().splitlines()[-1] == (
        f"daisee-node: error: the export would be {len(before):,} bytes, more than the "
        f"{len(before) - 1:,} bytes `verify-export` reads: export a shorter range"
    )
    monkeypatch.undo()

    code, _, err = run(capsys, "revoke", "-c", str(config), *args)
    assert code == 0, err
    assert not reg.grant_in_force(key.address, recipient, "supplier")


def test_an_export_to_a_path_that_cannot_be_written_is_refused_before_the_chain_is_asked(
    chain: Chain, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, _ = node_config(tmp_path, chain, [chain.anvil.anvil.url])
    argv = ["-c", str(config), "--registry", chain.registry, "--recipient", chain.node.address]
    span = ["--role", "own", "--from", "0", "--to", "1", "-o", "/proc/x.json"]
    code, _, err = run(capsys, "export", *argv, *span)
    assert code == 1
    assert err.strip() == "daisee-node: error: cannot write /proc/x.json: No such file or directory"
