"""How events and counters are recorded, and the meta keys `status` reads them from.

An event is a rule decision or a relay switch with its reason. Besides the `events` table, the
newest event of each (kind, name, target) is kept under a meta key, so `status` never scans events.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

LAST_EVENT_PREFIX = "last_event|"
LAST_EVENT_END = "last_event}"  # '}' sorts right after '|': the end of the prefix's key range
#: meta key: set once the newest events of a file written before they were kept are noted
LAST_EVENTS_KEPT = "last_events_kept"

INSERT_EVENT = (
    "INSERT INTO events (t_ms, kind, name, target, state, reason, data) VALUES (?,?,?,?,?,?,?)"
)
SET_LAST_EVENT = "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)"
# The newest row of each group: SQLite takes bare columns from the max(id) row.
LAST_EVENTS_SCAN = (
    "SELECT kind, name, target, state, reason, t_ms, max(id) FROM events "
    "GROUP BY kind, name, target"
)
ADD_COUNTER = (
    "INSERT INTO counters (name, value, t_ms) VALUES (?,?,?) "
    "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value, t_ms = excluded.t_ms"
)
SET_COUNTER = (
    "INSERT INTO counters (name, value, t_ms) VALUES (?,?,?) "
    "ON CONFLICT(name) DO UPDATE SET value = excluded.value, t_ms = excluded.t_ms"
)


def last_events(events: Sequence[tuple[Any, ...]]) -> list[tuple[str, str]]:
    """(meta key, value) of the newest of `events` (as `Store.put_event` takes them) per key."""
    newest: dict[str, str] = {}
    for t_ms, kind, name, target, state, reason, _ in events:
        key = f"{LAST_EVENT_PREFIX}{kind}|{name}|{target or ''}"
        newest[key] = json.dumps([kind, name, target, state, reason, t_ms])
    return list(newest.items())
