"""daisee-mosquitto-setup against boot-partition files written by anyone holding the SD card:
each bad file is one clear line (exit 2, no traceback), the node stays standalone, and the
community password never stays on the card."""

from __future__ import annotations

import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from tests.support.bridge import (
    CommunityBroker,
    NodeBroker,
    add_logins,
    listening,
    make_tls_files,
    run_setup,
    wait_until,
)

BRIDGE = "etc/mosquitto/conf.d/daisee-bridge.conf"
PENDING = "etc/daisee-node/community-boot.pass"
KEPT = "etc/daisee-node/community.pass"


def node_root(tmp_path: Path, node_id: str = "house-3") -> Path:
    root = tmp_path / "root"
    (root / "etc/daisee-node").mkdir(parents=True)
    (root / "etc/daisee-node/config.toml").write_text(f'[node]\nid = "{node_id}"\n')
    (root / "boot/firmware").mkdir(parents=True)
    return root


def boot_files(root: Path, settings: bytes, password: bytes, ca: bytes | None = None) -> Path:
    boot = root / "boot/firmware"
    (boot / "daisee-community.txt").write_bytes(settings)
    (boot / "daisee-community.pass").write_bytes(password)
    if ca is not None:
        (boot / "daisee-community-ca.crt").write_bytes(ca)
    return boot


def refused(root: Path, done: subprocess.CompletedProcess[str], *words: str) -> None:
    """Exit 2, one line naming the problem, the node standalone, the password off the card."""
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert "sudo daisee-mosquitto-setup" in lines[0]  # how to retry
    assert not (root / BRIDGE).exists()  # standalone
    assert (root / "etc/mosquitto/conf.d/daisee.conf").is_file()  # its own listener regardless
    assert "daisee/house-3/#" in (root / "etc/mosquitto/daisee.acl").read_text()
    assert not (root / "boot/firmware/daisee-community.pass").exists()


def parked(root: Path, password: bytes) -> None:
    """The password kept, root only, byte for byte, for the retry."""
    pending = root / PENDING
    assert pending.read_bytes() == password
    assert stat.S_IMODE(pending.stat().st_mode) == 0o600


def test_a_der_ca_is_refused_and_the_retry_after_converting_it_bridges(tmp_path: Path) -> None:
    root = node_root(tmp_path)
    ca, _, _ = make_tls_files(tmp_path)
    der = tmp_path / "ca.der"
    openssl = shutil.which("openssl")
    assert openssl is not None
    subprocess.run(
        [openssl, "x509", "-in", str(ca), "-outform", "DER", "-out", str(der)],
        check=True,
        capture_output=True,
    )
    boot = boot_files(root, b"host = broker.example.org\n", b"s3cret\n", der.read_bytes())
    done = run_setup(root)
    refused(root, done, "daisee-community-ca.crt is not a PEM text file", "openssl x509")
    parked(root, b"s3cret\n")
    assert (boot / "daisee-community.txt").is_file()  # left for the operator to fix

    (boot / "daisee-community-ca.crt").write_bytes(ca.read_bytes())  # converted
    again = run_setup(root)
    assert again.returncode == 0, again.stderr
    assert "remote_password s3cret" in (root / BRIDGE).read_text().splitlines()
    assert not list(boot.iterdir()) and not (root / PENDING).exists()
    assert (root / KEPT).read_text() == "s3cret\n"


@pytest.mark.parametrize(
    "password",
    ["pëw\n".encode("utf-16"), b"p\xe9w\n"],
    ids=["utf-16", "latin-1"],
)
def test_a_password_file_not_in_utf8_is_refused_and_moved_off_the_card(
    tmp_path: Path, password: bytes
) -> None:
    root = node_root(tmp_path)
    boot_files(root, b"host = broker.example.org\n", password)
    done = run_setup(root)
    refused(root, done, "daisee-community.pass is not UTF-8 text")
    parked(root, password)

    # Fixed by writing the password again, as UTF-8, on the boot partition: it wins.
    (root / "boot/firmware/daisee-community.pass").write_text("pëw\n", encoding="utf-8")
    again = run_setup(root)
    assert again.returncode == 0, again.stderr
    assert "remote_password pëw" in (root / BRIDGE).read_text(encoding="utf-8").splitlines()
    assert not (root / PENDING).exists()


