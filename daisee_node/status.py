"""`daisee-node status`: what a node is doing, read from its data dir (the daemon need not run)."""

from __future__ import annotations

import json
import math
import sqlite3
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from daisee_node.conformity import last_verdict, verdict_line
from daisee_node.datadir import running_pid
from daisee_node.errors import DaiseeError
from daisee_node.readings import Quality
from daisee_node.store import (
    HEALTH_NAME,
    INTEGRITY_MARK,
    LAST_EVENT_END,
    LAST_EVENT_PREFIX,
    LAST_EVENTS_SCAN,
    connect_readonly,
    db_path,
)

# Each query a primary-key or index search, so `status` costs the same on a day or a year of
# data. min() and max() asked apart: together, SQLite scans the whole table.
OLDEST_SQL = "SELECT min(t_ms) FROM readings"
NEWEST_SQL = "SELECT max(t_ms) FROM readings"
LAST_EVENTS_SQL = "SELECT value FROM meta WHERE key >= ? AND key < ?"
LAST_EVENTS_KEPT_SQL = "SELECT 1 FROM meta WHERE key = 'last_events_kept'"
STATUS_QUERIES = (OLDEST_SQL, NEWEST_SQL, LAST_EVENTS_SQL, LAST_EVENTS_KEPT_SQL)
#: the event kind of a relay's mode and why (`control.MODE_EVENT`; not imported from there, so
#: that `status` does not load the relay and rule machinery)
MODE_EVENT = "relay_mode"


def open_readonly(data_dir: Path) -> sqlite3.Connection:
    """A read-only connection to a node's database (nothing is written beside a live node)."""
    path = db_path(data_dir)
    if not path.exists():
        raise DaiseeError(f"no node database in {data_dir} (has a node run with this data dir?)")
    conn = connect_readonly(path)
    try:
        conn.execute("SELECT 1 FROM readings LIMIT 1")
    except sqlite3.Error as exc:
        conn.close()
        raise DaiseeError(f"cannot read {path}: {exc}") from None
    return conn


