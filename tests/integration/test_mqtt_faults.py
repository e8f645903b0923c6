"""MQTT under faults and abuse, against a real mosquitto and real `daisee-node run` processes:
malformed and flooding relay commands, a broker that dies or freezes as the node stops, a broker
that never answers, a node frozen (SIGSTOP) past its keepalive, and bugs told from outages."""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from paho.mqtt.client import MQTTErrorCode

from daisee_node.mqtt.link import MqttLink
from daisee_node.mqtt.settings import MqttSection
from tests.conftest import Daemon, db_rows, sim_sensors, wait_for, write_config
from tests.integration.test_mqtt import Watcher
from tests.support.broker import Broker

BASE = "daisee/m1"
SET = f"{BASE}/relay/heater/set"


def node_config(tmp_path: Path, host: str, port: int, password_file: Path, **mqtt: Any) -> Path:
    return write_config(
        tmp_path / "node.toml",
        {
            "node": {"id": "m1", "data_dir": str(tmp_path / "data")},
            "store": {"flush_interval_s": 0.05},
            "sensors": sim_sensors(0.1),
            "gpio": {"backend": "mock"},
            "relays": [{"name": "heater", "pin": 17, "safe_state": "off"}],
            "mqtt": {
                "host": host,
                "port": port,
                "username": "node",
                "password_file": str(password_file),
                "reading_interval_s": 0,
                **mqtt,
            },
        },
    )


def broker_config(tmp_path: Path, broker: Broker, **mqtt: Any) -> Path:
    return node_config(tmp_path, broker.host, broker.port, broker.password_file("node"), **mqtt)


def counter(tmp_path: Path, name: str) -> int:
    rows = db_rows(
        tmp_path / "data" / "node.db", "SELECT value FROM counters WHERE name=?", (name,)
    )
    return int(rows[0][0]) if rows else 0


def log_problems(output: str) -> list[str]:
    """Tracebacks and error lines a daemon printed."""
    return [
        line
        for line in output.splitlines()
        if "Traceback" in line or '"level": "error"' in line or '"exception"' in line
    ]


def wait_started(d: Daemon, timeout: float = 20) -> None:
    wait_for(lambda: "node started" in d.output() or d.proc.poll() is not None, timeout)
    assert d.proc.poll() is None, d.output()


async def await_started(d: Daemon, timeout: float = 20) -> None:
    await asyncio.to_thread(wait_started, d, timeout)


def ha_client(broker: Broker) -> aiomqtt.Client:
    return aiomqtt.Client(
        broker.host,
        broker.port,
        username="ha",
        password=broker.password_file("ha").read_text().strip(),
    )


# -- commands ------------------------------------------------------------------------------------

