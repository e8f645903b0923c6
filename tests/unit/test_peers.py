"""Peers' signed readings: what a node keeps, what it refuses and why, how rules see them, and
the config that declares peers."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from eth_account import Account
from structlog.testing import capture_logs

from daisee_node import peers
from daisee_node.config import parse_config
from daisee_node.errors import ConfigError
from daisee_node.peers import (
    MAX_MESSAGE_BYTES,
    PeerConfig,
    PeerInbox,
    PeerMessageError,
    PeerPublisher,
    message,
    sign,
)
from daisee_node.readings import Quality, Reading
from daisee_node.rules.engine import RuleConfig, RuleEngine
from tests.conftest import run_cli
from tests.support.clocks import FixedClock

NOW = 1_780_000_000_000
B = Account.create()
C = Account.create()
TOPIC_B = "daisee/b/peer"


class Events:
    """The store's counters and events, as the inbox records them."""

    def __init__(self) -> None:
        self.counters: dict[str, int] = {}
        self.events: list[tuple[Any, ...]] = []

    def put_event(self, t_ms: int, kind: str, name: str, *rest: Any) -> None:
        self.events.append((t_ms, kind, name, *rest))

    def add_counter(self, name: str, delta: int) -> None:
        self.counters[name] = self.counters.get(name, 0) + delta

    def set_counter(self, name: str, value: int) -> None:
        self.counters[name] = value


class Inbox:
    """An inbox for peer `b` (key B) on a clock the test sets, with what it delivered."""

    def __init__(self, address: str | None = None) -> None:
        self.clock = FixedClock(NOW)
        self.delivered: list[Reading] = []
        self.events = Events()
        self.inbox = PeerInbox(
            [PeerConfig(id="b", address=address or B.address.lower())],
            now_ms=self.clock.now_ms,
            deliver=self.delivered.extend,
            events=self.events,
        )

    def check(self, payload: bytes, topic: str = TOPIC_B) -> list[Reading]:
        return self.inbox.check(topic, payload)

    def refused(self, payload: bytes, topic: str = TOPIC_B) -> str:
        with pytest.raises(PeerMessageError) as exc:
            self.inbox.check(topic, payload)
        return str(exc.value)


def signed(
    t_ms: int = NOW - 100,
    values: dict[str, tuple[int, float]] | None = None,
    *,
    node: str = "b",
    key: Any = B,
    **change: Any,
) -> bytes:
    """A message signed by `key`; `change` replaces keys after signing (malformed messages)."""
    values = {"pv.power_w": (NOW - 200, 1520.5)} if values is None else values
    body = message(node, t_ms, {n: Reading(n, t, v) for n, (t, v) in values.items()})
    body = sign(body, key)
    return json.dumps({**body, **change}).encode()


def test_a_message_signed_by_the_peers_key_gives_its_readings_to_the_rules() -> None:
    h = Inbox(B.address)  # checksummed in the config: the same key
    got = h.check(signed(values={"pv.power_w": (NOW - 200, 1520.5), "grid.import_wh": (NOW, 7)}))
    assert sorted(got) == [
        Reading("peer.b.grid.import_wh", NOW, 7.0),
        Reading("peer.b.pv.power_w", NOW - 200, 1520.5),
    ]
    assert sorted(h.delivered) == sorted(got)
    assert h.events.counters == {
        "peer.b.messages": 1,
        "peer.b.readings": 2,
        "peer.b.last_ms": NOW,
    }
    snap = h.inbox.snapshot()["b"]
    assert (snap["messages"], snap["readings"], snap["rejected"]) == (1, 2, 0)


def test_a_message_signed_by_another_key_is_refused_and_counted() -> None:
    h = Inbox()
    assert "wrongly signed" in h.refused(signed(key=C))
    assert C.address.lower() in h.inbox.snapshot()["b"]["last_reason"]
    assert h.delivered == []
    assert h.events.counters == {"peer.b.rejected": 1}
    assert [e[1:5] for e in h.events.events] == [("peer", "b", None, "rejected")]


def test_a_message_changed_after_signing_is_refused() -> None:
    h = Inbox()
    body = json.loads(signed())
    body["readings"]["pv.power_w"][1] = 99_999.0
    assert "wrongly signed" in h.refused(json.dumps(body).encode())
    assert h.delivered == []


