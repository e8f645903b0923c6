"""A community you can watch: several simulated homes, each with its own daemon, on a chain of
three signers, with one MQTT broker, in real time.

    roof      producer: a 9 kW PV roof; sells to its neighbours by its [market] policy
    ana       consumer whose battery is low: buys from the roof while it stays low
    ben       consumer with a small roof: buys while the roof has surplus and its battery is half
    building  the shared building meter (lifts, stairs, lights): no roof, no battery

Each home is a `daisee-node run` process with its own config, database and node key. The chain is
go-ethereum 1.13 (`[chain_node]`, the same client a Pi runs): roof, ana and ben each run a signer,
the building a follower, peered on loopback, each daemon talking to its own chain node and falling
back to the others. Without geth, one anvil (npm) serves every home. Governance (a key of its own)
deploys the ledger and the market, and registers the homes.

Every period a line per home says what it committed (import, export, on chain or not) and what it
bought or sold. Ctrl-C (or `--duration`) stops the daemons, then the chain and the broker, and
prints the community's statement from the chain: each home's committed totals, its credits and
its market settlements.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daisee_node.errors import DaiseeError

if TYPE_CHECKING:
    from eth_account.signers.local import LocalAccount
    from web3 import Web3

#: where the community keeps its homes, chain and broker, relative to the current directory
COMMUNITY_DIR = Path("daisee-community")
GETH_VERSION = "1.13.15"
CHAIN_ID = 4_242
BLOCK_PERIOD_S = 2
#: the price the buying homes offer, in credits per kWh
PRICE = 0.25
#: what a buying home exported before the run, so that it has credits to buy with (Wh)
EARNED_WH = 2_000


@dataclass(frozen=True)
class Home:
    """One simulated home: what it has, and how it trades."""

    name: str
    what: str
    simulation: dict[str, Any]
    chain_role: str  # signer or follower
    buy: dict[str, Any] | None = None
    sells: bool = False


HOMES = (
    Home(
        "roof",
        "a 9 kW PV roof and a full battery: sells its surplus",
        {"pv_peak_w": 9000, "battery_initial_soc_pct": 95, "load_base_w": 300},
        "signer",
        sells=True,
    ),
    Home(
        "ana",
        "no roof, battery low: buys from the roof while it stays low",
        {
            "pv_peak_w": 0,
            "battery_initial_soc_pct": 12,
            "battery_min_soc_pct": 20,
            "load_base_w": 1500,
        },
        "signer",
        buy={"name": "low_battery", "when": "battery.soc_pct < 20", "amount_wh": 20},
    ),
    Home(
        "ben",
        "a small roof: buys while the roof has surplus and its battery is below half",
        # a slow battery: the house still imports what its roof and battery do not cover
        {
            "pv_peak_w": 1500,
            "battery_initial_soc_pct": 40,
            "load_base_w": 2500,
            "battery_max_discharge_w": 400,
        },
        "signer",
        buy={
            "name": "neighbour_sun",
            "when": "peer.roof.pv.power_w > 2000 and battery.soc_pct < 50",
            "amount_wh": 10,
        },
    ),
    Home(
        "building",
        "the shared building meter: lifts, stairs, lights",
        {
            "pv_peak_w": 0,
            "load_base_w": 2500,
            "battery_max_charge_w": 0,
            "battery_max_discharge_w": 0,
        },
        "follower",
    ),
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_geth() -> Path | None:
    """geth 1.13.15: `$DAISEE_GETH`, the one `./run` caches, or one on PATH of that version."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    candidates = [
        os.environ.get("DAISEE_GETH"),
        cache / "daisee-node" / f"geth-{GETH_VERSION}" / "geth",
        shutil.which("geth"),
    ]
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            out = subprocess.run([str(c), "version"], capture_output=True, text=True, check=False)
            if f"Version: {GETH_VERSION}" in out.stdout:
                return Path(c)
    return None


def find_anvil() -> Path | None:
    for base in (Path.cwd(), Path(__file__).resolve().parent.parent):
        anvil = base / "node_modules" / ".bin" / "anvil"
        if anvil.exists():
            return anvil
    return None


