"""A real multi-signer Clique chain: go-ethereum v1.13.15 nodes peered on loopback.

geth 1.13.15 is the last release that seals Clique blocks. `./run test` builds it once (Go
module proxy) into the user's cache; a missing binary fails the test rather than skipping it.

What the harness does the way a community would, and why:
- each node has its own data dir and its own `--port`, `--http.port` and `--authrpc.port`;
- `static-nodes.json` is ignored by 1.13: nodes are peered with `admin_addPeer`;
- signers start without sealing, are peered, then start sealing one at a time (signers that
  start together race at block 1 and can stay split);
- two nodes are peered by one of them dialling the other (`connect`), not both at once;
- a partition is `admin_removePeer` on both sides, healed by `admin_addPeer`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import requests
from eth_account import Account
from eth_account.signers.local import LocalAccount

from daisee_node.ledger.chain_node import DURABLE_STATE
from tests.conftest import free_port, wait_for
from tests.support.chains import RPCError, rpc

GETH_VERSION = "1.13.15"
PASSWORD = "clique-test"


def geth_binary() -> Path:
    """The geth 1.13.15 binary: `$DAISEE_GETH`, the one `./run` caches, or one on PATH of that
    version. Raises when none is found (a test then fails: it is never skipped)."""
    candidates: list[Path] = []
    if os.environ.get("DAISEE_GETH"):
        candidates.append(Path(os.environ["DAISEE_GETH"]))
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    candidates.append(cache / "daisee-node" / f"geth-{GETH_VERSION}" / "geth")
    on_path = shutil.which("geth")
    if on_path:
        candidates.append(Path(on_path))
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK) and _version(path) == GETH_VERSION:
            return path
    raise RuntimeError(
        f"geth {GETH_VERSION} is missing (looked at {', '.join(map(str, candidates))}): "
        "`./run test` builds it with Go"
    )


def _version(path: Path) -> str | None:
    try:
        out = subprocess.run(
            [str(path), "version"], capture_output=True, text=True, timeout=20, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in out.splitlines():
        if line.startswith("Version:"):
            return line.split()[1].split("-")[0]
    return None


class GethNode:
    """One geth process: a signer (with its key) or a follower, with its own ports and data."""

    def __init__(
        self, workdir: Path, name: str, genesis: Path, key: LocalAccount | None = None
    ) -> None:
        self.name = name
        self.dir = workdir / name
        self.data = self.dir / "data"
        self.genesis = genesis
        self.key = key
        self.port, self.http_port, self.auth_port = free_port(), free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.log = self.dir / "geth.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_start = 0
        #: geth syncs from its peers once it has min(5, --maxpeers) of them, else every 10 s
        #: only. A new node that joins later gets 1 and takes its peers as trusted ones: it
        #: syncs at once, as they dial it. (Not for a restarted node: the others redial it
        #: only after a back-off, and it may dial out to maxpeers/3 nodes only.)
        self.max_peers = 25
        self.enode = ""
        self.binary = geth_binary()
        self.chain_id = int(json.loads(genesis.read_text())["config"]["chainId"])

    @property
    def address(self) -> str | None:
        return self.key.address if self.key else None

    def init(self) -> None:
        """Write the genesis into a fresh data dir and import the signer key."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self._run("--datadir", str(self.data), "init", str(self.genesis))
        if self.key is not None:
            keyfile, pw = self.dir / "key.hex", self.dir / "password"
            keyfile.write_text(bytes(self.key.key).hex())
            pw.write_text(PASSWORD)
            # --lightkdf: the key is unlocked at every start; a test needs no strong KDF
            self._run("account", "import", "--lightkdf", "--datadir", str(self.data),
                      "--password", str(pw), str(keyfile))  # fmt: skip
            keyfile.unlink()

    def _run(self, *args: str) -> None:
        result = subprocess.run(
            [str(self.binary), *args], capture_output=True, text=True, timeout=60, check=False
        )
        if result.returncode != 0:
            raise RuntimeError(f"geth {' '.join(args)}: {result.stderr[-2000:]}")

    def command(self) -> list[str]:
        cmd = [
            str(self.binary),
            "--datadir", str(self.data),
            "--networkid", str(self.chain_id),
            "--port", str(self.port),
            "--authrpc.port", str(self.auth_port),
            "--http", "--http.addr", "127.0.0.1", "--http.port", str(self.http_port),
            "--http.api", "eth,net,web3,admin,clique,miner,txpool",
            "--nodiscover", "--nat", "none", "--ipcdisable", "--maxpeers", str(self.max_peers),
            "--syncmode", "full",
            *DURABLE_STATE,  # as a node's `chain-node run` does: a cut loses no block
            "--verbosity", "3",
        ]  # fmt: skip
        if self.key is not None:
            cmd += [
                "--unlock", self.key.address,
                "--password", str(self.dir / "password"),
                "--allow-insecure-unlock",  # the key signs blocks only; RPC is on loopback
                "--miner.etherbase", self.key.address,  # mandatory with sealing in 1.13
            ]  # fmt: skip
        return cmd

    def start(self) -> None:
        """Start from the data dir (`init` first for a new node); sealing waits for `seal`."""
        self.launch()
        self.wait_ready()

    def _log_since_start(self) -> str:
        with self.log.open("rb") as f:
            f.seek(self._log_start)
            return f.read().decode(errors="replace")

    def launch(self) -> None:
        self._log_start = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.command(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"geth {self.name} exited: {self.log.read_text()[-3000:]}")
            try:
                info = self.call("admin_nodeInfo")
                break
            except (requests.RequestException, RPCError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"geth {self.name} does not answer") from None
                time.sleep(0.1)
        if self.key is not None:
            # The key is unlocked after RPC is up; sealing asked for before that never starts.
            wait_for(lambda: "Unlocked account" in self._log_since_start(), timeout=60, every=0.1)
        # The node id is hex, so only the host part can hold dots.
        self.enode = info["enode"].split("?")[0].replace("@0.0.0.0:", "@127.0.0.1:")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM (geth writes its state out), SIGKILL after `grace_s`."""
        if not self.running:
            return
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """A power cut: SIGKILL, nothing written out."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def call(self, method: str, params: list[Any] | None = None) -> Any:
        return rpc(self.url, method, params)

    def seal(self) -> None:
        assert self.key is not None, f"{self.name} is a follower"
        self.call("miner_start")

    def head(self) -> int:
        return int(self.call("eth_blockNumber"), 16)

    def block_hash(self, number: int) -> str | None:
        block = self.call("eth_getBlockByNumber", [hex(number), False])
        return block["hash"] if block else None

    def signers_at(self, number: int | None = None) -> set[str]:
        """The signer list in force at block `number` (the head by default), lower case."""
        at = "latest" if number is None else hex(number)
        return {a.lower() for a in self.call("clique_getSigners", [at])}

    def signer_of(self, number: int) -> str:
        """The signer of block `number`, from its Clique seal."""
        return str(self.call("clique_getSigner", [hex(number)]))

    def peers(self) -> set[str]:
        return {p["enode"].split("@")[0] for p in self.call("admin_peers")}

    def is_peer(self, other: GethNode) -> bool:
        return other.enode.split("@")[0] in self.peers()