def read_health(data_dir: Path, pid: int | None) -> dict[str, Any] | None:
    """The running writer's health file, if it belongs to the daemon running now."""
    try:
        report = json.loads((data_dir / HEALTH_NAME).read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(report, dict) or pid is None or report.get("pid") is None:
        return None
    if pid != -1 and report.get("pid") != pid:
        return None  # left by an earlier run
    return report


def newest_reading_ms(data_dir: Path) -> int | None:
    """Time of the newest stored reading, or None for an empty or missing database."""
    try:
        conn = open_readonly(data_dir)
    except DaiseeError:
        return None
    with conn:
        row = conn.execute(NEWEST_SQL).fetchone()
    conn.close()
    return None if row is None or row[0] is None else int(row[0])


def read_status(data_dir: Path) -> dict[str, Any]:
    """Everything `status` shows, as plain data (also the `--json` output)."""
    pid = running_pid(data_dir)
    health = read_health(data_dir, pid)
    try:
        conn = open_readonly(data_dir)
    except DaiseeError as exc:
        if health is None:
            raise
        # The database cannot be read (a disk that filled before it existed, or a store opened
        # for its own process only), but the daemon runs: show what its writer says.
        return _report(data_dir, pid, health, str(exc), {}, [], {}, None, (None, None), 0, 0)
    path = db_path(data_dir)
    size = sum(p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.exists())
    counters: dict[str, int] = {}
    try:
        counters = dict(conn.execute("SELECT name, value FROM counters").fetchall())
        oldest = conn.execute(OLDEST_SQL).fetchone()[0]
        newest = conn.execute(NEWEST_SQL).fetchone()[0]
        aggregates = counters.pop("aggregates_stored", None)
        if aggregates is None:  # a file no writer of this version has maintained yet
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
        last_events = _last_events(conn)
        ledger = _ledger(conn)
        market = _market(conn)
        verdict = last_verdict(conn)
    except sqlite3.Error as exc:
        # A damaged page: say so, with what could be read, rather than fail.
        error = f"cannot read {path}: {exc}"
        return _report(data_dir, pid, health, error, counters, [], {}, None, (None, None), 0, size)
    finally:
        conn.close()
    report = _report(
        data_dir,
        pid,
        health,
        None,
        counters,
        latest,
        last_events,
        ledger,
        (oldest, newest),
        aggregates,
        size,
    )
    report["market"] = market
    report["conformity"] = verdict
    return report


def _market(conn: sqlite3.Connection) -> dict[str, Any] | None:
    """The node's orders and credits as its market service last kept them (None: no market)."""
    row = conn.execute("SELECT value FROM meta WHERE key = 'market.status'").fetchone()
    if row is None:
        return None
    try:
        market = json.loads(row[0])
    except ValueError:
        return None
    return market if isinstance(market, dict) else None


def _last_events(conn: sqlite3.Connection) -> dict[tuple[str, str], tuple[Any, ...]]:
    """The newest event of each relay and rule target, as the writer keeps them in `meta`."""
    if conn.execute(LAST_EVENTS_KEPT_SQL).fetchone() is not None:
        rows = [
            json.loads(value)
            for (value,) in conn.execute(LAST_EVENTS_SQL, (LAST_EVENT_PREFIX, LAST_EVENT_END))
        ]
    elif conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'events'").fetchone() is not None:
        # A file whose writer has not yet noted them (an older version, or just upgraded).
        rows = [row[:6] for row in conn.execute(LAST_EVENTS_SCAN)]
    else:
        rows = []
    return {
        (kind, name if kind != "rule" else f"{name}>{target}"): (state, reason, t_ms)
        for kind, name, target, state, reason, t_ms in rows
    }


def _report(
    data_dir: Path,
    pid: int | None,
    health: dict[str, Any] | None,
    db_error: str | None,
    counters: dict[str, int],
    latest: list[dict[str, Any]],
    last_events: dict[tuple[str, str], tuple[Any, ...]],
    ledger: dict[str, Any] | None,
    span: tuple[int | None, int | None],
    aggregates: int,
    size: int,
) -> dict[str, Any]:
    """The report from what the database holds, completed by what the writer holds in memory."""
    counters = dict(counters)
    last_events = dict(last_events)
    unwritten = (health or {}).get("unwritten") or {}
    # State the writer could not write yet is newer than the database's.
    counters.update(unwritten.get("counters") or {})
    for key, (state, reason, t_ms) in (unwritten.get("events") or {}).items():
        kind, name, target = key.split("|", 2)
        last_events[(kind, name if kind != "rule" else f"{name}>{target}")] = (state, reason, t_ms)
    relays: dict[str, dict[str, Any]] = {}
    rules: dict[str, dict[str, Any]] = {}
    for name, value in counters.items():
        if name.startswith("relay."):
            relay, _, what = name[len("relay.") :].rpartition(".")
            relays.setdefault(relay, {})[what] = value
        elif name.startswith("rule."):
            rule, _, what = name[len("rule.") :].rpartition(".")
            rules.setdefault(rule, {})[what] = value
    for (kind, key), _ in last_events.items():
        if kind == MODE_EVENT:  # a relay recorded at start (also one that never switched)
            relays.setdefault(key, {})
    for relay, info in relays.items():
        info["state"] = "on" if info.get("state") else "off"
        switched = last_events.get(("relay", relay))
        noted = last_events.get((MODE_EVENT, relay))
        if noted is not None:
            info["mode"] = noted[0]
        # Under a command, the command says why (with its end, if it has one). Otherwise the
        # newer of the last switch and the last mode record does (on a tie, the record: it is
        # written after the switch it follows).
        newest = max(
            (e for e in (switched, noted) if e is not None),
            key=lambda e: (e[2], e is noted),
            default=None,
        )
        if noted is not None and noted[0] != "auto":
            newest = noted
        info["reason"] = newest[1] if newest else ""
    for (kind, key), (state, reason, t_ms) in last_events.items():
        if kind == "rule":
            rule, _, target = key.partition(">")
            entry = rules.setdefault(rule, {})
            entry.setdefault("asks", {})[target] = state
            entry["reason"], entry["t_ms"] = reason, t_ms
    if pid is None:
        for entry in rules.values():
            # What the rule last decided, while the node ran: it asks nothing of a stopped node.
            entry["stopped"] = True
    peers: dict[str, dict[str, Any]] = {}
    for name, value in counters.items():
        if name.startswith("peer."):  # peer.<id>.<what>, kept by daisee_node.peers
            peer, _, what = name[len("peer.") :].rpartition(".")
            peers.setdefault(peer, {})[what] = value
    for (kind, key), (_, reason, t_ms) in last_events.items():
        if kind == "peer" and key in peers:
            peers[key]["last_reason"], peers[key]["reason_ms"] = reason, t_ms
    sensors: dict[str, dict[str, int]] = {}
    for name, value in counters.items():
        if name.startswith("sensor."):
            sensor, _, what = name[len("sensor.") :].rpartition(".")
            sensors.setdefault(sensor, {})[what] = value
    return {
        "data_dir": str(data_dir),
        "running": pid is not None,
        "pid": pid,
        "database": {
            "path": str(db_path(data_dir)),
            "bytes": size,
            "readings": counters.get("readings_stored", 0),
            "minute_aggregates": aggregates,
            "oldest_ms": span[0],
            "newest_ms": span[1],
            "error": db_error,
            "integrity": {
                # the background check found damage: the file is moved aside at the next start
                "damaged": Path(f"{db_path(data_dir)}{INTEGRITY_MARK}").exists(),
                "failures": counters.get("store.integrity_failures", 0),
                "last_ok_ms": counters.get("store.integrity_ok_ms"),
            },
        },
        "store": _store_health(health, counters),
        "sensors": sensors,
        "latest": latest,
        "relays": relays,
        "rules": rules,
        "peers": peers,
        "peers_sent": counters.get("peers.sent", 0),
        "peers_undeclared": counters.get("peers.rejected_undeclared", 0),
        "ledger": ledger,
        "market": None,
    }


def _store_health(health: dict[str, Any] | None, counters: dict[str, int]) -> dict[str, Any]:
    """Write errors: live from the running writer, else as counted in the database."""
    if health is not None:
        return {
            "healthy": bool(health.get("healthy", True)),
            "write_errors": int(health.get("write_errors", 0)),
            "last_error": health.get("last_error"),
            "failing_since_ms": health.get("failing_since_ms"),
            "held_in_memory": int(health.get("pending", 0)),
            "dropped": int(health.get("dropped", 0)),
            "live": True,
        }
    return {
        "healthy": True,
        "write_errors": counters.get("store.write_errors", 0),
        "last_error": None,
        "failing_since_ms": None,
        "held_in_memory": 0,
        "dropped": counters.get("store.dropped", 0),
        "live": False,
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


def _utc(t_ms: float) -> str:
    """A stored time (ms) as UTC to the second; one the calendar cannot hold (a clock or a
    peer gone wrong) as its ms, never an error."""
    try:
        return (datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=t_ms)).strftime(
            "%Y-%m-%d %H:%M:%S"
        )
    except (OverflowError, ValueError, TypeError):
        return f"{t_ms} ms (beyond the calendar)"


def _when(t_ms: int | None) -> str:
    if t_ms is None:
        return "-"
    text = _utc(t_ms)
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
    ]
    if db.get("integrity", {}).get("damaged"):
        lines.append(
            "database        DAMAGED (found by the background integrity check); the file is "
            "moved aside at the next start"
        )
    if db.get("error"):
        lines.append(f"database        unreadable: {db['error']}")
    else:
        lines += [
            f"database        {_size(db['bytes'])}, {db['readings']:,} raw readings, "
            f"{db['minute_aggregates']:,} minute aggregates",
            f"  oldest        {_when(db['oldest_ms'])}",
            f"  newest        {_when(db['newest_ms'])}",
        ]
    lines += [*_store_lines(report.get("store")), ""]
    rows: list[tuple[str, ...]] = [("CHANNEL", "VALUE", "UNIT", "QUALITY", "AT (UTC)")]
    for r in report["latest"]:
        value, unit = ("unavailable", r["unit"])
        if r["value"] is not None:
            value, unit = value_text(r["value"], r["unit"])
        at = _utc(r["t_ms"])
        rows.append((r["channel"], value, unit, r["quality"], at))
    lines += _table(rows)
    if report["sensors"]:
        lines.append("")
        rows = [("SENSOR", "READS", "ERRORS", "BAD READINGS")]
        for name, c in sorted(report["sensors"].items()):
            rows.append(
                (name, f"{c.get('reads', 0):,}", f"{c.get('errors', 0):,}", f"{c.get('bad', 0):,}")
            )
        lines += _table(rows)
    running = report["running"]
    relays = report.get("relays") or {}
    if relays:
        lines.append("")
        rows = [("RELAY", "STATE", "MODE", "SWITCHES", "WHY")]
        for name, r in sorted(relays.items()):
            mode = _MODE_WORDS.get(r.get("mode", ""), "-") if running else "-"
            rows.append(
                (name, r["state"], mode, f"{r.get('switches', 0):,}", _relay_why(r, running))
            )
        lines += _table(rows)
    if report.get("rules"):
        lines.append("")
        rows = [("RULE", "ACTIVE", "ASKS", "ERRORS", "WHY")]
        for name, r in sorted(report["rules"].items()):
            errors = f"{r.get('errors', 0):,}"
            if r.get("stopped"):
                rows.append((name, "-", "-", errors, _stopped_rule(r, relays)))
                continue
            asks = ", ".join(f"{k} {v or '-'}" for k, v in sorted(r.get("asks", {}).items()))
            active = "yes" if r.get("active") else "no"
            rows.append((name, active, asks, errors, r.get("reason", "")))
        lines += _table(rows)
    lines += _peer_lines(report)
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
        lines += verdict_line(report.get("conformity"))
    lines += _market_lines(report.get("market"))
    return "\n".join(lines)