@pytest.mark.parametrize("password", ["ab@NODE_ID@ef", "ab@CD@ef", "@PASSWORD@", "a@b@@c"])
def test_a_password_with_at_signs_is_written_as_it_is(tmp_path: Path, password: str) -> None:
    root = node_root(tmp_path)
    boot_files(root, b"host = broker.example.org\n", password.encode() + b"\n")
    done = run_setup(root)
    assert done.returncode == 0, done.stderr
    lines = (root / BRIDGE).read_text().splitlines()
    assert f"remote_password {password}" in lines
    assert "remote_username house-3" in lines and "topic daisee/house-3/peer out 0" in lines


async def test_a_bridge_with_a_placeholder_in_its_password_logs_in(tmp_path: Path) -> None:
    """The password as written reaches the real community broker: the bridge links."""
    community = CommunityBroker(tmp_path / "community", ("house-3",))
    community.passwords["house-3"] = "ab@NODE_ID@ef"
    add_logins(community.root / "etc/mosquitto/daisee-community.passwd", community.passwords)
    node = NodeBroker(tmp_path / "house-3", "house-3", community)
    started: list[CommunityBroker | NodeBroker] = []
    try:
        for broker in (community, node):
            broker.start()
            started.append(broker)
        async with listening(node.client(), node.state_topic) as state:
            await wait_until(lambda: state.last(node.state_topic) == b"1", 20, "the bridge up")
        assert "as house-3 (" in community.log_text()
    finally:
        for broker in reversed(started):
            broker.stop()


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        (b"host = broker.example.org\nlogin = house 3\n", ["login 'house 3'", "no spaces"]),
        (
            b"host = broker.example.org\nlogin = house-3\nlogin = house-4\n",
            ["line 3", "login is given twice"],
        ),
        (b"host = a.example.org\nport = 8883\nhost = b.example.org\n", ["host is given twice"]),
        (b"host = [::1\n", ["host '[::1'"]),
        (b"host = ::1]\n", ["host '::1]'"]),
        (b"host = [broker.example.org]\n", ["host '[broker.example.org]'"]),
        (b"host = :::::\n", ["host ':::::'"]),
    ],
    ids=[
        "login-space",
        "login-twice",
        "host-twice",
        "open-bracket",
        "close-bracket",
        "name-in-brackets",
        "colons",
    ],
)
def test_ambiguous_settings_are_refused_naming_the_problem(
    tmp_path: Path, settings: bytes, words: list[str]
) -> None:
    root = node_root(tmp_path)
    boot_files(root, settings, b"s3cret\n")
    done = run_setup(root)
    refused(root, done, *words)
    parked(root, b"s3cret\n")


def test_an_ipv6_address_in_brackets_is_taken(tmp_path: Path) -> None:
    root = node_root(tmp_path)
    boot_files(root, b"host = [::1]\nport = 8884\n", b"s3cret\n")
    done = run_setup(root)
    assert done.returncode == 0, done.stderr
    assert "address [::1]:8884" in (root / BRIDGE).read_text().splitlines()


def test_a_failure_keeps_a_working_bridge_and_its_kept_password(tmp_path: Path) -> None:
    root = node_root(tmp_path)
    boot_files(root, b"host = broker.example.org\n", b"first\n")
    assert run_setup(root).returncode == 0
    bridge = (root / BRIDGE).read_text()

    # New settings on the card that fail: the working bridge and its kept password stay.
    boot_files(root, b"host = [::1\n", b"second\n")
    done = run_setup(root)
    assert done.returncode == 2 and "host '[::1'" in done.stderr
    assert (root / BRIDGE).read_text() == bridge
    assert (root / KEPT).read_text() == "first\n"
    parked(root, b"second\n")
    assert not (root / "boot/firmware/daisee-community.pass").exists()

    # Fixed settings: the parked password is the one used.
    (root / "boot/firmware/daisee-community.txt").write_text("host = [::1]\n")
    again = run_setup(root)
    assert again.returncode == 0, again.stderr
    assert "remote_password second" in (root / BRIDGE).read_text().splitlines()
    assert (root / KEPT).read_text() == "second\n" and not (root / PENDING).exists()


def test_the_bridge_template_says_to_restart_mosquitto() -> None:
    template = Path(__file__).parents[2] / "firmware/files/mosquitto-bridge.conf"
    text = template.read_text()
    assert "systemctl restart mosquitto" in text and "reload mosquitto" not in text