def connect(a: GethNode, b: GethNode, timeout: float = 60.0) -> None:
    """Peer two nodes. Both trust the other (a trusted peer is taken beyond `--maxpeers`, see
    `GethNode.max_peers`); `a` dials.

    Only one side dials at first: when both dial at once, each node may keep its own outbound
    connection and refuse the other's as "already connected", which leaves them unpeered until
    geth's next dial 35 s later. If `a`'s dial has not peered them after a third of the
    timeout, `b` dials too, so a failed first dial does not cost that wait.
    """
    for x, y in ((a, b), (b, a)):
        x.call("admin_addTrustedPeer", [y.enode])
    a.call("admin_addPeer", [b.enode])

    def peered() -> bool:
        return a.is_peer(b) and b.is_peer(a)

    try:
        wait_for(peered, timeout=timeout / 3, every=0.1)
    except AssertionError:
        b.call("admin_addPeer", [a.enode])
        wait_for(peered, timeout=timeout * 2 / 3, every=0.1)


def disconnect(a: GethNode, b: GethNode, timeout: float = 30.0) -> None:
    """Unpeer two nodes. Asked again while they are still connected: a redial one side had
    under way when the other removed it can connect them again."""

    def apart() -> bool:
        a.call("admin_removePeer", [b.enode])
        b.call("admin_removePeer", [a.enode])
        return not a.is_peer(b) and not b.is_peer(a)

    wait_for(apart, timeout=timeout, every=0.2)


