"""Signed, batched commitments of readings to a proof-of-authority chain."""
