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

import ipaddress
import json
import os
import re
import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator

from daisee_node import durable
from daisee_node.errors import ConfigProblem, DaiseeError
from daisee_node.models import StrictModel, not_empty_path

ENODE_PATTERN = r"^enode://[0-9a-fA-F]{128}@[^\s@]+:\d{1,5}(\?discport=\d{1,5})?$"
#: what the chain's HTTP endpoint answers: no `admin`, `personal`, `debug` or `miner`
HTTP_APIS = "eth,net,web3,clique"
#: geth takes the network id (the chain id) as a 64-bit number; kept signed for SQLite
MAX_CHAIN_ID = 2**63 - 1
#: forks after London: geth 1.13 seals Clique blocks up to London rules only
LATER_FORKS = ("shanghaiTime", "cancunTime", "terminalTotalDifficulty")
PORT_KEYS = ("port", "http_port", "authrpc_port")
_HOST_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


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

    # an empty path is the current folder: geth would make its chain wherever it started
    _not_empty = field_validator("genesis", "data_dir", "geth", mode="before")(not_empty_path)


def host_problem(host: str) -> str | None:
    """Why `host` is not an IP address or a host name other nodes could dial, or None."""
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        pass
    labels = host.removesuffix(".").split(".")
    if len(host) <= 253 and all(_HOST_LABEL.match(label) for label in labels):
        return None
    return f"{host!r} is neither an IP address nor a host name"


def _enode_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def port_problems(section: ChainNodeSection) -> list[ConfigProblem]:
    """geth listens on all three ports at once: each must be its own."""
    problems = []
    first: dict[int, str] = {}
    for key in PORT_KEYS:
        port = getattr(section, key)
        if port in first:
            problems.append(
                ConfigProblem(
                    f"chain_node.{key}",
                    f"{port} is already chain_node.{first[port]}; geth needs a port for each",
                )
            )
        else:
            first[port] = key
    return problems


def genesis_problems(path: Path) -> tuple[int | None, list[str]]:
    """The genesis' chain id, and what keeps geth 1.13 from running it as a Clique chain."""
    try:
        genesis = json.loads(path.read_text())
    except FileNotFoundError:
        return None, [
            f"no file {path}; write it with `daisee-node chain-spec --engine clique` and copy "
            "it to every node"
        ]
    except IsADirectoryError:
        return None, [f"{path} is a folder, not a genesis file"]
    except OSError as exc:
        return None, [f"cannot read {path}: {exc.strerror}"]
    except (ValueError, RecursionError) as exc:
        return None, [f"{path} is not a genesis: not JSON ({exc})"]
    config = genesis.get("config") if isinstance(genesis, dict) else None
    if not isinstance(config, dict):
        return None, [f'{path} is not a genesis: no "config" object']
    problems = []
    chain_id = config.get("chainId")
    if type(chain_id) is not int or not 1 <= chain_id <= MAX_CHAIN_ID:
        problems.append(
            f"{path}: chainId must be a whole number from 1 to 2^63 - 1 (got {chain_id!r})"
        )
        chain_id = None
    if "clique" not in config:
        problems.append(f"{path} is not a Clique genesis")
    elif not isinstance(config["clique"], dict):
        # geth takes `"clique": null` for no Clique at all, and then refuses to start
        problems.append(f'{path}: "clique" must be an object such as {{"period": 5}}')
    # geth reads a null fork as not set
    later = [k for k in LATER_FORKS if config.get(k) is not None]
    if later:
        problems.append(
            f"{', '.join(later)} set, but geth 1.13 seals Clique blocks up to London rules only"
        )
    return chain_id, problems


def _not_a_folder(path: Path) -> str | None:
    """Why `path` cannot be (or become) a folder, or None."""
    if path.is_dir():
        return None
    if path.exists():
        return f"{path} is not a folder"
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return f"{path} cannot be made: {parent} is not a folder"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{path} cannot be made: {parent} is not writable"
    return None


def _data_dir_problems(section: ChainNodeSection) -> list[str]:
    from daisee_node.ledger.keys import KeyStoreError, keystore_address, read_password

    d = section.data_dir
    problem = _not_a_folder(d)
    if problem is not None:
        return [problem]
    problems = []
    nodekey = d / "geth" / "nodekey"
    folder = _not_a_folder(nodekey.parent)
    if folder is not None:
        problems.append(folder)
    elif nodekey.exists() or nodekey.is_symlink():
        try:
            _parse_nodekey(nodekey)
        except DaiseeError as exc:
            problems.append(str(exc))
    if section.role != "signer":
        return problems
    store = d / "keystore"
    folder = _not_a_folder(store)
    if folder is not None:
        return [*problems, folder]
    existing = sorted(store.glob("*.json")) if store.is_dir() else []
    if existing:
        # made on the first start, with its password beside it: without that password geth
        # cannot unlock the key it seals with
        try:
            keystore_address(existing[0])
            read_password(d / "sealer.pass")
        except KeyStoreError as exc:
            problems.append(f"the sealing key cannot be used: {exc}")
    return problems


