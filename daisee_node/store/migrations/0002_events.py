"""Rule decisions and relay switches, with their reasons: what the node did and why."""

SQL = """
CREATE TABLE events (
    id INTEGER PRIMARY KEY,
    t_ms INTEGER NOT NULL,
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    target TEXT,
    state TEXT,
    reason TEXT NOT NULL,
    data TEXT
);
CREATE INDEX events_by_time ON events (t_ms);
"""
