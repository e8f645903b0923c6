"""The interlock on every path, with real `daisee-node` processes and the mock pins' history.

Two supply relays in one group (`supply_own` safe on, `supply_neighbour` safe off, dead time
0.5 s). Whatever happens — a start from any levels a crash left, a clean stop, `safe-state`
after `kill -9`, overrides from MQTT, a reload — the recorded pin history must never show both
closed at once, and every change of source must wait the dead time after the last opening.
"""

from __future__ import annotations

import asyncio
import math
import random
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from daisee_node.actuators.mockpins import (
    GroupPin,
    interlock_breaches,
    pin_changes,
    pin_level,
    set_pin_level,
)
from tests.conftest import ROOT, run_cli, wait_for, write_config

OWN, NEIGHBOUR = 23, 24
DEAD = 0.5

# The group changes source every node minute: every real second with time_speed = 60.
FLIP = {
    "name": "flip",
    "when": "time.minute % 2 == 0",
    "then": {"relay": "supply_neighbour", "state": "on"},
    "otherwise": {"relay": "supply_own", "state": "on"},
}
# Any household draws more than 1 W: the neighbour's line, for as long as the rule runs.
NEIGHBOUR_ON = {
    "name": "buy",
    "when": "load.power_w > 1",
    "then": {"relay": "supply_neighbour", "state": "on"},
    "otherwise": {"relay": "supply_own", "state": "on"},
}
OWN_ON = {**NEIGHBOUR_ON, "when": "load.power_w < 1"}


def node_config(
    tmp_path: Path, rules: list[dict[str, Any]], time_speed: float = 1.0, interval_s: float = 0.1
) -> Path:
    return write_config(
        tmp_path / "node.toml",
        {
            "node": {"id": "interlock", "data_dir": str(tmp_path / "data"),
                     "time_speed": time_speed},
            "sensors": [{"name": "load", "kind": "simulated", "model": "load",
                         "interval_s": interval_s}],
            "gpio": {"backend": "mock"},
            "relays": [
                {"name": "supply_own", "pin": OWN, "safe_state": "on", "group": "supply",
                 "dead_time_s": DEAD},
                {"name": "supply_neighbour", "pin": NEIGHBOUR, "safe_state": "off",
                 "group": "supply", "dead_time_s": DEAD},
            ],
            "rules": rules,
        },
    )  # fmt: skip


def pins_of(tmp_path: Path) -> Path:
    return tmp_path / "data" / "mock-gpio"


def breaches(pins: Path, own: int = OWN, neighbour: int = NEIGHBOUR, after: float = -math.inf):
    return interlock_breaches(
        pin_changes(pins),
        {"supply": [GroupPin(own), GroupPin(neighbour)]},
        {"supply": DEAD},
        after=after,
    )


def supply(pins: Path, own: int = OWN, neighbour: int = NEIGHBOUR) -> tuple[bool, bool]:
    """(own closed?, neighbour closed?) as the pins hold them now."""
    return bool(pin_level(pins, own)), bool(pin_level(pins, neighbour))


def closings(pins: Path, pin: int) -> int:
    return sum(1 for c in pin_changes(pins) if c.pin == f"GPIO{pin}" and c.high)


def starts_logged(config: Path) -> int:
    """How many daemons started so far on this config (they share one log file)."""
    log = config.with_suffix(".log")
    return log.read_text(errors="replace").count("node started") if log.exists() else 0


def safe_state(config: Path) -> None:
    result = run_cli("safe-state", "-c", str(config))
    assert result.returncode == 0, result.stderr
    assert "supply_own: on" in result.stdout and "supply_neighbour: off" in result.stdout


# -- kill -9 at random moments -----------------------------------------------------------------


