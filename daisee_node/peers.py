"""Neighbours' readings as rule inputs: `peer.<node>.<sensor>.<quantity>`, heard over MQTT, signed.

Each node that declares `[[peers]]` and has a node key (the `[chain]` keystore) publishes, every
`mqtt.reading_interval_s` (at least every `STATE_LOOP_S`), one message on
`<base_topic>/<own id>/peer`:

    {"type": "daisee.peer.v1", "node": "b", "t_ms": 1767225600000,
     "readings": {"pv.power_w": [1767225599950, 1520.5], ...}, "sig": "0x…"}

`readings` holds its own channels' newest good readings, each with its own time; `t_ms` is the
sending time, strictly increasing from one message to the next (the replay counter: the wall clock
carries it across restarts). `sig` is an EIP-191 (`personal_sign`) signature by the node key over
the canonical JSON of every other key (sorted keys, no spaces, ASCII, no NaN: what
`json.dumps(..., sort_keys=True, separators=(",", ":"))` writes, and what parsing and writing
again gives back byte for byte). `type` keeps a peer message from ever being mistaken for any
other text the key signs. The message is sent with QoS 0 and not retained: peer data is only worth
having fresh; a retained copy would be handed to every new subscriber when it is already old, and
a lost message is replaced by the next one within an interval. Nothing is queued for a broker that
is away (a burst of old messages after a reconnect would only be stale).

A receiving node subscribes `<base_topic>/<peer id>/peer` for each declared peer and keeps a
message only if, in this order (cheap checks before the signature is recovered): it is at most
`MAX_MESSAGE_BYTES`, JSON nested no deeper than `safejson` allows, of the expected shape with at
most `MAX_READINGS` readings, from a declared peer and on that peer's topic, dated newer than the
last message kept from that peer (no replays), not more than `MAX_SKEW_MS` in the future nor
`MAX_AGE_MS` in the past, within the peer's rate (`RATE_PER_S`), and signed by the peer's
configured address. Anything else is dropped,
counted (`peer.<id>.rejected`), logged at most once a minute per peer and recorded as the peer's
last rejection (what `status` shows); nothing a neighbour sends can stop the node.

A kept message becomes readings named `peer.<id>.<channel>`, put in the rules' table of newest
values (never in the local store, never committed on chain: they are the neighbour's data). Their
times are the neighbour's (never later than now), so each rule's own `stale_after_s` and
`fallback` apply to them exactly as to local inputs; a peer has no staleness setting of its own.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import Field

from daisee_node import safejson
from daisee_node.errors import DaiseeError
from daisee_node.logs import get_logger
from daisee_node.models import NAME_PATTERN, StrictModel
from daisee_node.readings import CHANNEL_RE, Reading

if TYPE_CHECKING:
    from eth_account.signers.local import LocalAccount

    from daisee_node.control import EventLog

MESSAGE_TYPE = "daisee.peer.v1"
#: the topic under `<base_topic>/<node id>/`
TOPIC = "peer"
#: the prefix of peer inputs in rules
PREFIX = "peer."
#: a message is refused unread beyond this size (a node with 200 channels needs about 12 kB)
MAX_MESSAGE_BYTES = 16_384
MAX_READINGS = 200
#: longest channel name taken from a peer
MAX_NAME = 64
#: how far a peer's clock may run ahead of ours
MAX_SKEW_MS = 5_000
#: a message dated further back is refused (a replay after a restart, or clocks far apart)
MAX_AGE_MS = 300_000
#: signatures checked per peer and second (a burst of `RATE_BURST` first): a sender flooding a
#: peer's topic costs the node a bounded amount of work (a peer sends one message an interval)
RATE_PER_S = 10.0
RATE_BURST = 20
#: at most one log line (and one recorded event) per peer this often
LOG_EVERY_S = 60.0
#: the undeclared senders are counted together, under this name
UNDECLARED = "peers.rejected_undeclared"
_ADDRESS_PATTERN = r"^0x[0-9a-fA-F]{40}$"


class PeerConfig(StrictModel):
    """One `[[peers]]` entry: a neighbour whose readings rules may read as `peer.<id>.…`."""

    id: str = Field(
        pattern=NAME_PATTERN,
        description="the neighbour's node id (its [node] id; rules name it, so no '-')",
    )
    address: str = Field(
        pattern=_ADDRESS_PATTERN,
        description="the neighbour's node key address (0x…, checksummed or not): it signs "
        "every message the node keeps from this peer",
    )


class PeerMessageError(DaiseeError):
    """A peer message that is refused; `str()` says why, in words."""


def canonical(body: Mapping[str, Any]) -> bytes:
    """The bytes a peer message's signature covers: its keys but `sig`, as canonical JSON."""
    fields = {k: v for k, v in body.items() if k != "sig"}
    return json.dumps(
        fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode()


def sign(body: Mapping[str, Any], account: LocalAccount) -> dict[str, Any]:
    """`body` with its EIP-191 signature under `sig` (eth_account's `encode_defunct`)."""
    from eth_account.messages import encode_defunct

    signed = account.sign_message(encode_defunct(primitive=canonical(body)))
    return {**body, "sig": "0x" + bytes(signed.signature).hex()}


def signer_of(body: Mapping[str, Any]) -> str:
    """The address that signed `body` (lower-case hex); PeerMessageError if `sig` is unusable."""
    from eth_account import Account
    from eth_account.messages import encode_defunct

    sig = body.get("sig")
    if not isinstance(sig, str) or len(sig) != 132 or not sig.startswith("0x"):
        raise PeerMessageError("unsigned (no 65-byte 0x… signature)")
    try:
        raw = bytes.fromhex(sig[2:])
        address = Account.recover_message(encode_defunct(primitive=canonical(body)), signature=raw)
    except Exception:  # whatever eth_keys makes of arbitrary bytes: a bad signature
        raise PeerMessageError("signature cannot be recovered") from None
    return str(address).lower()


def message(node_id: str, t_ms: int, readings: Mapping[str, Reading]) -> dict[str, Any]:
    """The unsigned body of a peer message (`readings`: own channels' newest good readings)."""
    return {
        "type": MESSAGE_TYPE,
        "node": node_id,
        "t_ms": t_ms,
        "readings": {name: [r.t_ms, r.value] for name, r in sorted(readings.items())},
    }


@dataclass
class PeerState:
    """What this node knows of one peer."""

    config: PeerConfig
    address: str  # lower-case
    #: time of the newest message kept (the sender's clock): older or equal ones are replays
    last_t_ms: int | None = None
    #: when that message arrived (our clock)
    seen_ms: int | None = None
    messages: int = 0
    readings: int = 0
    rejected: int = 0
    last_reason: str | None = None
    _tokens: float = float(RATE_BURST)
    _tokens_t: float = 0.0
    _next_log: float = 0.0
    _left_out: int = 0


class PeerInbox:
    """Checks messages from the declared peers and hands the readings of good ones to `deliver`.

    `check` does the whole check synchronously (tests); `receive` is the MQTT handler, which
    recovers the signature on a worker thread (about 0.4 ms here, several ms on a Pi: too long
    for the event loop)."""

    def __init__(
        self,
        peers: Sequence[PeerConfig],
        *,
        base_topic: str = "daisee",
        now_ms: Callable[[], int],
        deliver: Callable[[list[Reading]], None],
        events: EventLog | None = None,
    ) -> None:
        self.peers = {p.id: PeerState(p, p.address.lower()) for p in peers}
        self.base_topic = base_topic
        self.now_ms = now_ms
        self.deliver = deliver
        self.events = events
        self.log = get_logger("peers")
        self.undeclared = 0
        self._undeclared_next_log = 0.0

    def topics(self) -> dict[str, str]:
        """Topic → peer id, one per declared peer."""
        return {f"{self.base_topic}/{pid}/{TOPIC}": pid for pid in self.peers}

    # -- checks --------------------------------------------------------------------------------

    def screen(self, topic: str, payload: bytes, now_ms: int) -> tuple[PeerState, dict[str, Any]]:
        """Every check but the signature's. Raises PeerMessageError (with `.peer` set to the
        peer's state when the topic names a declared peer)."""
        pid = self._topic_peer(topic)
        state = self.peers.get(pid) if pid is not None else None
        if state is None:
            raise _refused(None, f"from an undeclared peer ({topic[:80]!r})")
        if len(payload) > MAX_MESSAGE_BYTES:
            raise _refused(
                state, f"oversized: {len(payload):,} bytes (at most {MAX_MESSAGE_BYTES:,})"
            )
        try:
            body = safejson.loads(payload)
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            raise _refused(state, f"malformed: not JSON ({str(exc)[:60]})") from None
        try:
            _shape(body)
        except PeerMessageError as exc:
            raise _refused(state, f"malformed: {exc}") from None
        if body["node"] != state.config.id:
            raise _refused(
                state, f"node {str(body['node'])[:40]!r} on the topic of peer {state.config.id!r}"
            )
        t_ms = body["t_ms"]
        if state.last_t_ms is not None and t_ms <= state.last_t_ms:
            raise _refused(state, "replayed: not newer than the last message kept")
        newest = max([t_ms, *(r[0] for r in body["readings"].values())])
        if newest > now_ms + MAX_SKEW_MS:
            ahead = (newest - now_ms) / 1000
            raise _refused(state, f"dated {ahead:.0f} s in the future (clocks apart?)")
        if t_ms < now_ms - MAX_AGE_MS:
            raise _refused(state, f"dated {(now_ms - t_ms) / 1000:.0f} s ago (too old)")
        mono = time.monotonic()
        state._tokens = min(RATE_BURST, state._tokens + (mono - state._tokens_t) * RATE_PER_S)
        state._tokens_t = mono
        if state._tokens < 1.0:
            raise _refused(state, f"too many messages (over {RATE_PER_S:g} a second)")
        state._tokens -= 1.0
        return state, body

    @staticmethod
    def verify(state: PeerState, body: Mapping[str, Any]) -> None:
        """The signature recovers the peer's configured address, or PeerMessageError."""
        try:
            signer = signer_of(body)
        except PeerMessageError as exc:
            raise _refused(state, str(exc)) from None
        if signer != state.address:
            raise _refused(state, f"wrongly signed (by {signer}, not the peer's key)")

    def keep(self, state: PeerState, body: Mapping[str, Any], now_ms: int) -> list[Reading]:
        """Take a checked message: the peer's readings, named and timed for the rules."""
        if state.last_t_ms is not None and body["t_ms"] <= state.last_t_ms:
            # another message was kept while this one was being verified
            raise _refused(state, "replayed: not newer than the last message kept")
        state.last_t_ms = body["t_ms"]
        state.seen_ms = now_ms
        prefix = f"{PREFIX}{state.config.id}."
        readings = [
            # A peer clock a little ahead must not keep its readings fresh for longer.
            Reading(prefix + name, min(int(t), now_ms), float(value))
            for name, (t, value) in body["readings"].items()
        ]
        state.messages += 1
        state.readings = len(readings)
        if self.events is not None:
            pid = state.config.id
            self.events.add_counter(f"peer.{pid}.messages", 1)
            self.events.set_counter(f"peer.{pid}.readings", len(readings))
            self.events.set_counter(f"peer.{pid}.last_ms", now_ms)
        return readings

    def check(self, topic: str, payload: bytes, now_ms: int | None = None) -> list[Reading]:
        """The readings of a good message (also delivered); PeerMessageError for a bad one (also
        counted and logged)."""
        now = self.now_ms() if now_ms is None else now_ms
        try:
            state, body = self.screen(topic, payload, now)
            self.verify(state, body)
            readings = self.keep(state, body, now)
        except PeerMessageError as exc:
            self.rejected(exc, now)
            raise
        self.deliver(readings)
        return readings

    async def receive(self, topic: str, payload: bytes) -> None:
        """The MQTT handler: never raises for anything a sender can put in a message."""
        now = self.now_ms()
        try:
            state, body = self.screen(topic, payload, now)
            await asyncio.to_thread(self.verify, state, body)
            readings = self.keep(state, body, self.now_ms())
        except PeerMessageError as exc:
            self.rejected(exc, now)
            return
        self.deliver(readings)

    # -- refusals ------------------------------------------------------------------------------

    def rejected(self, exc: PeerMessageError, now_ms: int) -> None:
        """Count a refused message; log it (and record it for `status`) at most once a minute
        per peer, saying how many were left out in between."""
        state: PeerState | None = getattr(exc, "peer", None)
        reason = str(exc)
        mono = time.monotonic()
        if state is None:
            self.undeclared += 1
            if self.events is not None:
                self.events.add_counter(UNDECLARED, 1)
            if mono >= self._undeclared_next_log:
                self._undeclared_next_log = mono + LOG_EVERY_S
                self.log.warning("peer message dropped", reason=reason, count=self.undeclared)
            return
        pid = state.config.id
        state.rejected += 1
        state.last_reason = reason
        if self.events is not None:
            self.events.add_counter(f"peer.{pid}.rejected", 1)
        if mono < state._next_log:
            state._left_out += 1
            return
        fields: dict[str, Any] = {"peer": pid, "reason": reason, "rejected": state.rejected}
        if state._left_out:
            fields["left_out"] = state._left_out
        self.log.warning("peer message dropped", **fields)
        state._next_log = mono + LOG_EVERY_S
        state._left_out = 0
        if self.events is not None:
            self.events.put_event(now_ms, "peer", pid, None, "rejected", reason)

    def heard_age_s(self, peer_id: str) -> float | None:
        """Seconds since peer `peer_id`'s last kept message arrived (None: never heard, or not
        a declared peer): its heartbeat."""
        state = self.peers.get(peer_id)
        if state is None or state.seen_ms is None:
            return None
        return max(0.0, (self.now_ms() - state.seen_ms) / 1000)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Each peer: when its last message came, how many readings it had, refusals."""
        return {
            pid: {
                "address": s.address,
                "seen_ms": s.seen_ms,
                "messages": s.messages,
                "readings": s.readings,
                "rejected": s.rejected,
                "last_reason": s.last_reason,
            }
            for pid, s in self.peers.items()
        }

    def _topic_peer(self, topic: str) -> str | None:
        head = f"{self.base_topic}/"
        tail = f"/{TOPIC}"
        if not (topic.startswith(head) and topic.endswith(tail)):
            return None
        pid = topic[len(head) : -len(tail)]
        return pid if "/" not in pid else None


def _refused(state: PeerState | None, reason: str) -> PeerMessageError:
    exc = PeerMessageError(reason)
    exc.peer = state  # type: ignore[attr-defined]
    return exc


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**53


def _shape(body: object) -> None:
    """The fields a peer message has, with their types; PeerMessageError otherwise."""
    if not isinstance(body, dict):
        raise PeerMessageError("not a JSON object")
    keys = {"type", "node", "t_ms", "readings", "sig"}
    extra = sorted(str(k)[:20] for k in body.keys() - keys)
    if extra:
        raise PeerMessageError(f"unknown key(s) {extra}")
    if "sig" not in body:
        raise PeerMessageError("unsigned (no sig)")
    if body.get("type") != MESSAGE_TYPE:
        raise PeerMessageError(f"type is not {MESSAGE_TYPE!r}")
    if not isinstance(body.get("node"), str):
        raise PeerMessageError("node is not text")
    if not _is_int(body.get("t_ms")):
        raise PeerMessageError("t_ms is not a time in milliseconds")
    readings = body.get("readings")
    if not isinstance(readings, dict):
        raise PeerMessageError("readings is not an object")
    if len(readings) > MAX_READINGS:
        raise PeerMessageError(f"{len(readings)} readings (at most {MAX_READINGS})")
    for name, pair in readings.items():
        if len(name) > MAX_NAME or not CHANNEL_RE.match(name):
            raise PeerMessageError(f"{name[:40]!r} is not a channel name")
        if not (isinstance(pair, list) and len(pair) == 2 and _is_int(pair[0])):
            raise PeerMessageError(f"{name}: not [t_ms, value]")
        value = pair[1]
        if not _is_finite(value):
            raise PeerMessageError(f"{name}: the value is not a finite number")


def _is_finite(value: object) -> bool:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an integer beyond any float
        return False


@dataclass(frozen=True)
class PeerExchange:
    """What the MQTT face needs for peers: the inbox of the declared peers' messages, and the
    node key that signs this node's own (None: nothing is sent)."""

    inbox: PeerInbox | None
    unlock: Callable[[], Awaitable[LocalAccount]] | None
    now_ms: Callable[[], int]


class PeerPublisher:
    """Signs and sends this node's newest good readings for its peers (see the module).

    `unlock` gives the node key (decrypted on a worker thread, once); `readings` the newest
    reading of each of the node's own channels; `send` queues one message. A key that cannot be
    had is logged once and nothing is sent: the rest of the node runs on."""

    def __init__(
        self,
        node_id: str,
        unlock: Callable[[], Awaitable[LocalAccount]],
        readings: Callable[[], Mapping[str, Reading]],
        send: Callable[[bytes], None],
        *,
        now_ms: Callable[[], int],
        interval_s: float,
        connected: Callable[[], bool],
        count: Callable[[str, int], None] | None = None,
    ) -> None:
        self.node_id = node_id
        self.unlock = unlock
        self.readings = readings
        self.send = send
        self.now_ms = now_ms
        self.interval_s = interval_s
        self.connected = connected
        self.count = count or (lambda name, n: None)
        self.last_t_ms = 0
        self.sent = 0
        self.log = get_logger("peers")

    def body(self) -> dict[str, Any]:
        """The next unsigned message: good, finite own readings (at most MAX_READINGS)."""
        good = {
            name: r
            for name, r in self.readings().items()
            if r.good and math.isfinite(r.value) and len(name) <= MAX_NAME
        }
        if len(good) > MAX_READINGS:
            good = dict(sorted(good.items())[:MAX_READINGS])
        # Strictly increasing, also when two messages fall in one millisecond or the clock steps
        # back: receivers take a message only if it is newer than the last.
        t_ms = max(self.now_ms(), self.last_t_ms + 1)
        self.last_t_ms = t_ms
        return message(self.node_id, t_ms, good)

    async def run(self) -> None:
        """Every `interval_s` while the broker is there, one signed message."""
        try:
            account = await self.unlock()
        except DaiseeError as exc:
            self.log.error("the node key cannot be used; no readings are sent to peers", error=exc)
            await asyncio.Event().wait()  # until the node stops
            return
        while True:
            await asyncio.sleep(self.interval_s)
            if not self.connected():
                continue  # not queued: an old message is worth nothing
            body = self.body()  # on the loop: the readings change under it
            signed = await asyncio.to_thread(sign, body, account)
            payload = json.dumps(signed, sort_keys=True, separators=(",", ":"), allow_nan=False)
            if len(payload) > MAX_MESSAGE_BYTES:  # long channel names: keep the heartbeat
                signed = await asyncio.to_thread(sign, {**body, "readings": {}}, account)
                payload = json.dumps(signed, sort_keys=True, separators=(",", ":"))
            self.send(payload.encode())
            self.sent += 1
            self.count("peers.sent", 1)
