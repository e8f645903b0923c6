"""Real chain nodes for the ledger's integration tests: anvil, and a one-signer Clique node.

Both come from npm (`npm install` at the project root installs them); a missing binary fails the
test rather than skipping it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import requests

from tests.conftest import ROOT, free_port

if TYPE_CHECKING:
    from daisee_node.community.registry import Registry

BIN = ROOT / "node_modules" / ".bin"
# anvil's first development account (well known; funded on every anvil chain)
ANVIL_KEY = bytes.fromhex("ac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80")


class RPCError(RuntimeError):
    """The node answered with a JSON-RPC error."""


def rpc(url: str, method: str, params: list[Any] | None = None, timeout: float = 5.0) -> Any:
    """One JSON-RPC call; the node's error reply raised as `RPCError`."""
    reply = requests.post(
        url,
        json={"jsonrpc": "2.0", "id": 1, "method": method, "params": params or []},
        timeout=timeout,
    ).json()
    if "error" in reply:
        raise RPCError(f"{method}: {reply['error']}")
    return reply["result"]


def _wait_rpc(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"chain node exited ({proc.returncode}): {log.read_text()[-2000:]}")
        try:
            rpc(url, "eth_blockNumber", timeout=1.0)
            return
        except (requests.RequestException, RuntimeError):
            time.sleep(0.2)
    raise RuntimeError(f"chain node did not answer on {url}: {log.read_text()[-2000:]}")


class ChainNode:
    """A chain node process with a JSON-RPC URL."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / f"{self.__class__.__name__.lower()}.log"

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        binary = Path(self.command()[0])
        if not binary.exists():
            raise RuntimeError(f"{binary} is missing: run `npm install` at {ROOT}")
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.command(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        _wait_rpc(self.url, self.proc, self.log)

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after `grace_s` (the Clique node ignores SIGTERM for a while)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def call(self, method: str, params: list[Any] | None = None) -> Any:
        return rpc(self.url, method, params)


class Anvil(ChainNode):
    """anvil with 1 s blocks; its state file keeps the chain across a stop and start."""

    def __init__(self, workdir: Path, block_time_s: int = 1) -> None:
        super().__init__(workdir)
        self.state = workdir / "anvil-state.json"
        self.block_time_s = block_time_s

    def command(self) -> list[str]:
        cmd = [str(BIN / "anvil"), "--port", str(self.port), "--dump-state", str(self.state)]
        cmd.append("--silent")
        if self.block_time_s:  # 0: mine each transaction as it arrives
            cmd += ["--block-time", str(self.block_time_s)]
        if self.state.exists():
            cmd += ["--load-state", str(self.state)]
        return cmd


class Clique(ChainNode):
    """@ethereumjs/client sealing a Clique chain alone, from a genesis written by `chain-spec`."""

    def __init__(self, workdir: Path, genesis: Path, signer_key: bytes) -> None:
        super().__init__(workdir)
        self.genesis = genesis
        self.keyfile = workdir / "signer.key"
        self.keyfile.write_text(signer_key.hex())
        self.data = workdir / "clique-data"

    def command(self) -> list[str]:
        return [
            str(BIN / "ethereumjs"),
            "--gethGenesis",
            str(self.genesis),
            "--dataDir",
            str(self.data),
            "--mine",
            "--unlock",
            str(self.keyfile),
            "--rpc",
            "--rpcPort",
            str(self.port),
            "--port",
            str(free_port()),
            "--maxPeers",
            "0",
            "--discV4",
            "false",
            "--logLevel",
            "info",
        ]


def genesis_chain_id(path: Path) -> int:
    return int(json.loads(path.read_text())["config"]["chainId"])


class AnvilLedger:
    """anvil with the ledger deployed; anvil's funded development account is the governance."""

    def __init__(self, workdir: Path, block_time_s: int = 1) -> None:
        from eth_account import Account

        from daisee_node.ledger import chain as chainlib

        self.chainlib = chainlib
        self.anvil = Anvil(workdir, block_time_s)
        self.anvil.start()
        self.gov = Account.from_key(ANVIL_KEY)
        self.w3 = chainlib.connect(self.anvil.url)
        self.ledger = chainlib.Ledger(self.w3, chainlib.deploy(self.w3, self.gov, None, 1000))

    def enrol(self, address: str, *, funded: bool = True, capacity_w: int | None = None) -> None:
        """Register a node (default capacity unless given), and give it gas money unless it is
        to rely on relays."""
        capacity = self.chainlib.DEFAULT_CAPACITY_W if capacity_w is None else capacity_w
        self.ledger.set_node(self.gov, address, capacity_w=capacity)
        if funded:
            self.chainlib.fund(self.w3, self.gov, address, 10**18)

    def restart(self) -> None:
        """Start anvil again on the same port, from its state dump."""
        self.anvil.start()
        self.w3 = self.chainlib.connect(self.anvil.url)
        self.ledger = self.chainlib.Ledger(self.w3, self.ledger.address)


@contextlib.contextmanager
def anvil_with_registry(tmp_path: Path) -> Iterator[tuple[AnvilLedger, Registry]]:
    """anvil mining a block per transaction, the ledger and a community registry on it."""
    from daisee_node.community.registry import Registry, deploy

    anvil = AnvilLedger(tmp_path, block_time_s=0)
    try:
        yield anvil, Registry(anvil.w3, deploy(anvil.w3, anvil.gov, anvil.ledger.address))
    finally:
        anvil.anvil.stop()
