"""`community-demo` empties only a folder it made, and refuses bad options before touching any."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from daisee_node.community_demo import MARKER, fresh_folder
from daisee_node.errors import DaiseeError
from tests.conftest import ROOT, run_cli


def a_node_data_dir(d: Path) -> dict[str, bytes]:
    d.mkdir()
    files = {"node.db": b"SQLite format 3\x00 readings not yet sent", "node-key.json": b"{}"}
    for name, data in files.items():
        (d / name).write_bytes(data)
    return files


def test_a_real_nodes_data_dir_is_refused_and_kept(tmp_path: Path) -> None:
    d = tmp_path / "daisee-node"
    files = a_node_data_dir(d)
    run = run_cli("community-demo", "--data-dir", str(d), "--duration", "1")
    assert run.returncode == 1
    assert "not empty, and not a folder community-demo made" in run.stderr
    assert "Traceback" not in run.stderr
    assert {p.name: p.read_bytes() for p in d.iterdir()} == files


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--period", "99999999999999999999", "--period: from 10 s"),
        ("--period", "5", "--period: from 10 s"),
        ("--duration", "-1", "--duration: a positive number"),
        ("--duration", "nan", "--duration: a positive number"),
    ],
)
def test_bad_options_are_refused_before_the_folder_is_touched(
    tmp_path: Path, option: str, value: str, message: str
) -> None:
    d = tmp_path / "community"
    d.mkdir()
    (d / MARKER).write_text("")
    (d / "kept").write_text("x")
    run = run_cli("community-demo", "--data-dir", str(d), option, value)
    assert run.returncode == 1 and message in run.stderr
    assert "Traceback" not in run.stderr
    assert (d / "kept").read_text() == "x"


def test_a_file_as_the_folder_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    with pytest.raises(DaiseeError, match="not a folder"):
        fresh_folder(f)
    assert f.read_text() == "mine"


def test_a_folder_an_earlier_run_made_is_emptied_and_a_new_one_is_marked(tmp_path: Path) -> None:
    d = tmp_path / "c"
    fresh_folder(d)  # new: made and marked
    assert [p.name for p in d.iterdir()] == [MARKER]
    (d / "signer0").mkdir()
    (d / "signer0" / "chaindata").write_text("old chain")
    fresh_folder(d)  # made by a run: emptied, so the next chain starts at genesis
    assert [p.name for p in d.iterdir()] == [MARKER]
    empty = tmp_path / "empty"
    empty.mkdir()
    fresh_folder(empty)  # an empty folder is fine as it is
    assert [p.name for p in empty.iterdir()] == [MARKER]


def test_a_reader_that_goes_away_is_not_a_traceback() -> None:
    """`daisee-node … | head`: the command stops quietly when its reader closes the pipe."""
    script = (
        "import argparse, sys\n"
        "from daisee_node import cli\n"
        "def many(args):\n"
        "    for i in range(200_000):\n"
        "        print('line', i)\n"
        "    return 0\n"
        "def parser():\n"
        "    p = argparse.ArgumentParser()\n"
        "    p.set_defaults(func=many)\n"
        "    return p\n"
        "cli._parser = parser\n"
        "sys.exit(cli.main([]))\n"
    )
    writer = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    assert writer.stdout is not None and writer.stderr is not None
    assert writer.stdout.readline().startswith(b"line")
    writer.stdout.close()
    err = writer.stderr.read().decode()
    assert writer.wait(30) == 1
    assert "Traceback" not in err and "BrokenPipeError" not in err
