"""`daisee-node status`: what a node is doing, read from its data dir (the daemon need not run)."""

from __future__ import annotations

import math
import sqlite3
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from daisee_node.daemon import running_pid
from daisee_node.errors import DaiseeError
from daisee_node.readings import Quality
from daisee_node.store import db_path


def open_readonly(data_dir: Path) -> sqlite3.Connection:
    """A read-only connection to a node's database; a clear error when there is none."""
    path = db_path(data_dir)
    if not path.exists():
        raise DaiseeError(f"no node database in {data_dir} (has a node run with this data dir?)")
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        conn.execute("SELECT 1 FROM readings LIMIT 1")
    except sqlite3.Error as exc:
        raise DaiseeError(f"cannot read {path}: {exc}") from None
    return conn


def newest_reading_ms(data_dir: Path) -> int | None:
    """Time of the newest stored reading, or None for an empty or missing database."""
    try:
        conn = open_readonly(data_dir)
    except DaiseeError:
        return None
    with conn:
        row = conn.execute("SELECT max(t_ms) FROM readings").fetchone()
    conn.close()
    return None if row is None or row[0] is None else int(row[0])


def read_status(data_dir: Path) -> dict[str, Any]:
    """Everything `status` shows, as plain data (also the `--json` output)."""
    conn = open_readonly(data_dir)
    try:
        path = db_path(data_dir)
        size = sum(p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.exists())
        oldest, newest = conn.execute("SELECT min(t_ms), max(t_ms) FROM readings").fetchone()
        counters = dict(conn.execute("SELECT name, value FROM counters").fetchall())
        aggregates = conn.execute("SELECT count(*) FROM readings_1m").fetchone()[0]
        latest = [
            {
                "channel": name,
                "unit": unit,
                "t_ms": t_ms,
                "value": None if value is None or not math.isfinite(value) else value,
                "quality": Quality(quality).name.lower(),
            }
            for name, unit, t_ms, value, quality in conn.execute(
                "SELECT c.name, c.unit, l.t_ms, l.value, l.quality FROM latest l "
                "JOIN channels c ON c.id = l.channel_id ORDER BY c.name"
            )
        ]
        has_events = (
            conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'events'").fetchone() is not None
        )
        last_events: dict[tuple[str, str], tuple[Any, ...]] = {}
        if has_events:
            # The newest row of each group: SQLite takes bare columns from the max(id) row.
            for kind, name, target, state, reason, t_ms, _ in conn.execute(
                "SELECT kind, name, target, state, reason, t_ms, max(id) FROM events "
                "GROUP BY kind, name, target"
            ):
                last_events[(kind, name if kind != "rule" else f"{name}>{target}")] = (
                    state,
                    reason,
                    t_ms,
                )
        ledger = _ledger(conn)
    finally:
        conn.close()
    relays: dict[str, dict[str, Any]] = {}
    rules: dict[str, dict[str, Any]] = {}
    for name, value in counters.items():
        if name.startswith("relay."):
            relay, _, what = name[len("relay.") :].rpartition(".")
            relays.setdefault(relay, {})[what] = value
        elif name.startswith("rule."):
            rule, _, what = name[len("rule.") :].rpartition(".")
            rules.setdefault(rule, {})[what] = value
    for relay, info in relays.items():
        info["state"] = "on" if info.get("state") else "off"
        event = last_events.get(("relay", relay))
        info["reason"] = event[1] if event else ""
    for (kind, key), (state, reason, t_ms) in last_events.items():
        if kind == "rule":
            rule, _, target = key.partition(">")
            entry = rules.setdefault(rule, {})
            entry.setdefault("asks", {})[target] = state
            entry["reason"], entry["t_ms"] = reason, t_ms
    sensors: dict[str, dict[str, int]] = {}
    for name, value in counters.items():
        if name.startswith("sensor."):
            sensor, _, what = name[len("sensor.") :].rpartition(".")
            sensors.setdefault(sensor, {})[what] = value
    pid = running_pid(data_dir)
    return {
        "data_dir": str(data_dir),
        "running": pid is not None,
        "pid": pid,
        "database": {
            "path": str(db_path(data_dir)),
            "bytes": size,
            "readings": counters.get("readings_stored", 0),
            "minute_aggregates": aggregates,
            "oldest_ms": oldest,
            "newest_ms": newest,
        },
        "sensors": sensors,
        "latest": latest,
        "relays": relays,
        "rules": rules,
        "ledger": ledger,
    }