class CliqueNetwork:
    """Signers and followers of one Clique chain, from the genesis `daisee-node chain-spec`
    writes (`write_genesis`), peered on loopback."""

    def __init__(
        self,
        workdir: Path,
        signers: int = 3,
        period_s: int = 2,
        funds: Mapping[str, int] | None = None,
        chain_id: int = 4243,
    ) -> None:
        self.workdir = workdir
        self.period_s = period_s
        self.chain_id = chain_id
        self.keys = [Account.create() for _ in range(signers)]
        self.genesis = write_genesis(
            workdir / "spec", [k.address for k in self.keys], period_s, chain_id, funds or {}
        )
        self.signers = [
            GethNode(workdir, f"signer{i}", self.genesis, key) for i, key in enumerate(self.keys)
        ]
        self.followers: list[GethNode] = []

    @property
    def nodes(self) -> list[GethNode]:
        return self.signers + self.followers

    def start(self, first_block_in_s: float = 5.0) -> None:
        """Start every signer, peer them all, then start sealing on one after the other.

        The genesis is stamped a few seconds ahead, so that no signer seals block 1 before all
        of them are peered and sealing: geth discards blocks its peers announce until it has
        synced once or seals itself, and a signer that missed block 1 would seal its own.
        """
        spec = json.loads(self.genesis.read_text())
        spec["timestamp"] = hex(int(time.time() + first_block_in_s - self.period_s))
        self.genesis.write_text(json.dumps(spec, indent=2) + "\n")
        for node in self.signers:
            node.init()
        for node in self.signers:
            node.launch()
        for node in self.signers:
            node.wait_ready()
        for i, a in enumerate(self.signers):
            for b in self.signers[i + 1 :]:
                connect(a, b)
        for node in self.signers:
            node.seal()
        wait_for(lambda: self.signers[0].head() >= 1, timeout=60, every=0.1)
        self.wait_agree()

    def add_follower(self, name: str | None = None, key: LocalAccount | None = None) -> GethNode:
        """A node that follows the chain, peered with every running node. With a `key` it can
        seal once the signers have voted it in (`seal` starts it then)."""
        node = GethNode(self.workdir, name or f"follower{len(self.followers)}", self.genesis, key)
        node.max_peers = 1
        node.init()
        self.followers.append(node)  # stopped with the others, even if peering fails
        node.start()
        for other in self.nodes:
            if other is not node and other.running:
                connect(other, node)  # with --maxpeers 1 it would dial out to one node only
        return node

    def restart(self, node: GethNode, timeout: float = 60.0) -> None:
        """Start a stopped (or killed) node again from its data dir, peer it, and once it has
        caught up (within geth's 10 s sync cycle), let it seal again."""
        node.start()
        for other in self.nodes:
            if other is not node and other.running:
                connect(node, other)
        if node.key is not None:
            others = [o for o in self.signers if o is not node and o.running]
            wait_for(
                lambda: node.head() >= min(o.head() for o in others), timeout=timeout, every=0.2
            )
            node.seal()

    def partition(self, node: GethNode) -> None:
        """Cut `node` off from every other node."""
        for other in self.nodes:
            if other is not node and other.running:
                disconnect(node, other)

    def heal(self, node: GethNode) -> None:
        for other in self.nodes:
            if other is not node and other.running:
                connect(node, other)

    def head(self) -> int:
        """The highest head among running nodes."""
        return max(n.head() for n in self.nodes if n.running)

    def wait_agree(self, nodes: Iterable[GethNode] | None = None, timeout: float = 60.0) -> int:
        """Wait until the nodes hold the same block at the lowest of their heads (and that
        height is not behind the best head by more than one block); return it."""
        members = [n for n in (nodes or self.nodes) if n.running]

        def agreed() -> int | None:
            heads = [n.head() for n in members]
            low = min(heads)
            if max(heads) - low > 1:
                return None
            hashes = {n.block_hash(low) for n in members}
            return low if len(hashes) == 1 else None

        return int(wait_for(agreed, timeout=timeout, every=0.2))

    def settle(self, timeout: float = 60.0) -> int:
        """Wait until no running node holds a transaction still to mine, and all agree on
        their head's block; return that block's number. Reads after it are consistent."""

        def empty() -> bool:
            for node in self.nodes:
                if node.running:
                    status = node.call("txpool_status")
                    if int(status["pending"], 16) or int(status["queued"], 16):
                        return False
            return True

        wait_for(empty, timeout=timeout, every=0.2)
        # nothing is left to mine: once every node holds the best head seen now, with one
        # hash, later blocks are empty and every node answers the same
        members = [n for n in self.nodes if n.running]
        best = max(n.head() for n in members)

        def agreed() -> bool:
            if any(n.head() < best for n in members):
                return False
            return len({n.block_hash(best) for n in members}) == 1

        wait_for(agreed, timeout=timeout, every=0.2)
        return best

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def write_genesis(
    out: Path, signers: list[str], period_s: int, chain_id: int, funds: Mapping[str, int]
) -> Path:
    """The Clique genesis, written as `daisee-node chain-spec --engine clique` writes it."""
    from daisee_node.ledger.chainspec import write_specs

    (path,) = write_specs(
        out,
        signers,
        chain_id=chain_id,
        block_period_s=period_s,
        funds=funds,
        engines=("clique",),
    )
    return path
