"""MQTT against a real mosquitto: retained state, last will, Home Assistant discovery,
authenticated relay commands, and a broker that goes away and comes back."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from daisee_node.config import load_config
from daisee_node.daemon import Node
from tests.conftest import sim_sensors, until, write_config


def mqtt_config(
    tmp_path: Path,
    broker: Any,
    *,
    sensors: list[dict[str, Any]] | None = None,
    name: str = "node.toml",
    rules: list[dict[str, Any]] | None = None,
    time_speed: float | None = 50,
    **mqtt: Any,
) -> Path:
    node: dict[str, Any] = {"id": "m1", "data_dir": str(tmp_path / "data")}
    if time_speed is not None:
        node["time_speed"] = time_speed
    return write_config(
        tmp_path / name,
        {
            "node": node,
            "store": {"flush_interval_s": 0.05},
            "sensors": sim_sensors(1.0) if sensors is None else sensors,
            "gpio": {"backend": "mock"},
            "relays": [{"name": "heater", "pin": 17, "safe_state": "off"}],
            "rules": rules or [],
            "mqtt": {
                "host": broker.host,
                "port": broker.port,
                "username": "node",
                "password_file": str(broker.password_file("node")),
                "reading_interval_s": 0,
                **mqtt,
            },
        },
    )


class Watcher:
    """A client that records the last payload seen on every topic."""

    def __init__(self, broker: Any, user: str = "viewer") -> None:
        self.broker = broker
        self.user = user
        self.seen: dict[str, bytes] = {}
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Watcher:
        ready = asyncio.Event()

        async def listen() -> None:
            async with aiomqtt.Client(
                self.broker.host,
                self.broker.port,
                username=self.user,
                password=self.broker.password_file(self.user).read_text().strip(),
            ) as client:
                await client.subscribe("#")
                ready.set()
                async for msg in client.messages:
                    self.seen[msg.topic.value] = bytes(msg.payload)  # type: ignore[arg-type]

        self.task = asyncio.create_task(listen())
        await asyncio.wait_for(ready.wait(), 5)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.task is not None
        self.task.cancel()

    async def wait(self, topic: str, predicate=lambda p: True, timeout: float = 15) -> bytes:
        async def poll() -> bytes:
            while topic not in self.seen or not predicate(self.seen[topic]):
                await asyncio.sleep(0.05)
            return self.seen[topic]

        return await asyncio.wait_for(poll(), timeout)


async def publish_as(broker: Any, user: str, topic: str, payload: str) -> None:
    async with aiomqtt.Client(
        broker.host,
        broker.port,
        username=user,
        password=broker.password_file(user).read_text().strip(),
    ) as client:
        await client.publish(topic, payload, qos=1)


async def start(path: Path) -> tuple[Node, asyncio.Task[int]]:
    node = Node(load_config(path), config_path=path)
    task = asyncio.create_task(node.run())
    await asyncio.wait_for(node.started.wait(), 10)
    return node, task


async def stop(node: Node, task: asyncio.Task[int]) -> int:
    node.request_stop()
    return await asyncio.wait_for(task, 8)


async def test_status_readings_relays_and_discovery_are_retained(tmp_path, broker):
    rule = {
        "name": "never",
        "when": "load.power_w < -1000000",
        "then": {"relay": "heater", "state": "on"},
        "otherwise": {"relay": "heater", "state": "off"},
    }
    node, task = await start(mqtt_config(tmp_path, broker, rules=[rule]))
    base = "daisee/m1"
    async with Watcher(broker) as w:
        assert await w.wait(f"{base}/status", lambda p: p == b"online") == b"online"
        power = await w.wait(f"{base}/reading/pv.power_w")
        assert float(power) >= 0
        assert await w.wait(f"{base}/relay/heater") == b"OFF"
        attributes = json.loads(await w.wait(f"{base}/relay/heater/attributes"))
        assert attributes["mode"] == "auto"

        energy = json.loads(await w.wait("homeassistant/sensor/daisee_m1/grid_import_wh/config"))
        assert energy["device_class"] == "energy"
        assert energy["state_class"] == "total_increasing"
        assert energy["unit_of_measurement"] == "Wh"
        assert energy["state_topic"] == f"{base}/reading/grid.import_wh"
        assert energy["availability_topic"] == f"{base}/status"
        switch = json.loads(await w.wait("homeassistant/switch/daisee_m1/heater/config"))
        assert switch["command_topic"] == f"{base}/relay/heater/set"
        state = json.loads(await w.wait(f"{base}/rule/never"))
        assert state["active"] is False and state["asks"] == {"heater": "off"}
        soc = json.loads(await w.wait("homeassistant/sensor/daisee_m1/battery_soc_pct/config"))
        assert soc["device_class"] == "battery"
        # one device for the whole node
        assert energy["device"]["identifiers"] == switch["device"]["identifiers"]

    assert await stop(node, task) == 0
    # a late subscriber still gets the retained state: the node said goodbye
    async with Watcher(broker) as w:
        assert await w.wait(f"{base}/status") == b"offline"
        assert await w.wait(f"{base}/relay/heater") == b"OFF"


async def test_commands_need_the_right_to_command(tmp_path, broker):
    node, task = await start(mqtt_config(tmp_path, broker))
    base = "daisee/m1"
    async with Watcher(broker) as w:
        await w.wait(f"{base}/status", lambda p: p == b"online")
        # a read-only client: the broker's ACL drops its command. Its PUBACK comes after the
        # broker routed (or dropped) it, so a command sent after it reaches the node after it:
        # once that one is counted, the first had its chance.
        await publish_as(broker, "viewer", f"{base}/relay/heater/set", "ON")
        await publish_as(broker, "ha", f"{base}/relay/heater/set", "NOT-A-COMMAND")
        assert node.mqtt is not None
        await until(lambda: node.mqtt.commands_refused == 1)
        assert node.relays is not None and not node.relays.relays["heater"].on
        assert node.mqtt is not None and node.mqtt.commands_applied == 0
        # Home Assistant's user may
        await publish_as(broker, "ha", f"{base}/relay/heater/set", "ON 600")
        assert await w.wait(f"{base}/relay/heater", lambda p: p == b"ON") == b"ON"
        assert node.relays.relays["heater"].mode == "on"
        # nonsense is refused and counted, and changes nothing
        await publish_as(broker, "ha", f"{base}/relay/heater/set", "MAYBE")
        await publish_as(broker, "ha", f"{base}/relay/nosuch/set", "ON")
        await until(lambda: node.mqtt.commands_refused >= 3)
        assert node.mqtt.commands_refused - 1 == 2
        assert node.relays.relays["heater"].mode == "on"
        await publish_as(broker, "ha", f"{base}/relay/heater/set", '{"state": "AUTO"}')
        attrs = await w.wait(
            f"{base}/relay/heater/attributes", lambda p: json.loads(p)["mode"] == "auto"
        )
        assert json.loads(attrs)["mode"] == "auto"
    await stop(node, task)


async def test_broker_outage_loses_no_readings_and_state_comes_back(tmp_path, broker):
    node, task = await start(mqtt_config(tmp_path, broker))
    base = "daisee/m1"
    async with Watcher(broker) as w:
        await w.wait(f"{base}/status", lambda p: p == b"online")
    broker.stop()
    written = node.store.stats.written
    # sampling and the buffer carried on without the broker
    await until(lambda: node.store.stats.written > written + 20, timeout=10)
    assert node.store.stats.written > written + 20
    assert not node.mqtt.link.connected.is_set()
    broker.start()  # same port, and no persistence: the retained state is gone
    async with Watcher(broker) as w:
        assert await w.wait(f"{base}/status", lambda p: p == b"online", timeout=40) == b"online"
        await w.wait(f"{base}/relay/heater")
        await w.wait("homeassistant/switch/daisee_m1/heater/config")
        # subscribed again: commands work on the new session
        await publish_as(broker, "ha", f"{base}/relay/heater/set", "ON")
        assert await w.wait(f"{base}/relay/heater", lambda p: p == b"ON") == b"ON"
    assert node.mqtt is not None and node.mqtt.link.connects >= 2
    await stop(node, task)


async def test_discovery_entities_are_removed_when_their_channel_goes(tmp_path, broker):
    node, task = await start(mqtt_config(tmp_path, broker))
    topic = "homeassistant/sensor/daisee_m1/pv_power_w/config"
    async with Watcher(broker) as w:
        await w.wait(topic)
    await stop(node, task)

    without_pv = [s for s in sim_sensors(1.0) if s["name"] != "pv"]
    node, task = await start(mqtt_config(tmp_path, broker, sensors=without_pv))
    async with Watcher(broker) as w:
        await w.wait("homeassistant/sensor/daisee_m1/grid_power_w/config")
        # the retained config is cleared, so Home Assistant drops the entity
        assert await w.wait(topic, lambda p: p == b"") == b""
    await stop(node, task)


async def test_last_will_says_offline_when_the_process_dies(tmp_path, broker, daemon):
    import signal

    proc = daemon(mqtt_config(tmp_path, broker))
    async with Watcher(broker) as w:
        await w.wait("daisee/m1/status", lambda p: p == b"online", timeout=30)
        proc.signal(signal.SIGKILL)
        assert await w.wait("daisee/m1/status", lambda p: p == b"offline") == b"offline"


async def test_tls_with_a_private_ca(tmp_path):
    from tests.support.broker import Broker

    tls_broker = Broker(tmp_path / "tls", tls=True) if (tmp_path / "tls").mkdir() is None else None
    assert tls_broker is not None and tls_broker.ca is not None
    tls_broker.start()
    try:
        path = mqtt_config(tmp_path, tls_broker, tls=True, ca_file=str(tls_broker.ca))
        node, task = await start(path)
        assert node.mqtt is not None
        await asyncio.wait_for(node.mqtt.link.connected.wait(), 15)
        await stop(node, task)

        # without the CA the server's certificate is refused: never connected
        path = mqtt_config(tmp_path, tls_broker, tls=True, name="no-ca.toml")
        node, task = await start(path)
        assert node.mqtt is not None
        # the broker sees the handshake fail (the node refused its certificate)
        seen = tls_broker.log.read_text()
        await until(
            lambda: tls_broker.log.read_text().count("OpenSSL Error") > seen.count("OpenSSL Error")
        )
        assert not node.mqtt.link.connected.is_set() and node.mqtt.link.connects == 0
        await stop(node, task)
    finally:
        tls_broker.stop()


async def test_a_failing_rule_shows_its_error_in_its_retained_state(tmp_path, broker):
    rule = {
        "name": "broken",
        "when": "battery.soc_pct / (pv.power_w - pv.power_w) > 1",
        "then": {"relay": "heater", "state": "on"},
        "otherwise": {"relay": "heater", "state": "off"},
    }
    node, task = await start(mqtt_config(tmp_path, broker, rules=[rule]))
    async with Watcher(broker) as w:
        raw = await w.wait("daisee/m1/rule/broken", lambda p: bool(json.loads(p).get("error")))
        state = json.loads(raw)
        assert "zero" in state["error"].lower()
        assert state["errors"] >= 1
    await stop(node, task)


async def test_relays_that_cannot_be_made_safe_are_said_on_mqtt(tmp_path: Path, broker) -> None:
    node = Node(load_config(mqtt_config(tmp_path, broker, discovery=False)))
    assert node.relays is not None

    async def stuck() -> None:
        raise OSError("relay board not answering")

    async with Watcher(broker) as watcher:
        task = asyncio.create_task(node.run())
        await asyncio.wait_for(node.started.wait(), 10)
        await watcher.wait("daisee/m1/status", lambda p: p == b"online")
        node.relays.all_safe = stuck  # type: ignore[method-assign]
        node.request_stop()
        assert await asyncio.wait_for(task, 10) == 3
        problem = await watcher.wait("daisee/m1/problem", lambda p: p != b"")
        assert b"relays not in their safe state" in problem and b"not answering" in problem

    # A node that starts again, relays in hand, clears it.
    node = Node(load_config(mqtt_config(tmp_path, broker, discovery=False)))
    async with Watcher(broker) as watcher:
        task = asyncio.create_task(node.run())
        await asyncio.wait_for(node.started.wait(), 10)
        await watcher.wait("daisee/m1/status", lambda p: p == b"online")
        await watcher.wait("daisee/m1/problem", lambda p: p == b"")
        node.request_stop()
        assert await asyncio.wait_for(task, 10) == 0


async def test_after_a_stop_the_relay_attributes_say_safe_state_not_a_rule(tmp_path, broker):
    rule = {
        "name": "always",
        "when": "pv.power_w > -1000000",
        "then": {"relay": "heater", "state": "on"},
        "otherwise": {"relay": "heater", "state": "off"},
    }
    node, task = await start(mqtt_config(tmp_path, broker, rules=[rule]))
    base = "daisee/m1"
    async with Watcher(broker) as w:
        await w.wait(f"{base}/relay/heater", lambda p: p == b"ON")
        attributes = json.loads(await w.wait(f"{base}/relay/heater/attributes"))
        assert attributes["mode"] == "auto" and "always" in attributes["reason"]
    assert node.mqtt is not None
    for i in range(30_000):
        # a backlog the goodbye cannot send in its time: the final relay states go first
        node.mqtt.link.publish(f"{base}/backlog/{i}", "x" * 200, retain=True)
    assert await stop(node, task) == 0
    async with Watcher(broker) as w:
        assert await w.wait(f"{base}/status") == b"offline"
        assert await w.wait(f"{base}/relay/heater") == b"OFF"
        attributes = json.loads(await w.wait(f"{base}/relay/heater/attributes"))
        assert attributes["reason"] == "safe state"
        assert attributes["mode"] == "auto" and attributes["override_ends"] is None


def energy_meter_sensor(port: int) -> dict[str, Any]:
    """A Modbus meter whose import counter is a uint32 of tenths of Wh."""
    return {
        "name": "grid",
        "kind": "modbus",
        "model": "custom",
        "transport": "tcp",
        "host": "127.0.0.1",
        "port": port,
        "unit": 1,
        "interval_s": 0.1,
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


def set_tenths(meter: Any, tenths: int) -> None:
    import struct

    hi, lo = struct.unpack(">HH", struct.pack(">I", tenths))
    meter.holding = {0: hi, 1: lo}


async def test_a_meter_counter_is_exact_and_a_failed_read_keeps_the_last_good_value(
    tmp_path, broker
):
    from tests.conftest import free_port
    from tests.support.meters import EmulatedMeter, MeterServer

    meter = EmulatedMeter(1, {}, {})
    set_tenths(meter, 12_345_678)  # 1,234,567.8 Wh
    server = MeterServer([meter], port=free_port())
    await server.start()
    topic = "daisee/m1/reading/grid.import_wh"
    sensors = [energy_meter_sensor(server.port)]
    path = mqtt_config(tmp_path, broker, sensors=sensors, time_speed=None)
    node, task = await start(path)
    try:
        async with Watcher(broker) as w:
            assert float(await w.wait(topic)) == 1_234_567.8
            await server.stop()
            assert node.mqtt is not None
            # the failed reads reached the MQTT face, which sent nothing for them
            await until(lambda: node.latest["grid.import_wh"].quality != 0)
            failed = node.latest["grid.import_wh"].t_ms
            await until(lambda: node.mqtt._sent_readings["grid.import_wh"][0] >= failed)
            assert w.seen[topic] == b"1234567.8"
            set_tenths(meter, 12_345_679)
            await server.start()
            assert await w.wait(topic, lambda p: p == b"1234567.9") == b"1234567.9"
    finally:
        await stop(node, task)
        await server.stop()


async def test_a_removed_sensor_or_rule_takes_its_retained_state_with_it(tmp_path, broker):
    rule = {
        "name": "never",
        "when": "load.power_w < -1000000",
        "then": {"relay": "heater", "state": "on"},
        "otherwise": {"relay": "heater", "state": "off"},
    }
    node, task = await start(mqtt_config(tmp_path, broker, rules=[rule]))
    base = "daisee/m1"
    async with Watcher(broker) as w:
        await w.wait(f"{base}/reading/pv.power_w")
        await w.wait(f"{base}/rule/never")
        await w.wait("homeassistant/binary_sensor/daisee_m1/rule_never/config")
    await stop(node, task)

    without_pv = [s for s in sim_sensors(1.0) if s["name"] != "pv"]
    node, task = await start(mqtt_config(tmp_path, broker, sensors=without_pv))
    async with Watcher(broker) as w:
        await w.wait("homeassistant/sensor/daisee_m1/grid_power_w/config")
        for topic in (
            f"{base}/reading/pv.power_w",
            f"{base}/rule/never",
            "homeassistant/binary_sensor/daisee_m1/rule_never/config",
            "homeassistant/sensor/daisee_m1/rule_never_reason/config",
        ):
            assert await w.wait(topic, lambda p: p == b"") == b"", topic
        # the stored reading of the removed sensor is never sent again (not after a reconnect)
        assert node.mqtt is not None and "pv.power_w" in node.latest
        node.mqtt._sent_readings.clear()
        await node.mqtt.publish_state()
        assert "pv.power_w" not in node.mqtt._sent_readings
        assert "grid.power_w" in node.mqtt._sent_readings
        # what stays keeps its state
        assert float(await w.wait(f"{base}/reading/grid.power_w")) == pytest.approx(
            float(w.seen[f"{base}/reading/grid.power_w"])
        )
    await stop(node, task)


NEVER = {
    "name": "never",
    "when": "load.power_w < -1000000",
    "then": {"relay": "heater", "state": "on"},
    "otherwise": {"relay": "heater", "state": "off"},
}


async def test_an_override_duration_set_over_mqtt_makes_on_and_off_expire(tmp_path, broker):
    node, task = await start(mqtt_config(tmp_path, broker, rules=[NEVER]))
    base = "daisee/m1"
    async with Watcher(broker) as w:
        await w.wait(f"{base}/status", lambda p: p == b"online")
        await publish_as(broker, "ha", f"{base}/relay/heater/set", '{"override_duration_s": 1}')
        attrs = await w.wait(
            f"{base}/relay/heater/attributes",
            lambda p: json.loads(p)["override_duration_s"] == 1,
        )
        assert json.loads(attrs)["override_ends"] is None
        await publish_as(broker, "ha", f"{base}/relay/heater/set", "ON")
        on = json.loads(
            await w.wait(f"{base}/relay/heater/attributes", lambda p: json.loads(p)["mode"] == "on")
        )
        assert on["override_ends"] is not None
        # a second later the rules have the relay again
        back = await w.wait(
            f"{base}/relay/heater/attributes", lambda p: json.loads(p)["mode"] == "auto", timeout=5
        )
        assert json.loads(back)["override_ends"] is None
        assert await w.wait(f"{base}/relay/heater", lambda p: p == b"OFF") == b"OFF"
    await stop(node, task)
    # the duration is kept across a restart
    node, task = await start(mqtt_config(tmp_path, broker))
    async with Watcher(broker) as w:
        attrs = await w.wait(
            f"{base}/relay/heater/attributes",
            lambda p: json.loads(p)["override_duration_s"] == 1,
        )
        assert json.loads(attrs)["override_duration_s"] == 1
    await stop(node, task)
