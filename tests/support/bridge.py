"""A community broker and node brokers bridged to it, as the image sets them up.

The community broker runs `firmware/files/community-broker.conf` and `community-broker.acl` (TLS
with a throw-away CA, one login per node, persistence). Each node broker is set up by the node's
own `firmware/files/mosquitto-setup.py` (what `install-node.sh` and the first boot run) in a folder
standing for the node's root filesystem, from community settings on its boot partition (or the
environment), with the logins the first boot makes; then it runs as Debian runs it: a main
config with persistence that includes `conf.d/`. Only the paths (folder instead of `/`) and the
ports (free loopback ports) differ from a Pi.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiomqtt

from tests.conftest import ROOT, free_port
from tests.support.broker import _binary, make_tls_files

FILES = ROOT / "firmware/files"
SETUP = FILES / "mosquitto-setup.py"
#: the node's login on its own broker (files/config.toml's `[mqtt] username`)
NODE_LOGIN = "daisee-node"
VIEWER = "community-viewer"
LOG_TYPES = "log_type error\nlog_type warning\nlog_type notice\nlog_type information\n"


def run_setup(
    root: Path, env: dict[str, str] | None = None, *args: str
) -> subprocess.CompletedProcess[str]:
    """`daisee-mosquitto-setup` into the root filesystem `root` (no COMMUNITY_* from outside)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("COMMUNITY_")}
    return subprocess.run(
        [sys.executable, str(SETUP), *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**clean, "ROOT": str(root), **(env or {})},
        check=False,
    )


def localize(text: str, root: Path, port: int) -> str:
    """A config file of a Pi made to run from the folder `root` on loopback port `port`."""
    text = re.sub(r"(?m)^listener \d+$", f"listener {port} 127.0.0.1", text)
    for path in ("/etc/mosquitto/", "/var/lib/mosquitto/"):
        text = text.replace(path, f"{root}{path}")
    return text


def add_logins(passwd: Path, logins: dict[str, str]) -> None:
    passwd.parent.mkdir(parents=True, exist_ok=True)
    passwd.touch(mode=0o600)
    for login, password in logins.items():
        subprocess.run(
            [_binary("mosquitto_passwd"), "-b", str(passwd), login, password],
            check=True,
            capture_output=True,
        )


class Mosquitto:
    """One mosquitto process on a fixed loopback port (kept across restarts)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = _mkdir(workdir)
        self.root = workdir / "root"
        self.port = free_port()
        self.host = "127.0.0.1"
        self.conf = workdir / "mosquitto.conf"
        self.log = workdir / "mosquitto.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.passwords: dict[str, str] = {}

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [_binary("mosquitto"), "-c", str(self.conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.log_text()}")
            try:
                socket.create_connection((self.host, self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not start")

    def stop(self) -> None:
        """SIGTERM: mosquitto saves its sessions and queues (persistence) and exits."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class CommunityBroker(Mosquitto):
    """The community broker: the example config and ACL, TLS, one login per node."""

    def __init__(self, workdir: Path, nodes: tuple[str, ...]) -> None:
        super().__init__(workdir)
        self.ca, cert, key = make_tls_files(_mkdir(workdir / "tls"))
        etc = self.root / "etc/mosquitto"
        certs = _mkdir(etc / "certs")
        shutil.copy(cert, certs / "daisee-community.crt")
        shutil.copy(key, certs / "daisee-community.key")
        shutil.copy(self.ca, certs / "daisee-community-ca.crt")
        shutil.copy(FILES / "community-broker.acl", etc / "daisee-community.acl")
        _mkdir(self.root / "var/lib/mosquitto")
        self.passwords = {node: f"{node}-community-secret" for node in nodes}
        self.passwords[VIEWER] = "viewer-community-secret"
        add_logins(etc / "daisee-community.passwd", self.passwords)
        self.conf.write_text(
            localize((FILES / "community-broker.conf").read_text(), self.root, self.port)
            + f"user {getpass.getuser()}\nlog_dest file {self.log}\n{LOG_TYPES}"
        )

    def password_file(self, node: str) -> Path:
        """The node's community password, as the community gives it to the node's operator."""
        path = self.workdir / f"{node}.pass"
        path.write_text(self.passwords[node] + "\n")
        return path

    def tls(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))