def _credits(units: str | None, decimals: int) -> str:
    if units is None:
        return "unknown"
    return f"{Decimal(int(units)).scaleb(-decimals).normalize():f} credits"


def _market_lines(market: dict[str, Any] | None) -> list[str]:
    """The node's orders (role, peer, amount, delivered, state, why the flow is off or what
    the policy decided) and its credits."""
    if not market:
        return []
    decimals = int(market.get("decimals") or 18)
    lines = [
        "",
        f"market          balance {_credits(market.get('balance_units'), decimals)}; "
        f"escrowed {_credits(market.get('escrowed_units'), decimals)}",
    ]
    if market.get("error"):
        lines.append(f"  chain         {market['error']}")
    rows = [("ORDER", "ROLE", "PEER", "AMOUNT", "DELIVERED", "STATE", "WHY")]
    for o in market.get("orders") or ():
        delivered = o.get("delivered_wh")
        why = o.get("flow") if o.get("state") == "accepted" else None
        rows.append(
            (
                str(o["id"]),
                str(o["role"]),
                str(o["peer"]),
                f"{o['amount_wh']} Wh",
                "-" if delivered is None else f"{delivered:g} Wh",
                str(o["state"]),
                str(why or o.get("decision") or "-"),
            )
        )
    if len(rows) > 1:
        lines += _table(rows)
    return lines