@pytest.mark.parametrize("sig", [None, "", "0x12", "0x" + "00" * 65, "0x" + "zz" * 65, 12])
def test_unsigned_or_unusable_signatures_are_refused(sig: Any) -> None:
    body = json.loads(signed())
    if sig is None:
        del body["sig"]
    else:
        body["sig"] = sig
    reason = Inbox().refused(json.dumps(body).encode())
    assert "unsigned" in reason or "signature" in reason


def test_a_replayed_or_older_message_is_refused() -> None:
    h = Inbox()
    first = signed(NOW - 100)
    h.check(first)
    assert "replayed" in h.refused(first)
    assert "replayed" in h.refused(signed(NOW - 500))
    h.check(signed(NOW - 99))  # newer by a millisecond: taken
    assert h.inbox.snapshot()["b"] | {"last_reason": None} == {
        "address": B.address.lower(),
        "seen_ms": NOW,
        "messages": 2,
        "readings": 1,
        "rejected": 2,
        "last_reason": None,
    }


def test_a_wrongly_signed_message_does_not_move_the_replay_counter() -> None:
    h = Inbox()
    h.refused(signed(NOW + 1000, key=C))
    h.check(signed(NOW - 100))  # a forged future message must not shut the peer out


def test_future_dated_messages_and_readings_are_refused_beyond_the_skew() -> None:
    h = Inbox()
    assert "future" in h.refused(signed(NOW + peers.MAX_SKEW_MS + 1000))
    assert "future" in h.refused(signed(values={"pv.power_w": (NOW + 60_000, 1.0)}))
    # a clock a little ahead is taken, but its readings are never newer than now
    (r,) = h.check(signed(NOW + 2000, {"pv.power_w": (NOW + 1500, 1.0)}))
    assert r.t_ms == NOW


def test_messages_dated_too_long_ago_are_refused() -> None:
    assert "too old" in Inbox().refused(signed(NOW - peers.MAX_AGE_MS - 1))


@pytest.mark.parametrize(
    ("payload", "words"),
    [
        (b"not json", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b"[" * 200 + b"]" * 200, "nested"),
        (signed(readings={"pv.power_w": [NOW, float("nan")]}), "finite"),
        (signed(readings={"pv.power_w": [NOW, float("inf")]}), "finite"),
        (signed(readings={"Bad Name": [NOW, 1.0]}), "not a channel name"),
        (signed(readings={"power": [NOW, 1.0]}), "not a channel name"),
        (signed(type="something.else"), "type"),
        (signed(extra=1), "unknown key"),
        (signed(t_ms="soon"), "t_ms"),
        (signed(t_ms=True), "t_ms"),
        (signed(readings={"pv.power_w": [NOW]}), "[t_ms, value]"),
        (signed(readings={"pv.power_w": [NOW, True]}), "finite"),
        (signed(readings={"pv.power_w": [NOW, 10**400]}), "finite"),
        (signed(readings=[]), "readings"),
        (
            signed(readings={f"s.c{i}_w": [NOW, 1.0] for i in range(peers.MAX_READINGS + 1)}),
            "readings (at most",
        ),
    ],
)
def test_malformed_messages_are_refused_with_a_reason(payload: bytes, words: str) -> None:
    h = Inbox()
    reason = h.refused(payload)
    assert words in reason
    assert h.delivered == [] and h.events.counters == {"peer.b.rejected": 1}


def test_an_oversized_message_is_refused_unread() -> None:
    payload = signed() + b" " * MAX_MESSAGE_BYTES  # valid JSON, signed: refused for its size
    assert "oversized" in Inbox().refused(payload)


def test_messages_from_undeclared_peers_or_under_another_name_are_refused() -> None:
    h = Inbox()
    assert "undeclared" in h.refused(signed(node="c", key=C), topic="daisee/c/peer")
    assert h.events.counters == {peers.UNDECLARED: 1}
    assert "on the topic of peer 'b'" in h.refused(signed(node="c", key=B))
    assert h.inbox.topics() == {TOPIC_B: "b"}


def test_refusals_are_logged_once_a_minute_per_peer_and_nothing_raises_in_receive() -> None:
    with capture_logs() as logs:
        h = Inbox()
        for i in range(5):
            asyncio.run(h.inbox.receive(TOPIC_B, signed(NOW - i, key=C)))
        asyncio.run(h.inbox.receive(TOPIC_B, b"\x00" * 10))
        asyncio.run(h.inbox.receive("daisee/x/peer", b"{}"))
        asyncio.run(h.inbox.receive(TOPIC_B, signed()))
    dropped = [e for e in logs if e["event"] == "peer message dropped"]
    assert [e.get("peer") for e in dropped] == ["b", None]  # b once, the undeclared one once
    assert h.events.counters["peer.b.rejected"] == 6
    assert len(h.events.events) == 1  # recorded for `status` once, like the log line
    assert [r.channel for r in h.delivered] == ["peer.b.pv.power_w"]


