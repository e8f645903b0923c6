"""JSON from outside the node (HTTP sources, peers over MQTT, proof files), parsed safely.

The standard parser recurses once per level of nesting. The chain libraries raise Python's
recursion limit to 100,000 when they are imported, so a document nested a few hundred thousand
levels deep overflows the C stack and kills the process (a segmentation fault, not an exception).
Nesting is therefore measured before parsing, without recursion, and refused past a bound no
honest document comes near.
"""

from __future__ import annotations

import json
import re
from typing import Any

MAX_DEPTH = 64

_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")
_STEP = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}


def nesting(data: str | bytes) -> int:
    """How deeply arrays and objects nest in a JSON text (strings' contents do not count)."""
    raw = data.encode() if isinstance(data, str) else data
    brackets = _STRING.sub(b"", raw).translate(None, _NOT_BRACKET)
    depth = deepest = 0
    for b in brackets:
        depth += _STEP[b]
        if depth > deepest:
            deepest = depth
    return deepest


def loads(data: str | bytes, *, max_depth: int = MAX_DEPTH) -> Any:
    """`json.loads`, refusing (ValueError) a document nested more than `max_depth` levels."""
    depth = nesting(data)
    if depth > max_depth:
        raise ValueError(f"JSON nested {depth} levels deep (at most {max_depth})")
    return json.loads(data)
