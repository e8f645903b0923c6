"""The conformity report of each sealed own period, as it was signed with the commitment.

`body` is the report's canonical JSON and `digest` its keccak: the value of the report's leaf in
the period's Merkle tree. A period sealed again (after the chain refused it) replaces its row.
"""

SQL = """
CREATE TABLE conformity_reports (
    node TEXT NOT NULL,
    seq INTEGER NOT NULL,
    t0 INTEGER NOT NULL,
    t1 INTEGER NOT NULL,
    digest BLOB NOT NULL,
    passed INTEGER NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (node, seq)
);
CREATE INDEX conformity_reports_by_time ON conformity_reports (node, t1);
"""
