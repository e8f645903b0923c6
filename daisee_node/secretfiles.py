"""Files that hold secrets (key and broker passwords): readable by the node, never by others.

The image grants the service's group read access (0640, owned by root); anything wider, or a
file others could write, is refused with the command that fixes it, as the keystore already is.
"""

from __future__ import annotations

import stat
from pathlib import Path

from daisee_node.errors import DaiseeError

#: others may not read, write or run it; the group may read it but not write it
FORBIDDEN_BITS = 0o027


def read_secret(path: Path, what: str) -> str:
    """The file's text, stripped of its final newline; a clear error if it is missing,
    unreadable or open to others."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & FORBIDDEN_BITS:
            raise DaiseeError(
                f"{what} {path} is open to others (mode {mode:o}); chmod 600 it "
                "(or 640 with the node's group)"
            )
        return path.read_text().rstrip("\n")
    except OSError as exc:
        raise DaiseeError(f"cannot read {what} {path}: {exc.strerror}") from None
