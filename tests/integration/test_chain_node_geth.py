"""`daisee-node chain-node` with the real geth 1.13: a signer that seals from its own key, a
follower that finds it through `bootnodes` and syncs, the identity printed before geth ever ran,
and a data dir of another genesis refused."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port, run_cli, wait_for, write_config
from tests.support.geth import RPCError, geth_binary, rpc

pytestmark = pytest.mark.slow  # starts two geth nodes


def chain_node_config(tmp_path: Path, name: str, role: str, bootnodes: list[str]) -> Path:
    return write_config(
        tmp_path / f"{name}.toml",
        {
            "node": {"id": name, "data_dir": str(tmp_path / f"{name}-data")},
            "chain_node": {
                "role": role,
                "genesis": str(tmp_path / "spec" / "clique-genesis.json"),
                "data_dir": str(tmp_path / f"{name}-chain"),
                "geth": str(geth_binary()),
                "port": free_port(),
                "http_port": free_port(),
                "authrpc_port": free_port(),
                "bootnodes": bootnodes,
                "nat": "extip:127.0.0.1",
            },
        },
    )


def http_url(config: Path) -> str:
    import tomllib

    port = tomllib.loads(config.read_text())["chain_node"]["http_port"]
    return f"http://127.0.0.1:{port}"


def block_number(url: str) -> int:
    try:
        return int(rpc(url, "eth_blockNumber"), 16)
    except (OSError, RPCError):
        return -1


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)


def start(config: Path, procs: list[subprocess.Popen[str]], log: Path) -> None:
    procs.append(
        subprocess.Popen(
            [sys.executable, "-m", "daisee_node", "chain-node", "run", "-c", str(config)],
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            text=True,
        )
    )


def test_a_signer_and_a_follower_from_the_node_config(
    tmp_path: Path, started: list[subprocess.Popen[str]]
) -> None:
    signer = chain_node_config(tmp_path, "a", "signer", [])
    shown = run_cli("chain-node", "id", "-c", str(signer))
    assert shown.returncode == 0, shown.stderr
    ids = dict(line.split(None, 1) for line in shown.stdout.splitlines())
    enode, address = ids["enode"], ids["signer"]

    spec = run_cli(
        "chain-spec", "--validators", address, "--engine", "clique", "--block-period", "1",
        "--out", str(tmp_path / "spec"),
    )  # fmt: skip
    assert spec.returncode == 0, spec.stderr
    start(signer, started, tmp_path / "a.log")
    url = http_url(signer)
    wait_for(lambda: block_number(url) >= 2, timeout=60, every=0.5)
    sealed = rpc(url, "eth_getBlockByNumber", ["0x2", False])
    assert sealed["miner"] == "0x" + "00" * 20  # Clique: the sealer is in the signature, not here
    signers = rpc(url, "clique_getSigners", ["latest"])
    assert [s.lower() for s in signers] == [address.lower()]
    # what `id` printed before geth ever ran is geth's own identity
    info = subprocess.run(
        [str(geth_binary()), "attach", "--exec", "admin.nodeInfo.enode",
         str(tmp_path / "a-chain" / "geth.ipc")],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert json.loads(info.stdout.strip()).split("@")[0] == enode.split("@")[0]
    # the HTTP endpoint has no admin or personal namespace
    for method in ("admin_nodeInfo", "personal_listAccounts"):
        with pytest.raises(RPCError):
            rpc(url, method)

    follower = chain_node_config(tmp_path, "b", "follower", [enode])
    start(follower, started, tmp_path / "b.log")
    target = block_number(url)
    wait_for(lambda: block_number(http_url(follower)) >= target, timeout=90, every=0.5)
    head = block_number(http_url(follower))
    mine = rpc(http_url(follower), "eth_getBlockByNumber", [hex(head), False])["hash"]
    assert mine == rpc(url, "eth_getBlockByNumber", [hex(head), False])["hash"]

    # A data dir made from another genesis is refused, not reused.
    started[-1].send_signal(signal.SIGTERM)
    started[-1].wait(30)
    started.pop()
    genesis = tmp_path / "spec" / "clique-genesis.json"
    other = json.loads(genesis.read_text())
    other["config"]["clique"]["period"] = 2
    genesis.write_text(json.dumps(other))
    again = run_cli("chain-node", "run", "-c", str(follower))
    assert again.returncode == 1
    assert "another genesis" in again.stderr and "Traceback" not in again.stderr
