"""`[chain_node]`: the community chain's client on this node, a signer or a follower.

The community's proof-of-authority chain is go-ethereum 1.13 (the last release that seals
Clique blocks) on every node that runs one. `daisee-chain.service` starts it through
`daisee-node chain-node run`, which checks the section, prepares the data dir once and then
becomes geth (`exec`), so systemd supervises geth itself:

- the genesis (`daisee-node chain-spec --engine clique`) is written into a fresh data dir with
  `geth init`, and a data dir made from another genesis is refused, not silently reused;
- the node's p2p identity (`geth/nodekey`) is made once, so its enode is known before geth ever
  runs (`daisee-node chain-node id` prints it for the other nodes' `bootnodes`);
- a signer seals with a key of its own, made once in the data dir (`keystore/`, with a random
  password beside it), never with the node key: the chain's RPC answers on localhost only, but
  an unlocked account can be spent through it, and the sealing key holds nothing to spend. Its
  address is what the genesis lists, or what the signers vote in (`clique.propose`).

The daemon reaches the chain at `http://127.0.0.1:<http_port>` (`[chain] rpc_url`) and falls back
to the other nodes' endpoints (`[chain] rpc_fallback_urls`) while its own is down.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field

from daisee_node.errors import DaiseeError
from daisee_node.models import StrictModel

ENODE_PATTERN = r"^enode://[0-9a-fA-F]{128}@[^\s@]+:\d{1,5}(\?discport=\d{1,5})?$"
#: what the chain's HTTP endpoint answers: no `admin`, `personal`, `debug` or `miner`
HTTP_APIS = "eth,net,web3,clique"


class ChainNodeSection(StrictModel):
    """`[chain_node]`: the chain client this node runs (go-ethereum 1.13, Clique)."""

    role: Literal["signer", "follower"] = Field(
        description="'signer' seals blocks (its address must be a signer of the genesis, or voted "
        "in); 'follower' keeps a full copy and serves it"
    )
    genesis: Path = Field(
        Path("/etc/daisee-node/genesis.json"),
        description="the community's Clique genesis (`daisee-node chain-spec --engine clique`)",
    )
    data_dir: Path = Field(Path("/var/lib/daisee-chain"), description="geth's data dir")
    geth: Path = Field(Path("/usr/local/bin/geth"), description="the geth 1.13 binary")
    port: int = Field(30303, ge=1, le=65535, description="p2p port (TCP and UDP)")
    http_port: int = Field(8545, ge=1, le=65535, description="JSON-RPC port, on localhost only")
    authrpc_port: int = Field(8551, ge=1, le=65535, description="geth's engine API, localhost")
    bootnodes: list[Annotated[str, Field(pattern=ENODE_PATTERN)]] = Field(
        default_factory=list,
        description="the other nodes' enode URLs (`daisee-node chain-node id` prints a node's)",
    )
    nat: str | None = Field(
        None,
        pattern=r"^(any|none|upnp|pmp|extip:\S+)$",
        description="how others reach this node, e.g. 'extip:192.168.1.20' (default: geth's)",
    )
    max_peers: int = Field(25, ge=1, le=200)
    verbosity: int = Field(3, ge=0, le=5, description="geth's log level (3: info)")


@dataclass(frozen=True)
class Identity:
    """What the other nodes need to know of this one: its enode and its sealing address."""

    enode: str
    signer: str | None  # only for role = signer


def _nodekey(section: ChainNodeSection) -> bytes:
    """This node's p2p key (geth's `nodekey` file: 64 hex digits), made once."""
    path = section.data_dir / "geth" / "nodekey"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        _write_private(path, secrets.token_hex(32))
    text = path.read_text().strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != 32:
        raise DaiseeError(f"{path} is not a node key (64 hex digits)")
    return key


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def sealing_key(section: ChainNodeSection) -> tuple[Path, Path, str]:
    """The signer's own key (keystore file, password file, address), made once."""
    from daisee_node.ledger.keys import keystore_address, new_keystore

    store = section.data_dir / "keystore"
    password = section.data_dir / "sealer.pass"
    existing = sorted(store.glob("*.json")) if store.is_dir() else []
    if existing:
        return existing[0], password, keystore_address(existing[0])
    store.mkdir(parents=True, exist_ok=True, mode=0o700)
    keyfile = store / "sealer.json"
    return keyfile, password, new_keystore(keyfile, password)


