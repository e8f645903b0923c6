"""A real Home Assistant (pinned release, its own environment) against the test mosquitto and a
real daemon reading a Modbus meter: entities with readable names and exact energy values, a
relay's mode set from Home Assistant, a failing meter shown unavailable."""

from __future__ import annotations

import struct
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from daisee_node.actuators.mockpins import pin_level
from tests.conftest import free_port, wait_for, write_config
from tests.support import hass as hass_support
from tests.support.meters import EmulatedMeter, ThreadedMeterServer

# Home Assistant's own environment is built on first use: run beside the rest (`./run test`).
pytestmark = pytest.mark.beside

NODE = "hass1"
#: 1,234,567.8 Wh as the meter holds it: a uint32 of tenths of Wh
TENTHS = 12_345_678


def meter_with_energy() -> EmulatedMeter:
    meter = EmulatedMeter(1, {}, {})
    hi, lo = struct.unpack(">HH", struct.pack(">I", TENTHS))
    meter.holding = {0: hi, 1: lo}
    return meter


def node_config(tmp_path: Path, broker: Any, meter_port: int) -> Path:
    return write_config(
        tmp_path / "node.toml",
        {
            "node": {"id": NODE, "data_dir": str(tmp_path / "data")},
            "sensors": [
                {
                    "name": "grid",
                    "kind": "modbus",
                    "model": "custom",
                    "transport": "tcp",
                    "host": "127.0.0.1",
                    "port": meter_port,
                    "unit": 1,
                    "interval_s": 0.5,
                    "timeout_s": 0.3,
                    "retries": 0,
                    "max_backoff_s": 0.5,
                    "registers": [
                        {
                            "quantity": "import_wh",
                            "address": 0,
                            "function": 3,
                            "type": "uint32",
                            "scale": 0.1,
                            "unit": "Wh",
                            "state_class": "total_increasing",
                        }
                    ],
                }
            ],
            "gpio": {"backend": "mock"},
            "relays": [{"name": "heater", "pin": 17, "safe_state": "off"}],
            "rules": [
                {
                    "name": "never",
                    "when": "grid.import_wh < 0",
                    "then": {"relay": "heater", "state": "on"},
                    "otherwise": {"relay": "heater", "state": "off"},
                    "stale_after_s": 3600,
                }
            ],
            "mqtt": {
                "host": broker.host,
                "port": broker.port,
                "username": "node",
                "password_file": str(broker.password_file("node")),
                "reading_interval_s": 1,
            },
        },
    )


def state_of(ha: hass_support.HomeAssistant, entity_id: str, wanted: Any = None) -> dict[str, Any]:
    """Wait until the entity exists (with state `wanted`, when given); its state object."""

    def check() -> dict[str, Any] | None:
        state = ha.state(entity_id)
        if state is None or (wanted is not None and state["state"] != wanted):
            return None
        return state

    try:
        return wait_for(check, timeout=30, every=0.2)
    except AssertionError:
        last = ha.state(entity_id)
        raise AssertionError(
            f"{entity_id}: {last and last['state']!r}, wanted {wanted!r}\n{ha.output()[-3000:]}"
        ) from None


@pytest.mark.slow
# the first run installs Home Assistant (a few minutes, once); the test itself takes seconds
@pytest.mark.timeout(900)
def test_home_assistant_sees_the_node_and_sets_a_relays_mode(tmp_path, broker, daemon) -> None:
    hass_support.hass_python()  # the environment first: its install is not part of the test
    server = ThreadedMeterServer([meter_with_energy()], port=free_port())
    server.start()
    pins = tmp_path / "data" / "mock-gpio"
    try:
        node = daemon(node_config(tmp_path, broker, server.port))
        with hass_support.running(tmp_path, broker) as ha:
            wait_for(lambda: ha.api("GET", "") is not None, timeout=60, every=0.3)

            # exact, readable, and fit for the Energy dashboard
            energy = state_of(ha, f"sensor.daisee_{NODE}_grid_import_wh", "1234567.8")
            assert float(energy["state"]) == 1_234_567.8
            attributes = energy["attributes"]
            assert attributes["friendly_name"] == f"DAISEE node {NODE} Grid energy imported"
            assert attributes["unit_of_measurement"] == "Wh"
            assert attributes["device_class"] == "energy"
            assert attributes["state_class"] == "total_increasing"
            rule = state_of(ha, f"binary_sensor.daisee_{NODE}_rule_never", "off")
            assert rule["attributes"]["friendly_name"] == f"DAISEE node {NODE} Rule never"
            state_of(ha, f"switch.daisee_{NODE}_relay_heater", "off")
            mode = f"select.daisee_{NODE}_relay_heater_mode"
            assert state_of(ha, mode, "auto")["attributes"]["options"] == ["auto", "on", "off"]
            assert not pin_level(pins, 17)  # never closed

            # a 30-minute override from Home Assistant: the relay closes, and says until when
            duration = f"number.daisee_{NODE}_relay_heater_override_duration"
            state_of(ha, duration, "0")
            ha.api("POST", "services/number/set_value", {"entity_id": duration, "value": 30})
            state_of(ha, duration, "30")
            ha.api("POST", "services/select/select_option", {"entity_id": mode, "option": "on"})
            wait_for(lambda: pin_level(pins, 17) is True)
            state_of(ha, mode, "on")
            state_of(ha, f"switch.daisee_{NODE}_relay_heater", "on")
            ends = state_of(ha, f"sensor.daisee_{NODE}_relay_heater_override_ends")["state"]
            left = datetime.fromisoformat(ends).timestamp() - time.time()
            assert 29 * 60 < left <= 30 * 60 + 1

            # back to automatic: the rule asks the heater off again
            ha.api("POST", "services/select/select_option", {"entity_id": mode, "option": "auto"})
            wait_for(lambda: pin_level(pins, 17) is False)
            state_of(ha, mode, "auto")

            # the meter fails: the reading goes unavailable, then comes back with the meter
            server.stop()
            state_of(ha, f"sensor.daisee_{NODE}_grid_import_wh", "unavailable")
            server.start()
            state_of(ha, f"sensor.daisee_{NODE}_grid_import_wh", "1234567.8")

            deprecated = [
                line
                for line in ha.output().splitlines()
                if "deprecated" in line.lower() and "daisee" in line.lower()
            ]
            assert deprecated == []
        assert node.proc.poll() is None
    finally:
        server.close()
