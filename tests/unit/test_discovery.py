"""Home Assistant discovery: payloads checked by Home Assistant's own MQTT schemas (a pinned
release, in its own environment), readable names, exact reading payloads, relay commands."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from daisee_node.mqtt import discovery
from daisee_node.mqtt.service import CommandError, NodeMqtt, exact_number, parse_command
from daisee_node.mqtt.settings import MqttSection
from daisee_node.readings import Channel, Reading
from tests.support import hass

# Home Assistant's own environment is built on first use: run beside the rest (`./run test`).
pytestmark = pytest.mark.beside

CHANNELS = [
    Channel("grid.power_w", "W"),
    Channel("grid.import_wh", "Wh", "total_increasing"),
    Channel("grid.export_wh", "Wh", "total_increasing"),
    Channel("battery.soc_pct", "%"),
    Channel("battery.current_a", "A"),
    Channel("battery.voltage_v", "V"),
    Channel("battery.charge_wh", "Wh", "total_increasing"),
    Channel("pv.power_w", "W"),
    Channel("grid.frequency_hz", "Hz"),
    Channel("grid.power_factor", ""),
    Channel("tank.level_cm", "cm"),
]


class FakeLedger:
    """A ledger whose state has the given keys."""

    relays_peers = False

    def __init__(self, state: dict[str, Any]) -> None:
        self._state = state

    async def state(self) -> dict[str, Any]:
        return self._state

    def on_sealed(self, callback: Any) -> None:
        pass

    async def accept_peer(self, commitment: Any, signature: bytes) -> bool:
        return False


class FakeNode:
    """A node with channels, two relays and two rules, seen as MQTT sees one."""

    node_id = "house-7"
    started = True
    safe_state_error: str | None = None

    def __init__(self, ledger: FakeLedger | None = None) -> None:
        self.latest: Mapping[str, Reading] = {}
        self.ledger = ledger
        self.meta: dict[str, str] = {}

    def channels(self) -> Sequence[Channel]:
        return CHANNELS

    def channel_interval_s(self, channel: str) -> float | None:
        return 1.0

    def relay_names(self) -> Sequence[str]:
        return ("heater", "supply_neighbour")

    def relay_states(self) -> dict[str, dict[str, Any]]:
        return {}

    def rule_states(self) -> dict[str, dict[str, Any]] | None:
        return {"buy-when-low": {"active": False}, "heat_surplus": {"active": True}}

    def override(self, relay: str, mode: str, expires_s: float | None, reason: str) -> None:
        pass

    def add_counter(self, name: str, delta: int) -> None:
        pass

    async def get_meta(self, key: str) -> str | None:
        return self.meta.get(key)

    async def set_meta(self, key: str, value: str) -> None:
        self.meta[key] = value


def node_mqtt(ledger: FakeLedger | None = None) -> NodeMqtt:
    return NodeMqtt(FakeNode(ledger), MqttSection(reading_interval_s=5))  # type: ignore[arg-type]


def component(topic: str) -> str:
    return topic.split("/")[1]


@pytest.mark.slow
# the first run installs Home Assistant (a few minutes, once); the test itself takes seconds
@pytest.mark.timeout(900)
async def test_every_discovery_payload_passes_home_assistants_own_schema() -> None:
    mqtt = node_mqtt(FakeLedger({"backlog": 0, "sealed_seq": 3, "confirmed_seq": 2}))
    mqtt._ledger_keys = ("backlog", "confirmed_seq", "credit_balance", "sealed_seq")
    entities = mqtt.discovery_entities()
    kinds = {component(e.topic) for e in entities}
    assert kinds == {"sensor", "switch", "select", "number", "binary_sensor"}
    results = hass.validate([(component(e.topic), e.config) for e in entities])
    problems = {
        e.topic: r for e, r in zip(entities, results, strict=True) if r["errors"] or r["dropped"]
    }
    assert problems == {}
    for entity, result in zip(entities, results, strict=True):
        seen = result["config"]
        kind = component(entity.topic)
        # the entity id Home Assistant will give, without the `object_id` it ignores from 2026.4
        assert seen["default_entity_id"].startswith(f"{kind}.daisee_house_7_")
        assert "object_id" not in seen
        assert seen["origin"]["name"] == "daisee-node"
        assert seen["device"]["identifiers"] == ["daisee_house-7"]
    by_id = {r["config"]["default_entity_id"]: r["config"] for r in results}
    energy = by_id["sensor.daisee_house_7_grid_import_wh"]
    assert energy["name"] == "Grid energy imported"
    assert energy["device_class"] == "energy" and energy["state_class"] == "total_increasing"
    assert energy["expire_after"] == discovery.expire_after_s(5.5)
    assert by_id["sensor.daisee_house_7_battery_current_a"]["suggested_display_precision"] == 2
    mode = by_id["select.daisee_house_7_relay_heater_mode"]
    assert mode["options"] == ["auto", "on", "off"]
    assert mode["command_topic"] == "daisee/house-7/relay/heater/set"
    duration = by_id["number.daisee_house_7_relay_heater_override_duration"]
    assert duration["entity_category"] == "config"
    assert duration["command_topic"] == "daisee/house-7/relay/heater/set"
    assert by_id["switch.daisee_house_7_relay_heater"]["icon"] == "mdi:electric-switch"
    assert by_id["binary_sensor.daisee_house_7_rule_buy_when_low"]["name"] == "Rule buy-when-low"
    reason = by_id["sensor.daisee_house_7_rule_heat_surplus_reason"]
    assert reason["entity_category"] == "diagnostic"
    credits = by_id["sensor.daisee_house_7_ledger_credit_balance"]
    assert credits["entity_category"] == "diagnostic"


def test_ledger_entities_follow_what_the_ledger_reports() -> None:
    def ledger_ids(mqtt: NodeMqtt) -> set[str]:
        return {
            e.config["default_entity_id"]
            for e in mqtt.discovery_entities()
            if "_ledger_" in e.config["unique_id"]
        }

    assert ledger_ids(node_mqtt()) == set()  # no chain, no ledger entities
    mqtt = node_mqtt(FakeLedger({}))
    assert ledger_ids(mqtt) == {
        "sensor.daisee_house_7_ledger_backlog",
        "sensor.daisee_house_7_ledger_confirmed_seq",
        "sensor.daisee_house_7_ledger_sealed_seq",
    }
    mqtt._ledger_keys = ("credit_balance",)
    assert "sensor.daisee_house_7_ledger_credit_balance" in ledger_ids(mqtt)


async def test_ledger_entities_wait_for_the_first_ledger_state_and_then_stay() -> None:
    ledger = FakeLedger({"backlog": 0, "sealed_seq": 1, "confirmed_seq": None, "credit_balance": 5})
    mqtt = node_mqtt(ledger)
    mqtt.link.connected.set()
    announced: list[str] = []
    mqtt.link.publish = lambda topic, payload, **kw: announced.append(topic)  # type: ignore[method-assign]
    await mqtt.publish_state()
    credit = "homeassistant/sensor/daisee_house-7/ledger_credit_balance/config"
    assert credit in announced  # with the first discovery: never removed and added again
    ledger._state = {"backlog": 0, "sealed_seq": 1, "confirmed_seq": 1, "credit_balance": None}
    mqtt._ledger_due = 0.0
    announced.clear()
    await mqtt.publish_state()
    assert credit not in announced and mqtt._ledger_keys is not None
    assert "credit_balance" in mqtt._ledger_keys


@pytest.mark.parametrize(
    ("channel", "name"),
    [
        ("battery.soc_pct", "Battery state of charge"),
        ("grid.import_wh", "Grid energy imported"),
        ("pv.power_w", "PV power"),
        ("battery.current_a", "Battery current"),
        ("peer.solar.surplus_w", "Peer solar surplus"),
        ("tank.level_cm", "Tank level cm"),
        ("boiler.water_temp_c", "Boiler water temp"),
        ("battery.charge_wh", "Battery energy charged"),
    ],
)
def test_channels_get_names_people_read(channel: str, name: str) -> None:
    assert discovery.readable(channel) == name


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (1234567.8, "1234567.8"),
        (1500.0, "1500"),
        (-5.57661, "-5.57661"),
        (0.00001, "0.00001"),
        (12345678901.25, "12345678901.25"),
        (1e20, "100000000000000000000"),
    ],
)
def test_readings_are_published_exactly(value: float, text: str) -> None:
    assert exact_number(value) == text
    assert float(text) == value


@pytest.mark.parametrize(
    ("value", "resolution", "text"),
    [
        (12_345_679 * 0.1, 0.1, "1234567.9"),  # 1234567.9000000001 as a float
        (1500.0, 1.0, "1500"),
        (3 * 0.25, 0.25, "0.75"),
        (2**60 * 1.0, 0.1, "1152921504606847000"),  # past 2**53: the shortest exact digits
    ],
)
def test_a_counter_is_published_with_the_digits_of_its_resolution(
    value: float, resolution: float, text: str
) -> None:
    assert exact_number(value, resolution) == text
    assert float(text) == pytest.approx(value, rel=1e-15)


def test_any_float_survives_the_round_trip() -> None:
    rng = random.Random(7)
    for _ in range(20_000):
        value = rng.uniform(-1e7, 1e7) * 10 ** rng.randint(-6, 6)
        text = exact_number(value)
        assert float(text) == value and "e" not in text.lower() and math.isfinite(float(text))


def test_override_duration_commands() -> None:
    assert parse_command(b'{"override_duration_s": 1800}').duration_s == 1800
    assert parse_command(b'{"override_duration_s": 0}').duration_s == 0
    command = parse_command(b'{"state": "ON", "override_duration_s": 60}')
    assert (command.mode, command.expires_s, command.duration_s) == ("on", None, 60)
    assert parse_command(b"AUTO").mode == "auto"
    assert parse_command(b"ON 600").expires_s == 600
    for bad in (
        b'{"override_duration_s": -1}',
        b'{"override_duration_s": true}',
        b'{"override_duration_s": 700000}',
        b'{"expires_s": 60}',
        b'{"override_duration_s": 60, "expires_s": 60}',
    ):
        with pytest.raises(CommandError):
            parse_command(bad)


async def test_removed_entities_take_their_retained_state_with_them() -> None:
    mqtt = node_mqtt()
    published: list[tuple[str, bytes | str]] = []
    mqtt.link.publish = lambda topic, payload, **kw: published.append((topic, payload))  # type: ignore[method-assign]
    await mqtt._discovery()
    record = json.loads(mqtt.node.meta["mqtt_discovery_topics"])  # type: ignore[attr-defined]
    topic = "homeassistant/sensor/daisee_house-7/tank_level_cm/config"
    assert record[topic] == ["daisee/house-7/reading/tank.level_cm"]

    CHANNELS_BEFORE = list(CHANNELS)
    CHANNELS.remove(Channel("tank.level_cm", "cm"))
    try:
        published.clear()
        await mqtt._discovery()
    finally:
        CHANNELS[:] = CHANNELS_BEFORE
    cleared = {t for t, p in published if p == b""}
    assert cleared == {topic, "daisee/house-7/reading/tank.level_cm"}
