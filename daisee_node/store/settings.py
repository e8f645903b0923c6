"""The store's settings: how long data is kept, and how often the writer commits."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Retention:
    """How long data is kept, and how often the writer commits."""

    raw_days: float = 14.0
    aggregate_days: float = 365.0
    flush_interval_s: float = 0.25
    max_pending: int = 500_000
    maintenance_interval_s: float = 60.0
    #: minutes are rolled up once they ended this long ago, so late readings still count
    rollup_grace_s: float = 5.0
    #: longest wait between two tries of a failing write
    retry_max_s: float = 5.0
    #: events (decisions, switches) held in memory at most while writes fail
    max_pending_events: int = 10_000
    #: days events are kept; None: as long as raw readings
    events_days: float | None = None
    #: most time one maintenance turn holds the writer; the rest waits for the next turn
    maintenance_budget_s: float = 0.25
    #: the full integrity check runs this long after the writer starts, then every interval
    integrity_delay_s: float = 120.0
    integrity_interval_s: float = 86_400.0
