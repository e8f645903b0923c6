"""The node's connection to its MQTT broker: reconnects, republishes, dispatches messages.

Publishing never blocks the node. Retained state is kept as the newest payload per topic and sent
before anything else, so a flood of events or commands never holds it back; other messages wait in
a bounded queue (oldest dropped, counted) while the broker is away. Whoever owns retained state also
re-publishes it after every (re)connect through an `on_connect` hook.

Errors: a broker or network failure (`aiomqtt.MqttError`, `OSError`: refused, reset, timed out, TLS)
is an outage, logged as a warning once and retried with a capped, jittered backoff. Anything else is
a bug: `run()` raises it, so the daemon's supervisor logs it with its traceback, counts it and
restarts the task; it is never mistaken for an outage.

Stopping is bounded whatever the broker does: `stop()` ends the reconnect loop and gives a graceful
DISCONNECT `CLOSE_S`; on cancellation, or when that runs out, the socket is abandoned (closed
without a word, the broker then sends the last will). Nothing awaited here outlives a cancellation.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiomqtt

from daisee_node.backoff import Backoff
from daisee_node.logs import get_logger
from daisee_node.mqtt.settings import MqttSection

Handler = Callable[[str, bytes], Awaitable[None] | None]
Counter = Callable[[str, int], None]
#: non-retained messages waiting for the broker
QUEUE_MAX = 10_000
#: received messages waiting for their handler; a flood beyond this is dropped and counted
INCOMING_MAX = 1_000
#: a graceful DISCONNECT gets this long before the socket is abandoned
CLOSE_S = 0.5
#: TCP/TLS connect: it runs in a thread that a stop cannot interrupt
CONNECT_TIMEOUT_S = 3.0
#: CONNACK, SUBACK, PUBACK
OPERATION_TIMEOUT_S = 10.0
STATUS_ONLINE, STATUS_OFFLINE = "online", "offline"
#: what counts as the broker or the network failing (TimeoutError and ssl.SSLError are OSErrors)
OUTAGES: tuple[type[Exception], ...] = (aiomqtt.MqttError, OSError)
#: a timeout or an outage: what may end a goodbye or a DISCONNECT without it being a bug
TIMEOUT_OR_OUTAGE: tuple[type[Exception], ...] = (TimeoutError, *OUTAGES)


@dataclass
class Outgoing:
    """One message waiting to be sent."""

    topic: str
    payload: bytes | str
    qos: int
    retain: bool


class _Stopped(Exception):
    """Raised inside a session to end it after `stop()`."""


class SafeClient(aiomqtt.Client):
    """aiomqtt's client, with its socket registrations made safe against a socket that closes first.

    paho asks for its socket to be watched from wherever it runs (the event loop, or the thread
    that connects); aiomqtt defers `add_reader`/`add_writer` with `call_soon_threadsafe`, by fd
    number. When the connection dies in between (a node resumed by SIGCONT long after its keepalive
    ran out pings the broker and reads its EOF in the same turn of the loop), the deferred
    `add_writer` ran on a closed fd: an unhandled `OSError: [Errno 9] Bad file descriptor` from the
    event loop, or, had the number been reused, a watch on somebody else's socket. Here a deferred
    registration only happens if the socket is still the client's live one. Incoming messages beyond
    the bounded queue are counted through `on_overflow` instead of logged one line each.
    """

    def __init__(
        self, *args: Any, on_overflow: Callable[[], None] | None = None, **kw: Any
    ) -> None:
        super().__init__(*args, **kw)
        self._on_overflow = on_overflow
        self._abandoned = False
        self._client.connect_timeout = CONNECT_TIMEOUT_S

    def _live(self, sock: Any, fd: int) -> bool:
        live = self._client.socket()
        return not self._abandoned and live is not None and live is sock and live.fileno() == fd

    def _on_socket_open(self, client: Any, userdata: Any, sock: Any) -> None:
        fd = sock.fileno()

        def readable() -> None:
            try:
                while True:
                    client.loop_read()
                    # loop_read() does not always consume what an SSL socket has decoded
                    pending = getattr(client.socket(), "pending", None)
                    if pending is not None and pending() > 0:
                        continue
                    break
            except Exception as exc:  # a broken connection: end the session with it
                if not self._disconnected.done():
                    self._disconnected.set_exception(exc)

        def register() -> None:
            if self._live(sock, fd):
                self._loop.add_reader(fd, readable)
                self._misc_task = self._loop.create_task(self._misc_loop())

        self._loop.call_soon_threadsafe(register)

    def _on_socket_register_write(self, client: Any, userdata: Any, sock: Any) -> None:
        fd = sock.fileno()

        def writable() -> None:
            try:
                client.loop_write()
            except Exception as exc:
                if not self._disconnected.done():
                    self._disconnected.set_exception(exc)

        def register() -> None:
            if self._live(sock, fd):
                self._loop.add_writer(fd, writable)

        self._loop.call_soon_threadsafe(register)

    def _on_socket_unregister_write(self, client: Any, userdata: Any, sock: Any) -> None:
        fd = sock.fileno()
        if fd >= 0:
            self._loop.remove_writer(fd)

    def _on_socket_close(self, client: Any, userdata: Any, sock: Any) -> None:
        fd = sock.fileno()
        if fd >= 0:
            self._loop.remove_reader(fd)
            self._loop.remove_writer(fd)
        if self._misc_task is not None and not self._misc_task.done():
            self._loop.call_soon_threadsafe(self._misc_task.cancel)

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        try:
            self._queue.put_nowait(aiomqtt.Message._from_paho_message(message))
        except asyncio.QueueFull:
            if self._on_overflow is not None:
                self._on_overflow()

    def abandon(self) -> None:
        """Close the socket now, without a DISCONNECT (the broker then publishes the last will).

        Synchronous: safe in a cancelled task, and idempotent."""
        self._abandoned = True
        with contextlib.suppress(Exception):
            self._client._sock_close()  # paho 2.x: unregisters from the loop, then closes
        if self._misc_task is not None and not self._misc_task.done():
            self._misc_task.cancel()
        if not self._disconnected.done():
            self._disconnected.set_result(None)  # wakes anything still waiting on the session
        for fut in (self._connected, self._disconnected):
            if fut.done() and not fut.cancelled():
                fut.exception()  # seen: no "exception was never retrieved" at garbage collection


class MqttLink:
    """A long-lived connection: `run()` as a task; `publish`, `subscribe` from anywhere.

    A clean stop publishes `offline` itself (NodeMqtt.goodbye) and calls `stop()`; otherwise the
    broker sends the last will."""

    def __init__(
        self,
        settings: MqttSection,
        node_id: str,
        password: str | None = None,
        *,
        counter: Counter | None = None,
    ) -> None:
        self.settings = settings
        self.node_id = node_id
        self.base = f"{settings.base_topic}/{node_id}"
        self.status_topic = f"{self.base}/status"
        self._password = password
        self._count = counter or (lambda name, n: None)
        #: newest payload of each retained topic not yet sent, oldest change first. An OrderedDict:
        #: taking the first entry of a plain dict whose front was deleted scans every deleted slot
        #: (11 µs a message with 20,000 waiting, quadratic in the backlog after an outage)
        self._retained: OrderedDict[str, Outgoing] = OrderedDict()
        self._events: deque[Outgoing] = deque(maxlen=QUEUE_MAX)
        self._wake = asyncio.Event()
        self._subscriptions: dict[str, tuple[int, Handler]] = {}
        self._client: SafeClient | None = None
        self._session_task: asyncio.Task[None] | None = None
        self._session_connected = False
        #: set when a session is cancelled: its socket is abandoned, no DISCONNECT awaited
        self._hurry = False
        self._stop = asyncio.Event()
        self._finished = asyncio.Event()
        self._finished.set()  # not running yet
        #: awaited after every (re)connect, before queued messages go out
        self.on_connect: list[Callable[[], Awaitable[None]]] = []
        self.connected = asyncio.Event()
        self.connects = 0
        self.dropped = 0
        self.incoming_dropped = 0
        self.log = get_logger("mqtt")

    # -- API -----------------------------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def publish(
        self, topic: str, payload: bytes | str, *, qos: int = 0, retain: bool = False
    ) -> None:
        """Queue a message. Retained: only the newest per topic is kept, and goes first.
        Otherwise the oldest waiting message is dropped, and counted, when the queue is full."""
        msg = Outgoing(topic, payload, qos, retain)
        if retain:
            self._retained[topic] = msg
            self._retained.move_to_end(topic)  # older changes go first
        else:
            if len(self._events) == self._events.maxlen:
                self.dropped += 1
                self._count("mqtt.outgoing_dropped", 1)
            self._events.append(msg)
        self._wake.set()

    async def publish_now(
        self, topic: str, payload: bytes | str, *, qos: int = 0, retain: bool = False
    ) -> None:
        """Send at once when connected (used by `on_connect` hooks); queue otherwise.

        A retained message sent now replaces an older one still queued for its topic (which
        would otherwise go out after it)."""
        client = self._client
        if client is None:
            self.publish(topic, payload, qos=qos, retain=retain)
            return
        if retain:
            self._retained.pop(topic, None)
        await client.publish(topic, payload, qos=qos, retain=retain)

    @property
    def pending(self) -> int:
        """Messages waiting to be sent."""
        return len(self._retained) + len(self._events)

    async def drain(self, timeout_s: float) -> None:
        """Wait (at most `timeout_s`) until everything queued is sent."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while self.pending and self.connected.is_set():
            if asyncio.get_running_loop().time() >= deadline:
                return
            await asyncio.sleep(0.01)

    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1) -> None:
        """Call `handler(topic, payload)` for every message on `topic_filter`, across reconnects."""
        self._subscriptions[topic_filter] = (qos, handler)

    async def stop(self, timeout_s: float = CLOSE_S) -> None:
        """No more reconnects; end the session within `timeout_s` (gracefully if it can)."""
        self._stop.set()
        session = self._session_task
        if session is not None and not session.done() and not self.connected.is_set():
            self._hurry = True
            session.cancel()  # still connecting: nothing to say goodbye on
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._finished.wait()

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
            "timeout": OPERATION_TIMEOUT_S,
            "max_queued_incoming_messages": INCOMING_MAX,
        }
        if s.tls:
            context = ssl.create_default_context(cafile=str(s.ca_file) if s.ca_file else None)
            options["tls_context"] = context
        return options

    async def run(self) -> None:
        """Stay connected until `stop()` or cancellation; raise only what is a bug."""
        self._finished.clear()
        self._hurry = False
        try:
            await self._reconnect_loop()
        finally:
            self._finished.set()

    async def _reconnect_loop(self) -> None:
        backoff = Backoff(1.0, self.settings.reconnect_max_s)
        while not self._stop.is_set():
            session = asyncio.create_task(self._session(), name="mqtt.session")
            session.add_done_callback(_retrieve)
            self._session_task = session
            try:
                await asyncio.wait({session})
            except asyncio.CancelledError:
                # The session abandons its socket on cancellation without awaiting anything.
                self._hurry = True
                session.cancel()
                raise
            if session.cancelled():
                if self._stop.is_set():
                    return
                raise asyncio.CancelledError
            exc = session.exception()
            if exc is None:  # ended by stop()
                return
            outage, bug = _split(exc)
            if bug is not None:
                raise bug
            if self._stop.is_set():
                return
            if self._session_connected:
                # it was up: this outage starts the backoff (and the warning) afresh
                backoff.reset()
            delay = backoff.next_delay()
            failures = backoff.failures
            log = self.log.bind(
                broker=f"{self.settings.host}:{self.settings.port}",
                retry_in_s=round(delay, 2),
                error=_reason(outage or exc),
            )
            if failures == 1:
                log.warning("MQTT broker unavailable; readings and rules carry on")
            else:
                log.debug("MQTT broker still unavailable")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._stop.wait()

    async def _session(self) -> None:
        self._session_connected = False
        client = SafeClient(**self._client_options(), on_overflow=self._incoming_overflow)
        try:
            await client.__aenter__()
        except BaseException:
            client.abandon()
            raise
        self._client = client
        try:
            await self._connected(client)
            self._session_connected = True
            try:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(self._sender(client), name="mqtt.sender")
                    tg.create_task(self._receiver(client), name="mqtt.receiver")
                    tg.create_task(self._until_stopped(), name="mqtt.stop")
            except* _Stopped:
                pass
        finally:
            self._client = None
            self.connected.clear()
            await self._close(client)

    async def _close(self, client: SafeClient) -> None:
        """Say DISCONNECT if there is time; abandon the socket in any case. Never raises but
        CancelledError: it runs in a `finally` and must not replace what is propagating."""
        try:
            if not self._hurry:
                async with asyncio.timeout(CLOSE_S):
                    await client.__aexit__(None, None, None)
        except TIMEOUT_OR_OUTAGE:
            pass
        except Exception:
            self.log.exception("MQTT client did not close cleanly")
        finally:
            client.abandon()

    async def _until_stopped(self) -> None:
        await self._stop.wait()
        raise _Stopped

    def _incoming_overflow(self) -> None:
        self.incoming_dropped += 1
        self._count("mqtt.incoming_dropped", 1)

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

    def _next(self) -> Outgoing | None:
        if self._retained:
            return next(iter(self._retained.values()))
        return self._events[0] if self._events else None

    def _sent(self, msg: Outgoing) -> None:
        # Removed only once sent (a lost connection keeps it), and only if nothing newer came.
        if msg.retain:
            if self._retained.get(msg.topic) is msg:
                del self._retained[msg.topic]
        elif self._events and self._events[0] is msg:
            self._events.popleft()

    async def _sender(self, client: aiomqtt.Client) -> None:
        while True:
            msg = self._next()
            if msg is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                await client.publish(msg.topic, msg.payload, qos=msg.qos, retain=msg.retain)
            except OUTAGES:
                raise  # kept: sent after the reconnect
            except Exception:
                self._sent(msg)  # a bug: dropped, or it would fail the same way after a restart
                raise
            self._sent(msg)
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # Python 3.11's asyncio.wait_for (inside aiomqtt's publish) drops a cancellation
                # that comes with the broker's acknowledgement: honour it here, or the sender
                # waits on `_wake` forever and the session never ends.
                raise asyncio.CancelledError

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
                        # A bug in one handler: logged with its traceback; the link carries on.
                        self._count("mqtt.handler_errors", 1)
                        self.log.exception("MQTT message handler failed", topic=topic)


def _split(exc: BaseException) -> tuple[BaseException | None, BaseException | None]:
    """(the outage part, the bug part) of what ended a session."""
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(OUTAGES)
    return (exc, None) if isinstance(exc, OUTAGES) else (None, exc)


def _retrieve(task: asyncio.Task[None]) -> None:
    # A session abandoned on cancellation may still end with an error nobody awaits.
    if not task.cancelled():
        task.exception()


def _reason(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_reason(e) for e in exc.exceptions)
    return str(exc) or exc.__class__.__name__
