"""The community's governance and accounts commands against a real chain (anvil): a key that names
a member twice, or a start off the period grid, is refused and nothing is recorded; a node config's
fallback RPC URLs are used when its first URL does not answer; the CSV outputs still go where they
are asked to (one new folder, never a tree)."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from eth_account import Account

from daisee_node.cli import main
from daisee_node.community import key_hash, load_key
from daisee_node.community.billing import utc_text
from daisee_node.community.registry import Registry
from tests.conftest import free_port, run_cli, write_config
from tests.support.chains import AnvilLedger, anvil_with_registry
from tests.support.community import write_members

pytestmark = pytest.mark.beside  # mostly waits on anvil

PERIOD_S = 900
ALICE, BOB, SOL = "0x" + "a1" * 20, "0x" + "b2" * 20, "0x" + "c3" * 20


@pytest.fixture
def chain(tmp_path: Path) -> Iterator[tuple[AnvilLedger, Registry]]:
    with anvil_with_registry(tmp_path) as ledger_and_registry:
        yield ledger_and_registry


@pytest.fixture
def files(tmp_path: Path) -> Path:
    """Members, a prorata key, a key naming alice twice, and governance's keystore."""
    names = {ALICE: "alice", BOB: "bob", SOL: "sol"}
    write_members(tmp_path / "members.toml", names)
    (tmp_path / "prorata.toml").write_text('kind = "prorata"\n')
    shouting = "0x" + ALICE[2:].upper()  # alice's address in another case
    (tmp_path / "twice.toml").write_text(
        f'kind = "static"\n[coefficients]\nalice = 0.5\n"{shouting}" = 0.5\n'
    )
    return tmp_path


def gov_keystore(anvil: AnvilLedger, folder: Path) -> list[str]:
    keystore, password = folder / "gov.json", folder / "gov.pass"
    password.write_text("governance")
    keystore.write_text(json.dumps(Account.encrypt(anvil.gov.key, "governance")))
    for secret in (keystore, password):
        secret.chmod(0o600)
    return ["--keystore", str(keystore), "--password-file", str(password)]


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def next_start(anvil: AnvilLedger, periods: int = 1) -> int:
    """The start of a period `periods` ahead of the chain's clock."""
    now_ms = int(anvil.w3.eth.get_block("latest")["timestamp"]) * 1000
    return (now_ms // (PERIOD_S * 1000) + periods) * PERIOD_S * 1000


def test_a_key_naming_a_member_twice_or_a_start_off_the_grid_is_never_recorded(
    chain: tuple[AnvilLedger, Registry], files: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    anvil, registry = chain
    base = ["community", "key", "record"]
    where = ["--rpc", anvil.anvil.url, "--registry", registry.address, *gov_keystore(anvil, files)]
    start = next_start(anvil, 2)
    members = ["--members", str(files / "members.toml")]
    twice = str(files / "twice.toml")

    code, _, err = cli(capsys, *base, twice, *where, *members, "--from", str(start))
    assert code == 2 and "coefficients.alice" in err and "name each member once" in err
    code, _, err = cli(capsys, *base, twice, *where, "--from", str(start))
    assert code == 1 and "give --members FILE" in err
    off_grid = utc_text(start + 7 * 60_000).replace("Z", "+00:00")
    code, _, err = cli(capsys, *base, str(files / "prorata.toml"), *where, "--from", off_grid)
    assert code == 1 and "is not the start of a period of 900 s" in err
    assert registry.records() == []

    # the same command with a good key and start records it: the refusals were the inputs'
    first = next_start(anvil)  # the command's own block may fall in the next period
    code, out, err = cli(capsys, *base, str(files / "prorata.toml"), *where, *members)
    assert code == 0, err
    recorded = json.loads(out)
    assert recorded["hash"] == key_hash(load_key(files / "prorata.toml"))
    assert recorded["from_ms"] in (first, first + PERIOD_S * 1000)
    assert [r.key_hash for r in registry.records()] == [recorded["hash"]]


def test_a_config_s_fallback_rpc_urls_are_used_when_its_first_does_not_answer(
    chain: tuple[AnvilLedger, Registry], files: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    anvil, registry = chain
    prorata = files / "prorata.toml"
    registry.record_key(anvil.gov, key_hash(load_key(prorata)), next_start(anvil))
    config = write_config(
        files / "node.toml",
        {
            "node": {"id": "auditor", "data_dir": str(files / "data")},
            "chain": {
                "rpc_url": f"http://127.0.0.1:{free_port()}",  # nothing listens there
                "rpc_fallback_urls": [anvil.anvil.url],
                "ledger_address": anvil.ledger.address,
                "rpc_timeout_s": 5.0,
            },
        },
    )
    # As an operator runs them (a process each): the switch to the fallback is said on stderr,
    # and stdout carries the results alone.
    show = ["community", "key", "show", "-c", str(config), "--registry", registry.address]
    done = run_cli(*show, "--key", str(prorata), "--json")
    assert done.returncode == 0, done.stderr
    assert "using another" in done.stderr
    (row,) = json.loads(done.stdout)["keys"]
    assert row["file"] == str(prorata) and row["hash"] == key_hash(load_key(prorata))

    # allocate over the hour before the key: every period read from the chain, none allocated;
    # its CSV files go to an existing folder and to one new folder made in it
    end = next_start(anvil, 0)
    keys_csv, periods = files / "keys.csv", files / "periods"
    done = run_cli(
        "community", "allocate", "-c", str(config), "--registry", registry.address,
        "--members", str(files / "members.toml"), "--key", str(prorata),
        "--from", str(end - 3_600_000), "--to", str(end), "--json",
        "--keys-csv", str(keys_csv), "--periods-csv", str(periods),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert (result["ledger"], result["registry"]) == (anvil.ledger.address, registry.address)
    assert len(result["periods"]) == 4 * 3
    assert {p["status"] for p in result["periods"]} == {"missing"}
    with keys_csv.open() as f:
        assert len(list(csv.DictReader(f))) == 4 * 3
    assert sorted(p.name for p in periods.iterdir()) == ["alice.csv", "bob.csv", "sol.csv"]

    # the config's URL replaced with --rpc: its fallbacks are not for another URL
    code, _, err = cli(capsys, *show, "--rpc", f"http://127.0.0.1:{free_port()}")
    assert code == 1 and "cannot reach the chain" in err
