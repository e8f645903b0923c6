"""What the node says over MQTT, and the commands it takes.

Topics under `<base_topic>/<node id>/`: `status` (retained online/offline, the last will),
`reading/<channel>` (retained exact decimal number, at most every `reading_interval_s`; a failed
read publishes nothing, so the last good value stays and Home Assistant's `expire_after` shows
the entity unavailable), `relay/<name>` (retained ON/OFF) with `relay/<name>/attributes` (mode,
reason, override duration and end), `relay/<name>/set` (commands), `rule/<name>`, `ledger` and
`market` (retained JSON; `market` on nodes with a `[market]`: the active order, its delivered and
remaining Wh), `commitment` (signed commitments for relays), `peer` (signed readings for the
neighbours that declare this node a peer: see `daisee_node.peers`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Protocol

from daisee_node import safejson
from daisee_node.errors import DaiseeError
from daisee_node.logs import get_logger
from daisee_node.market_line import TOPIC as LINE_TOPIC
from daisee_node.mqtt import discovery
from daisee_node.mqtt.link import OUTAGES, TIMEOUT_OR_OUTAGE, MqttLink
from daisee_node.mqtt.settings import MqttSection
from daisee_node.readings import Channel, Reading
from daisee_node.secretfiles import read_secret

if TYPE_CHECKING:
    from daisee_node.ledger.commitment import Commitment
    from daisee_node.peers import PeerExchange, PeerPublisher

DISCOVERY_META_KEY = "mqtt_discovery_topics"
#: relay → seconds an ON / OFF without an expiry lasts (set from Home Assistant; 0: until AUTO)
DURATION_META_KEY = "mqtt_override_duration_s"
MODES = {"ON": "on", "OFF": "off", "AUTO": "auto"}
LEDGER_EVERY_S = 5.0
#: in every ledger state (other numbers are announced once the ledger reports them)
LEDGER_KEYS = ("backlog", "sealed_seq", "confirmed_seq")
#: a command is a few words; anything longer is refused before it is parsed
MAX_COMMAND_BYTES = 256
MAX_EXPIRES_S = 7 * 86_400.0
JSON_KEYS = frozenset({"state", "expires_s", "override_duration_s"})
#: the whole goodbye (final state, `offline`, DISCONNECT); the daemon allows it 1 s
GOODBYE_S = 0.9
#: how often retained state is looked at and sent
STATE_LOOP_S = 0.5
#: at most one warning line per kind this often; the lines between are counted in the next one
QUIET_S = 10.0


class CommandError(DaiseeError):
    """A relay command the node refuses (malformed, out of range, or for no such relay)."""


@dataclass(frozen=True)
class Command:
    """A parsed relay command: a mode (`on`, `off`, `auto`) with an optional expiry, and/or a
    new override duration (what later ON / OFF without an expiry last; 0: until AUTO)."""

    mode: str | None
    expires_s: float | None = None
    duration_s: float | None = None


def parse_command(payload: bytes) -> Command:
    """`ON`, `OFF`, `AUTO`, optionally followed by an expiry in seconds (`ON 600`), or JSON
    `{"state": "ON", "expires_s": 600}`, or `{"override_duration_s": 1800}` (with or without a
    state). Raises CommandError.

    Strict: at most MAX_COMMAND_BYTES of UTF-8; JSON is one flat object with only those keys;
    `expires_s` a finite number of seconds in (0, 7 days] (not a boolean, list or object);
    `override_duration_s` the same, or 0."""
    if len(payload) > MAX_COMMAND_BYTES:
        raise CommandError(f"command too long: {len(payload)} bytes (at most {MAX_COMMAND_BYTES})")
    try:
        text = payload.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise CommandError("command is not UTF-8 text") from None
    state: object
    expires: object
    duration: float | None = None
    if text.startswith("{"):
        state, expires, raw_duration = _json_command(text)
        if raw_duration is not None:
            duration = 0.0 if _is_zero(raw_duration) else _expiry(raw_duration, from_text=False)
        if state is None and duration is not None:
            if expires is not None:
                raise CommandError("expires_s needs a state")
            return Command(None, None, duration)
    else:
        parts = text.split()
        if not parts or len(parts) > 2:
            raise CommandError(f"not a command: {text[:60]!r}")
        state = parts[0]
        expires = parts[1] if len(parts) == 2 else None
    mode = MODES.get(state.upper()) if isinstance(state, str) else None
    if mode is None:
        raise CommandError(f"unknown state {str(state)[:30]!r}: use ON, OFF or AUTO")
    return Command(mode, _expiry(expires, from_text=not text.startswith("{")), duration)


def _is_zero(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == 0


def _json_command(text: str) -> tuple[object, object, object]:
    try:
        data = safejson.loads(text)
    except (ValueError, RecursionError):
        raise CommandError(f"not a command: {text[:60]!r}") from None
    if not isinstance(data, dict):
        raise CommandError("a JSON command is an object")
    unknown = sorted(str(k)[:30] for k in data.keys() - JSON_KEYS)
    if unknown:
        raise CommandError(
            f"unknown key(s) {unknown}: use state, expires_s and override_duration_s"
        )
    return data.get("state"), data.get("expires_s"), data.get("override_duration_s")


def _expiry(value: object, *, from_text: bool) -> float | None:
    if value is None:
        return None
    if isinstance(value, str) and from_text:
        try:
            seconds = float(value)
        except ValueError:
            raise CommandError(f"expiry {value[:30]!r} is not a number of seconds") from None
    elif isinstance(value, int | float) and not isinstance(value, bool):
        try:
            seconds = float(value)
        except OverflowError:
            seconds = math.inf
    else:
        raise CommandError(f"expires_s must be a number of seconds, not {type(value).__name__}")
    if not (math.isfinite(seconds) and 0 < seconds <= MAX_EXPIRES_S):
        raise CommandError("expiry must be more than 0 s and at most 7 days")
    return seconds


def exact_number(value: float, resolution: float = 0.0) -> str:
    """A reading as a plain decimal, never an exponent. With a source `resolution` (a counter in
    tenths of Wh has 0.1), the digits that resolution has: `raw * 0.1` carries binary noise
    (`1234567.9000000001`) that is no part of the reading. Otherwise the shortest digits that
    parse back to the same float (`1234567.8`, `0.00001`, `1500`)."""
    decimals = _decimals(resolution)
    if decimals is not None and abs(value) * 10**decimals < 2**53:
        return f"{value:.{decimals}f}"
    if value == int(value) and abs(value) < 2**53:
        return str(int(value))
    return format(Decimal(repr(value)), "f")


def _decimals(resolution: float) -> int | None:
    """How many decimals write every multiple of `resolution` exactly (None: none do)."""
    if not (resolution > 0 and math.isfinite(resolution)):
        return None
    for decimals in range(10):
        scaled = resolution * 10**decimals
        if abs(scaled - round(scaled)) <= 1e-9 * scaled:
            return decimals
    return None


class TokenBucket:
    """`rate_per_s` tokens a second, at most `burst` saved up: `take()` says whether one is left."""

    def __init__(
        self, rate_per_s: float, burst: int, now: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate_per_s
        self.burst = float(burst)
        self._now = now
        self._tokens = float(burst)
        self._t = now()

    def take(self) -> bool:
        t = self._now()
        self._tokens = min(self.burst, self._tokens + (t - self._t) * self.rate)
        self._t = t
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


class QuietLog:
    """A warning that may come thousands of times a second (a flood of bad commands): the first
    is logged at once, then at most one line every `every_s`, saying how many were left out."""

    def __init__(self, log: Any, event: str, every_s: float = QUIET_S) -> None:
        self.log = log
        self.event = event
        self.every_s = every_s
        self._next = 0.0
        self._left_out = 0

    def __call__(self, **fields: Any) -> None:
        now = time.monotonic()
        if now < self._next:
            self._left_out += 1
            return
        if self._left_out:
            fields["left_out"] = self._left_out
        self.log.warning(self.event, **fields)
        self._left_out = 0
        self._next = now + self.every_s


class LedgerView(Protocol):
    """What MQTT uses of the ledger: its state, and commitments out (own) and in (peers')."""

    @property
    def relays_peers(self) -> bool:
        """Whether peers' commitments heard over MQTT are relayed to the chain."""

    async def state(self) -> dict[str, Any]: ...

    def on_sealed(self, callback: Callable[[Commitment, bytes], None]) -> None: ...

    async def accept_peer(self, commitment: Commitment, signature: bytes) -> bool: ...


class MarketView(Protocol):
    """What MQTT shows of the market (a node's view has it as `market` when it has one)."""

    def state(self) -> dict[str, Any]:
        """The retained `market` state: `order_active`, `active_order`, `delivered_wh`,
        `remaining_wh`, `orders`."""

    def line_messages(self) -> dict[int, str]:
        """LINE orders: this node's retained proofs by order id ("" clears one)."""

    def on_line_message(self, peer_id: str, order_id: int, payload: bytes) -> None:
        """A peer's proofs of a LINE order's readings (`market/line/<order>`)."""


class NodeView(Protocol):
    """Everything the MQTT face may read of the node or ask of it, and nothing more."""

    @property
    def node_id(self) -> str: ...

    @property
    def latest(self) -> Mapping[str, Reading]: ...

    @property
    def ledger(self) -> LedgerView | None: ...

    @property
    def started(self) -> bool: ...

    @property
    def safe_state_error(self) -> str | None: ...

    def channels(self) -> Sequence[Channel]: ...

    def channel_interval_s(self, channel: str) -> float | None:
        """Seconds between two readings of `channel`, when the node knows it."""

    def relay_names(self) -> Sequence[str]: ...

    def relay_states(self) -> dict[str, dict[str, Any]]:
        """Each relay's state, mode and reason; `override_ends` (Unix seconds) while an override
        with an expiry runs."""

    def rule_states(self) -> dict[str, dict[str, Any]] | None:
        """Each rule's snapshot with the reason it last failed; None when the node has none."""

    def override(self, relay: str, mode: str, expires_s: float | None, reason: str) -> None: ...

    def add_counter(self, name: str, delta: int) -> None: ...

    def get_meta(self, key: str) -> Awaitable[str | None]: ...

    def set_meta(self, key: str, value: str) -> Awaitable[None]: ...


class NodeMqtt:
    """The node's MQTT face: state out, commands in, discovery kept in step with the config."""

    def __init__(
        self, node: NodeView, settings: MqttSection, *, peers: PeerExchange | None = None
    ) -> None:
        self.node = node
        self.settings = settings
        password = None
        if settings.password_file is not None:
            password = read_secret(settings.password_file, "mqtt.password_file").strip()
        self.node_id = node.node_id
        self.link = MqttLink(settings, self.node_id, password, counter=node.add_counter)
        self.base = self.link.base
        self.log = get_logger("mqtt")
        self._sent_readings: dict[str, tuple[int, float]] = {}  # channel → (t_ms, monotonic)
        self._sent_json: dict[str, str] = {}
        self._announced: tuple[Any, ...] | None = None  # entities announced this session
        #: the keys of the last ledger state sent (its entities follow what the ledger reports)
        self._ledger_keys: tuple[str, ...] | None = None
        #: relay → seconds an ON / OFF without an expiry lasts (0: until AUTO); None: not loaded
        self._durations: dict[str, float] | None = None
        self._ledger_due = 0.0
        self.commands_applied = 0
        self.commands_refused = 0
        self.commands_dropped = 0
        self._buckets: dict[str, TokenBucket] = {}
        self._warn_refused = QuietLog(self.log, "MQTT command refused")
        self._warn_dropped = QuietLog(self.log, "MQTT commands over the rate limit dropped")
        self.link.on_connect.append(self._on_connect)
        self.link.subscribe(f"{self.base}/relay/+/set", self._on_command)
        ledger = node.ledger
        if ledger is not None:
            if settings.share_commitments:
                ledger.on_sealed(self._share_commitment)
            if ledger.relays_peers:
                self.link.subscribe(f"{settings.base_topic}/+/commitment", self._on_peer_commitment)
        if self._market() is not None:
            self.link.subscribe(f"{settings.base_topic}/+/{LINE_TOPIC}/+", self._on_line_message)
        #: signs and sends this node's readings for its peers (None: no peers, or no key)
        self.peer_publisher: PeerPublisher | None = None
        if peers is not None:
            self._wire_peers(peers)

    # -- tasks ---------------------------------------------------------------------------------

    async def run(self) -> None:
        """The link and the state publisher, until the link stops (`goodbye`) or cancellation.

        A broker outage never ends it; a bug does (raised for the daemon's supervisor)."""
        if self._durations is None:
            self._durations = await self._load_durations()
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.link.run(), name="mqtt.link")
                tg.create_task(self._state_loop(), name="mqtt.state")
                if self.peer_publisher is not None:
                    tg.create_task(self.peer_publisher.run(), name="mqtt.peers")
        except Exception:
            if self.link.stopping:
                # Cancelled on the way out as a child failed: a TaskGroup then raises the
                # failure, not the cancellation; a restart now would hold the stop back.
                self.log.exception("MQTT failed while stopping")
                raise asyncio.CancelledError from None
            raise

    async def goodbye(self, timeout_s: float = GOODBYE_S) -> None:
        """On a clean stop: the final states (relays safe), then `offline`, then DISCONNECT.

        Bounded by `timeout_s` whatever the broker does, and never raises: the node's stop goes
        on without it (the broker's last will says `offline` then)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        try:
            async with asyncio.timeout(timeout_s * 0.6):  # the rest is for disconnecting
                if self.link.connected.is_set():
                    # The relays' safe states first: a backlog queued before them might not
                    # all go out in time, and their last retained word must not be a rule's.
                    for suffix, payload in self._relay_messages():
                        self._sent_json[suffix] = payload
                        await self.link.publish_now(
                            f"{self.base}/{suffix}", payload, qos=1, retain=True
                        )
                    await self.publish_state(quick=True)
                    unsafe = self.node.safe_state_error
                    if unsafe:
                        # The house must hear it: relays that could not be made safe.
                        await self.link.publish_now(
                            self.problem_topic,
                            f"relays not in their safe state: {unsafe}",
                            qos=1,
                            retain=True,
                        )
                    await self.link.drain(timeout_s * 0.3)
                    await self.link.publish_now(
                        self.link.status_topic, "offline", qos=1, retain=True
                    )
        except TIMEOUT_OR_OUTAGE as exc:
            self.log.warning("MQTT goodbye not sent; the last will says offline", error=repr(exc))
        except Exception:
            self.log.exception("MQTT goodbye failed")
        await self.link.stop(max(0.05, deadline - loop.time()))

    @property
    def problem_topic(self) -> str:
        """Retained: what keeps the node from being safe (empty while nothing does)."""
        return f"{self.base}/problem"

    async def _on_connect(self) -> None:
        # A running node has its relays under control: clear a problem an earlier stop left.
        await self.link.publish_now(self.problem_topic, "", qos=1, retain=True)
        # A new session: the broker may have lost retained state; send all of it again.
        self._sent_readings.clear()
        self._sent_json.clear()
        self._announced = None
        self._ledger_due = 0.0
        await self.publish_state()

    async def _state_loop(self) -> None:
        while not self.link.stopping:
            await asyncio.sleep(STATE_LOOP_S)
            if self.link.connected.is_set() and not self.link.stopping:
                # The connection may go meanwhile: the link reconnects, and then all is re-sent.
                with contextlib.suppress(*OUTAGES):
                    await self.publish_state()

    # -- state ---------------------------------------------------------------------------------

    async def publish_state(self, *, quick: bool = False) -> None:
        """Whatever changed since it was last sent (retained state is re-sent on connect).

        `quick`: readings, relays and rules only (no database query, no discovery)."""
        now = time.monotonic()
        every = self.settings.reading_interval_s
        resolution = {c.name: c.resolution for c in self.node.channels()}
        for name, reading in list(self.node.latest.items()):
            sent = self._sent_readings.get(name)
            if sent is not None and (sent[0] == reading.t_ms or now - sent[1] < every):
                continue
            if name not in resolution:
                continue  # stored before a restart by a sensor since removed: cleared, not sent
            self._sent_readings[name] = (reading.t_ms, now)
            if reading.quality != 0 or not math.isfinite(reading.value):
                # Nothing is sent: the broker keeps the last good value, and Home Assistant
                # shows the entity unavailable once `expire_after` passes without a reading.
                continue
            text = exact_number(reading.value, resolution.get(name, 0.0))
            self.link.publish(f"{self.base}/reading/{name}", text, retain=True)
        for suffix, payload in self._relay_messages():
            self._publish_if_changed(suffix, payload)
        for name, snap in (self.node.rule_states() or {}).items():
            self._publish_if_changed(f"rule/{name}", json.dumps(snap, sort_keys=True))
        market = self._market()
        if market is not None and self.node.started:
            self._publish_if_changed("market", json.dumps(market.state(), sort_keys=True))
            for order_id, text in market.line_messages().items():
                self._publish_if_changed(f"{LINE_TOPIC}/{order_id}", text)
        if quick:
            return
        if self.node.ledger is not None and self.node.started and now >= self._ledger_due:
            # A database query: a few seconds' delay is fine for a 15-minute ledger.
            self._ledger_due = now + LEDGER_EVERY_S
            state = await self.node.ledger.state()
            # Sticky: an entity must not come and go with a value that is missing for a while.
            reported = {k for k, v in state.items() if v is not None}
            self._ledger_keys = tuple(sorted(reported.union(self._ledger_keys or ())))
            self._publish_if_changed("ledger", json.dumps(state, sort_keys=True))
        ledger_unread = self.node.ledger is not None and self._ledger_keys is None
        if self.settings.discovery and self.link.connected.is_set() and not ledger_unread:
            entities = self._entity_key()
            if entities != self._announced:  # after a connect, or a reload changed them
                await self._discovery()
                self._announced = entities

    def _relay_messages(self) -> list[tuple[str, str]]:
        """(topic suffix, payload) of each relay's state and attributes."""
        durations = self._durations or {}
        out = []
        for name, snap in self.node.relay_states().items():
            out.append((f"relay/{name}", snap["state"].upper()))
            attributes = dict(snap)
            ends = attributes.pop("override_ends", None)
            attributes["override_ends"] = _iso(ends) if ends is not None else None
            attributes["override_duration_s"] = durations.get(name, 0)
            out.append((f"relay/{name}/attributes", json.dumps(attributes)))
        return out

    def _publish_if_changed(self, suffix: str, payload: str) -> None:
        if self._sent_json.get(suffix) == payload:
            return
        self._sent_json[suffix] = payload
        self.link.publish(f"{self.base}/{suffix}", payload, qos=1, retain=True)

    # -- Home Assistant discovery ----------------------------------------------------------------

    def _entity_key(self) -> tuple[Any, ...]:
        channels = tuple(
            (c.name, c.unit, c.state_class, self.node.channel_interval_s(c.name))
            for c in self.node.channels()
        )
        rules = tuple(self.node.rule_states() or ())
        return channels, tuple(self.node.relay_names()), rules, self._ledger_keys, self._market()

    def _market(self) -> MarketView | None:
        # Optional on a view: nodes (and views) without a market need not name it.
        return getattr(self.node, "market", None)

    def _publish_every_s(self, channel: str) -> float:
        """How often a good reading of `channel` reaches the broker, at the slowest."""
        interval = self.node.channel_interval_s(channel)
        # unknown: a source that reports now and then (Home Assistant must not expire it soon)
        sampled = interval if interval is not None else 60.0
        return max(sampled, self.settings.reading_interval_s) + STATE_LOOP_S

    def discovery_entities(self) -> list[discovery.Entity]:
        """Every entity the node should have in Home Assistant."""
        ledger_keys: tuple[str, ...] | None = None
        if self.node.ledger is not None:
            # the numbers every ledger state has, and those it has reported so far
            ledger_keys = (*LEDGER_KEYS, *(self._ledger_keys or ()))
        return discovery.entities(
            self.settings.discovery_prefix,
            self.node_id,
            self.base,
            [(c, self._publish_every_s(c.name)) for c in self.node.channels()],
            self.node.relay_names(),
            list(self.node.rule_states() or ()),
            ledger_keys,
            market=self._market() is not None,
        )

    def discovery_messages(self) -> dict[str, str]:
        """Every discovery config topic the node should have, with its payload."""
        return {e.topic: json.dumps(e.config) for e in self.discovery_entities()}

    async def _discovery(self) -> None:
        wanted = {e.topic: e for e in self.discovery_entities()}
        announced = _announced_topics(await self.node.get_meta(DISCOVERY_META_KEY))
        for topic, entity in wanted.items():
            payload = json.dumps(entity.config)
            if self._sent_json.get(topic) != payload:
                self._sent_json[topic] = payload
                self.link.publish(topic, payload, qos=1, retain=True)
        gone = sorted(set(announced) - set(wanted))
        kept_state = {t for e in wanted.values() for t in e.state_topics}
        for topic in gone:
            # An empty retained config removes the entity from Home Assistant; its retained
            # state goes with it, or a later subscriber would still see the last reading.
            self.link.publish(topic, b"", qos=1, retain=True)
            self._sent_json.pop(topic, None)
            for state_topic in announced[topic]:
                if state_topic not in kept_state:
                    self.link.publish(state_topic, b"", qos=1, retain=True)
                    self._sent_json.pop(state_topic[len(self.base) + 1 :], None)
        record = {t: list(e.state_topics) for t, e in wanted.items()}
        if gone or record != announced:
            await self.node.set_meta(DISCOVERY_META_KEY, json.dumps(record, sort_keys=True))
            if gone:
                self.log.info("Home Assistant entities removed", topics=gone)

    # -- override durations --------------------------------------------------------------------

    async def _load_durations(self) -> dict[str, float]:
        try:
            raw = safejson.loads(await self.node.get_meta(DURATION_META_KEY) or "{}")
        except ValueError:
            raw = {}
        if not isinstance(raw, dict):
            return {}
        return {
            str(k): float(v)
            for k, v in raw.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v <= MAX_EXPIRES_S
        }

    async def _set_duration(self, relay: str, seconds: float) -> None:
        durations = self._durations if self._durations is not None else {}
        self._durations = durations
        if seconds:
            durations[relay] = seconds
        else:
            durations.pop(relay, None)
        await self.node.set_meta(DURATION_META_KEY, json.dumps(durations, sort_keys=True))

    # -- commands ------------------------------------------------------------------------------

    async def _on_command(self, topic: str, payload: bytes) -> None:
        """A relay command: parsed strictly, rate limited per relay, then applied.

        ON / OFF without an expiry last the relay's override duration, when one is set.
        Every command ends counted: `mqtt.commands_applied`, `_refused` (malformed, unknown relay,
        or refused by the node) or `_dropped` (over the relay's rate)."""
        relay = topic[len(self.base) + len("/relay/") : -len("/set")]
        try:
            if relay not in self.node.relay_names():
                raise CommandError(f"no relay named {relay[:40]!r}")
            command = parse_command(payload)
        except CommandError as exc:
            self._refuse(topic, exc)
            return
        bucket = self._buckets.get(relay)
        if bucket is None:
            bucket = TokenBucket(self.settings.commands_per_s, self.settings.command_burst)
            self._buckets[relay] = bucket
        if not bucket.take():
            self.commands_dropped += 1
            self.node.add_counter("mqtt.commands_dropped", 1)
            self._warn_dropped(relay=relay, per_s=self.settings.commands_per_s)
            return
        if command.duration_s is not None:
            await self._set_duration(relay, command.duration_s)
        expires = command.expires_s
        if command.mode is not None:
            if expires is None and command.mode != "auto":
                expires = (self._durations or {}).get(relay) or None
            try:
                self.node.override(relay, command.mode, expires, reason="mqtt")
            except DaiseeError as exc:
                self._refuse(topic, exc)
                return
        self.commands_applied += 1
        self.node.add_counter("mqtt.commands_applied", 1)
        self.log.info(
            "MQTT command",
            relay=relay,
            mode=command.mode,
            expires_s=expires,
            override_duration_s=command.duration_s,
        )

    def _refuse(self, topic: str, exc: Exception) -> None:
        self.commands_refused += 1
        self.node.add_counter("mqtt.commands_refused", 1)
        self._warn_refused(topic=topic[:200], error=str(exc))

    # -- peers ---------------------------------------------------------------------------------

    def _wire_peers(self, peers: PeerExchange) -> None:
        from daisee_node.peers import TOPIC, PeerPublisher

        if peers.inbox is not None:
            for topic in peers.inbox.topics():
                self.link.subscribe(topic, peers.inbox.receive)
        if peers.unlock is None:
            return
        topic = f"{self.base}/{TOPIC}"
        self.peer_publisher = PeerPublisher(
            self.node_id,
            peers.unlock,
            self._own_readings,
            lambda payload: self.link.publish(topic, payload, qos=0),
            now_ms=peers.now_ms,
            interval_s=max(STATE_LOOP_S, self.settings.reading_interval_s),
            connected=self.link.connected.is_set,
            count=self.node.add_counter,
        )

    def _own_readings(self) -> dict[str, Reading]:
        """The newest reading of each of the node's own channels (never a peer's)."""
        latest = self.node.latest
        return {c.name: latest[c.name] for c in self.node.channels() if c.name in latest}

    # -- commitments -----------------------------------------------------------------------------

    def _share_commitment(self, commitment: Commitment, signature: bytes) -> None:
        from daisee_node.ledger.commitment import signed_to_json

        self.link.publish(f"{self.base}/commitment", signed_to_json(commitment, signature), qos=1)

    async def _on_line_message(self, topic: str, payload: bytes) -> None:
        market = self._market()
        # <base_topic>/<node id>/market/line/<order id>: the base topic may hold slashes
        node_id, _, order = topic[len(self.settings.base_topic) + 1 :].partition(f"/{LINE_TOPIC}/")
        if market is None or node_id == self.node_id or not order.isdigit():
            return
        market.on_line_message(node_id, int(order), payload)

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
            self.node.add_counter("ledger.peer_commitments", 1)


def _iso(unix_s: float) -> str:
    """Unix seconds as an ISO 8601 UTC time, to the second (what Home Assistant's timestamps
    take)."""
    from datetime import UTC, datetime

    return datetime.fromtimestamp(round(unix_s), UTC).isoformat()


def _announced_topics(raw: str | None) -> dict[str, list[str]]:
    """The discovery topics announced before, each with the retained state topics it owns (a
    list of topics alone, as earlier versions kept it, owns none)."""
    try:
        data = safejson.loads(raw or "{}")
    except ValueError:
        return {}
    if isinstance(data, list):
        return {str(t): [] for t in data}
    if isinstance(data, dict):
        return {str(t): [str(x) for x in v] if isinstance(v, list) else [] for t, v in data.items()}
    return {}
