"""Signed, batched commitments of readings to a proof-of-authority chain."""

#: the chain id `chain-spec` writes unless told otherwise (here so that building the command
#: line does not load the genesis writer's libraries: every command, `safe-state` included,
#: builds it)
DEFAULT_CHAIN_ID = 1_337_714
