"""The image's install and first-boot scripts, run into a root filesystem in a folder."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, free_port

pytestmark = pytest.mark.slow
FIRMWARE = ROOT / "firmware"


def base_root(tmp_path: Path) -> Path:
    """The bits of a Raspberry Pi OS root the scripts touch."""
    root = tmp_path / "root"
    etc = root / "etc"
    etc.mkdir(parents=True)
    (etc / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/bash\nmosquitto:x:105:110::/var/lib/mosquitto:/usr/sbin/nologin\n"
    )
    (etc / "group").write_text("root:x:0:\ngpio:x:997:pi\nmosquitto:x:110:\n")
    (etc / "shadow").write_text("root:*:19000:0:99999:7:::\nmosquitto:*:19000:0:99999:7:::\n")
    (etc / "gshadow").write_text("root:*::\ngpio:!::pi\nmosquitto:!::\n")
    for name in ("shadow", "gshadow"):
        (etc / name).chmod(0o640)
    (etc / "machine-id").write_text("0123456789abcdef0123456789a1b2c3\n")
    boot = root / "boot/firmware"
    boot.mkdir(parents=True)
    (boot / "config.txt").write_text("[all]\n")
    return root


def run(script: str, root: Path, **env: str) -> subprocess.CompletedProcess[str]:
    assert os.geteuid() == 0, "the install scripts create users and set owners: run as root"
    return subprocess.run(
        ["bash", str(FIRMWARE / script)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "ROOT": str(root), **env},
        check=False,
    )


def users(root: Path) -> dict[str, list[str]]:
    return {
        line.split(":")[0]: line.split(":")
        for line in (root / "etc/passwd").read_text().splitlines()
    }


def test_install_then_first_boot_provisions_a_node(tmp_path):
    root = base_root(tmp_path)
    (root / "boot/firmware/daisee-node-id.txt").write_text("garden-7\n")
    installed = run("install-node.sh", root)
    assert installed.returncode == 0, installed.stderr + installed.stdout

    # the user, with the hardware groups
    daisee = users(root)["daisee"]
    uid, gid = int(daisee[2]), int(daisee[3])
    groups = {
        line.split(":")[0]: line.split(":")[3].split(",")
        for line in (root / "etc/group").read_text().splitlines()
    }
    for group in ("gpio", "i2c", "dialout"):
        assert "daisee" in groups[group], group
    # the package runs from its venv
    exe = root / "opt/daisee-node/venv/bin/daisee-node"
    assert subprocess.run(
        [str(exe), "--version"], capture_output=True, text=True
    ).stdout.startswith("daisee-node ")
    # the template is not a valid config until the first boot names the node
    config = root / "etc/daisee-node/config.toml"
    assert subprocess.run([str(exe), "check-config", str(config)]).returncode == 2
    assert (
        root / "etc/systemd/system/multi-user.target.wants/daisee-firstboot.service"
    ).is_symlink()
    assert not (
        root / "etc/systemd/system/multi-user.target.wants/daisee-node.service"
    ).is_symlink()
    assert "dtparam=i2c_arm=on" in (root / "boot/firmware/config.txt").read_text()
    assert (
        "acl_file /etc/mosquitto/daisee.acl"
        in (root / "etc/mosquitto/conf.d/daisee.conf").read_text()
    )

    first = run("firstboot.sh", root)
    assert first.returncode == 0, first.stderr + first.stdout
    assert 'id = "garden-7"' in config.read_text()
    assert (
        subprocess.run([str(exe), "check-config", str(config)], capture_output=True).returncode == 0
    )
    key = root / "var/lib/daisee-node/node-key.json"
    mode = stat.S_IMODE(key.stat().st_mode)
    assert mode == 0o600 and key.stat().st_uid == uid
    password = root / "etc/daisee-node/key.pass"
    assert stat.S_IMODE(password.stat().st_mode) == 0o640 and password.stat().st_gid == gid
    address = (root / "boot/firmware/daisee-node-address.txt").read_text().strip()
    shown = subprocess.run(
        [str(exe), "keys", "show", "--keystore", str(key)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(shown.stdout)["address"] == address
    assert (root / "etc/systemd/system/multi-user.target.wants/daisee-node.service").is_symlink()

    # running it again changes nothing (the key above is the node's for good)
    before = key.read_bytes()
    again = run("firstboot.sh", root)
    assert again.returncode == 0 and "already provisioned" in again.stdout
    assert key.read_bytes() == before

    # the generated MQTT logins work on a real mosquitto with the installed ACL
    broker_password = (root / "etc/daisee-node/mqtt.pass").read_text().strip()
    check_broker_login(tmp_path, root, "daisee-node", broker_password)


def check_broker_login(tmp_path: Path, root: Path, user: str, password: str) -> None:
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(
        (root / "etc/mosquitto/conf.d/daisee.conf")
        .read_text()
        .replace("listener 1883", f"listener {port} 127.0.0.1")
        .replace("/etc/mosquitto/", f"{root}/etc/mosquitto/")
        + "user root\n"
    )
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    proc = subprocess.Popen(
        [mosquitto, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "mosquitto did not start"
                time.sleep(0.05)
        pub = shutil.which("mosquitto_pub")
        assert pub, "mosquitto_pub (Debian mosquitto-clients) is missing"

        def publish(secret: str) -> subprocess.CompletedProcess[bytes]:
            return subprocess.run(
                [
                    pub,
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(port),
                    "-u",
                    user,
                    "-P",
                    secret,
                    "-t",
                    "daisee/x/status",
                    "-m",
                    "online",
                    "-q",
                    "1",
                ],
                capture_output=True,
                timeout=10,
            )

        ok = publish(password)
        assert ok.returncode == 0, ok.stderr
        assert publish("nope").returncode != 0
    finally:
        proc.terminate()
        proc.wait(5)