def kill_loop(tmp_path: Path, daemon: Any, kills: int, seed: int) -> tuple[int, int]:
    """Start, kill -9, and in turn `safe-state` or not, `kills` times on one node; the history
    must show no breach. Returns (kills that hit a change of source, neighbour closings)."""
    # A change of source every 0.5 s; the rule reads only the time: sample every 0.5 s.
    config = node_config(tmp_path, [FLIP], time_speed=120, interval_s=60)
    pins = pins_of(tmp_path)
    rng = random.Random(seed)
    mid_switch = 0
    for i in range(kills):
        started = starts_logged(config)
        closed_before = closings(pins, NEIGHBOUR)
        d = daemon(config)
        wait_for(lambda started=started: starts_logged(config) > started, timeout=30, every=0.01)
        # The moment of the kill, in turn: at random; in the middle of a change of source (the
        # old one open, the new one waiting out its dead time); just after the neighbour closed.
        if i % 3 == 0:
            time.sleep(rng.uniform(0.0, 0.6))  # not a wait for something: the random moment
        elif i % 3 == 1:
            wait_for(lambda: supply(pins) == (False, False), timeout=30, every=0.005)
        else:
            wait_for(lambda n=closed_before: closings(pins, NEIGHBOUR) > n, timeout=30, every=0.005)
        mid_switch += supply(pins) == (False, False)
        d.kill()
        if i % 2 == 0:
            safe_state(config)
            assert supply(pins) == (True, False)
    safe_state(config)
    assert breaches(pins) == []
    return mid_switch, closings(pins, NEIGHBOUR)


@pytest.mark.slow
def test_kill_9_at_random_moments_never_breaks_the_interlock(tmp_path: Path, daemon) -> None:
    """20 kills on two nodes side by side (the processes mostly wait: it halves the time)."""
    nodes, kills = 2, 10
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with ThreadPoolExecutor(nodes) as pool:
        runs = [
            pool.submit(kill_loop, tmp_path / name, daemon, kills, seed)
            for name, seed in [("a", 20261122), ("b", 1122)]
        ]
        results = [run.result() for run in runs]
    for mid_switch, neighbour_closings in results:
        assert mid_switch >= kills // 3  # the kills did hit changes of source
        assert neighbour_closings >= kills // 3  # and the rule did flip the group


# -- each path ---------------------------------------------------------------------------------

LEVELS = [(False, False), (False, True), (True, False), (True, True)]


def level_id(levels: tuple[bool, bool]) -> str:
    return "own-{}-neighbour-{}".format(*("closed" if x else "open" for x in levels))


@pytest.mark.parametrize("levels", LEVELS, ids=level_id)
def test_run_starts_from_any_levels_break_before_make(
    tmp_path: Path, daemon, levels: tuple[bool, bool]
) -> None:
    config = node_config(tmp_path, [])
    pins = pins_of(tmp_path)
    set_pin_level(pins, OWN, levels[0], t=time.time() - 5)
    set_pin_level(pins, NEIGHBOUR, levels[1])  # the last change just before the start
    start = time.time()
    d = daemon(config)
    wait_for(lambda: "node started" in d.output(), timeout=20)
    wait_for(lambda: supply(pins) == (True, False), timeout=20, every=0.01)
    d.signal(signal.SIGTERM)
    assert d.wait()[0] == 0
    assert breaches(pins, after=start) == []
    assert supply(pins) == (True, False)


@pytest.mark.parametrize("levels", LEVELS, ids=level_id)
def test_safe_state_from_any_levels_break_before_make(
    tmp_path: Path, levels: tuple[bool, bool]
) -> None:
    config = node_config(tmp_path, [])
    pins = pins_of(tmp_path)
    set_pin_level(pins, OWN, levels[0], t=time.time() - 5)
    set_pin_level(pins, NEIGHBOUR, levels[1])
    start = time.time()
    safe_state(config)
    assert breaches(pins, after=start) == []
    assert supply(pins) == (True, False)


def test_safe_state_after_kill_9_with_the_neighbour_held_on(tmp_path: Path, daemon) -> None:
    config = node_config(tmp_path, [NEIGHBOUR_ON])
    pins = pins_of(tmp_path)
    d = daemon(config)
    wait_for(lambda: supply(pins) == (False, True), timeout=20)
    d.kill()
    safe_state(config)
    assert breaches(pins) == []
    changes = [(c.pin, c.high) for c in pin_changes(pins)]
    assert changes[-2:] == [(f"GPIO{NEIGHBOUR}", False), (f"GPIO{OWN}", True)]


def test_restart_after_kill_9_with_the_neighbour_held_on(tmp_path: Path, daemon) -> None:
    config = node_config(tmp_path, [OWN_ON])
    pins = pins_of(tmp_path)
    set_pin_level(pins, NEIGHBOUR, True)  # what a killed node running another rule left
    d = daemon(config)
    wait_for(lambda: supply(pins) == (True, False), timeout=20)
    d.signal(signal.SIGTERM)
    assert d.wait()[0] == 0
    assert breaches(pins) == []


