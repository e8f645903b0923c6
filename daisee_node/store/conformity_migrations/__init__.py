"""The conformity reports' numbered schema migrations (`NNNN_what.py`), registered with the store
by the ledger's outbox under the owner name "conformity" (see daisee_node/store/schema.py)."""
