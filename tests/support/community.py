"""Files a community's commands read, written for tests."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path


def write_members(path: Path, names: Mapping[str, str]) -> Path:
    """A members file: each address with its member's name."""
    path.write_text("[members]\n" + "".join(f'"{a}" = "{n}"\n' for a, n in names.items()))
    return path
