"""SQLite buffer of every reading on the node.

One writer owns every write (zigpy appdb style): sources call `put`/`put_many`, which never block
and never await; the writer commits what has arrived at most every `flush_interval_s`, in one
transaction. A thread of its own commits a steady stream without a turn of the event loop; the
writer task on the loop sees to everything else (failures, maintenance, migrations, the drain).
The database runs in WAL mode with `synchronous=FULL`, so a committed batch survives a
`kill -9` and a power cut; what can be lost is what had not been committed yet (under one second).

The rooms of this package:

- `writer.py`: the `Store` (open, put, the writer task, counters and events);
- `schema.py` and `migrations/`: numbered schema migrations, the store's and those a component
  that owns tables registers (the ledger);
- `integrity.py`: the check at start, the background integrity check, quarantine, the health file;
- `retention.py`: rollup into 1-minute aggregates and expiry, with holds other parts may add;
- `queries.py`: the read side, on the writer's connection or read-only beside a live node;
- `settings.py` (`Retention`), `events.py`, `files.py`, `errors.py`, `base.py`: what they share.
"""

from daisee_node.store.base import (
    DAY_MS,
    HEALTH_NAME,
    MINUTE_MS,
    RawReadingsHold,
    StoreStats,
    now_ms,
)
from daisee_node.store.errors import StoreError, classify_error
from daisee_node.store.events import LAST_EVENT_END, LAST_EVENT_PREFIX, LAST_EVENTS_SCAN
from daisee_node.store.files import DB_NAME, INTEGRITY_MARK, db_path, ensure_private_dir
from daisee_node.store.integrity import HEALTH_BYTES
from daisee_node.store.queries import connect_readonly, readonly_uri
from daisee_node.store.schema import MIGRATIONS
from daisee_node.store.settings import Retention
from daisee_node.store.writer import Store

__all__ = [
    "DAY_MS",
    "DB_NAME",
    "HEALTH_BYTES",
    "HEALTH_NAME",
    "INTEGRITY_MARK",
    "LAST_EVENTS_SCAN",
    "LAST_EVENT_END",
    "LAST_EVENT_PREFIX",
    "MIGRATIONS",
    "MINUTE_MS",
    "RawReadingsHold",
    "Retention",
    "Store",
    "StoreError",
    "StoreStats",
    "classify_error",
    "connect_readonly",
    "db_path",
    "ensure_private_dir",
    "now_ms",
    "readonly_uri",
]
