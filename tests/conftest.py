"""Shared test helpers: config files on disk, and a real daemon process."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"
    if isinstance(v, list | tuple):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return repr(v)


def write_config(path: Path, sections: dict[str, Any]) -> Path:
    """Write a small TOML file from nested dicts (tables) and lists of dicts (arrays of tables)."""
    lines: list[str] = []
    for name, body in sections.items():
        if isinstance(body, list):
            for item in body:
                lines.append(f"[[{name}]]")
                lines += [f"{k} = {toml_value(v)}" for k, v in item.items()]
                lines.append("")
        else:
            lines.append(f"[{name}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in body.items()]
            lines.append("")
    path.write_text("\n".join(lines))
    return path


def sim_sensors(interval_s: float = 0.05, **extra: Any) -> list[dict[str, Any]]:
    return [
        {"name": m, "kind": "simulated", "model": m, "interval_s": interval_s, **extra}
        for m in ("pv", "load", "battery", "grid")
    ]


class Daemon:
    """A real `daisee-node run` process; its output goes to `<config>.log` (a pipe could fill)."""

    def __init__(self, config: Path, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.log = config.with_suffix(".log")
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "daisee_node", "run", "-c", str(config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=full_env,
                cwd=ROOT,
            )

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 10.0) -> tuple[int, str]:
        """Wait for the exit; return the exit code and everything the process printed."""
        self.proc.wait(timeout=timeout)
        return self.proc.returncode, self.output()

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)


@pytest.fixture
def daemon() -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []

    def start(config: Path, env: dict[str, str] | None = None) -> Daemon:
        d = Daemon(config, env)
        started.append(d)
        return d

    yield start
    for d in started:
        d.kill()


def run_cli(*args: str, cwd: Path = ROOT, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run `daisee-node ARGS…` as an operator would; output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "daisee_node", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )


def wait_for(predicate: Callable[[], Any], timeout: float = 15.0, every: float = 0.05) -> Any:
    """Poll until `predicate()` is truthy; fail the test with a clear message otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"condition not met within {timeout} s")


async def until(predicate: Callable[[], Any], timeout: float = 15.0) -> None:
    """Wait on the running loop until `predicate()` is truthy; fail the test otherwise."""

    async def poll() -> None:
        while not predicate():
            await asyncio.sleep(0.02)

    try:
        await asyncio.wait_for(poll(), timeout)
    except TimeoutError:
        raise AssertionError(f"condition not met within {timeout} s") from None


def db_rows(db: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Query a node database from outside the daemon (as an operator would)."""
    if not db.exists():
        return []
    conn = sqlite3.connect(db, timeout=5)
    try:
        return conn.execute(sql, params).fetchall()
    except sqlite3.OperationalError:
        return []
    finally:
        conn.close()


@pytest.fixture
def anvil(tmp_path: Path) -> Iterator[Any]:
    """anvil with 1 s blocks and the ledger deployed (`tests.support.chains.AnvilLedger`),
    stopped after the test."""
    from tests.support.chains import AnvilLedger

    chain = AnvilLedger(tmp_path, block_time_s=1)
    yield chain
    chain.anvil.stop()


def free_port() -> int:
    """A TCP port nothing listens on right now (on loopback)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Any]:
    """A running mosquitto with a password file and an ACL (see tests/support/broker.py)."""
    from tests.support.broker import Broker

    b = Broker(tmp_path)
    b.start()
    yield b
    b.stop()