def test_a_flood_on_a_peers_topic_is_refused_before_its_signatures_are_checked() -> None:
    h = Inbox()
    forged = [signed(NOW - 1000 + i, key=C) for i in range(2 * peers.RATE_BURST)]
    reasons = [h.refused(payload) for payload in forged]
    # at most a few tokens come back while these are checked, however slow the machine
    assert reasons.count("too many messages (over 10 a second)") >= peers.RATE_BURST // 2
    assert all("wrongly signed" in r for r in reasons[: peers.RATE_BURST - 1])


def engine_with(latest: dict[str, Reading], clock: FixedClock) -> tuple[RuleEngine, dict]:
    asked: dict[str, Any] = {}
    engine = RuleEngine(
        [
            RuleConfig(
                name="buy",
                when="battery.soc_pct < 20 and peer.b.pv.power_w > 500",
                then={"relay": "supply", "state": "on"},
                otherwise={"relay": "supply", "state": "off"},
                stale_after_s=10,
                fallback="off",
            )
        ],
        {},
        latest,
        {"supply": "off"},
        clock=clock,
        request=lambda relay, on, reason: asked.update({relay: (on, reason)}),
    )
    return engine, asked


def test_rules_read_peer_readings_and_fall_back_when_they_go_stale() -> None:
    h = Inbox()
    latest: dict[str, Reading] = {}
    engine, asked = engine_with(latest, h.clock)
    latest["battery.soc_pct"] = Reading("battery.soc_pct", NOW, 15.0)
    engine.tick()
    assert asked["supply"][0] is False
    assert "peer.b.pv.power_w has no reading (nothing kept from peer b yet)" in asked["supply"][1]

    def deliver(readings: list[Reading]) -> None:
        latest.update((r.channel, r) for r in readings)
        engine.on_readings(readings)

    h.inbox.deliver = deliver
    h.check(signed(NOW - 100, {"pv.power_w": (NOW - 100, 800.0)}))
    assert asked["supply"][0] is True
    h.clock.t_ms = NOW + 41_900
    latest["battery.soc_pct"] = Reading("battery.soc_pct", h.clock.t_ms, 15.0)
    engine.tick()
    assert asked["supply"][0] is False
    assert "peer.b.pv.power_w is 42 s old (stale after 10 s)" in asked["supply"][1]
    assert "fallback off" in asked["supply"][1]


def test_a_publishers_messages_are_kept_by_its_peers() -> None:
    clock = FixedClock(NOW)
    own = {
        "pv.power_w": Reading("pv.power_w", NOW - 10, 640.0),
        "grid.power_w": Reading("grid.power_w", NOW - 10, float("nan"), Quality.SOURCE_ERROR),
        "load.power_w": Reading("load.power_w", NOW - 10, 12.5, Quality.OUT_OF_RANGE),
    }
    sent: list[bytes] = []

    async def unlock() -> Any:
        return B

    async def scenario() -> None:
        publisher = PeerPublisher(
            "b",
            unlock,
            lambda: own,
            sent.append,
            now_ms=clock.now_ms,
            interval_s=0.01,
            connected=lambda: True,
        )
        task = asyncio.create_task(publisher.run())
        while len(sent) < 3:
            await asyncio.sleep(0.01)
        task.cancel()

    asyncio.run(scenario())
    h = Inbox()
    for payload in sent:  # the same millisecond: the counter still goes up
        assert h.check(payload) == [Reading("peer.b.pv.power_w", NOW - 10, 640.0)]
    assert h.inbox.snapshot()["b"]["messages"] == len(sent)


def test_a_publisher_sends_nothing_while_the_broker_is_away() -> None:
    sent: list[bytes] = []

    async def unlock() -> Any:
        return B

    asked: list[bool] = []

    def connected() -> bool:
        asked.append(False)
        return False

    async def scenario() -> None:
        publisher = PeerPublisher(
            "b", unlock, dict, sent.append, now_ms=lambda: NOW, interval_s=0.01,
            connected=connected,
        )  # fmt: skip
        task = asyncio.create_task(publisher.run())
        while len(asked) < 5:  # five rounds, each finding no broker
            await asyncio.sleep(0.01)
        task.cancel()
        assert sent == [] and publisher.sent == 0

    asyncio.run(scenario())


