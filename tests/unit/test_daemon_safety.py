"""The supervisor's own safety nets, in-process: a private data dir, a lock that survives a full
disk, consumers that fail without stopping a sampler, late readings, and relays that cannot be
made safe reported as an error."""

from __future__ import annotations

import asyncio
import errno
import json
import os
from pathlib import Path
from typing import Any

import pytest
import structlog

from daisee_node.config import load_config
from daisee_node.daemon import EXIT_UNSAFE, Node
from daisee_node.datadir import DataDirLock, make_private_dir
from daisee_node.readings import Quality, Reading
from tests.conftest import until, write_config


def config_path(tmp_path: Path, **extra: Any) -> Path:
    return write_config(
        tmp_path / "node.toml",
        {
            "node": {"id": "safety", "data_dir": str(tmp_path / "data"), "time_speed": 100},
            "store": {"flush_interval_s": 0.05},
            "sensors": [{"name": "load", "kind": "simulated", "model": "load", "interval_s": 0.5}],
            **extra,
        },
    )


def test_the_data_dir_is_private(tmp_path: Path) -> None:
    fresh = tmp_path / "fresh" / "data"
    make_private_dir(fresh)
    assert fresh.stat().st_mode & 0o777 == 0o700
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    make_private_dir(shared)
    assert shared.stat().st_mode & 0o777 == 0o700


def test_the_lock_holds_when_the_pid_cannot_be_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = os.write

    def full_disk(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full_disk)
    lock = DataDirLock(tmp_path)
    lock.acquire()  # no OSError: the flock is what keeps a second daemon out
    monkeypatch.setattr(os, "write", real_write)
    other = DataDirLock(tmp_path)
    with pytest.raises(Exception, match="another daisee-node"):
        other.acquire()
    lock.release()
    assert (tmp_path / "daisee-node.pid").stat().st_mode & 0o777 == 0o600


async def test_a_failing_consumer_never_stops_the_sampler(tmp_path: Path) -> None:
    node = Node(load_config(config_path(tmp_path)))
    seen: list[int] = []

    def broken(readings: Any) -> None:
        raise RuntimeError("a bug in a consumer")

    node.subscribe(broken)
    node.subscribe(lambda readings: seen.append(len(readings)))
    task = asyncio.create_task(node.run())
    await asyncio.wait_for(node.started.wait(), 10)
    await until(lambda: len(seen) >= 20 and node.store.stats.written >= 20)
    node.request_stop()
    assert await asyncio.wait_for(task, 8) == 0
    assert node.sensor_stats["load"].reads >= 20
    assert node.bus.failures and next(iter(node.bus.failures.values())) >= 20


async def test_readings_before_the_sealed_horizon_are_marked_late(tmp_path: Path) -> None:
    node = Node(load_config(config_path(tmp_path)))

    class Sealed:
        sealed_until_ms = 1_000_000

    node.ledger = Sealed()  # type: ignore[assignment]
    got: list[Reading] = []
    node.bus.sinks = [got.extend]
    node.store.add_counter = lambda name, delta: None  # type: ignore[method-assign]
    node.publish([Reading("load.power_w", 999_999, 1.0), Reading("load.power_w", 1_000_000, 2.0)])
    assert [r.quality for r in got] == [Quality.LATE, Quality.GOOD]


async def test_relays_that_cannot_be_made_safe_are_an_error(tmp_path: Path) -> None:
    path = config_path(
        tmp_path,
        gpio={"backend": "mock"},
        relays=[{"name": "heater", "pin": 22, "safe_state": "off"}],
    )
    node = Node(load_config(path), config_path=path)
    statuses: list[str] = []
    node.notifier.status = statuses.append  # type: ignore[method-assign]
    assert node.relays is not None

    async def stuck() -> None:
        raise OSError(errno.EIO, "relay board not answering")

    node.relays.all_safe = stuck  # type: ignore[method-assign]
    with structlog.testing.capture_logs() as logs:
        task = asyncio.create_task(node.run())
        await asyncio.wait_for(node.started.wait(), 10)
        node.request_stop()
        code = await asyncio.wait_for(task, 8)
    assert code == EXIT_UNSAFE
    assert node.safe_state_error and "relay board not answering" in node.safe_state_error
    errors = [e for e in logs if e["log_level"] == "error"]
    assert any("safe state" in e["event"] for e in errors), json.dumps(logs, default=str)
    assert any("relays not in their safe state" in s for s in statuses)


async def test_a_reload_that_removes_a_rule_releases_what_it_held(tmp_path: Path) -> None:
    rule = {
        "name": "hold",
        "when": "load.power_w > -1",  # always true: holds the boiler on
        "then": {"relay": "boiler", "state": "on"},
    }
    relays = [{"name": "boiler", "pin": 22, "safe_state": "off"}]
    path = config_path(tmp_path, gpio={"backend": "mock"}, relays=relays, rules=[rule])
    node = Node(load_config(path), config_path=path)
    task = asyncio.create_task(node.run())
    await asyncio.wait_for(node.started.wait(), 10)
    assert node.relays is not None
    boiler = node.relays.relays["boiler"]
    await until(lambda: boiler.on)

    config_path(tmp_path, gpio={"backend": "mock"}, relays=relays)  # the rule is gone
    assert await node.reload()
    await until(lambda: not boiler.on)
    node.request_stop()
    assert await asyncio.wait_for(task, 8) == 0


async def test_relays_are_safe_before_the_store_is_opened(tmp_path: Path) -> None:
    from daisee_node.actuators.mockpins import pin_level, set_pin_level

    path = config_path(
        tmp_path,
        gpio={"backend": "mock"},
        relays=[{"name": "heater", "pin": 22, "safe_state": "off"}],
    )
    pins = tmp_path / "data" / "mock-gpio"
    set_pin_level(pins, 22, True)  # a crashed process left the heater on
    node = Node(load_config(path), config_path=path)
    seen_at_open: list[bool | None] = []
    open_store = node.store.open

    async def open_and_look() -> None:
        seen_at_open.append(pin_level(pins, 22))
        await open_store()

    node.store.open = open_and_look  # type: ignore[method-assign]
    task = asyncio.create_task(node.run())
    await asyncio.wait_for(node.started.wait(), 10)
    node.request_stop()
    assert await asyncio.wait_for(task, 8) == 0
    assert seen_at_open == [False]
