"""Relays and their safety: known state at start, interlock groups, safe state on stop."""