@dataclass
class Proc:
    """A child process of the community, with its log."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def stop(self, timeout: float) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(10)


@dataclass
class Community:
    """The running community: its folder, chain, broker, homes and what it printed."""

    work: Path
    period_s: int
    procs: list[Proc] = field(default_factory=list)
    chain_procs: list[Proc] = field(default_factory=list)
    configs: dict[str, Path] = field(default_factory=dict)
    #: each home's chain node config (geth only): `daisee-node chain-node run -c` starts it
    chain_configs: dict[str, Path] = field(default_factory=dict)
    addresses: dict[str, str] = field(default_factory=dict)
    rpc_urls: dict[str, str] = field(default_factory=dict)
    ledger: str = ""
    market: str = ""
    chain_kind: str = ""
    from_block: int = 0
    registry: str = ""
    key_from_ms: int = 0
    shown: dict[str, int] = field(default_factory=dict)  # home → last period shown (t1)

    def spawn(self, name: str, args: list[str], *, chain: bool = False) -> Proc:
        log = self.work / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        popen = subprocess.Popen(
            args,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            # Ctrl-C reaches the community only: it stops its children in order.
            start_new_session=True,
        )
        proc = Proc(name, popen, log)
        (self.chain_procs if chain else self.procs).append(proc)
        return proc

    def stop(self) -> None:
        for p in reversed(self.procs):  # the daemons first: relays safe, buffers committed
            p.stop(30)
        for p in reversed(self.chain_procs):
            p.stop(60)


# -- set-up ---------------------------------------------------------------------------------------


def node_command() -> list[str]:
    return [sys.executable, "-m", "daisee_node"]


def start_broker(c: Community, homes: tuple[Home, ...]) -> tuple[int, dict[str, Path]]:
    """mosquitto on loopback: one login per home, each writing only under its own name."""
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    passwd_tool = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    if not Path(mosquitto).exists():
        raise DaiseeError("mosquitto is missing: `./run community` installs it (apt)")
    d = c.work / "broker"
    d.mkdir(parents=True)
    passwd = d / "passwd"
    passwd.touch(mode=0o600)
    secrets: dict[str, Path] = {}
    for h in homes:
        secret = os.urandom(12).hex()
        subprocess.run([passwd_tool, "-b", str(passwd), h.name, secret], check=True)
        secrets[h.name] = d / f"{h.name}.pass"
        secrets[h.name].write_text(secret)
        secrets[h.name].chmod(0o600)
    (d / "acl").write_text(
        "pattern write daisee/%u/#\npattern read daisee/%u/#\npattern read daisee/+/peer\n"
        "pattern read daisee/+/commitment\npattern read daisee/+/market/line/+\n"
    )
    port = free_port()
    (d / "mosquitto.conf").write_text(
        # as whoever started it: as root mosquitto would switch to a user who cannot read these
        f"user {getpass.getuser()}\n"
        f"listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {passwd}\n"
        f"acl_file {d / 'acl'}\npersistence false\nlog_dest stdout\n"
    )
    c.spawn("broker", [mosquitto, "-c", str(d / "mosquitto.conf")], chain=True)
    wait_until(lambda: _port_open(port), 10, "the broker did not start")
    return port, secrets


def _port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
    except OSError:
        return False
    return True


def wait_until(predicate: Any, timeout: float, failure: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise DaiseeError(failure)


def block_number(url: str) -> int:
    from daisee_node.ledger import chain as chainlib

    try:
        return int(chainlib.connect(url, 2).eth.block_number)
    except Exception:
        return -1


def toml_value(value: Any) -> str:
    """A TOML value for the plain types a config holds."""
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)  # strings, numbers and lists of strings read the same in TOML


def table(name: str, values: dict[str, Any], *, array: bool = False) -> str:
    head = f"[[{name}]]" if array else f"[{name}]"
    body = "".join(f"{k} = {toml_value(v)}\n" for k, v in values.items() if v is not None)
    return f"\n{head}\n{body}"


def chain_node_table(s: Any) -> str:
    keys = (
        "role",
        "genesis",
        "data_dir",
        "geth",
        "port",
        "http_port",
        "authrpc_port",
        "nat",
        "verbosity",
        "bootnodes",
    )
    return table("chain_node", {k: getattr(s, k) for k in keys})


def start_geth_chain(c: Community, homes: tuple[Home, ...], geth: Path) -> None:
    """A signer per signing home and a follower for the others, peered on loopback, each started
    by `daisee-node chain-node run` from the home's config; signers join one at a time, each once
    it has the first one's blocks (signers started together race for the first block and can stay
    split)."""
    from daisee_node.ledger import chainspec
    from daisee_node.ledger.chain_node import ChainNodeSection, identity

    sections: dict[str, ChainNodeSection] = {}
    for h in homes:
        sections[h.name] = ChainNodeSection(
            role=h.chain_role,
            genesis=c.work / "genesis.json",
            data_dir=c.work / h.name / "chain",
            geth=geth,
            port=free_port(),
            http_port=free_port(),
            authrpc_port=free_port(),
            nat="extip:127.0.0.1",
            # geth 1.13 starts syncing once it has min(5, maxpeers) peers (or every 10 s): a
            # small community's nodes have fewer than 5 others
            max_peers=len(homes) - 1,
            verbosity=2,
        )
    ids = {name: identity(s) for name, s in sections.items()}
    signers = [i.signer for i in ids.values() if i.signer is not None]
    funds = {a: 1_000 * 10**18 for a in [*c.addresses.values(), governance(c).address]}
    genesis = chainspec.clique(signers, CHAIN_ID, BLOCK_PERIOD_S, funds)
    (c.work / "genesis.json").write_text(json.dumps(genesis, indent=2))
    first = ""
    for name, s in sections.items():
        s = s.model_copy(update={"bootnodes": [ids[o].enode for o in sections if o != name]})
        url = c.rpc_urls[name] = f"http://127.0.0.1:{s.http_port}"
        config = c.work / name / "chain.toml"
        config.write_text(
            table("node", {"id": name, "data_dir": c.work / name / "data"}) + chain_node_table(s)
        )
        c.chain_configs[name] = config
        c.spawn(
            f"{name}-chain", [*node_command(), "chain-node", "run", "-c", str(config)], chain=True
        )
        if not first:
            first = url
            synced(url, 1, name)
        else:
            synced(url, block_number(first), name)
    c.chain_kind = (
        f"geth {GETH_VERSION} (Clique): {len(signers)} signers and "
        f"{len(sections) - len(signers)} follower on loopback, {BLOCK_PERIOD_S} s blocks"
    )


def synced(url: str, head: int, name: str) -> None:
    wait_until(lambda: block_number(url) >= head, 180, f"{name}'s chain node does not sync")


def start_anvil_chain(c: Community, homes: tuple[Home, ...], anvil: Path) -> None:
    """One anvil for every home, when geth is missing (not a PoA chain: blocks every second)."""
    from daisee_node.ledger import chain as chainlib

    port = free_port()
    c.spawn(
        "anvil",
        [
            str(anvil),
            "--port",
            str(port),
            "--block-time",
            "1",
            "--chain-id",
            str(CHAIN_ID),
            "--silent",
        ],
        chain=True,
    )
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: block_number(url) >= 0, 30, "anvil did not start")
    w3 = chainlib.connect(url)
    for address in [*c.addresses.values(), governance(c).address]:
        w3.provider.make_request("anvil_setBalance", [address, hex(1_000 * 10**18)])  # type: ignore[arg-type]
    for h in homes:
        c.rpc_urls[h.name] = url
    c.chain_kind = "anvil, one for all homes (geth 1.13.15 is missing: `./run community` builds it)"


def governance(c: Community) -> LocalAccount:
    """The community's governance key (it deploys, registers, records the allocation key),
    a keystore in the folder."""
    from daisee_node.ledger.keys import load_account, new_keystore

    keystore, password = c.work / "governance.json", c.work / "governance.pass"
    if not keystore.exists():
        new_keystore(keystore, password)
    return load_account(keystore, password)


def deploy(c: Community, homes: tuple[Home, ...]) -> None:
    """The ledger and the market, by governance; every home registered."""
    from daisee_node.ledger import chain as chainlib
    from daisee_node.ledger import market as marketlib

    gov = governance(c)
    w3 = chainlib.connect(c.rpc_urls[homes[0].name])
    c.ledger = chainlib.deploy(w3, gov, None, 1000)
    ledger = chainlib.Ledger(w3, c.ledger)
    for h in homes:
        ledger.set_node(gov, c.addresses[h.name], capacity_w=chainlib.DEFAULT_CAPACITY_W)
    c.market = marketlib.deploy(w3, gov, c.ledger, grace_ms=4 * c.period_s * 1000)
    for h in homes:
        if h.buy is not None:
            earned_before(c, w3, ledger, h)
    community_files(c, w3, gov, homes)
    c.from_block = int(w3.eth.block_number)
    # What an auditor needs besides the members, key and tariff files: every address, the
    # period the nodes commit (`--period-s`) and where the community's blocks begin.
    (c.work / "chain.json").write_text(
        json.dumps(
            {
                "rpc": c.rpc_urls,
                "ledger": c.ledger,
                "registry": c.registry,
                "market": c.market,
                "period_s": c.period_s,
                "from_block": c.from_block,
                "key_from_ms": c.key_from_ms,
                "chain": c.chain_kind,
            },
            indent=2,
        )
    )


def community_files(c: Community, w3: Web3, gov: LocalAccount, homes: tuple[Home, ...]) -> None:
    """The community registry, its allocation key (the French default, pro rata of
    consumption) recorded from the next period on, and the members and tariff files an auditor
    bills with."""
    from daisee_node.community import registry
    from daisee_node.community.keys import key_hash, load_key

    members = "".join(f'"{c.addresses[h.name]}" = "{h.name}"\n' for h in homes)
    (c.work / "members.toml").write_text(
        f'version = 1\nname = "daisee-node community demo"\n[members]\n{members}'
    )
    (c.work / "key.toml").write_text(
        'version = 1\nkind = "prorata"\nname = "the French default key (D315-6)"\n'
    )
    (c.work / "tariff.toml").write_text(
        'version = 1\nname = "demo tariff"\ncurrency = "EUR"\nlocal_price = "0.1450"\n'
        'producer_price = "0.1100"\nsurplus_price = "0.0400"\ncredit_price = "0.10"\n'
        "decimals = 4\n"
    )
    c.registry = registry.deploy(w3, gov, c.ledger)
    period_ms = c.period_s * 1000
    chain_now = int(w3.eth.get_block("latest")["timestamp"]) * 1000
    c.key_from_ms = -(-(chain_now + 3 * BLOCK_PERIOD_S * 1000) // period_ms) * period_ms
    key = key_hash(load_key(c.work / "key.toml"))
    registry.Registry(w3, c.registry).record_key(gov, key, c.key_from_ms)


def earned_before(c: Community, w3: Web3, ledger: Any, h: Home) -> None:
    """The credits a buying home starts with: its node's first commitment, signed with its own
    key, for an hour-long period that ended an hour ago, when it exported `EARNED_WH`. The daemon
    goes on from that head (an honest history for a demo: the period is older than the run)."""
    from eth_hash.auto import keccak

    from daisee_node.ledger import chain as chainlib
    from daisee_node.ledger.commitment import Commitment, sign
    from daisee_node.ledger.keys import load_account

    d = c.work / h.name
    account = load_account(d / "node-key.json", d / "node-key.pass")
    t0 = (int(time.time() * 1000) // 3_600_000 - 2) * 3_600_000
    zero = b"\0" * 32
    cm = Commitment(
        account.address, 1, t0, t0 + 3_600_000, keccak(b"earlier"), 1, 0, EARNED_WH, zero, zero
    )
    items = [(cm, sign(cm, account.key, ledger.chain_id, ledger.address))]
    chainlib.send(w3, account, {"to": ledger.address, "data": ledger.batch_data(items)})


def home_toml(
    c: Community, h: Home, homes: tuple[Home, ...], broker_port: int, secret: Path
) -> str:
    """The home's daemon config."""
    from daisee_node.sensors import simulated

    d = c.work / h.name
    others = [o for o in homes if o.name != h.name]
    own = c.rpc_urls[h.name]
    text = f"# {h.name}: {h.what}\n"
    text += table("node", {"id": h.name, "data_dir": d / "data"})
    text += table("store", {"flush_interval_s": 0.5})
    text += table(
        "simulation",
        {
            "longitude_deg": round(simulated.sunny_longitude(), 3),
            "latitude_deg": 20.0,
            "cloudiness": 0.1,
            "seed": 1 + [x.name for x in homes].index(h.name),
            **h.simulation,
        },
    )
    for m in ("pv", "load", "battery", "grid"):
        text += table(
            "sensors", {"name": m, "kind": "simulated", "model": m, "interval_s": 1.0}, array=True
        )
    text += table("gpio", {"backend": "mock"})
    text += table("relays", {"name": "supply", "pin": 17, "safe_state": "off"}, array=True)
    text += (
        '\n[[rules]]\nname = "market_supply"\nwhen = "market.order_active == 1"\n'
        'then = { relay = "supply", state = "on" }\n'
        'otherwise = { relay = "supply", state = "off" }\nstale_after_s = 10\nfallback = "off"\n'
    )
    text += table(
        "mqtt",
        {
            "host": "127.0.0.1",
            "port": broker_port,
            "username": h.name,
            "password_file": secret,
            "reading_interval_s": 2,
            "discovery": False,
        },
    )
    text += table(
        "chain",
        {
            "rpc_url": own,
            "rpc_fallback_urls": sorted({c.rpc_urls[o.name] for o in others} - {own}),
            "ledger_address": c.ledger,
            "keystore": d / "node-key.json",
            "password_file": d / "node-key.pass",
            "period_s": c.period_s,
            "seal_delay_s": 2,
            "submit_interval_s": c.period_s,
            "confirmations": 2,
            "import_channel": "grid.import_wh",
            "export_channel": "grid.export_wh",
        },
    )
    text += table(
        "market",
        {
            "address": c.market,
            "from_block": c.from_block,
            "accept_from": [o.name for o in others] if h.sells else [],
            "min_price": 0.1,
            "seller_meter": "grid.export_wh",
            "buyer_meter": "grid.import_wh",
            "heartbeat_s": 10,
        },
    )
    if h.buy is not None:
        text += table(
            "market.buy",
            {
                **h.buy,
                "seller": "roof",
                "max_price": PRICE,
                "window_min": c.period_s / 60,
                "lead_s": 3 * BLOCK_PERIOD_S,
            },
            array=True,
        )
    for o in others:
        text += table("peers", {"id": o.name, "address": c.addresses[o.name]}, array=True)
    return text


