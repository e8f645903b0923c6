"""The outbox of signed commitments, and the node's nonce ledger of every transaction it signed.

Files written before the ledger kept its own migrations already hold these tables (the store's
migration 3 made them): the store then records this migration as done and keeps their rows.
"""

SQL = """
-- The ledger's outbox: signed commitments (own and peers') and where they landed on chain.
CREATE TABLE commitments (
    node TEXT NOT NULL,
    seq INTEGER NOT NULL,
    own INTEGER NOT NULL,
    body TEXT NOT NULL,
    hash BLOB NOT NULL,
    signature BLOB NOT NULL,
    t0 INTEGER NOT NULL,
    t1 INTEGER NOT NULL,
    count INTEGER NOT NULL,
    sealed_ms INTEGER NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    tx_hash BLOB,
    block_number INTEGER,
    block_hash BLOB,
    note TEXT,
    PRIMARY KEY (node, seq)
);
CREATE INDEX commitments_by_state ON commitments (state, own);
-- Every transaction the node signed, with its nonce: the node's own nonce ledger.
CREATE TABLE ledger_txs (
    id INTEGER PRIMARY KEY,
    nonce INTEGER NOT NULL,
    tx_hash BLOB NOT NULL UNIQUE,
    raw BLOB NOT NULL,
    items TEXT NOT NULL,
    fee INTEGER NOT NULL,
    sent_ms INTEGER NOT NULL,
    state TEXT NOT NULL
);
"""
