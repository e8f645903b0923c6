"""The community layer: allocation of local production among members (keys, remainder rule)."""

from daisee_node.community.allocation import (
    AllocationError,
    Allocator,
    MemberAllocation,
    PeriodAllocation,
    Trade,
    apportion,
)
from daisee_node.community.keys import (
    AnyKey,
    EqualKey,
    ProrataKey,
    StaticKey,
    TiersKey,
    canonical_json,
    key_hash,
    load_key,
    member_id,
    parse_key,
)

__all__ = [
    "AllocationError",
    "Allocator",
    "AnyKey",
    "EqualKey",
    "MemberAllocation",
    "PeriodAllocation",
    "ProrataKey",
    "StaticKey",
    "TiersKey",
    "Trade",
    "apportion",
    "canonical_json",
    "key_hash",
    "load_key",
    "member_id",
    "parse_key",
]
