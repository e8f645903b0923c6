"""The store's numbered schema migrations: `NNNN_what.py`, each with its `SQL` (see schema.py).

`PRAGMA user_version` records how many have run. A migration that has shipped is never edited:
a change is a new file with the next number.
"""