def _ledger(conn: sqlite3.Connection) -> dict[str, Any] | None:
    """The outbox: what is sealed, what is on chain, what waits (None: no ledger here)."""
    if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'commitments'").fetchone() is None:
        return None
    own = conn.execute("SELECT count(*) FROM commitments WHERE own = 1").fetchone()[0]
    if not own:
        return None
    by_state = dict(
        conn.execute("SELECT state, count(*) FROM commitments WHERE own = 1 GROUP BY state")
    )
    node, sealed, sealed_t1 = conn.execute(
        "SELECT node, seq, t1 FROM commitments WHERE own = 1 ORDER BY seq DESC LIMIT 1"
    ).fetchone()
    confirmed = conn.execute(
        "SELECT max(seq) FROM commitments WHERE own = 1 AND state = 'confirmed'"
    ).fetchone()[0]
    last_tx = conn.execute(
        "SELECT tx_hash, nonce, state, sent_ms FROM ledger_txs ORDER BY id DESC LIMIT 1"
    ).fetchone()
    peers = conn.execute("SELECT count(*) FROM commitments WHERE own = 0").fetchone()[0]
    return {
        "node": node,
        "sealed_seq": sealed,
        "sealed_until_ms": sealed_t1,
        "confirmed_seq": confirmed or 0,
        "backlog": sum(n for st, n in by_state.items() if st in ("pending", "sent", "included")),
        "by_state": by_state,
        "relayed_for_peers": peers,
        "last_tx": None
        if last_tx is None
        else {
            "hash": "0x" + bytes(last_tx[0]).hex(),
            "nonce": last_tx[1],
            "state": last_tx[2],
            "sent_ms": last_tx[3],
        },
    }


def _when(t_ms: int | None) -> str:
    if t_ms is None:
        return "-"
    text = datetime.fromtimestamp(t_ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")
    age = time.time() - t_ms / 1000
    if 0 <= age < 86_400 * 3:
        text += f" ({_age(age)} ago)"
    return text


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return str(n)


def render_status(report: dict[str, Any]) -> str:
    """The status report as a table for a terminal."""
    db = report["database"]
    lines = [
        f"node data dir   {report['data_dir']}",
        "daemon          "
        + (f"running (pid {report['pid']})" if report["running"] else "not running"),
        f"database        {_size(db['bytes'])}, {db['readings']:,} raw readings, "
        f"{db['minute_aggregates']:,} minute aggregates",
        f"  oldest        {_when(db['oldest_ms'])}",
        f"  newest        {_when(db['newest_ms'])}",
        "",
    ]
    rows = [("CHANNEL", "VALUE", "UNIT", "QUALITY", "AT (UTC)")]
    for r in report["latest"]:
        value = "unavailable" if r["value"] is None else f"{r['value']:.6g}"
        at = datetime.fromtimestamp(r["t_ms"] / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")
        rows.append((r["channel"], value, r["unit"], r["quality"], at))
    lines += _table(rows)
    if report["sensors"]:
        lines.append("")
        rows = [("SENSOR", "READS", "ERRORS", "BAD READINGS")]
        for name, c in sorted(report["sensors"].items()):
            rows.append(
                (name, f"{c.get('reads', 0):,}", f"{c.get('errors', 0):,}", f"{c.get('bad', 0):,}")
            )
        lines += _table(rows)
    if report.get("relays"):
        lines.append("")
        rows = [("RELAY", "STATE", "SWITCHES", "WHY")]
        for name, r in sorted(report["relays"].items()):
            rows.append((name, r["state"], f"{r.get('switches', 0):,}", r.get("reason", "")))
        lines += _table(rows)
    if report.get("rules"):
        lines.append("")
        rows = [("RULE", "ACTIVE", "ASKS", "WHY")]
        for name, r in sorted(report["rules"].items()):
            asks = ", ".join(f"{k} {v or '-'}" for k, v in sorted(r.get("asks", {}).items()))
            rows.append((name, "yes" if r.get("active") else "no", asks, r.get("reason", "")))
        lines += _table(rows)
    ledger = report.get("ledger")
    if ledger:
        lines.append("")
        states = ", ".join(f"{n} {st}" for st, n in sorted(ledger["by_state"].items()))
        lines += [
            f"ledger          node {ledger['node']}",
            f"  sealed        period {ledger['sealed_seq']} "
            f"(to {_when(ledger['sealed_until_ms'])})",
            f"  on chain      period {ledger['confirmed_seq']} confirmed; "
            f"backlog {ledger['backlog']} ({states})",
        ]
        if ledger["last_tx"]:
            tx = ledger["last_tx"]
            lines.append(f"  last tx       {tx['hash']} nonce {tx['nonce']} {tx['state']}")
        if ledger["relayed_for_peers"]:
            lines.append(f"  peers         {ledger['relayed_for_peers']} commitments relayed")
    return "\n".join(lines)


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
