"""Hostile `[chain_node]` sections and files: every problem of the section listed at once with
its path, exit 2, in one line each and without a traceback, by `chain-node run|args|id` (and by
`load_config(..., files=True)`, what `check-config` runs); relative paths are the config file's."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from daisee_node import cli
from daisee_node.config import load_config, parse_config
from daisee_node.errors import ConfigError
from daisee_node.ledger import chainspec
from daisee_node.ledger.chain_node import genesis_problems
from tests.support.geth import geth_binary

SIGNER = "0x" + "11" * 20


def daisee(*argv: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """`daisee-node ARGV` in this process: exit code, stdout, stderr."""
    try:
        code = cli.main(list(argv))
    except SystemExit as exc:  # argparse refusing an argument
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def genesis(path: Path, **config: Any) -> Path:
    spec = chainspec.clique([SIGNER], 4242, 2, {})
    spec["config"].update(config)
    path.write_text(json.dumps(spec))
    return path


def node_config(folder: Path, **keys: Any) -> Path:
    """A config with a `[chain_node]` section of `keys` (a key given None is left out)."""
    folder.mkdir(parents=True, exist_ok=True)
    base: dict[str, Any] = {"role": "follower", "genesis": "genesis.json", "data_dir": "chain"}
    lines = [f"{k} = {json.dumps(v)}" for k, v in (base | keys).items() if v is not None]
    path = folder / "node.toml"
    path.write_text('[node]\nid = "a"\ndata_dir = "data"\n[chain_node]\n' + "\n".join(lines))
    return path


def problems(err: str) -> dict[str, str]:
    lines = err.splitlines()
    assert lines[0].endswith(f"{len(lines) - 1} problem(s)")
    return dict(line.removeprefix("  - ").split(": ", 1) for line in lines[1:])


def test_every_problem_of_the_section_is_listed_at_once_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = node_config(
        tmp_path,
        role="signer",
        geth="/nonexistent/geth",
        port=8545,
        http_port=8545,
        authrpc_port=8545,
    )
    for action in ("args", "run"):
        code, out, err = daisee("chain-node", action, "-c", str(config), capsys=capsys)
        assert code == 2 and out == ""
        found = problems(err)
        assert set(found) == {
            "chain_node.http_port",
            "chain_node.authrpc_port",
            "chain_node.genesis",
            "chain_node.geth",
        }
        assert found["chain_node.http_port"].startswith("8545 is already chain_node.port")
        assert found["chain_node.genesis"].startswith(f"no file {tmp_path / 'genesis.json'};")
        assert found["chain_node.geth"] == "no geth at /nonexistent/geth (the image installs one)"
    assert not (tmp_path / "chain").exists()  # nothing made for a config that cannot run
    with pytest.raises(ConfigError) as info:
        load_config(config, files=True)
    assert len(info.value.problems) == 4
    # what the daemon loads leaves the chain client's files alone (a first boot starts it
    # before the genesis is there), but not the section's own keys
    with pytest.raises(ConfigError) as info:
        load_config(config)
    assert {p.path for p in info.value.problems} == {
        "chain_node.http_port",
        "chain_node.authrpc_port",
    }


def test_check_config_warns_of_the_chain_clients_files_and_still_passes_the_daemons(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A node waits for its community's genesis after its first boot: `check-config && systemctl
    reload daisee-node` must still work then, and say what keeps the chain client from starting."""
    config = node_config(tmp_path, geth="/nonexistent/geth")
    code, out, err = daisee("check-config", str(config), capsys=capsys)
    assert code == 0 and ": ok" in out
    warnings = err.splitlines()
    assert len(warnings) == 2 and all(w.startswith("warning: the chain client") for w in warnings)
    assert "chain_node.genesis: no file" in err and "chain_node.geth: no geth at" in err
    genesis(tmp_path / "genesis.json")
    geth = tmp_path / "geth"
    geth.write_text("#!/bin/sh\n")
    geth.chmod(0o755)
    config = node_config(tmp_path, geth=str(geth))
    code, out, err = daisee("check-config", str(config), capsys=capsys)
    assert code == 0 and err == ""
    # the section's own keys are the daemon's config too: refused, exit 2
    config = node_config(tmp_path, geth=str(geth), port=8545, http_port=8545)
    code, out, err = daisee("check-config", str(config), capsys=capsys)
    assert code == 2 and "chain_node.http_port" in err


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        ({"chainId": -5}, "chainId must be a whole number from 1 to 2^63 - 1 (got -5)"),
        ({"chainId": 10**80}, "chainId must be a whole number"),
        ({"chainId": True}, "chainId must be a whole number"),
        ({"chainId": "7"}, "chainId must be a whole number"),
        ({"clique": None}, '"clique" must be an object'),
        ({"shanghaiTime": 0}, "shanghaiTime set, but geth 1.13"),
        ({"cancunTime": 0, "terminalTotalDifficulty": 0}, "cancunTime, terminalTotalDifficulty"),
    ],
)
def test_a_genesis_geth_cannot_run_as_clique_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], config: dict[str, Any], reason: str
) -> None:
    path = genesis(tmp_path / "genesis.json", **config)
    _, found = genesis_problems(path)
    assert len(found) == 1 and reason in found[0]
    code, _, err = daisee(
        "chain-node", "args", "-c", str(node_config(tmp_path, geth=str(geth_binary()))),
        capsys=capsys,
    )  # fmt: skip
    assert code == 2 and reason in problems(err)["chain_node.genesis"]


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("{", "not JSON"),
        ("[]", 'no "config" object'),
        ('{"config": null}', 'no "config" object'),
        ('{"config": {"chainId": 7}}', "not a Clique genesis"),
    ],
)
def test_a_file_that_is_no_genesis_is_named(tmp_path: Path, text: str, reason: str) -> None:
    (tmp_path / "genesis.json").write_text(text)
    _, found = genesis_problems(tmp_path / "genesis.json")
    assert len(found) == 1 and reason in found[0]
    (tmp_path / "genesis.json").unlink()
    (tmp_path / "genesis.json").mkdir()
    assert genesis_problems(tmp_path / "genesis.json")[1] == [
        f"{tmp_path / 'genesis.json'} is a folder, not a genesis file"
    ]