MALFORMED: list[bytes] = [
    b'{"expires_s":[1]}',
    b'{"expires_s":{}}',
    b'{"state":"ON","expires_s":[1]}',
    b'{"state":"ON","expires_s":{}}',
    b'{"state":"ON","expires_s":true}',
    b'{"state":"ON","expires_s":false}',
    b'{"state":"ON","expires_s":NaN}',
    b'{"state":"ON","expires_s":Infinity}',
    b'{"state":"ON","expires_s":-1}',
    b'{"state":"ON","expires_s":0}',
    b'{"state":"ON","expires_s":1e999}',
    b'{"state":"ON","expires_s":"600"}',
    b'{"state":"ON","expires_s":' + b"9" * 200 + b"}",
    b'{"state":"ON","expires_s":600,"x":1}',
    b'{"state":["ON"]}',
    b'{"state":{"ON":1}}',
    b'{"state":true}',
    b'{"state":null}',
    b"{}",
    b'{"state":' + b"[" * 100 + b"]" * 100 + b"}",
    b'{"state":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    b'{"state":"ON"',
    b"[1]",
    b"null",
    b'"ON"',
    b"",
    b"   ",
    b"ON 1 2",
    b"ON nan",
    b"ON inf",
    b"ON -5",
    b"ON 0",
    b"ON 604801",
    b"ON " + b"9" * 1000,
    b"MAYBE",
    b"\xff\xfeON",
    b"\x00ON",
]


async def test_malformed_commands_are_refused_counted_and_change_nothing(tmp_path, broker, daemon):
    d = daemon(broker_config(tmp_path, broker))
    await await_started(d)
    async with Watcher(broker) as w:
        await w.wait(f"{BASE}/status", lambda p: p == b"online", timeout=20)
        await w.wait(f"{BASE}/relay/heater", lambda p: p == b"OFF")
        async with ha_client(broker) as client:
            for payload in MALFORMED:
                await client.publish(SET, payload, qos=1)
            await client.publish(f"{BASE}/relay/nosuch/set", b"ON", qos=1)
        refused = len(MALFORMED) + 1
        await asyncio.to_thread(
            wait_for, lambda: counter(tmp_path, "mqtt.commands_refused") == refused, 15
        )
        # nothing switched, nothing taken as a command
        assert w.seen[f"{BASE}/relay/heater"] == b"OFF"
        assert json.loads(w.seen[f"{BASE}/relay/heater/attributes"])["mode"] == "auto"
        assert counter(tmp_path, "mqtt.commands_applied") == 0
        assert counter(tmp_path, "relay.heater.switches") == 0
        # and the node still takes a good command
        async with ha_client(broker) as client:
            await client.publish(SET, b'{"state": "ON", "expires_s": 600}', qos=1)
        assert await w.wait(f"{BASE}/relay/heater", lambda p: p == b"ON") == b"ON"
    d.signal(signal.SIGTERM)
    code, output = await asyncio.to_thread(d.wait, 10)
    assert code == 0
    assert counter(tmp_path, "mqtt.commands_refused") == refused
    assert counter(tmp_path, "mqtt.commands_applied") == 1
    assert log_problems(output) == []
    # refusals are warnings, and a flood of them does not flood the log
    warnings = [line for line in output.splitlines() if "MQTT command refused" in line]
    assert 1 <= len(warnings) <= 3


async def test_a_command_flood_is_rate_limited_and_never_starves_state(tmp_path, broker, daemon):
    d = daemon(broker_config(tmp_path, broker))
    await await_started(d)
    topic = f"{BASE}/reading/load.power_w"
    arrivals: list[float] = []
    async with Watcher(broker) as w:
        await w.wait(f"{BASE}/status", lambda p: p == b"online", timeout=20)
        await w.wait(topic)

        async def track() -> None:
            last = None
            while True:
                current = w.seen.get(topic)
                if current is not last:  # every message is a new bytes object
                    arrivals.append(time.monotonic())
                    last = current
                await asyncio.sleep(0.01)

        tracker = asyncio.create_task(track())
        t0 = time.monotonic()
        async with ha_client(broker) as client:
            for i in range(10_000):
                await client.publish(SET, b"ON" if i % 2 else b"OFF", qos=0)
                if i % 100 == 0:
                    # a QoS 0 publish may never yield: let the tracker see arrivals meanwhile
                    await asyncio.sleep(0)
        t_sent = time.monotonic()
        # the node keeps up with the flood: every command ends counted
        await asyncio.to_thread(
            wait_for,
            lambda: (
                counter(tmp_path, "mqtt.commands_applied")
                + counter(tmp_path, "mqtt.commands_dropped")
                + counter(tmp_path, "mqtt.incoming_dropped")
                >= 9_900
            ),
            30,
        )
        t_done = time.monotonic()
        await asyncio.sleep(1.0)  # one more state cycle after the flood
        tracker.cancel()
    during = [t for t in arrivals if t0 - 1.0 <= t <= t_done + 1.0]
    gaps = [b - a for a, b in itertools.pairwise(during)]
    assert during and during[0] <= t0 + 1.0 and during[-1] >= t_done
    # retained state kept flowing through the flood (it is published every 0.5 s)
    assert max(gaps) < 1.5, f"state held back {max(gaps):.1f} s; flood took {t_sent - t0:.1f} s"
    applied = counter(tmp_path, "mqtt.commands_applied")
    # 5 at once, then 2 a second
    assert 5 <= applied <= 5 + 2 * (t_done - t0) + 2
    assert counter(tmp_path, "mqtt.commands_dropped") >= 5_000
    d.signal(signal.SIGTERM)
    code, output = await asyncio.to_thread(d.wait, 10)
    assert code == 0 and log_problems(output) == []
    dropped_lines = [line for line in output.splitlines() if "rate limit dropped" in line]
    assert 1 <= len(dropped_lines) <= 5


# -- the socket, the event loop and bugs -----------------------------------------------------------


def link_for(broker: Broker, **settings: Any) -> MqttLink:
    section = MqttSection(
        host=broker.host, port=broker.port, username="node", keepalive_s=5, **settings
    )
    return MqttLink(section, "m1", broker.password_file("node").read_text().strip())


async def test_a_connection_lost_while_a_write_is_being_registered_leaves_the_loop_clean(broker):
    """What a node resumed by SIGCONT long after its keepalive does: paho pings (asking for its
    socket to be watched for writing, a registration deferred to the next turn of the loop) and
    finds the broker gone in the same turn. The deferred registration must not touch the fd."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    link = link_for(broker)
    task = asyncio.create_task(link.run())
    try:
        await asyncio.wait_for(link.connected.wait(), 10)
        for _ in range(3):
            connects = link.connects
            assert link._client is not None
            paho = link._client._client  # the live paho client under aiomqtt
            paho.publish(f"{BASE}/ping", b"x")  # asks for the socket to be watched for writing
            # as paho does on EOF: close the socket, then report the disconnection
            paho._loop_rc_handle(MQTTErrorCode.MQTT_ERR_CONN_LOST)
            await asyncio.sleep(0.05)  # the deferred registration runs now
            assert errors == []
            await asyncio.wait_for(_until(lambda n=connects: link.connects > n), 15)
        assert errors == []
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        loop.set_exception_handler(None)


async def _until(predicate: Any) -> None:
    while not predicate():
        await asyncio.sleep(0.02)


async def test_a_bug_is_raised_not_retried_as_a_broker_outage(broker):
    link = link_for(broker)
    link.publish(f"{BASE}/x", {"not": "a payload"}, qos=1)  # type: ignore[arg-type]
    with pytest.raises(BaseException) as caught:
        await asyncio.wait_for(link.run(), 5)
    error = caught.value
    if isinstance(error, BaseExceptionGroup):
        assert error.subgroup(TypeError) is not None, error
    else:
        assert isinstance(error, TypeError), error
    assert link.connects == 1  # not retried as if the broker were away
    # the message that showed the bug is gone: a restarted link works
    assert link.pending == 0
    task = asyncio.create_task(link.run())
    await asyncio.wait_for(link.connected.wait(), 10)
    await link.stop(1.0)
    assert task.done() and task.exception() is None


async def test_a_cancel_as_the_connection_breaks_always_ends_the_link(broker):
    """The node is told to stop just as the broker goes: the link's task is cancelled while its
    session is failing. The cancellation must end it, never be taken for one more outage."""
    for turns in range(8):
        link = link_for(broker)
        task = asyncio.create_task(link.run())
        await asyncio.wait_for(link.connected.wait(), 10)
        assert link._client is not None
        paho = link._client._client
        paho._loop_rc_handle(MQTTErrorCode.MQTT_ERR_CONN_LOST)  # the connection breaks …
        for _ in range(turns):
            await asyncio.sleep(0)
        task.cancel()  # … and the stop comes `turns` turns of the loop later
        done, _ = await asyncio.wait({task}, timeout=5)
        assert done, f"the link ignored its cancellation ({turns} turns after the break)"
        assert task.cancelled()


async def test_an_outage_is_retried_and_a_stop_ends_it_at_once(broker):
    broker.stop()
    link = link_for(broker, reconnect_max_s=0.2)
    task = asyncio.create_task(link.run())
    await asyncio.sleep(1.0)  # several failed attempts, each an outage
    assert not task.done() and link.connects == 0
    started = time.monotonic()
    await link.stop(1.0)
    assert task.done() and task.exception() is None
    assert time.monotonic() - started < 1.0


# -- stopping whatever the broker does -----------------------------------------------------------


@pytest.mark.slow
async def test_sigstop_past_the_keepalive_then_sigcont_reconnects_cleanly(tmp_path, broker, daemon):
    d = daemon(broker_config(tmp_path, broker, keepalive_s=5))
    await await_started(d)
    await asyncio.to_thread(wait_for, lambda: "MQTT connected" in d.output(), 15)
    d.signal(signal.SIGSTOP)
    try:
        # past the broker's 1.5 × keepalive and the node's own 10 s wait for acknowledgements
        await asyncio.sleep(12)
    finally:
        d.signal(signal.SIGCONT)
    await asyncio.to_thread(wait_for, lambda: d.output().count("MQTT connected") >= 2, 30)
    async with Watcher(broker) as w:
        await w.wait(f"{BASE}/status", lambda p: p == b"online")
        async with ha_client(broker) as client:
            await client.publish(SET, b"ON", qos=1)
        assert await w.wait(f"{BASE}/relay/heater", lambda p: p == b"ON") == b"ON"
    d.signal(signal.SIGTERM)
    code, output = await asyncio.to_thread(d.wait, 10)
    assert code == 0
    assert log_problems(output) == [], "\n".join(log_problems(output))


@pytest.mark.slow
def test_stop_within_5_s_while_the_broker_dies_or_freezes_at_random_moments(tmp_path, daemon):
    rng = random.Random(1510)
    for attempt in range(10):
        workdir = tmp_path / f"try{attempt}"
        workdir.mkdir()
        broker = Broker(workdir)
        broker.start()
        assert broker.proc is not None
        try:
            d = daemon(broker_config(workdir, broker, keepalive_s=5))
            wait_started(d)
            time.sleep(rng.uniform(0.0, 1.2))  # connecting, connected, publishing …
            fault = rng.choice([signal.SIGKILL, signal.SIGSTOP])
            offset = rng.uniform(-0.3, 0.3)  # < 0: the node is told to stop first
            if offset < 0:
                d.signal(signal.SIGTERM)
                time.sleep(-offset)
                broker.proc.send_signal(fault)
            else:
                broker.proc.send_signal(fault)
                time.sleep(offset)
                d.signal(signal.SIGTERM)
            told = time.monotonic()
            code, output = d.wait(10)
            took = time.monotonic() - told
            what = f"try {attempt}: {fault.name}, offset {offset:+.2f} s"
            assert took < 5.0, f"{what}: stopped in {took:.1f} s"
            assert code == 0, f"{what}: exit {code}\n{output[-3000:]}"
            assert log_problems(output) == [], f"{what}: " + "\n".join(log_problems(output))
        finally:
            broker.proc.send_signal(signal.SIGCONT)
            broker.proc.kill()
            broker.proc.wait(5)


@pytest.fixture
def mute_server() -> Iterator[tuple[int, list[socket.socket]]]:
    """A TCP server that accepts connections and never says a word (no CONNACK, ever)."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.1)
    accepted: list[socket.socket] = []
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            accepted.append(conn)  # held open, never read, never answered

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1], accepted
    done.set()
    thread.join(5)
    for conn in accepted:
        conn.close()
    server.close()


def test_stop_within_5_s_while_the_broker_never_answers(tmp_path, mute_server, daemon):
    port, accepted = mute_server
    password = tmp_path / "mqtt.pass"
    password.write_text("secret\n")
    password.chmod(0o600)
    d = daemon(node_config(tmp_path, "127.0.0.1", port, password))
    wait_started(d)
    wait_for(lambda: accepted, 10)  # the node is waiting for its CONNACK
    told = time.monotonic()
    d.signal(signal.SIGTERM)
    code, output = d.wait(10)
    assert time.monotonic() - told < 5.0
    assert code == 0
    assert log_problems(output) == []
