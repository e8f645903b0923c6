"""The database's files on disk: where they live, who may read them, moving a damaged one aside."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from daisee_node.logs import get_logger

DB_NAME = "node.db"
#: beside the database: the background integrity check found damage; moved aside at next start
INTEGRITY_MARK = ".integrity-failed"


def db_path(data_dir: str | os.PathLike[str]) -> Path:
    """The node's database in `data_dir`."""
    return Path(data_dir) / DB_NAME


def ensure_private_dir(path: str | os.PathLike[str]) -> Path:
    """Create `path` (and parents) as 0700, or tighten an existing one: it holds personal data."""
    folder = Path(path)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    tighten(folder, 0o700, get_logger("store"))
    return folder


def tighten(path: Path, mode: int, log: Any) -> None:
    """Remove group/other permissions from `path` if it has any (logged, since it is a change)."""
    try:
        current = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return
    if current & 0o077:
        try:
            os.chmod(path, (current | mode) & 0o700)
        except PermissionError as exc:
            log.warning("cannot tighten permissions", path=str(path), error=str(exc))
            return
        log.warning(
            "permissions tightened: household readings are personal data",
            path=str(path),
            was=oct(current),
            now=oct(stat.S_IMODE(path.stat().st_mode)),
        )


def move_aside(path: Path, tag: str) -> None:
    """Rename the database and the files beside it with `tag` appended."""
    for suffix in ("", "-wal", "-shm", INTEGRITY_MARK):
        src = Path(f"{path}{suffix}")
        if src.exists():
            src.rename(f"{path}{tag}{suffix}")