# -- config -----------------------------------------------------------------------------------

BASE = """
[node]
id = "a"
[[sensors]]
name = "battery"
kind = "simulated"
model = "battery"
[[relays]]
name = "supply"
pin = 17
[mqtt]
"""


def problems(text: str) -> dict[str, str]:
    """Each path with a problem, and its messages (joined by ' | ')."""
    with pytest.raises(ConfigError) as exc:
        parse_config(BASE + text)
    found: dict[str, list[str]] = {}
    for p in exc.value.problems:
        found.setdefault(p.path, []).append(p.message)
    return {path: " | ".join(messages) for path, messages in found.items()}


def rule(when: str) -> str:
    return f"""
[[rules]]
name = "buy"
when = "{when}"
then = {{ relay = "supply", state = "on" }}
"""


def test_a_config_with_peers_in_rules_and_derived_values_is_valid() -> None:
    config = parse_config(
        BASE
        + f"""
[[peers]]
id = "house2"
address = "{B.address}"
[derived]
"home.surplus_w" = "peer.house2.pv.power_w - 100"
"""
        + rule("battery.soc_pct < 20 and peer.house2.pv.power_w > 500 and home.surplus_w > 0")
    )
    assert config.peers == [PeerConfig(id="house2", address=B.address)]


def test_a_rule_naming_an_undeclared_peer_is_an_error_at_its_path() -> None:
    found = problems(
        f'[[peers]]\nid = "b"\naddress = "{B.address}"\n' + rule("peer.house9.pv.power_w > 1")
    )
    assert found == {
        "rules[0].when": "peer.house9.pv.power_w: 'house9' is not a declared peer; add it to "
        "[[peers]] (declared: b)"
    }
    found = problems(rule("peer.b.pv.power_w > 1"))
    assert "'b' is not a declared peer" in found["rules[0].when"]


def test_peer_config_mistakes_are_listed_with_their_paths() -> None:
    found = problems(
        f"""
[[peers]]
id = "a"
address = "{B.address}"
[[peers]]
id = "if"
address = "{B.address.lower()}"
[[peers]]
id = "if"
address = "{C.address}"
[[sensors]]
name = "peer"
kind = "simulated"
model = "pv"
[derived]
"peer.x.y_w" = "battery.soc_pct * 2"
"""
    )
    assert set(found) == {
        "peers[0].id",
        "peers[1].address",
        "peers[1].id",
        "peers[2].id",
        "sensors[1].name",
        "derived.peer.x.y_w",
    }
    assert "this node's own id" in found["peers[0].id"]
    assert "already the key of peers[0]" in found["peers[1].address"]
    assert "word of the rule language" in found["peers[1].id"]
    assert "already declared by peers[1]" in found["peers[2].id"]
    assert "rename this sensor" in found["sensors[1].name"]


def test_peer_ids_and_addresses_are_checked_for_their_form() -> None:
    found = problems('[[peers]]\nid = "house-2"\naddress = "0x1234"\n')
    assert set(found) == {"peers[0].id", "peers[0].address"}
    assert "letters, digits and '_'" in found["peers[0].id"]


def test_a_peer_input_must_name_a_channel_and_peers_need_mqtt() -> None:
    peer = f'[[peers]]\nid = "b"\naddress = "{B.address}"\n'
    found = problems(peer + rule("peer.b.power_w > 1"))
    assert "peer.<node>.<sensor>.<quantity>" in found["rules[0].when"]
    with pytest.raises(ConfigError) as exc:
        parse_config(BASE.replace("[mqtt]", "") + peer)
    assert [p.path for p in exc.value.problems] == ["peers"]
    assert "[mqtt]" in exc.value.problems[0].message


def test_check_config_lists_peer_errors_and_exits_2(tmp_path: Any) -> None:
    path = tmp_path / "node.toml"
    path.write_text(BASE + rule("peer.b.pv.power_w > 1"))
    result = run_cli("check-config", str(path))
    assert result.returncode == 2
    assert "rules[0].when: peer.b.pv.power_w: 'b' is not a declared peer" in (
        result.stdout + result.stderr
    )
