"""The node's connection to its MQTT broker: reconnects, republishes, dispatches messages.

Publishing never blocks the node: messages wait in a bounded queue while the broker is away.
Retained state is not queued at all; whoever owns it re-publishes it after every (re)connect
through an `on_connect` hook, so the broker always ends up with the newest state.
"""

from __future__ import annotations

import asyncio
import random
import ssl
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiomqtt

from daisee_node.logs import get_logger
from daisee_node.mqtt.settings import MqttSection

Handler = Callable[[str, bytes], Awaitable[None] | None]
QUEUE_MAX = 10_000
STATUS_ONLINE, STATUS_OFFLINE = "online", "offline"


@dataclass
class Outgoing:
    """One message waiting to be sent."""

    topic: str
    payload: bytes | str
    qos: int
    retain: bool


class MqttLink:
    """A long-lived connection: `run()` as a task; `publish`, `subscribe` from anywhere.

    A clean stop publishes `offline` itself (NodeMqtt.goodbye) before the task is cancelled;
    otherwise the broker sends the last will."""

    def __init__(self, settings: MqttSection, node_id: str, password: str | None = None) -> None:
        self.settings = settings
        self.node_id = node_id
        self.base = f"{settings.base_topic}/{node_id}"
        self.status_topic = f"{self.base}/status"
        self._password = password
        self._queue: deque[Outgoing] = deque(maxlen=QUEUE_MAX)
        self._wake = asyncio.Event()
        self._subscriptions: dict[str, tuple[int, Handler]] = {}
        self._client: aiomqtt.Client | None = None
        #: awaited after every (re)connect, before queued messages go out
        self.on_connect: list[Callable[[], Awaitable[None]]] = []
        self.connected = asyncio.Event()
        self.connects = 0
        self.dropped = 0
        self.log = get_logger("mqtt")

    # -- API -----------------------------------------------------------------------------------

    def publish(
        self, topic: str, payload: bytes | str, *, qos: int = 0, retain: bool = False
    ) -> None:
        """Queue a message (the oldest is dropped, and counted, when the queue is full)."""
        if len(self._queue) == self._queue.maxlen:
            self.dropped += 1
        self._queue.append(Outgoing(topic, payload, qos, retain))
        self._wake.set()

    async def publish_now(
        self, topic: str, payload: bytes | str, *, qos: int = 0, retain: bool = False
    ) -> None:
        """Send at once when connected (used by `on_connect` hooks); queue otherwise."""
        client = self._client
        if client is None:
            self.publish(topic, payload, qos=qos, retain=retain)
            return
        await client.publish(topic, payload, qos=qos, retain=retain)

    async def drain(self, timeout_s: float) -> None:
        """Wait (at most `timeout_s`) until the queue is sent."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while self._queue and self.connected.is_set():
            if asyncio.get_running_loop().time() >= deadline:
                return
            await asyncio.sleep(0.01)

    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1) -> None:
        """Call `handler(topic, payload)` for every message on `topic_filter`, across reconnects."""
        self._subscriptions[topic_filter] = (qos, handler)

    # -- connection loop -------------------------------------------------------------------------

    def _client_options(self) -> dict[str, Any]:
        s = self.settings
        options: dict[str, Any] = {
            "hostname": s.host,
            "port": s.port,
            "username": s.username,
            "password": self._password,
            "identifier": s.client_id or f"daisee-{self.node_id}",
            "keepalive": s.keepalive_s,
            "clean_session": False,  # the broker keeps our subscriptions' messages while away
            "will": aiomqtt.Will(self.status_topic, STATUS_OFFLINE, qos=1, retain=True),
            "timeout": 10,
        }
        if s.tls:
            context = ssl.create_default_context(cafile=str(s.ca_file) if s.ca_file else None)
            options["tls_context"] = context
        return options

    async def run(self) -> None:
        """Stay connected until cancelled."""
        failures = 0
        while True:
            delay = 1.0
            try:
                async with aiomqtt.Client(**self._client_options()) as client:
                    self._client = client
                    failures = 0
                    await self._connected(client)
                    async with asyncio.TaskGroup() as tg:
                        tg.create_task(self._sender(client), name="mqtt.sender")
                        tg.create_task(self._receiver(client), name="mqtt.receiver")
            except (aiomqtt.MqttError, OSError, ExceptionGroup) as exc:
                failures += 1
                delay = min(self.settings.reconnect_max_s, 0.5 * 2 ** min(failures, 10))
                delay *= random.uniform(0.5, 1.0)
                log = self.log.bind(
                    broker=f"{self.settings.host}:{self.settings.port}",
                    retry_in_s=round(delay, 2),
                    error=_reason(exc),
                )
                if failures == 1:
                    log.warning("MQTT broker unavailable; readings and rules carry on")
                else:
                    log.debug("MQTT broker still unavailable")
            finally:
                self._client = None
                self.connected.clear()
            await asyncio.sleep(delay)

    async def _connected(self, client: aiomqtt.Client) -> None:
        self.connects += 1
        for topic_filter, (qos, _) in self._subscriptions.items():
            await client.subscribe(topic_filter, qos=qos)
        await client.publish(self.status_topic, STATUS_ONLINE, qos=1, retain=True)
        for hook in self.on_connect:
            await hook()
        self.connected.set()
        self.log.info(
            "MQTT connected",
            broker=f"{self.settings.host}:{self.settings.port}",
            connects=self.connects,
        )

    async def _sender(self, client: aiomqtt.Client) -> None:
        while True:
            while self._queue:
                msg = self._queue[0]
                await client.publish(msg.topic, msg.payload, qos=msg.qos, retain=msg.retain)
                self._queue.popleft()  # only once sent: a lost connection keeps it queued
            self._wake.clear()
            await self._wake.wait()

    async def _receiver(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            topic = message.topic.value
            payload = (
                message.payload
                if isinstance(message.payload, bytes)
                else (str(message.payload).encode())
            )
            for topic_filter, (_, handler) in list(self._subscriptions.items()):
                if message.topic.matches(topic_filter):
                    try:
                        result = handler(topic, payload)
                        if asyncio.iscoroutine(result):
                            await result
                    except Exception:
                        self.log.exception("MQTT message handler failed", topic=topic)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ExceptionGroup):
        return "; ".join(_reason(e) for e in exc.exceptions)
    return str(exc) or exc.__class__.__name__
