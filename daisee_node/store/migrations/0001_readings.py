"""Channels, raw readings, the newest reading per channel, 1-minute aggregates, meta, counters."""

SQL = """
CREATE TABLE channels (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    unit TEXT NOT NULL DEFAULT '',
    state_class TEXT NOT NULL DEFAULT 'measurement'
);
-- Ordered by (t_ms, channel_id): the order of the ledger's Merkle leaves and of retention.
CREATE TABLE readings (
    t_ms INTEGER NOT NULL,
    channel_id INTEGER NOT NULL,
    value REAL,
    quality INTEGER NOT NULL,
    PRIMARY KEY (t_ms, channel_id)
) WITHOUT ROWID;
CREATE TABLE latest (
    channel_id INTEGER PRIMARY KEY,
    t_ms INTEGER NOT NULL,
    value REAL,
    quality INTEGER NOT NULL
);
CREATE TABLE readings_1m (
    minute INTEGER NOT NULL,
    channel_id INTEGER NOT NULL,
    min REAL,
    max REAL,
    mean REAL,
    last REAL,
    count INTEGER NOT NULL,
    bad INTEGER NOT NULL,
    PRIMARY KEY (minute, channel_id)
) WITHOUT ROWID;
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL, t_ms INTEGER NOT NULL);
"""
