"""`[chain_node]`: geth's command line for a signer and a follower, the genesis checks, and the
config's errors with their paths."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from daisee_node.config import parse_config
from daisee_node.errors import ConfigError, DaiseeError
from daisee_node.ledger.chain_node import (
    ChainNodeSection,
    genesis_chain_id,
    geth_args,
    identity,
    prepare,
)
from daisee_node.ledger.keys import keystore_address

ENODE = "enode://" + "ab" * 64 + "@192.168.1.21:30303"


def section(tmp_path: Path, **keys: Any) -> ChainNodeSection:
    base: dict[str, Any] = {
        "role": "follower",
        "genesis": tmp_path / "genesis.json",
        "data_dir": tmp_path / "chain",
        "geth": tmp_path / "geth",
    }
    return ChainNodeSection.model_validate(base | keys)


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_a_follower_serves_rpc_on_localhost_only_and_seals_nothing(tmp_path: Path) -> None:
    args = geth_args(section(tmp_path, bootnodes=[ENODE], nat="extip:192.168.1.20"), 4242)
    assert flag(args, "--networkid") == "4242"
    assert flag(args, "--http.addr") == "127.0.0.1"
    assert flag(args, "--authrpc.addr") == "127.0.0.1"
    assert set(flag(args, "--http.api").split(",")) == {"eth", "net", "web3", "clique"}
    assert flag(args, "--bootnodes") == ENODE and flag(args, "--nat") == "extip:192.168.1.20"
    assert not {"--mine", "--unlock", "--allow-insecure-unlock"} & set(args)
    # every block's state on disk as it comes: a power cut of every node loses no block
    assert flag(args, "--gcmode") == "archive" and flag(args, "--state.scheme") == "hash"


def test_a_signer_seals_with_a_key_of_its_own_made_once(tmp_path: Path) -> None:
    s = section(tmp_path, role="signer")
    args = geth_args(s, 4242)
    keystore = Path(flag(args, "--keystore"))
    (keyfile,) = keystore.glob("*.json")
    address = keystore_address(keyfile)
    assert flag(args, "--unlock") == flag(args, "--miner.etherbase") == address
    assert "--mine" in args
    password = Path(flag(args, "--password"))
    assert password.stat().st_mode & 0o077 == 0 and keyfile.stat().st_mode & 0o077 == 0
    assert keystore.is_relative_to(s.data_dir)  # never the node key in the daemon's data dir
    # a second start keeps the same key and the same p2p identity
    first = identity(s)
    assert geth_args(s, 4242) == args and identity(s) == first
    assert first.signer == address
    assert first.enode.startswith("enode://") and first.enode.endswith("@127.0.0.1:30303")


def write_genesis(path: Path, config: dict[str, Any]) -> None:
    path.write_text(json.dumps({"config": config, "extraData": "0x"}))


def test_only_a_clique_genesis_of_london_rules_is_taken(tmp_path: Path) -> None:
    s = section(tmp_path)
    with pytest.raises(DaiseeError, match=r"no file .*chain-spec --engine clique"):
        genesis_chain_id(s)
    write_genesis(s.genesis, {"chainId": 7, "clique": {"period": 2}})
    assert genesis_chain_id(s) == 7
    write_genesis(s.genesis, {"chainId": 7, "qbft": {}})
    with pytest.raises(DaiseeError, match="not a Clique genesis"):
        genesis_chain_id(s)
    write_genesis(s.genesis, {"chainId": 7, "clique": {"period": 2}, "shanghaiTime": 0})
    with pytest.raises(DaiseeError, match=r"shanghaiTime set, but geth 1\.13"):
        genesis_chain_id(s)


def test_a_missing_geth_is_named(tmp_path: Path) -> None:
    s = section(tmp_path)
    write_genesis(s.genesis, {"chainId": 7, "clique": {"period": 2}})
    with pytest.raises(DaiseeError, match="no geth at"):
        prepare(s)


NODE = """
[node]
id = "a"
data_dir = "/tmp/a"
"""


def test_bad_chain_node_keys_are_listed_with_their_paths() -> None:
    text = (
        NODE
        + """
[chain_node]
role = "validator"
port = 70000
bootnodes = ["enode://1234@host:30303"]
nat = "somewhere"
"""
    )
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    paths = {p.path for p in info.value.problems}
    keys = ("role", "port", "bootnodes[0]", "nat")
    assert paths == {f"chain_node.{k}" for k in keys}
    good = NODE + f'[chain_node]\nrole = "signer"\nbootnodes = ["{ENODE}"]\n'
    config = parse_config(good)
    assert config.chain_node is not None and config.chain_node.bootnodes == [ENODE]
