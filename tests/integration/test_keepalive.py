"""A frozen node (SIGSTOP: a hung process, a stalled SD card) shows as unavailable in Home
Assistant within 15 s with the default settings: the broker gives up on a silent client after
1.5 × its keepalive and publishes the node's last will, `offline` (what Home Assistant's
availability follows)."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from daisee_node.mqtt.settings import MqttSection
from tests.conftest import sim_sensors, wait_for, write_config
from tests.integration.test_mqtt import Watcher
from tests.support.broker import Broker

#: what Home Assistant users are promised
UNAVAILABLE_WITHIN_S = 15.0
STATUS = "daisee/ka1/status"


#: mosquitto 2.0 (Debian 12) looks for silent clients every 5 s (measured: a keepalive of 8 s,
#: due at 12 s, ended the session 17 s after the last packet), and the check is strict
BROKER_CHECK_S = 6.0


def test_the_default_keepalive_lets_the_broker_give_up_within_the_promise() -> None:
    # mosquitto declares a client dead 1.5 × keepalive after its last packet, at its next check
    assert 1.5 * MqttSection().keepalive_s + BROKER_CHECK_S <= UNAVAILABLE_WITHIN_S


@pytest.mark.slow
async def test_a_frozen_node_shows_offline_within_15_s_with_the_default_keepalive(
    tmp_path: Path, broker: Broker, daemon: Any
) -> None:
    path = write_config(
        tmp_path / "node.toml",
        {
            "node": {"id": "ka1", "data_dir": str(tmp_path / "data")},
            "sensors": sim_sensors(0.5),
            # everything MQTT at its defaults (keepalive included) but where the broker is
            "mqtt": {
                "host": broker.host,
                "port": broker.port,
                "username": "node",
                "password_file": str(broker.password_file("node")),
            },
        },
    )
    d = daemon(path)
    async with Watcher(broker) as w:
        await w.wait(STATUS, lambda p: p == b"online", timeout=30)
        # the node's last packet: a reading published just now (they flow every few seconds)
        await asyncio.to_thread(wait_for, lambda: "MQTT connected" in d.output(), 15)
        w.seen.pop("daisee/ka1/reading/load.power_w", None)
        await w.wait("daisee/ka1/reading/load.power_w", timeout=15)
        d.signal(signal.SIGSTOP)
        frozen = time.monotonic()
        try:
            await w.wait(STATUS, lambda p: p == b"offline", timeout=UNAVAILABLE_WITHIN_S + 1)
            took = time.monotonic() - frozen
        finally:
            d.signal(signal.SIGCONT)
        assert took <= UNAVAILABLE_WITHIN_S, f"offline after {took:.1f} s"
        # and back: the resumed node reconnects and says so
        await w.wait(STATUS, lambda p: p == b"online", timeout=30)
    d.signal(signal.SIGTERM)
    code, _ = await asyncio.to_thread(d.wait, 10)
    assert code == 0