# -- watching -----------------------------------------------------------------------------------


def hhmmss(t_ms: int) -> str:
    return datetime.fromtimestamp(t_ms / 1000, UTC).strftime("%H:%M:%S")


def period_lines(c: Community, homes: tuple[Home, ...]) -> Iterator[str]:
    """A line per home for each period it sealed since the last call."""
    from daisee_node.ledger.commitment import Commitment

    for h in homes:
        db = c.work / h.name / "data" / "node.db"
        if not db.exists():
            continue
        try:
            conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=2)
            try:
                rows = conn.execute(
                    "SELECT body, state, t1 FROM commitments WHERE own = 1 AND t1 > ? ORDER BY t1",
                    (c.shown.get(h.name, 0),),
                ).fetchall()
            finally:
                conn.close()
        except sqlite3.Error:
            continue  # not created yet, or busy: next time
        for body, state, t1 in rows:
            cm = Commitment.from_json(json.loads(body))
            if state not in ("included", "confirmed"):
                break  # shown once it is on chain, in order
            c.shown[h.name] = t1
            yield (
                f"{hhmmss(cm.t0)}–{hhmmss(cm.t1)}  {h.name:<9} import {cm.import_wh:>5} Wh  "
                f"export {cm.export_wh:>5} Wh  {cm.count:>5} readings  period {cm.seq} on chain"
                + market_note(c, h)
            )