def _peer_lines(report: dict[str, Any]) -> list[str]:
    """Each peer: when its last kept message came, its readings, and what was refused."""
    peers = report.get("peers") or {}
    if not peers and not report.get("peers_sent"):
        return []
    lines = [""]
    if peers:
        rows = [("PEER", "LAST MESSAGE", "READINGS", "MESSAGES", "REJECTED", "LAST REJECTED")]
        for name, p in sorted(peers.items()):
            last = _when(p["last_ms"]) if p.get("last_ms") else "never"
            why = p.get("last_reason") or "-"
            age = time.time() - p["reason_ms"] / 1000 if p.get("reason_ms") else -1.0
            if age >= 0:
                why += f" ({_age(age)} ago)"
            rows.append(
                (
                    name,
                    last,
                    f"{p.get('readings', 0):,}",
                    f"{p.get('messages', 0):,}",
                    f"{p.get('rejected', 0):,}",
                    why if p.get("rejected") else "-",
                )
            )
        lines += _table(rows)
    if report.get("peers_undeclared"):
        lines.append(f"  from undeclared peers: {report['peers_undeclared']:,} messages refused")
    if report.get("peers_sent"):
        lines.append(f"peers           {report['peers_sent']:,} signed messages sent to peers")
    return lines


def value_text(value: float, unit: str) -> tuple[str, str]:
    """A reading as an operator reads it, with every digit it has and never an exponent: energy
    in kWh from 1 kWh and in MWh from 1 MWh (1234567.8 Wh → `1.2345678`, `MWh`)."""
    exact = Decimal(repr(float(value)))
    if unit == "Wh" and abs(exact) >= 1_000_000:
        exact, unit = exact.scaleb(-6), "MWh"
    elif unit == "Wh" and abs(exact) >= 1_000:
        exact, unit = exact.scaleb(-3), "kWh"
    return format(exact.normalize(), "f"), unit


_MODE_WORDS = {"auto": "auto", "on": "forced on", "off": "forced off"}


def _relay_why(relay: dict[str, Any], running: bool) -> str:
    """Why a relay is as it is; for a node that does not run, what that state is."""
    reason = str(relay.get("reason", ""))
    if running:
        return reason
    if reason == "safe state":
        return "safe state (the node stopped)"
    return f"node not running; last recorded: {reason}" if reason else "node not running"


def _stopped_rule(rule: dict[str, Any], relays: dict[str, Any]) -> str:
    """A rule of a node that does not run: it asks nothing; say what its relays are."""
    parts = []
    for name in sorted(rule.get("asks", {})):
        relay = relays.get(name)
        if relay is None:
            continue
        what = "safe state" if relay.get("reason") == "safe state" else "as last recorded"
        parts.append(f"{name} {relay['state']} ({what})")
    return "node stopped" + (f"; {', '.join(parts)}" if parts else "")


def _store_lines(store: dict[str, Any] | None) -> list[str]:
    if not store:
        return []
    if not store["healthy"]:
        return [
            f"store           WRITES FAILING since {_when(store['failing_since_ms'])}: "
            f"{store['write_errors']:,} write errors",
            f"  last error    {store['last_error']}",
            f"  in memory     {store['held_in_memory']:,} readings waiting, "
            f"{store['dropped']:,} dropped",
        ]
    if store["write_errors"] or store["dropped"]:
        return [
            f"store           writing ({store['write_errors']:,} write errors so far, "
            f"{store['dropped']:,} readings dropped)"
        ]
    return []


def _table(rows: Sequence[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