class NodeBroker(Mosquitto):
    """A node's own mosquitto, set up by `daisee-mosquitto-setup`, bridged when `community`;
    or, with `root`, the one `install-node.sh` and `firstboot.sh` set up in that folder."""

    def __init__(
        self,
        workdir: Path,
        node_id: str,
        community: CommunityBroker | None,
        *,
        ca: Path | None = None,
        from_env: bool = False,
        root: Path | None = None,
        host: str | None = None,
    ) -> None:
        super().__init__(workdir)
        self.node_id = node_id
        if root is None:
            self._set_up(community, ca, from_env, host)
        else:
            self.root = root
            etc = root / "etc/daisee-node"
            self.passwords = {
                NODE_LOGIN: (etc / "mqtt.pass").read_text().strip(),
                "homeassistant": (etc / "homeassistant-mqtt.pass").read_text().strip(),
            }
        for conf in (self.root / "etc/mosquitto/conf.d").glob("*.conf"):
            conf.write_text(localize(conf.read_text(), self.root, self.port))
        _mkdir(self.root / "var/lib/mosquitto")
        # Debian's /etc/mosquitto/mosquitto.conf, in the folder.
        self.conf.write_text(
            f"user {getpass.getuser()}\npersistence true\n"
            f"persistence_location {self.root}/var/lib/mosquitto/\n"
            f"log_dest file {self.log}\n{LOG_TYPES}"
            f"include_dir {self.root}/etc/mosquitto/conf.d\n"
        )

    def _set_up(
        self, community: CommunityBroker | None, ca: Path | None, from_env: bool, host: str | None
    ) -> None:
        node_id = self.node_id
        config = _mkdir(self.root / "etc/daisee-node") / "config.toml"
        config.write_text(
            f'[node]\nid = "{node_id}"\n\n[mqtt]\nusername = "{NODE_LOGIN}"\n'
            'password_file = "/etc/daisee-node/mqtt.pass"\n'
        )
        env: dict[str, str] = {}
        if community is not None:
            ca = ca or community.ca
            password = community.password_file(node_id)
            if from_env:
                env = {
                    "COMMUNITY_HOST": host or community.host,
                    "COMMUNITY_PORT": str(community.port),
                    "COMMUNITY_CA": str(ca),
                    "COMMUNITY_LOGIN": node_id,
                    "COMMUNITY_PASSWORD_FILE": str(password),
                    "COMMUNITY_RECONNECT_MAX_S": "2",
                }
            else:
                boot = _mkdir(self.root / "boot/firmware")
                (boot / "daisee-community.txt").write_text(
                    f"# from the community\nhost = {host or community.host}\n"
                    f"port = {community.port}\n"
                    "reconnect_max_s = 2   # quick retries for the tests\n"
                )
                shutil.copy(ca, boot / "daisee-community-ca.crt")
                shutil.copy(password, boot / "daisee-community.pass")
        self.setup = run_setup(self.root, env)
        if self.setup.returncode != 0:
            raise RuntimeError(f"mosquitto setup failed:\n{self.setup.stdout}{self.setup.stderr}")
        # The logins the first boot makes.
        self.passwords = {NODE_LOGIN: f"{node_id}-local-secret", "homeassistant": "ha-secret"}
        add_logins(self.root / "etc/mosquitto/daisee.passwd", self.passwords)

    @property
    def state_topic(self) -> str:
        """Where the bridge says whether it is linked (`1`) or not (`0`), retained."""
        return f"$SYS/broker/connection/{self.node_id}/state"

    def password_file(self) -> Path:
        """The node login's password, as the first boot writes it for the daemon."""
        path = self.workdir / "mqtt.pass"
        path.write_text(self.passwords[NODE_LOGIN] + "\n")
        path.chmod(0o600)
        return path

    def client(self, login: str = NODE_LOGIN, **kwargs: Any) -> aiomqtt.Client:
        return aiomqtt.Client(
            self.host, self.port, username=login, password=self.passwords[login], **kwargs
        )


class Inbox:
    """Everything one client receives on its subscriptions, in order of arrival."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes]] = []

    def has(self, topic: str, payload: bytes) -> bool:
        return (topic, payload) in self.messages

    def payloads(self, topic: str) -> list[bytes]:
        return [p for t, p in self.messages if t == topic]

    def last(self, topic: str) -> bytes | None:
        found = self.payloads(topic)
        return found[-1] if found else None


@contextlib.asynccontextmanager
async def listening(client: aiomqtt.Client, *filters: str) -> AsyncIterator[Inbox]:
    """`client` connected and subscribed (QoS 1) to `filters`; what it gets lands in the inbox."""
    inbox = Inbox()
    async with client:
        for topic_filter in filters:
            await client.subscribe(topic_filter, qos=1)

        async def collect() -> None:
            async for msg in client.messages:
                payload = msg.payload if isinstance(msg.payload, bytes) else b""
                inbox.messages.append((msg.topic.value, payload))

        task = asyncio.create_task(collect())
        try:
            yield inbox
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.05)


async def publish(
    client_of: aiomqtt.Client, topic: str, payload: bytes, qos: int = 1, retain: bool = False
) -> None:
    """One message with its own short connection."""
    async with client_of as client:
        await client.publish(topic, payload, qos=qos, retain=retain)


def pi_root(path: Path) -> Path:
    """The bits of a Raspberry Pi OS root filesystem the install and first-boot scripts touch,
    with the `mosquitto` user the Debian package makes."""
    etc = _mkdir(path / "etc")
    (etc / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/bash\n"
        "mosquitto:x:105:110::/var/lib/mosquitto:/usr/sbin/nologin\n"
    )
    (etc / "group").write_text("root:x:0:\ngpio:x:997:pi\nmosquitto:x:110:\n")
    (etc / "shadow").write_text("root:*:19000:0:99999:7:::\nmosquitto:*:19000:0:99999:7:::\n")
    (etc / "gshadow").write_text("root:*::\ngpio:!::pi\nmosquitto:!::\n")
    for name in ("shadow", "gshadow"):
        (etc / name).chmod(0o640)
    (etc / "machine-id").write_text("0123456789abcdef0123456789a1b2c3\n")
    (_mkdir(path / "boot/firmware") / "config.txt").write_text("[all]\n")
    return path


def run_firmware(script: str, root: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """`firmware/<script>` into the root filesystem `root` (as root: it makes users)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("COMMUNITY_")}
    return subprocess.run(
        ["bash", str(ROOT / "firmware" / script)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**clean, "ROOT": str(root), **env},
        check=False,
    )


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