def market_note(c: Community, h: Home) -> str:
    from daisee_node.status import read_status

    try:
        m = read_status(c.work / h.name / "data").get("market") or {}
    except DaiseeError:
        return ""
    orders = m.get("orders") or []
    if not orders:
        return ""
    o = orders[-1]
    delivered = o.get("delivered_wh")
    what = "sells" if o["role"] == "seller" else "buys"
    return (
        f"  | order {o['id']}: {what} {o['amount_wh']} Wh "
        f"{'to' if o['role'] == 'seller' else 'from'} {o['peer']}, {o['state']}"
        + (f", {delivered:g} Wh metered" if delivered is not None else "")
    )


# -- the statement --------------------------------------------------------------------------------


def statement_url(c: Community, homes: tuple[Home, ...]) -> str | None:
    """The RPC URL the statement is computed on: a follower's, once it has every block the
    others have (it can be started again alone, after the demo, to run the printed command);
    else the first that answers."""
    heads = {h.name: block_number(c.rpc_urls[h.name]) for h in homes if h.name in c.rpc_urls}
    live = [name for name, head in heads.items() if head >= 0]
    if not live:
        return None
    top = max(heads.values())
    for h in homes:
        if h.chain_role == "follower" and h.name in live:
            url = c.rpc_urls[h.name]
            with contextlib.suppress(DaiseeError):
                return str(wait_until(lambda u=url: block_number(u) >= top and u, 30, "behind"))
    return c.rpc_urls[live[0]]