def identity(section: ChainNodeSection, host: str = "127.0.0.1") -> Identity:
    """This node's enode (at `host`) and, for a signer, its sealing address."""
    from eth_keys import keys

    public = keys.PrivateKey(_nodekey(section)).public_key.to_hex()[2:]
    enode = f"enode://{public}@{host}:{section.port}"
    signer = sealing_key(section)[2] if section.role == "signer" else None
    return Identity(enode, signer)


def genesis_chain_id(section: ChainNodeSection) -> int:
    """The genesis' chain id, after checking it is a Clique genesis geth 1.13 can run."""
    try:
        genesis = json.loads(section.genesis.read_text())
        config = genesis["config"]
        chain_id = int(config["chainId"])
    except FileNotFoundError:
        raise DaiseeError(
            f"chain_node.genesis: no file {section.genesis}; write it with "
            "`daisee-node chain-spec --engine clique` and copy it to every node"
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DaiseeError(
            f"chain_node.genesis: {section.genesis} is not a genesis: {exc}"
        ) from None
    if "clique" not in config:
        raise DaiseeError(f"chain_node.genesis: {section.genesis} is not a Clique genesis")
    later = [k for k in ("shanghaiTime", "cancunTime", "terminalTotalDifficulty") if k in config]
    if later:
        raise DaiseeError(
            f"chain_node.genesis: {', '.join(later)} set, but geth 1.13 seals Clique blocks "
            "up to London rules only"
        )
    return chain_id


def geth_args(section: ChainNodeSection, chain_id: int) -> list[str]:
    """geth's command line for this node."""
    d = section.data_dir
    args = [
        str(section.geth),
        "--datadir", str(d),
        "--networkid", str(chain_id),
        "--port", str(section.port),
        "--syncmode", "full",
        "--http",
        "--http.addr", "127.0.0.1",
        "--http.port", str(section.http_port),
        "--http.api", HTTP_APIS,
        "--http.vhosts", "localhost,127.0.0.1",
        "--authrpc.addr", "127.0.0.1",
        "--authrpc.port", str(section.authrpc_port),
        "--maxpeers", str(section.max_peers),
        "--verbosity", str(section.verbosity),
    ]  # fmt: skip
    if section.bootnodes:
        args += ["--bootnodes", ",".join(section.bootnodes)]
    if section.nat is not None:
        args += ["--nat", section.nat]
    if section.role == "signer":
        keyfile, password, address = sealing_key(section)
        args += [
            "--mine",
            "--miner.etherbase", address,
            "--unlock", address,
            "--password", str(password),
            "--keystore", str(keyfile.parent),
            # geth refuses to unlock with HTTP on; it listens on localhost only, and the sealing
            # key has nothing to spend
            "--allow-insecure-unlock",
        ]  # fmt: skip
    return args


def prepare(section: ChainNodeSection) -> int:
    """Make the data dir ready (genesis written once, node key, sealing key); the chain id."""
    chain_id = genesis_chain_id(section)
    if not section.geth.exists():
        raise DaiseeError(f"chain_node.geth: no geth at {section.geth} (the image installs one)")
    section.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    _nodekey(section)
    if section.role == "signer":
        sealing_key(section)
    marker = section.data_dir / "genesis.json"
    wanted = section.genesis.read_text()
    if marker.exists():
        if json.loads(marker.read_text()) != json.loads(wanted):
            raise DaiseeError(
                f"{section.data_dir} holds a chain made from another genesis than "
                f"{section.genesis}; move that data dir away to start this chain"
            )
        return chain_id
    done = subprocess.run(
        [str(section.geth), "--datadir", str(section.data_dir), "init", str(section.genesis)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise DaiseeError(f"geth init failed: {' / '.join(tail)}")
    marker.write_text(wanted)
    return chain_id


def run(section: ChainNodeSection) -> None:
    """Prepare the data dir, then become geth (never returns)."""
    args = geth_args(section, prepare(section))
    os.execv(args[0], args)
