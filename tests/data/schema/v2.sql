-- A node database as daisee-node wrote it at schema version 2 (PRAGMA user_version),
-- commits 4ce6c4a: that code's migrations, verbatim, then a few rows of each table.
-- Made once from `git show <commit>:daisee_node/store.py`; never regenerated from newer code.

-- migration 1
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
-- migration 2
    -- Rule decisions and relay switches, with their reasons: what the node did and why.
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

PRAGMA user_version=2;

INSERT INTO channels (id, name, unit, state_class) VALUES (1, 'grid.power_w', 'W', 'measurement');
INSERT INTO channels (id, name, unit, state_class) VALUES (2, 'grid.export_wh', 'Wh', 'total_increasing');
INSERT INTO readings (t_ms, channel_id, value, quality) VALUES (1781000040000, 1, 100.5, 0);
INSERT INTO readings (t_ms, channel_id, value, quality) VALUES (1781000040000, 2, 1000.0, 0);
INSERT INTO readings (t_ms, channel_id, value, quality) VALUES (1781000070000, 1, 101.5, 0);
INSERT INTO readings (t_ms, channel_id, value, quality) VALUES (1781000070000, 2, 1010.0, 0);
INSERT INTO readings (t_ms, channel_id, value, quality) VALUES (1781000100000, 1, 102.5, 0);
INSERT INTO readings (t_ms, channel_id, value, quality) VALUES (1781000100000, 2, 1020.0, 0);
INSERT INTO readings (t_ms, channel_id, value, quality) VALUES (1781000130000, 1, 103.5, 1);
INSERT INTO readings (t_ms, channel_id, value, quality) VALUES (1781000130000, 2, 1030.0, 0);
INSERT INTO readings (t_ms, channel_id, value, quality) VALUES (1781000160000, 1, NULL, 0);
INSERT INTO readings (t_ms, channel_id, value, quality) VALUES (1781000160000, 2, 1040.0, 0);
INSERT INTO readings (t_ms, channel_id, value, quality) VALUES (1781000190000, 1, 105.5, 0);
INSERT INTO readings (t_ms, channel_id, value, quality) VALUES (1781000190000, 2, 1050.0, 0);
INSERT INTO latest (channel_id, t_ms, value, quality) VALUES (1, 1781000190000, 105.5, 0);
INSERT INTO latest (channel_id, t_ms, value, quality) VALUES (2, 1781000190000, 1050.0, 0);
INSERT INTO readings_1m (minute, channel_id, min, max, mean, last, count, bad) VALUES (29683334, 1, 100.5, 101.5, 101.0, 101.5, 2, 0);
INSERT INTO readings_1m (minute, channel_id, min, max, mean, last, count, bad) VALUES (29683334, 2, 1000.0, 1010.0, 1005.0, 1010.0, 2, 0);
INSERT INTO meta (key, value) VALUES ('rollup_until_ms', '1781000100000');
INSERT INTO counters (name, value, t_ms) VALUES ('readings_stored', 12, 1781000190000);
INSERT INTO counters (name, value, t_ms) VALUES ('sensor.grid.reads', 6, 1781000190000);
INSERT INTO counters (name, value, t_ms) VALUES ('relay.supply.state', 1, 1781000190000);
INSERT INTO events (id, t_ms, kind, name, target, state, reason, data) VALUES (1, 1781000041000, 'rule', 'night_supply', 'supply', 'on', 'battery.soc_pct < 20', NULL);
INSERT INTO events (id, t_ms, kind, name, target, state, reason, data) VALUES (2, 1781000041200, 'relay', 'supply', NULL, 'on', 'rule night_supply', '{"ms": 12}');