@pytest.mark.parametrize("moment", ["held", "mid-switch"])
def test_a_clean_stop_is_break_before_make(tmp_path: Path, daemon, moment: str) -> None:
    pins = pins_of(tmp_path)
    if moment == "held":
        d = daemon(node_config(tmp_path, [NEIGHBOUR_ON]))
        wait_for(lambda: supply(pins) == (False, True), timeout=20)
    else:
        d = daemon(node_config(tmp_path, [FLIP], time_speed=60, interval_s=30))
        wait_for(lambda: closings(pins, NEIGHBOUR) >= 1, timeout=20, every=0.01)
        wait_for(lambda: supply(pins) == (False, False), timeout=20, every=0.005)
    d.signal(signal.SIGTERM)
    assert d.wait()[0] == 0
    assert supply(pins) == (True, False)
    assert breaches(pins) == []


def test_reload_with_changed_rules_is_break_before_make(tmp_path: Path, daemon) -> None:
    pins = pins_of(tmp_path)
    d = daemon(node_config(tmp_path, [NEIGHBOUR_ON]))
    wait_for(lambda: supply(pins) == (False, True), timeout=20)
    for rule, wanted in [(OWN_ON, (True, False)), (NEIGHBOUR_ON, (False, True))]:
        node_config(tmp_path, [rule])
        d.signal(signal.SIGHUP)
        wait_for(lambda wanted=wanted: supply(pins) == wanted, timeout=20)
    d.signal(signal.SIGTERM)
    assert d.wait()[0] == 0
    assert breaches(pins) == []
    assert closings(pins, NEIGHBOUR) == 2 and closings(pins, OWN) >= 2


# -- overrides from MQTT, on the DAISEE example --------------------------------------------------

EXAMPLE_OWN, EXAMPLE_NEIGHBOUR = 17, 27


def daisee_consumer(tmp_path: Path, broker: Any) -> Path:
    """examples/daisee-consumer.toml in real time, with its data here and an MQTT link."""
    text = (ROOT / "examples" / "daisee-consumer.toml").read_text()
    text = re.sub(r"(?m)^data_dir = .*$", f'data_dir = "{tmp_path / "data"}"', text)
    text = re.sub(r"(?m)^time_speed = .*$", "time_speed = 1", text)
    text += (
        f'\n[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\nusername = "node"\n'
        f'password_file = "{broker.password_file("node")}"\n'
    )
    path = tmp_path / "consumer.toml"
    path.write_text(text)
    return path


async def command(broker: Any, relay: str, payload: str) -> None:
    import aiomqtt

    async with aiomqtt.Client(
        broker.host,
        broker.port,
        username="ha",
        password=broker.password_file("ha").read_text().strip(),
    ) as client:
        await client.publish(f"daisee/consumer-1/relay/{relay}/set", payload, qos=1)


def test_overrides_on_off_auto_and_expiry_keep_the_group_supplied(
    tmp_path: Path, daemon, broker
) -> None:
    config = daisee_consumer(tmp_path, broker)
    pins = pins_of(tmp_path)
    example_pins = (EXAMPLE_OWN, EXAMPLE_NEIGHBOUR)

    def now_supplied_by(wanted: tuple[bool, bool], timeout: float = 10) -> None:
        wait_for(lambda: supply(pins, *example_pins) == wanted, timeout=timeout, every=0.01)

    def send(payload: str) -> None:
        asyncio.run(command(broker, "supply_neighbour", payload))

    d = daemon(config)
    now_supplied_by((True, False), timeout=20)
    wait_for(lambda: "MQTT connected" in d.output(), timeout=20)  # commands are not retained
    send("ON")
    now_supplied_by((False, True))
    # OFF with no rule asking for the neighbour: back to the house's own supply, after the dead
    # time — not both open until someone sends AUTO.
    send("OFF")
    now_supplied_by((True, False), timeout=3)
    closed_before = closings(pins, EXAMPLE_NEIGHBOUR)
    send("ON 1")  # for one second, then AUTO: the rule asks for the own supply
    # The neighbour's supply lasts about half a second: the pin history keeps it even when
    # this thread is not scheduled while it lasts.
    wait_for(lambda: closings(pins, EXAMPLE_NEIGHBOUR) > closed_before, timeout=10)
    now_supplied_by((True, False), timeout=5)
    send("ON")
    now_supplied_by((False, True))
    send("AUTO")
    now_supplied_by((True, False))
    d.signal(signal.SIGTERM)
    assert d.wait()[0] == 0
    assert breaches(pins, *example_pins) == []
    assert closings(pins, EXAMPLE_NEIGHBOUR) == 3
