"""The node's data dir: private to its user, and held by one daemon at a time."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from daisee_node.errors import DaiseeError, NodeLockedError
from daisee_node.logs import get_logger
from daisee_node.store import ensure_private_dir

LOCK_NAME = "daisee-node.pid"


class DataDirLock:
    """An exclusive lock on the data dir: two daemons must never share one database."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock and write our pid into it, or raise `NodeLockedError` naming the
        daemon that holds it."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise DaiseeError(f"cannot open the lock file {self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise NodeLockedError(
                f"another daisee-node (pid {other}) is running on {self.path.parent}"
            ) from None
        self._fd = fd
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError as exc:
            # The lock is the flock, not the text: a full disk must not keep the relays unsafe.
            get_logger("daemon").warning(
                "cannot write the pid into the lock file; running without it",
                path=str(self.path),
                error=exc.strerror,
            )

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def make_private_dir(path: Path) -> None:
    """The data dir, private to the node's user (see `ensure_private_dir`), or a clear error."""
    try:
        ensure_private_dir(path)
    except OSError as exc:
        raise DaiseeError(f"cannot create the data dir {path}: {exc.strerror}") from None


def running_pid(data_dir: Path) -> int | None:
    """The pid of the daemon holding `data_dir`, or None when no daemon runs there."""
    path = data_dir / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        text = os.read(fd, 32).decode(errors="replace").strip()
        return int(text) if text.isdigit() else -1
    finally:
        os.close(fd)
    return None
