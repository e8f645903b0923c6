"""Market nodes for end-to-end tests: daemons with node keys on anvil, credits earned before the
test, a `[market]` section, and readers for what they stored and switched."""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any

from eth_hash.auto import keccak

from daisee_node.ledger import chain as chainlib
from daisee_node.ledger.commitment import Commitment, sign
from daisee_node.ledger.keys import load_account, new_keystore
from tests.conftest import db_rows, write_config
from tests.support.broker import Broker
from tests.support.chains import AnvilLedger
from tests.support.clocks import sunny_longitude

#: a node's key: keystore, password file, address
Key = tuple[Path, Path, str]


def make_keys(tmp_path: Path, chain: AnvilLedger, names: tuple[str, ...]) -> dict[str, Key]:
    """A funded, registered node key for each name."""
    keys: dict[str, Key] = {}
    for name in names:
        keystore, password = tmp_path / f"{name}-key.json", tmp_path / f"{name}-key.pass"
        address = new_keystore(keystore, password)
        chain.enrol(address)
        keys[name] = (keystore, password, address)
    return keys


def earn_credits(chain: AnvilLedger, keystore: Path, password: Path, export_wh: int) -> None:
    """The node's first commitment, signed with its key: a past period that exported
    `export_wh` (one credit per 1000 Wh). Its daemon goes on from this head."""
    account = load_account(keystore, password)
    ledger = chain.ledger
    t0 = (int(time.time() * 1000) // 900_000 - 4) * 900_000
    c = Commitment(
        account.address, 1, t0, t0 + 900_000, keccak(b"r"), 1, 0, export_wh, b"\0" * 32, b"\0" * 32
    )
    items = [(c, sign(c, account.key, ledger.chain_id, ledger.address))]
    receipt = chainlib.send(
        chain.w3, account, {"to": ledger.address, "data": ledger.batch_data(items)}
    )
    assert ledger.outcome(receipt)[1] == []


def interlocked(name: str, own: tuple[str, int], other: tuple[str, int], dead_time_s: float) -> Any:
    """Two relays of one interlock group `name` and the rule that switches between them: the
    `other` source while an order flows (`market.order_active`), the `own` one otherwise."""
    relays = [
        {
            "name": relay,
            "pin": pin,
            "safe_state": "on" if relay == own[0] else "off",
            "group": name,
            "dead_time_s": dead_time_s,
        }
        for relay, pin in (own, other)
    ]
    rule = {
        "name": f"{name}_market",
        "when": "market.order_active == 1",
        "then": {"relay": other[0], "state": "on"},
        "otherwise": {"relay": own[0], "state": "on"},
        "stale_after_s": 5,
        "fallback": "safe",
    }
    return relays, [rule]


def node_config(
    tmp_path: Path,
    name: str,
    *,
    chain: AnvilLedger,
    broker: Broker,
    key: Key,
    simulation: dict[str, Any],
    chain_extra: dict[str, Any] | None = None,
    market: dict[str, Any] | None = None,
    peers: dict[str, str] | None = None,
    relays: list[dict[str, Any]] | None = None,
    rules: list[dict[str, Any]] | None = None,
    login: str | None = None,
    period_s: int = 10,
) -> Path:
    """A node's config: simulated battery and grid meter read every 0.2 s, mock pins, MQTT with
    its own login (`login` for another), the chain with `period_s` periods submitted at once;
    `peers` maps the declared peers' ids to their addresses."""
    keystore, password, _ = key
    user = login or name
    sections: dict[str, Any] = {
        "node": {"id": name, "data_dir": str(tmp_path / f"{name}-data")},
        "store": {"flush_interval_s": 0.05},
        "simulation": {
            "latitude_deg": 0.0,
            "longitude_deg": sunny_longitude(),
            "cloudiness": 0.0,
            "noise_pct": 0.0,
            **simulation,
        },
        "sensors": [
            {"name": m, "kind": "simulated", "model": m, "interval_s": 0.2}
            for m in ("battery", "grid")
        ],
        "gpio": {"backend": "mock"},
        "relays": relays or [],
        "rules": rules or [],
        "mqtt": {
            "host": broker.host,
            "port": broker.port,
            "username": user,
            "password_file": str(broker.password_file(user)),
            "reading_interval_s": 0.5,
            "discovery": False,
        },
        "chain": {
            "rpc_url": chain.anvil.url,
            "ledger_address": chain.ledger.address,
            "keystore": str(keystore),
            "password_file": str(password),
            "period_s": period_s,
            "seal_delay_s": 1.0,
            "submit_interval_s": 1.0,
            "confirmations": 1,
            "import_channel": "grid.import_wh",
            "export_channel": "grid.export_wh",
            **(chain_extra or {}),
        },
    }
    if market is not None:
        market = dict(market)
        buy = market.pop("buy", None)
        sections["market"] = market
        if buy is not None:
            sections["market.buy"] = buy
    if peers:
        sections["peers"] = [{"id": pid, "address": address} for pid, address in peers.items()]
    return write_config(tmp_path / f"{name}.toml", sections)


def readings(db: Path, channel: str) -> list[tuple[int, float]]:
    """A channel's stored readings (t_ms, value), oldest first."""
    return [
        (int(t), float(v))
        for t, v in db_rows(
            db,
            "SELECT r.t_ms, r.value FROM readings r JOIN channels c ON c.id = r.channel_id "
            "WHERE c.name = ? ORDER BY r.t_ms",
            (channel,),
        )
    ]


def at(series: list[tuple[int, float]], t_ms: int) -> float:
    """A counter's value at `t_ms`, between the readings either side (as the tracker counts)."""
    for (ta, va), (tb, vb) in itertools.pairwise(series):
        if ta <= t_ms <= tb:
            return va + (vb - va) * (t_ms - ta) / (tb - ta) if tb > ta else vb
    raise AssertionError(f"no readings around {t_ms}")


def counted_at(series: list[tuple[int, float]], t0_ms: int, t_ms: int) -> tuple[float, float]:
    """What a counter counted from `t0_ms` up to its last reading at or before `t_ms` (what the
    node had seen when it switched), and its largest step between two readings after `t0_ms`
    (one sampling interval's energy)."""
    start = at(series, t0_ms)
    seen = [(t, v - start) for t, v in series if t0_ms <= t <= t_ms]
    after = [v for t, v in series if t >= t0_ms]
    step = max((b - a for a, b in itertools.pairwise(after)), default=0.0)
    return (seen[-1][1] if seen else 0.0), step