def restart_hint(c: Community, url: str) -> str:
    """How to run the printed command once the demo has stopped its chain."""
    name = next((n for n, u in c.rpc_urls.items() if u == url), None)
    if name is not None and name in c.chain_configs:
        from daisee_node.demo import command_name

        return (
            f"The chain stops with the demo; its blocks stay in {c.work}. To run the command "
            f"again, start {name}'s chain node (it answers on {url}):\n"
            f"  {command_name()} chain-node run -c {c.chain_configs[name]}"
        )
    return (
        "The command works while the chain runs: anvil keeps nothing once the demo stops "
        "(with geth 1.13.15, which `./run community` builds, the chain's blocks stay)."
    )


def statement(c: Community, homes: tuple[Home, ...]) -> tuple[list[str], list[str]]:
    """The community's allocation and bills for the periods every home has on chain, from the
    chain alone, as an auditor computes them: the command (and how to run it again once the
    chain is stopped), and what it printed."""
    url = statement_url(c, homes)
    end = min((c.shown.get(h.name, 0) for h in homes), default=0)
    if url is None or end <= c.key_from_ms:
        return [], ["no period every home has on chain yet: no statement"]
    w = c.work
    reports = gather_reports(c, homes, end)
    args = [
        "community", "bill", "--rpc", url, "--ledger", c.ledger, "--registry", c.registry,
        "--market", c.market, "--members", str(w / "members.toml"), "--key",
        str(w / "key.toml"), "--tariff", str(w / "tariff.toml"), "--from", str(c.key_from_ms),
        "--to", str(end), "--period-s", str(c.period_s), "--from-block", str(c.from_block),
        "--html", str(w / "statements"), "--keys-csv", str(w / "keys.csv"),
        "--periods-csv", str(w / "periods"), "--reports", str(reports),
    ]  # fmt: skip
    done = subprocess.run(
        [*node_command(), *args], capture_output=True, text=True, check=False, timeout=300
    )
    out = (done.stdout + done.stderr).rstrip().splitlines()
    from daisee_node.demo import command_name

    return [f"{command_name()} " + " ".join(args), restart_hint(c, url)], out


