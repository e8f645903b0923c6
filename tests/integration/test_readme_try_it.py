"""The README's "Try it" commands, run as written from a fresh clone of the work tree.

The clone reuses the installed virtual environment (its entries linked, the package imported
from the clone) so that `./run` finds everything installed and the test stays fast; apt-get,
npm, sudo and `python -m pip` are replaced by stubs that record any call: the demo must need
none of them, and nothing may be installed into the shared environment.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT

#: what the demo must not need (the test suite's tools)
FORBIDDEN = ("apt-get", "npm", "sudo")


def try_it_commands(readme: str) -> list[str]:
    """The shell commands of the README's first section's fenced `sh` blocks, in order."""
    section = readme.split("\n## ", 2)[1]
    assert section.startswith("Try it"), section[:40]
    blocks = re.findall(r"```sh\n(.*?)```", section, flags=re.S)
    lines = [ln.strip() for block in blocks for ln in block.splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")]


def fresh_clone(dest: Path) -> Path:
    """`git clone` of the repository, with the work tree's uncommitted changes on top: what a
    clone will be once they are committed."""
    subprocess.run(["git", "clone", "-q", str(ROOT), str(dest)], check=True, timeout=60)
    listed = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-m", "-o", "--exclude-standard", "-z"],
        capture_output=True,
        check=True,
        text=True,
    ).stdout.split("\0")
    for name in filter(None, listed):
        source, target = ROOT / name, dest / name
        if source.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
        elif not source.exists():
            target.unlink(missing_ok=True)  # deleted in the work tree
    return dest


def linked_venv(clone: Path, calls: Path) -> None:
    """A `.venv` in the clone made of links to the installed one. Its `python` refuses
    `-m pip` (recorded in `calls`): nothing may be installed into the shared environment."""
    venv = clone / ".venv"
    (venv / "bin").mkdir(parents=True)
    for entry in (ROOT / ".venv").iterdir():
        if entry.name != "bin" and not entry.name.startswith(".installed-"):
            (venv / entry.name).symlink_to(entry)
    for entry in (ROOT / ".venv" / "bin").iterdir():
        link = venv / "bin" / entry.name
        if entry.name.startswith("python"):
            link.write_text(
                "#!/bin/sh\n"
                f'[ "$1 $2" = "-m pip" ] && {{ echo "pip $*" >> {calls}; exit 1; }}\n'
                f'exec {entry} "$@"\n'
            )
            link.chmod(0o755)
        else:
            link.symlink_to(entry)
    # `./run` installs for the demo when this stamp is missing; the linked venv is installed.
    digest = hashlib.sha1((clone / "pyproject.toml").read_bytes()).hexdigest()[:12]
    (venv / f".installed-{digest}-demo").touch()


@pytest.mark.slow
def test_the_readme_try_it_commands_work_as_written(tmp_path: Path) -> None:
    clone = fresh_clone(tmp_path / "clone")
    calls = tmp_path / "forbidden-calls"
    linked_venv(clone, calls)
    commands = try_it_commands((clone / "README.md").read_text())
    # The whole suite cannot run inside one of its own tests, and the community runs until
    # Ctrl-C (tests/integration/test_community_demo.py runs the command behind it and stops it
    # with Ctrl-C); every other command is run.
    to_run = [c for c in commands if not c.startswith(("./run test", "./run community"))]
    assert len(to_run) < len(commands) - 1
    for word in ("./run demo", "daisee-node status", "daisee-node prove", "daisee-node verify"):
        assert any(word in c for c in to_run), (word, to_run)

    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for name in FORBIDDEN:
        stub = stubs / name
        stub.write_text(f'#!/bin/sh\necho "{name} $*" >> {calls}\nexit 1\n')
        stub.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "DAISEE_NODE_COMMAND"}
    env |= {"PATH": f"{stubs}:{env['PATH']}", "PYTHONPATH": str(clone)}
    which = subprocess.run(
        [".venv/bin/python", "-c", "import daisee_node; print(daisee_node.__file__)"],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert which.stdout.startswith(str(clone)), which.stdout  # the clone's code runs

    outputs: dict[str, str] = {}
    for command in to_run:
        result = subprocess.run(
            ["bash", "-c", command],
            cwd=clone,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, (command, result.stdout[-2000:], result.stderr[-2000:])
        assert "Traceback" not in result.stderr, (command, result.stderr)
        outputs[command] = result.stdout
    assert not calls.exists(), calls.read_text()

    demo = next(out for c, out in outputs.items() if c.startswith("./run demo"))
    lines = [ln for ln in demo.splitlines() if " UTC  pv " in ln]
    assert lines, demo
    # The roof produces from the first line.
    first_pv = float(re.search(r" pv +(-?\d+) W", lines[0]).group(1))  # type: ignore[union-attr]
    assert first_pv > 0, lines[0]
    # The hints it prints on stopping are commands that work here, as printed.
    assert "See them with: ./run daisee-node status\n" in demo
    assert "./run daisee-node prove --channel" in demo

    status = next(out for c, out in outputs.items() if "daisee-node status" in c)
    assert "confirmed" in status and "pv.power_w" in status
    verify = next(out for c, out in outputs.items() if "daisee-node verify" in c)
    assert json.loads(verify)["valid"] is True
    assert (clone / "daisee-demo" / "chain" / "transactions.hex").exists()