def test_a_null_fork_is_not_set_as_for_geth(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    genesis(tmp_path / "genesis.json", cancunTime=None, shanghaiTime=None)
    assert genesis_problems(tmp_path / "genesis.json") == (4242, [])
    config = node_config(tmp_path, geth=str(geth_binary()))
    code, out, err = daisee("chain-node", "args", "-c", str(config), capsys=capsys)
    assert code == 0, err
    assert "--networkid 4242" in out
    assert (tmp_path / "chain" / "geth" / "chaindata").is_dir()  # geth init took it


def test_relative_paths_are_the_config_files_not_the_current_folders(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    etc = tmp_path / "etc"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "geth").symlink_to(geth_binary())
    config = node_config(etc, geth="../bin/geth")
    genesis(etc / "genesis.json")
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # as under systemd, where it is /
    section = load_config(config).chain_node
    assert section is not None
    assert (section.genesis, section.data_dir) == (etc / "genesis.json", etc / "chain")
    assert section.geth == (etc / "../bin/geth").resolve()
    code, out, err = daisee("chain-node", "args", "-c", str(config), capsys=capsys)
    assert code == 0, err
    assert f"--datadir {etc / 'chain'} " in out
    assert (etc / "chain" / "geth" / "chaindata").is_dir()
    assert list(elsewhere.iterdir()) == []


def test_empty_paths_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = node_config(tmp_path, genesis="", data_dir="", geth=" ")
    code, _, err = daisee("chain-node", "args", "-c", str(config), capsys=capsys)
    assert code == 2
    assert problems(err) == {
        f"chain_node.{key}": "an empty path; name a file or a folder (got '')"
        for key in ("genesis", "data_dir")
    } | {"chain_node.geth": "an empty path; name a file or a folder (got ' ')"}
    assert list(tmp_path.iterdir()) == [config]


def test_a_geth_that_cannot_run_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    genesis(tmp_path / "genesis.json")
    plain = tmp_path / "not-geth"
    plain.write_text("#!/bin/sh\n")
    plain.chmod(0o644)
    for geth, reason in ((tmp_path, "is a folder, not geth"), (plain, "is not executable")):
        config = node_config(tmp_path, geth=str(geth))
        code, _, err = daisee("chain-node", "args", "-c", str(config), capsys=capsys)
        assert code == 2 and problems(err) == {"chain_node.geth": f"{geth} {reason}"}


def test_id_names_a_data_dir_it_cannot_use_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    for data_dir, reason in (
        (a_file, f"{a_file} is not a folder"),
        (a_file / "chain", f"{a_file / 'chain'} cannot be made: {a_file} is not a folder"),
    ):
        config = node_config(tmp_path, data_dir=str(data_dir))
        code, _, err = daisee("chain-node", "id", "-c", str(config), capsys=capsys)
        assert code == 2 and problems(err) == {"chain_node.data_dir": reason}
    nodekey = tmp_path / "chain" / "geth" / "nodekey"
    nodekey.mkdir(parents=True)
    config = node_config(tmp_path)
    code, _, err = daisee("chain-node", "id", "-c", str(config), capsys=capsys)
    assert code == 2
    assert problems(err) == {"chain_node.data_dir": f"{nodekey} is a folder, not a node key"}
    # /proc takes no folders; root passes the access check, and the making fails in one line
    config = node_config(tmp_path, data_dir="/proc/nope")
    code, _, err = daisee("chain-node", "id", "-c", str(config), capsys=capsys)
    assert (code, len(err.splitlines())) == ((1, 1) if os.geteuid() == 0 else (2, 2))
    assert "chain_node.data_dir: /proc/nope" in err


def test_a_signers_key_without_its_password_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    genesis(tmp_path / "genesis.json")
    config = node_config(tmp_path, role="signer", geth=str(geth_binary()))
    code, first, _ = daisee("chain-node", "id", "-c", str(config), capsys=capsys)
    assert code == 0 and "signer 0x" in first
    password = tmp_path / "chain" / "sealer.pass"
    password.unlink()
    for action in ("args", "id"):
        code, _, err = daisee("chain-node", action, "-c", str(config), capsys=capsys)
        assert code == 2
        (message,) = problems(err).values()
        assert message.startswith("the sealing key cannot be used") and str(password) in message
    assert not password.exists()  # not silently replaced: the key needs its own password


@pytest.mark.parametrize("host", ["evil host@x:1", "a@b", "", "-x.lan", "x..lan", "[::1]"])
def test_id_refuses_a_host_others_could_not_dial(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], host: str
) -> None:
    config = node_config(tmp_path)
    code, out, err = daisee("chain-node", "id", "-c", str(config), "--host", host, capsys=capsys)
    assert code == 2 and out == ""
    assert err.splitlines()[-1].startswith("daisee-node chain-node: error: argument --host: ")
    assert not (tmp_path / "chain").exists()


