"""What the node says over MQTT, and the commands it takes.

Topics under `<base_topic>/<node id>/`: `status` (retained online/offline, the last will),
`reading/<channel>` (retained number, at most every `reading_interval_s`), `relay/<name>`
(retained ON/OFF) with `relay/<name>/attributes` (mode, reason), `relay/<name>/set` (commands),
`rule/<name>` and `ledger` (retained JSON), `commitment` (signed commitments for relays).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import TYPE_CHECKING, Any

from daisee_node.errors import DaiseeError
from daisee_node.logs import get_logger
from daisee_node.mqtt import discovery
from daisee_node.mqtt.link import MqttLink
from daisee_node.mqtt.settings import MqttSection
from daisee_node.readings import Channel

if TYPE_CHECKING:
    from daisee_node.daemon import Node
    from daisee_node.ledger.commitment import Commitment

DISCOVERY_META_KEY = "mqtt_discovery_topics"
MODES = {"ON": "on", "OFF": "off", "AUTO": "auto"}
LEDGER_EVERY_S = 5.0


def parse_command(payload: bytes) -> tuple[str, float | None]:
    """`ON`, `OFF`, `AUTO`, optionally followed by an expiry in seconds (`ON 600`), or JSON
    `{"state": "ON", "expires_s": 600}`. Returns (mode, expires_s)."""
    text = payload.decode(errors="replace").strip()
    state: Any
    expires: Any = None
    if text.startswith("{"):
        try:
            data = json.loads(text)
            state, expires = data.get("state"), data.get("expires_s")
        except (ValueError, AttributeError) as exc:
            raise DaiseeError(f"not a command: {text[:60]!r}") from exc
    else:
        parts = text.split()
        if not parts or len(parts) > 2:
            raise DaiseeError(f"not a command: {text[:60]!r}")
        state = parts[0]
        expires = parts[1] if len(parts) == 2 else None
    mode = MODES.get(str(state).upper())
    if mode is None:
        raise DaiseeError(f"unknown state {state!r}: use ON, OFF or AUTO")
    if expires is not None:
        try:
            expires = float(expires)
        except ValueError as exc:
            raise DaiseeError(f"expiry {expires!r} is not a number of seconds") from exc
        if not 0 < expires <= 7 * 86_400:
            raise DaiseeError("expiry must be between 0 and 7 days")
    return mode, expires


class NodeMqtt:
    """The node's MQTT face: state out, commands in, discovery kept in step with the config."""

    def __init__(self, node: Node, settings: MqttSection) -> None:
        self.node = node
        self.settings = settings
        password = None
        if settings.password_file is not None:
            try:
                password = settings.password_file.read_text().strip()
            except OSError as exc:
                raise DaiseeError(
                    f"cannot read mqtt.password_file {settings.password_file}: {exc.strerror}"
                ) from None
        self.node_id = node.config.node.id
        self.link = MqttLink(settings, self.node_id, password)
        self.base = self.link.base
        self.log = get_logger("mqtt")
        self._sent_readings: dict[str, tuple[int, float]] = {}  # channel → (t_ms, monotonic)
        self._sent_json: dict[str, str] = {}
        self._announced: tuple[Any, ...] | None = None  # entities announced this session
        self._ledger_due = 0.0
        self.commands_applied = 0
        self.commands_refused = 0
        self.link.on_connect.append(self._on_connect)
        self.link.subscribe(f"{self.base}/relay/+/set", self._on_command)
        ledger = node.ledger
        if ledger is not None:
            if settings.share_commitments:
                ledger.on_sealed.append(self._share_commitment)
            if ledger.settings.relay_peers:
                self.link.subscribe(f"{settings.base_topic}/+/commitment", self._on_peer_commitment)

    # -- tasks ---------------------------------------------------------------------------------

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.link.run(), name="mqtt.link")
            tg.create_task(self._state_loop(), name="mqtt.state")

    async def goodbye(self) -> None:
        """On a clean stop: the final states (relays safe), then `offline`."""
        if self.link.connected.is_set():
            await self.publish_state()
            await self.link.drain(0.5)
            await self.link.publish_now(self.link.status_topic, "offline", qos=1, retain=True)

    async def _on_connect(self) -> None:
        # A new session: the broker may have lost retained state; send all of it again.
        self._sent_readings.clear()
        self._sent_json.clear()
        self._announced = None
        self._ledger_due = 0.0
        await self.publish_state()

    async def _state_loop(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            if self.link.connected.is_set():
                await self.publish_state()

    # -- state ---------------------------------------------------------------------------------

    async def publish_state(self) -> None:
        """Whatever changed since it was last sent (retained state is re-sent on connect)."""
        now = time.monotonic()
        every = self.settings.reading_interval_s
        for name, reading in list(self.node.latest.items()):
            sent = self._sent_readings.get(name)
            if sent is not None and (sent[0] == reading.t_ms or now - sent[1] < every):
                continue
            value = "" if reading.quality != 0 else f"{reading.value:.6g}"
            self.link.publish(f"{self.base}/reading/{name}", value, retain=True)
            self._sent_readings[name] = (reading.t_ms, now)
        if self.node.relays is not None:
            for name, snap in self.node.relays.snapshot().items():
                self._publish_if_changed(f"relay/{name}", snap["state"].upper())
                self._publish_if_changed(f"relay/{name}/attributes", json.dumps(snap))
        if self.node.rules is not None:
            for name, snap in self.node.rules.snapshot().items():
                self._publish_if_changed(f"rule/{name}", json.dumps(snap, sort_keys=True))
        if self.node.ledger is not None and self.node.started.is_set() and now >= self._ledger_due:
            # A database query: a few seconds' delay is fine for a 15-minute ledger.
            self._ledger_due = now + LEDGER_EVERY_S
            state = await self.node.ledger.state()
            self._publish_if_changed("ledger", json.dumps(state, sort_keys=True))
        if self.settings.discovery and self.link.connected.is_set():
            entities = self._entity_key()
            if entities != self._announced:  # after a connect, or a reload changed them
                await self._discovery()
                self._announced = entities

    def _publish_if_changed(self, suffix: str, payload: str) -> None:
        if self._sent_json.get(suffix) == payload:
            return
        self._sent_json[suffix] = payload
        self.link.publish(f"{self.base}/{suffix}", payload, qos=1, retain=True)

    # -- Home Assistant discovery ----------------------------------------------------------------

    def _entity_key(self) -> tuple[Any, ...]:
        relays = tuple(self.node.relays.relays) if self.node.relays is not None else ()
        return tuple((c.name, c.unit, c.state_class) for c in self._channels()), relays

    def _channels(self) -> list[Channel]:
        return [c for sensor in self.node.sensors.values() for c in sensor.channels]

    def discovery_messages(self) -> dict[str, str]:
        """Every discovery config topic the node should have, with its payload."""
        prefix = self.settings.discovery_prefix
        out = {}
        for channel in self._channels():
            topic = discovery.config_topic(prefix, "sensor", self.node_id, channel.name)
            out[topic] = json.dumps(discovery.sensor_config(self.node_id, self.base, channel))
        relays = self.node.relays.relays if self.node.relays is not None else {}
        for relay in relays:
            topic = discovery.config_topic(prefix, "switch", self.node_id, relay)
            out[topic] = json.dumps(discovery.switch_config(self.node_id, self.base, relay))
        return out

    async def _discovery(self) -> None:
        wanted = self.discovery_messages()
        announced = set(json.loads(await self.node.store.get_meta(DISCOVERY_META_KEY) or "[]"))
        for topic, payload in wanted.items():
            if self._sent_json.get(topic) != payload:
                self._sent_json[topic] = payload
                await self.link.publish_now(topic, payload, qos=1, retain=True)
        gone = announced - set(wanted)
        for topic in sorted(gone):
            # An empty retained config removes the entity from Home Assistant.
            await self.link.publish_now(topic, b"", qos=1, retain=True)
            self._sent_json.pop(topic, None)
        if gone or set(wanted) - announced:
            await self.node.store.set_meta(DISCOVERY_META_KEY, json.dumps(sorted(wanted)))
            if gone:
                self.log.info("Home Assistant entities removed", topics=sorted(gone))

    # -- commands ------------------------------------------------------------------------------

    def _on_command(self, topic: str, payload: bytes) -> None:
        relay = topic[len(self.base) + len("/relay/") : -len("/set")]
        try:
            mode, expires = parse_command(payload)
            self.node.override(relay, mode, expires, reason="mqtt")
        except (DaiseeError, KeyError, ValueError) as exc:
            self.commands_refused += 1
            self.node.store.add_counter("mqtt.commands_refused", 1)
            self.log.warning("MQTT command refused", topic=topic, error=str(exc))
            return
        self.commands_applied += 1
        self.node.store.add_counter("mqtt.commands_applied", 1)
        self.log.info("MQTT command", relay=relay, mode=mode, expires_s=expires)

    # -- commitments -----------------------------------------------------------------------------

    def _share_commitment(self, commitment: Commitment, signature: bytes) -> None:
        from daisee_node.ledger.commitment import signed_to_json

        self.link.publish(f"{self.base}/commitment", signed_to_json(commitment, signature), qos=1)

    async def _on_peer_commitment(self, topic: str, payload: bytes) -> None:
        from daisee_node.ledger.commitment import CommitmentError, signed_from_json

        if topic == f"{self.base}/commitment" or self.node.ledger is None:
            return
        try:
            commitment, signature = signed_from_json(payload)
        except CommitmentError as exc:
            self.log.warning("malformed peer commitment", topic=topic, error=str(exc))
            return
        if await self.node.ledger.accept_peer(commitment, signature):
            self.node.store.add_counter("ledger.peer_commitments", 1)