def file_problems(section: ChainNodeSection, *, identity_only: bool = False) -> list[ConfigProblem]:
    """What keeps the files `[chain_node]` names from being used, each with its key's path;
    `identity_only`: only what `chain-node id` needs (the data dir), not the genesis or geth,
    which come later."""
    try:
        found = _data_dir_problems(section)
    except OSError as exc:  # a folder on the way that cannot be looked into
        found = [str(_os_error(exc))]
    problems = [ConfigProblem("chain_node.data_dir", p) for p in found]
    if identity_only:
        return problems
    problems += [
        ConfigProblem("chain_node.genesis", p) for p in genesis_problems(section.genesis)[1]
    ]
    try:
        found = [] if (p := _geth_problem(section.geth)) is None else [p]
    except OSError as exc:
        found = [str(_os_error(exc))]
    return problems + [ConfigProblem("chain_node.geth", p) for p in found]


def _geth_problem(geth: Path) -> str | None:
    if not geth.exists():
        return f"no geth at {geth} (the image installs one)"
    if geth.is_dir():
        return f"{geth} is a folder, not geth"
    if not os.access(geth, os.X_OK):
        return f"{geth} is not executable"
    return None


@dataclass(frozen=True)
class Identity:
    """What the other nodes need to know of this one: its enode and its sealing address."""

    enode: str
    signer: str | None  # only for role = signer


def _nodekey(section: ChainNodeSection) -> bytes:
    """This node's p2p key (geth's `nodekey` file: 64 hex digits), made once."""
    path = section.data_dir / "geth" / "nodekey"
    try:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            durable.create_private(path, secrets.token_hex(32))
    except OSError as exc:
        raise _os_error(exc, "chain_node.data_dir") from None
    return _parse_nodekey(path)


def _parse_nodekey(path: Path) -> bytes:
    try:
        text = path.read_text().strip()
    except IsADirectoryError:
        raise DaiseeError(f"{path} is a folder, not a node key") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DaiseeError(f"{path} is not a node key: {exc}") from None
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != 32:
        raise DaiseeError(f"{path} is not a node key (64 hex digits)")
    return key


def _os_error(exc: OSError, key: str | None = None) -> DaiseeError:
    """One line for a file operation that failed, after the config key that named the file."""
    where = f"{exc.filename}: " if exc.filename else ""
    return DaiseeError(f"{key + ': ' if key else ''}{where}{exc.strerror or exc}")


def sealing_key(section: ChainNodeSection) -> tuple[Path, Path, str]:
    """The signer's own key (keystore file, password file, address), made once."""
    from daisee_node.ledger.keys import keystore_address, new_keystore

    store = section.data_dir / "keystore"
    password = section.data_dir / "sealer.pass"
    try:
        existing = sorted(store.glob("*.json")) if store.is_dir() else []
        if existing:
            return existing[0], password, keystore_address(existing[0])
        store.mkdir(parents=True, exist_ok=True, mode=0o700)
        keyfile = store / "sealer.json"
        return keyfile, password, new_keystore(keyfile, password)
    except OSError as exc:
        raise _os_error(exc, "chain_node.data_dir") from None


def identity(section: ChainNodeSection, host: str = "127.0.0.1") -> Identity:
    """This node's enode (at `host`) and, for a signer, its sealing address."""
    from eth_keys import keys

    problem = host_problem(host)
    if problem is not None:
        raise DaiseeError(problem)
    public = keys.PrivateKey(_nodekey(section)).public_key.to_hex()[2:]
    enode = f"enode://{public}@{_enode_host(host)}:{section.port}"
    signer = sealing_key(section)[2] if section.role == "signer" else None
    return Identity(enode, signer)


def genesis_chain_id(section: ChainNodeSection) -> int:
    """The genesis' chain id, after checking it is a Clique genesis geth 1.13 can run."""
    chain_id, problems = genesis_problems(section.genesis)
    if problems or chain_id is None:
        raise DaiseeError(f"chain_node.genesis: {problems[0]}")
    return chain_id


#: Every block's state written to disk as the block is imported. With geth's default (state kept
#: in memory, written every few minutes of block processing: hours on a quiet community chain),
#: a power cut of the whole community rewinds every node to the last state written, and the
#: blocks after it, with the commitments in them, are gone from every copy of the chain. The
#: archive's cost is small here: Clique pays no block reward, so an empty block changes no state.
DURABLE_STATE = ("--state.scheme", "hash", "--gcmode", "archive")


def geth_args(section: ChainNodeSection, chain_id: int) -> list[str]:
    """geth's command line for this node."""
    d = section.data_dir
    args = [
        str(section.geth),
        "--datadir", str(d),
        "--networkid", str(chain_id),
        "--port", str(section.port),
        "--syncmode", "full",
        *DURABLE_STATE,
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
    problems = file_problems(section)
    if problems:
        raise DaiseeError("; ".join(map(str, problems)))
    chain_id = genesis_chain_id(section)
    try:
        return _prepare(section, chain_id)
    except OSError as exc:
        raise _os_error(exc) from None


def _prepare(section: ChainNodeSection, chain_id: int) -> int:
    section.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    _nodekey(section)
    if section.role == "signer":
        sealing_key(section)
    marker = section.data_dir / "genesis.json"
    wanted = section.genesis.read_text()
    if marker.exists():
        try:
            same = json.loads(marker.read_text()) == json.loads(wanted)
        except ValueError:
            same = False
        if not same:
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
    durable.replace(marker, wanted)
    return chain_id


def run(section: ChainNodeSection) -> None:
    """Prepare the data dir, then become geth (never returns)."""
    args = geth_args(section, prepare(section))
    try:
        os.execv(args[0], args)
    except OSError as exc:
        raise _os_error(exc) from None