def gather_reports(c: Community, homes: tuple[Home, ...], end: int) -> Path:
    """Each home's signed conformity report of each billed period, with its proof (what a node
    gives the community for its periods to be checked), in `reports/`."""
    folder = c.work / "reports"
    folder.mkdir(exist_ok=True)
    commands = [
        [*node_command(), "conformity", "-c", str(c.configs[h.name]), "--period", str(t0 + 1),
         "--prove", "-o", str(folder / f"{h.name}-{t0}.json")]
        for h in homes
        for t0 in range(c.key_from_ms, end, c.period_s * 1000)
    ]  # fmt: skip
    for i in range(0, len(commands), 8):  # a few at a time: each is a Python start
        running = [
            subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for cmd in commands[i : i + 8]
        ]
        for proc in running:
            proc.wait(120)
    return folder


# -- the whole ----------------------------------------------------------------------------------


#: written into the folder a community runs in: only such a folder is emptied by a later run
MARKER = ".daisee-community-demo"


def fresh_folder(work: Path) -> None:
    """Make `work` an empty folder for a new community (its chain starts at genesis).

    Only a folder an earlier run made (it holds `MARKER`) is emptied: given by mistake, a real
    node's data dir, with its key and its unsent readings, is refused rather than deleted.
    """
    try:
        if work.exists() or work.is_symlink():
            if not work.is_dir() or work.is_symlink():
                raise DaiseeError(f"--data-dir {work}: not a folder")
            if any(work.iterdir()):
                if not (work / MARKER).is_file():
                    raise DaiseeError(
                        f"--data-dir {work}: not empty, and not a folder community-demo made; "
                        "give a new or empty folder (it is emptied on every run)"
                    )
                shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
        (work / MARKER).write_text("a community-demo folder: emptied by its next run\n")
    except OSError as exc:
        raise DaiseeError(f"--data-dir {work}: {exc.strerror or exc}") from exc


