"""What went wrong with the database: the store's exception and how a failure is classified."""

from __future__ import annotations

import errno
import gc
import sqlite3

from daisee_node.errors import DaiseeError


class StoreError(DaiseeError):
    """The node's database cannot be opened or written."""


# SQLite's primary result codes that say the file itself is damaged, and those that say another
# connection holds it (https://www.sqlite.org/rescode.html).
_CORRUPT_CODES = frozenset({11, 26})  # SQLITE_CORRUPT, SQLITE_NOTADB
_LOCKED_CODES = frozenset({5, 6})  # SQLITE_BUSY, SQLITE_LOCKED

#: exceptions a write can fail with when the disk (or access to it) fails
WRITE_FAILURES = (sqlite3.Error, OSError)


def classify_error(exc: BaseException) -> str:
    """What kind of failure `exc` is: corrupt, locked, full (disk or quota), io or other."""
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        if code is not None:
            primary = code & 0xFF
            if primary in _CORRUPT_CODES:
                return "corrupt"
            if primary in _LOCKED_CODES:
                return "locked"
            if primary == 13:  # SQLITE_FULL
                return "full"
            if primary == 10:  # SQLITE_IOERR
                return "io"
            return "other"
        text = str(exc).lower()
        if "not a database" in text or "malformed" in text:
            return "corrupt"
        if "locked" in text or "busy" in text:
            return "locked"
        return "other"
    if isinstance(exc, OSError):
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return "full"
        return "io"
    return "other"


def is_write_failure(exc: BaseException) -> bool:
    """A failure of the disk or of access to it, as opposed to a bug in a statement."""
    if isinstance(exc, sqlite3.IntegrityError | sqlite3.ProgrammingError | sqlite3.InterfaceError):
        return False
    return isinstance(exc, WRITE_FAILURES)


def release_statements() -> None:
    """Free statements still referenced from the tracebacks of failed writes.

    Python closes SQLite connections with `sqlite3_close_v2`, which keeps a connection (and its
    file locks) alive until its last statement is finalized; a failed write leaves one in a
    reference cycle. Without a collection, a connection opened next could find the file locked.
    """
    gc.collect()
