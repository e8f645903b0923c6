"""Peers over a real mosquitto: node A's rule reads node B's simulated PV, signed by B's key;
the broker keeps each node to its own topics, and A refuses what B's key did not sign."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from eth_account import Account

from daisee_node.peers import message, sign
from daisee_node.readings import Reading
from tests.conftest import db_rows, run_cli, until, write_config
from tests.support.broker import Broker
from tests.support.clocks import sunny_longitude


@pytest.fixture
def node_broker(tmp_path: Path) -> Any:
    """mosquitto where nodes `a`, `b` and `c` each log in under their own name."""
    b = Broker(tmp_path, node_logins=("a", "b", "c"))
    b.start()
    yield b
    b.stop()


def mqtt_section(broker: Broker, login: str) -> dict[str, Any]:
    return {
        "host": broker.host,
        "port": broker.port,
        "username": login,
        "password_file": str(broker.password_file(login)),
        "reading_interval_s": 0.5,
        "discovery": False,
    }


def node_b(tmp_path: Path, broker: Broker, a_address: str) -> tuple[Path, str]:
    """Node B: simulated PV in the sun, a node key, and A as its peer (so it shares)."""
    keystore, password = tmp_path / "b-key.json", tmp_path / "b-key.pass"
    made = run_cli("keys", "new", "--keystore", str(keystore), "--password-file", str(password))
    assert made.returncode == 0, made.stderr
    address = json.loads(made.stdout)["address"]
    path = write_config(
        tmp_path / "b.toml",
        {
            "node": {"id": "b", "data_dir": str(tmp_path / "b-data")},
            "simulation": {
                "latitude_deg": 0.0,
                "longitude_deg": sunny_longitude(),
                "cloudiness": 0.0,
            },
            "sensors": [{"name": "pv", "kind": "simulated", "model": "pv", "interval_s": 0.2}],
            "mqtt": mqtt_section(broker, "b"),
            # No chain is reachable: the key signs all the same (commitments wait offline).
            "chain": {
                "rpc_url": "http://127.0.0.1:9",
                "ledger_address": "0x" + "11" * 20,
                "chain_id": 1337,
                "keystore": str(keystore),
                "password_file": str(password),
            },
            "peers": [{"id": "a", "address": a_address}],
        },
    )
    return path, address


def node_a(tmp_path: Path, broker: Broker, b_address: str) -> Path:
    """Node A: no sensor, no key; its relay follows B's PV."""
    return write_config(
        tmp_path / "a.toml",
        {
            "node": {"id": "a", "data_dir": str(tmp_path / "a-data")},
            "store": {"flush_interval_s": 0.05},
            "gpio": {"backend": "mock"},
            "relays": [{"name": "supply", "pin": 17, "safe_state": "off"}],
            "rules": [
                {
                    "name": "neighbour_sun",
                    "when": "peer.b.pv.power_w > 100",
                    "then": {"relay": "supply", "state": "on"},
                    "otherwise": {"relay": "supply", "state": "off"},
                    "stale_after_s": 2,
                    "fallback": "off",
                }
            ],
            "mqtt": mqtt_section(broker, "a"),
            "peers": [{"id": "b", "address": b_address.lower()}],
        },
    )


def counter(db: Path, name: str) -> int | None:
    rows = db_rows(db, "SELECT value FROM counters WHERE name = ?", (name,))
    return int(rows[0][0]) if rows else None


def status(config_dir: Path) -> dict[str, Any]:
    result = run_cli("status", "--data-dir", str(config_dir), "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


async def publish_as(broker: Broker, user: str, topic: str, payload: bytes) -> None:
    async with aiomqtt.Client(
        broker.host, broker.port, username=user, password=broker.passwords[user]
    ) as client:
        await client.publish(topic, payload, qos=1)


@pytest.mark.slow
async def test_a_rule_follows_a_neighbours_signed_pv_and_falls_back_when_it_stops(
    tmp_path: Path, node_broker: Broker, daemon: Any
) -> None:
    wrong = Account.create()
    b_config, b_address = node_b(tmp_path, node_broker, wrong.address)
    a_config = node_a(tmp_path, node_broker, b_address)
    a_db = tmp_path / "a-data" / "node.db"
    a = daemon(a_config)
    b = daemon(b_config)

    def relay_on() -> int | None:
        return counter(a_db, "relay.supply.state")

    # B's PV produces: its signed readings reach A, whose rule closes the relay.
    await until(lambda: relay_on() == 1, timeout=40)
    assert (counter(a_db, "peer.b.messages") or 0) >= 1
    assert (counter(a_db, "peer.b.readings") or 0) >= 1
    channels = db_rows(a_db, "SELECT name FROM channels")
    assert not [c for (c,) in channels if c.startswith("peer.")]  # the neighbour's: not stored

    # A forged message on B's topic (the `node` login may write anywhere): refused by A.
    forged = sign(message("b", int(time.time() * 1000), _r(0.0)), wrong)
    await publish_as(node_broker, "node", "daisee/b/peer", json.dumps(forged).encode())
    await until(lambda: (counter(a_db, "peer.b.rejected") or 0) >= 1)
    assert relay_on() == 1
    report = status(tmp_path / "a-data")
    peer = report["peers"]["b"]
    assert "wrongly signed" in peer["last_reason"] and peer["rejected"] >= 1
    assert peer["messages"] >= 1 and peer["readings"] >= 1 and peer["last_ms"] > 0
    text = run_cli("status", "--data-dir", str(tmp_path / "a-data")).stdout
    assert "PEER" in text and "wrongly signed" in text

    # B stops: its data go stale at A, whose rule falls back and opens the relay.
    b.signal(signal.SIGTERM)
    assert b.wait(15)[0] == 0
    await until(lambda: relay_on() == 0, timeout=20)
    rule = status(tmp_path / "a-data")["rules"]["neighbour_sun"]
    assert "peer.b.pv.power_w is" in rule["reason"] and "(stale after 2 s)" in rule["reason"]
    a.signal(signal.SIGTERM)
    code, output = a.wait(15)
    assert code == 0
    assert output.count("no node key ([chain])") == 1
    assert (counter(tmp_path / "b-data" / "node.db", "peers.sent") or 0) >= 1


def _r(value: float) -> dict[str, Reading]:
    return {"pv.power_w": Reading("pv.power_w", int(time.time() * 1000), value)}


async def test_the_broker_keeps_each_node_to_its_own_topics(node_broker: Broker) -> None:
    seen: list[tuple[str, bytes]] = []
    ready = asyncio.Event()

    async def watch() -> None:
        async with aiomqtt.Client(
            node_broker.host,
            node_broker.port,
            username="a",
            password=node_broker.passwords["a"],
        ) as client:
            await client.subscribe("daisee/+/peer")
            ready.set()
            async for msg in client.messages:
                seen.append((msg.topic.value, bytes(msg.payload)))  # type: ignore[arg-type]

    task = asyncio.create_task(watch())
    try:
        await asyncio.wait_for(ready.wait(), 5)
        async with aiomqtt.Client(
            node_broker.host, node_broker.port, username="c", password=node_broker.passwords["c"]
        ) as c:
            await c.publish("daisee/b/peer", b"c pretending to be b", qos=1)
            await c.publish("daisee/c/peer", b"c as itself", qos=1)  # after it, in order
        await until(lambda: ("daisee/c/peer", b"c as itself") in seen)
        assert seen == [("daisee/c/peer", b"c as itself")]
    finally:
        task.cancel()