def run(
    work: Path = COMMUNITY_DIR,
    *,
    period_s: int = 30,
    duration: float | None = None,
    homes: tuple[Home, ...] = HOMES,
) -> int:
    """Start the community, print what happens each period, stop on Ctrl-C or after
    `duration` seconds, and print the statement."""
    from daisee_node.ledger.keys import new_keystore

    fresh_folder(work)
    c = Community(work.resolve(), period_s)
    stop = {"now": False}

    def on_signal(signum: int, frame: Any) -> None:
        stop["now"] = True

    old = signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        for h in homes:
            (c.work / h.name).mkdir()
            c.addresses[h.name] = new_keystore(
                c.work / h.name / "node-key.json", c.work / h.name / "node-key.pass"
            )
        broker_port, secrets = start_broker(c, homes)
        geth = find_geth()
        anvil = find_anvil()
        if geth is not None:
            start_geth_chain(c, homes, geth)
        elif anvil is not None:
            start_anvil_chain(c, homes, anvil)
        else:
            raise DaiseeError("neither geth 1.13.15 nor anvil found: run `./run community`")
        deploy(c, homes)
        print(f"chain: {c.chain_kind}; ledger {c.ledger}, market {c.market}", flush=True)
        for h in homes:
            config = c.work / h.name / "node.toml"
            config.write_text(home_toml(c, h, homes, broker_port, secrets[h.name]))
            c.configs[h.name] = config
            c.spawn(h.name, [*node_command(), "run", "-c", str(config)])
            print(f"{h.name:<9} {h.what} (node {c.addresses[h.name]})", flush=True)
        print(
            f"a line per home each {period_s} s period once it is on chain; Ctrl-C stops; "
            f"logs in {c.work / 'logs'}",
            flush=True,
        )
        ends = None if duration is None else time.monotonic() + duration
        while not stop["now"] and (ends is None or time.monotonic() < ends):
            for line in period_lines(c, homes):
                print(line, flush=True)
            for p in c.procs + c.chain_procs:
                if p.popen.poll() is not None:
                    raise DaiseeError(f"{p.name} stopped (exit {p.popen.returncode}); see {p.log}")
            time.sleep(0.5)
        print("stopping the homes (relays safe, buffers committed), then the chain", flush=True)
        for p in reversed(c.procs):
            p.stop(30)
        for line in period_lines(c, homes):
            print(line, flush=True)
        command, printed = statement(c, homes)
        print(f"The community's statement, from the chain alone ({c.chain_kind}):", flush=True)
        for line in printed:
            print(f"  {line}", flush=True)
        if command:
            print(f"Computed, as anyone can, with:\n  {command[0]}", flush=True)
            print(command[1], flush=True)
            print(f"Statements (HTML) in {c.work / 'statements'}; CSV files beside them.")
        return 0
    finally:
        signal.signal(signal.SIGINT, old)
        with contextlib.suppress(Exception):
            c.stop()