@pytest.mark.parametrize("host", ["192.168.1.20", "node-3.lan", "fe80::1"])
def test_the_enode_id_prints_is_one_bootnodes_takes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], host: str
) -> None:
    config = node_config(tmp_path)
    code, out, err = daisee("chain-node", "id", "-c", str(config), "--host", host, capsys=capsys)
    assert code == 0, err
    enode = out.split()[1]
    where = urlsplit(enode)  # as geth reads it: an IPv6 address in brackets
    assert (where.hostname, where.port) == (host, 30303)
    taken = parse_config(
        f'[node]\nid = "b"\n[chain_node]\nrole = "follower"\nbootnodes = ["{enode}"]'
    )
    assert taken.chain_node is not None and taken.chain_node.bootnodes == [enode]


def test_id_announces_the_nat_address_unless_told_another(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With `nat = "extip:IP"` geth announces IP; `id` prints the enode the others dial."""
    config = node_config(tmp_path, nat="extip:192.168.1.20")
    code, out, err = daisee("chain-node", "id", "-c", str(config), capsys=capsys)
    assert code == 0, err
    assert urlsplit(out.split()[1]).hostname == "192.168.1.20"
    code, out, err = daisee(
        "chain-node", "id", "-c", str(config), "--host", "node7.lan", capsys=capsys
    )
    assert code == 0 and urlsplit(out.split()[1]).hostname == "node7.lan"
    config = node_config(tmp_path / "plain")
    code, out, err = daisee("chain-node", "id", "-c", str(config), capsys=capsys)
    assert code == 0 and urlsplit(out.split()[1]).hostname == "127.0.0.1"
