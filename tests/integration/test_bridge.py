"""The community network: each node's mosquitto bridged (TLS, its own login) to a community
broker, with the files the image installs; ACLs that keep every node to its own name; a link
that goes down and comes back without losing a commitment."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import stat
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from eth_account import Account

from tests.conftest import ROOT, db_rows, run_cli, until, write_config
from tests.support.bridge import (
    VIEWER,
    CommunityBroker,
    Inbox,
    NodeBroker,
    listening,
    make_tls_files,
    pi_root,
    publish,
    run_firmware,
    run_setup,
    wait_until,
)
from tests.support.clocks import sunny_longitude

COMMITMENTS = "daisee/+/commitment"
PEERS = "daisee/+/peer"


@pytest.fixture
def network(tmp_path: Path) -> Iterator[tuple[CommunityBroker, NodeBroker, NodeBroker]]:
    """The community broker and nodes `a` (settings on its boot partition) and `b` (settings
    given to the install script's environment), all running."""
    community = CommunityBroker(tmp_path / "community", ("a", "b", "c"))
    a = NodeBroker(tmp_path / "a", "a", community)
    b = NodeBroker(tmp_path / "b", "b", community, from_env=True)
    started: list[Any] = []
    try:
        for broker in (community, a, b):
            broker.start()
            started.append(broker)
        yield community, a, b
    finally:
        for broker in reversed(started):
            broker.stop()


async def linked(sender: NodeBroker, inbox: Inbox) -> None:
    """Wait until the sender's messages reach the inbox (both bridges up, subscriptions made):
    a peer reading (QoS 0, nothing queued) sent again until one arrives."""
    topic = f"daisee/{sender.node_id}/peer"
    async with sender.client() as client:
        for _ in range(150):
            await client.publish(topic, b"probe", qos=0)
            with contextlib.suppress(AssertionError):
                await wait_until(lambda: inbox.has(topic, b"probe"), 0.2, "a probe")
                return
    raise AssertionError(f"{sender.node_id}'s messages never crossed the community broker")


# -- the setup script ----------------------------------------------------------------------------


def node_root(tmp_path: Path, node_id: str = "garden-7") -> Path:
    root = tmp_path / "root"
    (root / "etc/daisee-node").mkdir(parents=True)
    (root / "etc/daisee-node/config.toml").write_text(f'[node]\nid = "{node_id}"\n')
    (root / "boot/firmware").mkdir(parents=True)
    return root


def test_setup_without_community_settings_leaves_a_standalone_node(tmp_path: Path) -> None:
    root = node_root(tmp_path)
    done = run_setup(root)
    assert done.returncode == 0, done.stderr
    assert "standalone" in done.stdout
    acl = (root / "etc/mosquitto/daisee.acl").read_text()
    assert "topic readwrite daisee/garden-7/#" in acl and "@" not in acl
    assert "topic readwrite daisee/#" not in acl  # the node login no longer writes anywhere
    assert (root / "etc/mosquitto/conf.d/daisee.conf").is_file()
    assert not (root / "etc/mosquitto/conf.d/daisee-bridge.conf").exists()

    # Installed before the first boot names the node (settings given to the install): the
    # listener only, no ACL or bridge to name it in, the settings kept for the first boot.
    unnamed = node_root(tmp_path / "unnamed", "CHANGE-ME")
    password = tmp_path / "community.pass"
    password.write_text("pw\n")
    env = {"COMMUNITY_HOST": "mqtt.example.net", "COMMUNITY_PASSWORD_FILE": str(password)}
    done = run_setup(unnamed, env)
    assert done.returncode == 0 and "first boot names the node" in done.stdout
    assert (unnamed / "etc/mosquitto/conf.d/daisee.conf").is_file()
    assert not (unnamed / "etc/mosquitto/daisee.acl").exists()
    assert not (unnamed / "etc/mosquitto/conf.d/daisee-bridge.conf").exists()
    config = unnamed / "etc/daisee-node/config.toml"
    config.write_text(config.read_text().replace("CHANGE-ME", "house-2"))  # the first boot
    named = run_setup(unnamed)
    assert named.returncode == 0, named.stderr
    bridge = (unnamed / "etc/mosquitto/conf.d/daisee-bridge.conf").read_text().splitlines()
    assert "remote_username house-2" in bridge and "remote_password pw" in bridge
    assert "topic daisee/house-2/commitment out 1" in bridge


def test_setup_takes_the_boot_partition_and_keeps_the_password_off_it(tmp_path: Path) -> None:
    root = node_root(tmp_path)
    boot = root / "boot/firmware"
    ca, _, _ = make_tls_files(tmp_path)
    (boot / "daisee-community.txt").write_bytes(
        b"\xef\xbb\xbfhost = broker.example.org\r\nport = 8884  # TLS\r\n"
    )
    (boot / "daisee-community-ca.crt").write_bytes(ca.read_bytes())
    (boot / "daisee-community.pass").write_text("s3cret\r\n")
    done = run_setup(root)
    assert done.returncode == 0, done.stderr
    bridge = root / "etc/mosquitto/conf.d/daisee-bridge.conf"
    text = bridge.read_text()
    for line in (
        "address broker.example.org:8884",
        "remote_username garden-7",
        "remote_clientid garden-7",
        "remote_password s3cret",
        "bridge_cafile /etc/mosquitto/certs/daisee-community-ca.crt",
        "bridge_insecure false",
        "cleansession false",
        "topic daisee/garden-7/commitment out 1",
        "topic daisee/garden-7/peer out 0",
        "topic daisee/+/commitment in 1",
        "topic daisee/+/peer in 0",
        "topic daisee/+/market/line/+ in 1",
    ):
        assert line in text.splitlines(), line
    assert stat.S_IMODE(bridge.stat().st_mode) == 0o640  # the password: not for every user
    assert not list(boot.iterdir())  # all kept under /etc, the password off the card
    kept = root / "etc/daisee-node/community.pass"
    assert kept.read_text() == "s3cret\n" and stat.S_IMODE(kept.stat().st_mode) == 0o600
    assert (root / "etc/mosquitto/certs/daisee-community-ca.crt").read_bytes() == ca.read_bytes()

    # Run again (a reinstall): the same bridge from what was kept.
    again = run_setup(root)
    assert again.returncode == 0, again.stderr
    assert bridge.read_text() == text

    # A broker with a public certificate: no CA given, the system's CAs.
    public = run_setup(
        root,
        {"COMMUNITY_HOST": "mqtt.example.net", "COMMUNITY_PASSWORD_FILE": str(kept)},
    )
    assert public.returncode == 0, public.stderr
    text = bridge.read_text()
    assert "bridge_capath /etc/ssl/certs" in text and "address mqtt.example.net:8883" in text

    # A login that is not the node id: every message would be refused upstream; said at once.
    wrong = run_setup(root, {"COMMUNITY_HOST": "mqtt.example.net", "COMMUNITY_LOGIN": "other"})
    assert wrong.returncode == 2 and "must be the node id" in wrong.stderr
    assert bridge.read_text() == text  # the working bridge is left as it was

    alone = run_setup(root, None, "--standalone")
    assert alone.returncode == 0, alone.stderr
    assert not bridge.exists() and not kept.exists()


# -- the network ---------------------------------------------------------------------------------


async def test_commitments_cross_the_community_and_no_node_speaks_for_another(
    network: tuple[CommunityBroker, NodeBroker, NodeBroker],
) -> None:
    community, a, b = network
    viewer = aiomqtt.Client(
        community.host,
        community.port,
        username=VIEWER,
        password=community.passwords[VIEWER],
        tls_context=community.tls(),
    )
    async with (
        listening(b.client(), COMMITMENTS, PEERS, "daisee/+/market/#") as at_b,
        listening(a.client("homeassistant"), "daisee/#") as at_a,
        listening(viewer, "daisee/#") as upstream,
    ):
        await linked(a, at_b)
        await linked(b, at_a)

        # A's commitment, published on A's own broker, reaches B's; its market state goes up to
        # the community (a dashboard sees it) but no node needs it: not bridged down.
        await publish(a.client(), "daisee/a/market", b'{"order_active": false}')
        await publish(a.client(), "daisee/a/commitment", b"a-1")
        await wait_until(lambda: at_b.has("daisee/a/commitment", b"a-1"), 15, "a-1 at b")
        await wait_until(
            lambda: upstream.has("daisee/a/market", b'{"order_active": false}'), 15, "market"
        )
        assert at_b.payloads("daisee/a/market") == []

        # The proofs of A's end of a LINE order (retained) reach B, and stay there for a client
        # that connects later (a daemon restarting).
        await publish(a.client(), "daisee/a/market/line/7", b"proofs", retain=True)
        await wait_until(lambda: at_b.has("daisee/a/market/line/7", b"proofs"), 15, "proofs")
        async with listening(b.client(), "daisee/+/market/line/+") as later:
            await wait_until(lambda: later.has("daisee/a/market/line/7", b"proofs"), 5, "kept")

        # A's login on its own broker cannot write under B's name: refused there, nothing leaves.
        await publish(b.client(), "daisee/b/commitment", b"b-1")
        await wait_until(lambda: at_a.has("daisee/b/commitment", b"b-1"), 15, "b-1 at a")
        await publish(a.client(), "daisee/b/commitment", b"forged-locally")
        await publish(a.client(), "daisee/a/commitment", b"a-2")  # after it, on the same path
        await wait_until(lambda: at_b.has("daisee/a/commitment", b"a-2"), 15, "a-2 at b")
        assert not at_a.has("daisee/b/commitment", b"forged-locally")
        assert not at_b.has("daisee/b/commitment", b"forged-locally")
        # B's own commitment was not echoed back to it (an echo would have come before a-2).
        assert at_b.payloads("daisee/b/commitment") == [b"b-1"]

        # A node's login on the community broker cannot write under another's name either.
        forger = aiomqtt.Client(
            community.host,
            community.port,
            username="c",
            password=community.passwords["c"],
            tls_context=community.tls(),
        )
        async with forger:
            await forger.publish("daisee/b/commitment", b"forged-upstream", qos=1)
            await forger.publish("daisee/a/peer", b"forged-peer", qos=1)
            await forger.publish("daisee/c/commitment", b"c-1", qos=1)  # its own: allowed
        await wait_until(lambda: at_a.has("daisee/c/commitment", b"c-1"), 15, "c-1 at a")
        await wait_until(lambda: at_b.has("daisee/c/commitment", b"c-1"), 15, "c-1 at b")
        await wait_until(lambda: upstream.has("daisee/c/commitment", b"c-1"), 15, "c-1 seen")
        assert not at_a.has("daisee/b/commitment", b"forged-upstream")
        assert not at_b.has("daisee/a/peer", b"forged-peer")
        assert not upstream.has("daisee/b/commitment", b"forged-upstream")


async def test_commitments_wait_while_the_community_broker_is_down(
    network: tuple[CommunityBroker, NodeBroker, NodeBroker],
) -> None:
    community, a, b = network
    async with (
        listening(b.client(), COMMITMENTS, PEERS) as at_b,
        listening(a.client("homeassistant"), "daisee/a/#", a.state_topic) as at_a,
    ):
        await linked(a, at_b)
        community.stop()
        await wait_until(lambda: at_a.last(a.state_topic) == b"0", 15, "a's bridge to go down")

        # The node goes on: its own broker takes its messages and serves them locally.
        for n in (1, 2, 3):
            await publish(a.client(), "daisee/a/commitment", f"during-{n}".encode())
        await publish(a.client(), "daisee/a/peer", b"reading-during", qos=0)
        await wait_until(lambda: at_a.has("daisee/a/peer", b"reading-during"), 5, "served locally")
        assert at_a.payloads("daisee/a/commitment") == [b"during-1", b"during-2", b"during-3"]

        # The community broker is back (its saved sessions too): the queued commitments arrive,
        # in order, once each; the peer reading of the outage is not replayed (QoS 0, stale).
        community.start()
        await wait_until(lambda: at_a.last(a.state_topic) == b"1", 30, "a's bridge back")
        await wait_until(lambda: at_b.has("daisee/a/commitment", b"during-3"), 30, "catch-up")
        assert at_b.payloads("daisee/a/commitment") == [b"during-1", b"during-2", b"during-3"]
        await publish(a.client(), "daisee/a/peer", b"reading-after", qos=0)
        await wait_until(lambda: at_b.has("daisee/a/peer", b"reading-after"), 15, "fresh reading")
        assert not at_b.has("daisee/a/peer", b"reading-during")


async def test_a_community_broker_not_certified_for_its_name_is_refused(tmp_path: Path) -> None:
    community = CommunityBroker(tmp_path / "community", ("c", "d"))
    # c trusts another CA; d trusts the right one but knows the broker by a name its
    # certificate does not hold (it is made for 127.0.0.1 only).
    stranger_ca, _, _ = make_tls_files(_dir(tmp_path / "other-ca"))
    c = NodeBroker(tmp_path / "c", "c", community, ca=stranger_ca)
    d = NodeBroker(tmp_path / "d", "d", community, host="localhost")
    started: list[Any] = []
    try:
        for broker in (community, c, d):
            broker.start()
            started.append(broker)
        for node in (c, d):
            await refused(node)
        log = community.log_text()
        assert "as c (" not in log and "as d (" not in log  # neither ever logged in
    finally:
        for broker in reversed(started):
            broker.stop()


@pytest.mark.slow
async def test_install_and_first_boot_bridge_a_node_named_by_its_community_login(
    tmp_path: Path,
) -> None:
    community = CommunityBroker(tmp_path / "community", ("garden-9", "b"))
    root = pi_root(tmp_path / "root")
    # The package itself is not what this test is about (test_firmware installs it): pip
    # installs nothing, and the venv's `daisee-node` runs this source tree.
    installed = run_firmware("install-node.sh", root, PACKAGE="pip", PIP_ARGS="--no-index")
    assert installed.returncode == 0, installed.stderr + installed.stdout
    assert not (root / "etc/mosquitto/daisee.acl").exists()  # no node id to name in it yet
    exe = root / "opt/daisee-node/venv/bin/daisee-node"
    exe.write_text(f'#!/bin/sh\nPYTHONPATH={ROOT} exec {sys.executable} -m daisee_node "$@"\n')
    exe.chmod(0o755)
    # What the community gave the operator, put on the card's boot partition before the boot.
    boot = root / "boot/firmware"
    (boot / "daisee-community.txt").write_text(
        f"host = {community.host}\nport = {community.port}\nlogin = garden-9\nreconnect_max_s = 2\n"
    )
    shutil.copy(community.ca, boot / "daisee-community-ca.crt")
    shutil.copy(community.password_file("garden-9"), boot / "daisee-community.pass")
    first = run_firmware("firstboot.sh", root)
    assert first.returncode == 0, first.stderr + first.stdout
    assert 'id = "garden-9"' in (root / "etc/daisee-node/config.toml").read_text()
    assert "bridge to 127.0.0.1" in first.stdout
    assert not (boot / "daisee-community.pass").exists()
    bridge = root / "etc/mosquitto/conf.d/daisee-bridge.conf"
    assert bridge.stat().st_gid == 110  # the mosquitto group reads the password, no one else

    node = NodeBroker(tmp_path / "garden-9", "garden-9", community, root=root)
    b = NodeBroker(tmp_path / "b", "b", community)
    started: list[Any] = []
    try:
        for broker in (community, node, b):
            broker.start()
            started.append(broker)
        async with listening(b.client(), COMMITMENTS, PEERS) as at_b:
            await linked(node, at_b)
            await publish(node.client(), "daisee/garden-9/commitment", b"signed")
            await wait_until(lambda: at_b.has("daisee/garden-9/commitment", b"signed"), 15, "b")
    finally:
        for broker in reversed(started):
            broker.stop()


async def refused(node: NodeBroker) -> None:
    """The node's bridge failed its TLS check and says it is not linked."""
    await wait_until(lambda: "certificate verify failed" in node.log_text(), 20, "TLS to fail")
    async with listening(node.client(), node.state_topic) as state:
        await wait_until(lambda: state.last(node.state_topic) is not None, 5, "the bridge state")
        assert state.last(node.state_topic) == b"0"


def _dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


# -- real daemons ----------------------------------------------------------------------------------


def counter(db: Path, name: str) -> int | None:
    rows = db_rows(db, "SELECT value FROM counters WHERE name = ?", (name,))
    return int(rows[0][0]) if rows else None


def mqtt_section(broker: NodeBroker) -> dict[str, Any]:
    """The node's `[mqtt]` as the image's config has it: its own broker, login `daisee-node`."""
    return {
        "host": broker.host,
        "port": broker.port,
        "username": "daisee-node",
        "password_file": str(broker.password_file()),
        "reading_interval_s": 0.5,
        "discovery": False,
    }


@pytest.mark.slow
async def test_daemons_on_two_bridged_nodes_follow_each_others_signed_readings(
    tmp_path: Path, network: tuple[CommunityBroker, NodeBroker, NodeBroker], daemon: Any
) -> None:
    community, a_broker, b_broker = network
    keystore, password = tmp_path / "b-key.json", tmp_path / "b-key.pass"
    made = run_cli("keys", "new", "--keystore", str(keystore), "--password-file", str(password))
    assert made.returncode == 0, made.stderr
    b_address = json.loads(made.stdout)["address"]
    b_config = write_config(
        tmp_path / "b.toml",
        {
            "node": {"id": "b", "data_dir": str(tmp_path / "b-data")},
            "simulation": {
                "latitude_deg": 0.0,
                "longitude_deg": sunny_longitude(),
                "cloudiness": 0.0,
            },
            "sensors": [{"name": "pv", "kind": "simulated", "model": "pv", "interval_s": 0.2}],
            "mqtt": mqtt_section(b_broker),
            "chain": {
                "rpc_url": "http://127.0.0.1:9",
                "ledger_address": "0x" + "11" * 20,
                "chain_id": 1337,
                "keystore": str(keystore),
                "password_file": str(password),
            },
            "peers": [{"id": "a", "address": Account.create().address}],
        },
    )
    a_config = write_config(
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
            "mqtt": mqtt_section(a_broker),
            "peers": [{"id": "b", "address": b_address}],
        },
    )
    a_db = tmp_path / "a-data" / "node.db"
    a = daemon(a_config)
    b = daemon(b_config)

    def relay() -> int | None:
        return counter(a_db, "relay.supply.state")

    # B's signed PV readings cross both bridges; A's rule closes its relay on them.
    await until(lambda: relay() == 1, timeout=40)
    # The community broker goes away: B's readings stop reaching A, whose rule falls back.
    community.stop()
    await until(lambda: relay() == 0, timeout=20)
    # It is back: the bridges reconnect by themselves, fresh readings flow, the rule acts again.
    community.start()
    await until(lambda: relay() == 1, timeout=40)
    assert (counter(a_db, "peer.b.rejected") or 0) == 0
    for node in (a, b):
        node.signal(signal.SIGTERM)
        assert node.wait(15)[0] == 0
