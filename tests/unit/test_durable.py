"""Files written whole or not at all: a failure part-way leaves the old file (or none), and no
half-written file under the final name or beside it."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from daisee_node import durable


def test_a_private_file_is_made_once_with_mode_600_and_nothing_left_beside_it(
    tmp_path: Path,
) -> None:
    key = tmp_path / "data" / "nodekey"
    durable.create_private(key, "first")
    assert key.read_text() == "first"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(key.parent.stat().st_mode) == 0o700
    with pytest.raises(FileExistsError):
        durable.create_private(key, "second")
    assert key.read_text() == "first"
    assert sorted(p.name for p in key.parent.iterdir()) == ["nodekey"]


def test_replace_puts_the_whole_new_text_over_the_old(tmp_path: Path) -> None:
    marker = tmp_path / "marker.json"
    marker.write_text('{"old": true}')
    durable.replace(marker, '{"new": true}')
    assert marker.read_text() == '{"new": true}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["marker.json"]


@pytest.mark.parametrize("write", ["create", "replace"])
def test_a_write_that_fails_before_it_is_on_disk_leaves_the_old_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, write: str
) -> None:
    target = tmp_path / "file"
    if write == "replace":
        target.write_text("old")

    def no_space(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError, match="No space"):
        if write == "create":
            durable.create_private(target, "new")
        else:
            durable.replace(target, "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ([] if write == "create" else ["file"])
    if write == "replace":
        assert target.read_text() == "old"
