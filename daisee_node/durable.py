"""Files written whole or not at all, and still there after a power cut.

A Pi loses power without warning: a key, a marker or a calibration file written in place can be
left empty or cut under its final name, and the node would then refuse to start (or, worse, make a
new key). Both writers here go through a synced file beside the target and sync the folder after.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def _sync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, data: bytes, mode: int) -> Path:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def create_private(path: Path, text: str) -> None:
    """Create `path` (mode 0600) whole or not at all, never over an existing file.

    The text is linked into place rather than renamed: a link, like O_EXCL, fails when the name
    exists, so two writers cannot both believe they made the key.
    """
    # A folder made here is the node's data dir more often than not: private from the start.
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = _write_synced(path, text.encode(), 0o600)
    try:
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise
        except OSError:
            # a file system without hard links (FAT): a rename, after checking the name is free
            if path.exists():
                raise FileExistsError(f"{path} exists") from None
            os.rename(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _sync_folder(path.parent)


def replace(path: Path, text: str, mode: int = 0o644) -> None:
    """Put `text` at `path`, over any file there: readers, and a reboot, see the old file or the
    whole new one."""
    tmp = _write_synced(path, text.encode(), mode)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _sync_folder(path.parent)
