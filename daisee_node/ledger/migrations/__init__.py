"""The ledger's numbered schema migrations (`NNNN_what.py`), registered with the store.

The store records how many have run under the owner name "ledger" (see daisee_node/store/schema.py).
"""
