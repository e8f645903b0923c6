"""First boot against what an operator (or a power cut) leaves on the boot partition.

Each case runs firmware/firstboot.sh into a root filesystem in a folder, installed once by
install-node.sh; whatever the boot files hold, the node's config must stay valid.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from daisee_node.durable import create_private
from tests.integration.test_firmware import base_root, run

# Mostly waits on install-node.sh and first boot's processes: run beside the rest of the suite.
pytestmark = [pytest.mark.slow, pytest.mark.beside]

ENODE = "enode://" + "ab" * 64 + "@1.2.3.4:30303"
DATA = "var/lib/daisee-node"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = base_root(tmp_path_factory.mktemp("installed"))
    done = run("install-node.sh", root)
    assert done.returncode == 0, done.stderr + done.stdout
    return root


@pytest.fixture
def root(installed: Path, tmp_path: Path) -> Path:
    """A fresh copy of the installed root (the venv shared: its scripts name its path)."""
    copy = tmp_path / "node"
    copy.mkdir()
    for item in installed.iterdir():
        if item.name == "opt":
            (copy / "opt").symlink_to(item)
        else:
            shutil.copytree(item, copy / item.name, symlinks=True)
    return copy


def exe(root: Path) -> str:
    return str(root / "opt/daisee-node/venv/bin/daisee-node")


def config_ok(root: Path) -> bool:
    config = root / "etc/daisee-node/config.toml"
    return (
        subprocess.run([exe(root), "check-config", str(config)], capture_output=True).returncode
        == 0
    )


def config(root: Path) -> dict:
    return tomllib.loads((root / "etc/daisee-node/config.toml").read_text())


def keystore_address(root: Path) -> str:
    shown = subprocess.run(
        [exe(root), "keys", "show", "--keystore", str(root / DATA / "node-key.json")],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(shown.stdout)["address"]


def boot(root: Path, name: str, data: str | bytes) -> None:
    path = root / "boot/firmware" / name
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data)


def test_typos_in_the_chain_file_never_leave_the_config_invalid(root):
    boot(root, "daisee-node-id.txt", "house-3\n")
    boot(root, "daisee-chain.txt", "role = follower\nbootnodes = garbage\n")
    first = run("firstboot.sh", root)
    assert first.returncode == 0, first.stderr + first.stdout
    assert "Traceback" not in first.stderr
    line = next(x for x in first.stdout.splitlines() if "daisee-chain.txt" in x)
    assert "chain_node.bootnodes" in line and "garbage" in line
    assert "rm /var/lib/daisee-node/.provisioned" in line  # how to try again
    assert config_ok(root) and "chain_node" not in config(root)

    # fixed, and run again as the message says: the chain section is there
    boot(root, "daisee-chain.txt", f"role = follower\nbootnodes = {ENODE},\n")
    (root / DATA / ".provisioned").unlink()
    again = run("firstboot.sh", root)
    assert again.returncode == 0, again.stderr + again.stdout
    assert config_ok(root)
    assert config(root)["chain_node"]["bootnodes"] == [ENODE]  # the trailing comma is no node


@pytest.mark.parametrize(
    ("line", "kept"),
    [
        (f"bootnodes = {ENODE},", {"bootnodes": [ENODE]}),
        ("nat = a]", None),
        ("nat = extip:1.2.3.4\\", {"nat": "extip:1.2.3.4\\"}),
        ("role = signer", None),  # a key given twice is refused, not guessed
    ],
)
def test_chain_file_values_are_quoted_or_refused(root, line, kept):
    boot(root, "daisee-chain.txt", f"\ufeffrole = follower\r\n{line}\r\n")
    first = run("firstboot.sh", root)
    assert first.returncode == 0, first.stderr + first.stdout
    assert config_ok(root)
    if kept is None:
        assert "chain_node" not in config(root)
        assert "no chain client: daisee-chain.txt" in first.stdout
    else:
        section = config(root)["chain_node"]
        assert section["role"] == "follower"
        assert {k: section[k] for k in kept} == kept


def test_a_boot_cut_after_the_chain_section_still_copies_the_genesis(root):
    genesis = root / "tmp-spec"
    validators = "0x" + "11" * 20
    subprocess.run(
        [
            exe(root),
            "chain-spec",
            "--validators",
            validators,
            "--engine",
            "clique",
            "--out",
            genesis,
        ],
        check=True,
        capture_output=True,
    )
    spec = next(genesis.glob("*.json")).read_text()
    boot(root, "daisee-chain.txt", "role = signer\n")
    boot(root, "daisee-genesis.json", "{}")
    first = run("firstboot.sh", root)
    assert first.returncode == 0, first.stderr + first.stdout
    # a genesis geth cannot run is not installed (the chain client would restart for ever)
    assert "daisee-genesis.json is refused" in first.stdout
    assert "systemctl enable --now daisee-chain" in first.stdout
    assert not (root / "etc/daisee-node/genesis.json").exists()

    # the boot was cut after [chain_node] was written: the next boot finishes the set-up
    (root / DATA / ".provisioned").unlink()
    boot(root, "daisee-genesis.json", spec)
    again = run("firstboot.sh", root)
    assert again.returncode == 0, again.stderr + again.stdout
    assert (root / "etc/daisee-node/genesis.json").read_text() == spec
    text = (root / "etc/daisee-node/config.toml").read_text()
    assert text.count("[chain_node]") == 1 and config_ok(root)


def test_a_boot_cut_after_the_key_was_made_keeps_that_key(root):
    data = root / DATA
    password = root / "etc/daisee-node/key.pass"
    made = subprocess.run(
        [
            exe(root),
            "keys",
            "new",
            "--keystore",
            data / "node-key.json",
            "--password-file",
            password,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    address = json.loads(made.stdout)["address"]
    (data / "node-address.json").write_text("")  # the redirect, cut before the address came
    first = run("firstboot.sh", root)
    assert first.returncode == 0, first.stderr + first.stdout
    assert "Traceback" not in first.stderr
    assert (root / "boot/firmware/daisee-node-address.txt").read_text().strip() == address
    assert json.loads((data / "node-address.json").read_text())["address"] == address
    assert config_ok(root)


def test_an_empty_keystore_is_replaced_only_when_never_published(root):
    data = root / DATA
    data.mkdir(parents=True, exist_ok=True)
    (data / "node-key.json").write_text("")
    (root / "boot/firmware/daisee-node-address.txt").write_text("0x" + "12" * 20 + "\n")
    published = run("firstboot.sh", root)
    # a key that may be registered is never silently replaced
    assert published.returncode == 1
    assert "restore node-key.json from a backup" in published.stdout
    assert (data / "node-key.json").read_text() == ""
    assert not (data / ".provisioned").exists() and config_ok(root)

    (root / "boot/firmware/daisee-node-address.txt").unlink()
    fresh = run("firstboot.sh", root)
    assert fresh.returncode == 0, fresh.stderr + fresh.stdout
    assert "moved it to" in fresh.stdout
    assert [p.read_text() for p in data.glob("node-key.json.unreadable-*")] == [""]
    address = (root / "boot/firmware/daisee-node-address.txt").read_text().strip()
    assert keystore_address(root) == address


@pytest.mark.parametrize(
    ("text", "node_id", "said"),
    [
        (b"\xef\xbb\xbf\r\n  garden-7  \r\n", "garden-7", None),
        (b"my node\n", "node-a1b2c3", "'my node' has a space inside"),
        (b"x" * 5_000_000, "node-a1b2c3", "is not lower-case letters"),
    ],
)
def test_the_node_id_file(root, text, node_id, said):
    boot(root, "daisee-node-id.txt", text)
    first = run("firstboot.sh", root)
    assert first.returncode == 0, first.stderr + first.stdout
    assert config(root)["node"]["id"] == node_id and config_ok(root)
    if said:
        line = next(x for x in first.stdout.splitlines() if "daisee-node-id.txt" in x)
        assert said in line and len(line) < 600
        assert "systemctl restart daisee-node" in line


def test_a_community_login_given_twice_is_refused(root):
    boot(root, "daisee-community.txt", "login = house-1\nlogin = house-2\n")
    first = run("firstboot.sh", root)
    assert first.returncode == 0, first.stderr + first.stdout
    assert "`login =` is given 2 times" in first.stdout
    assert config(root)["node"]["id"] == "node-a1b2c3" and config_ok(root)


def test_a_key_file_is_written_whole_and_never_over_another(tmp_path, monkeypatch):
    path = tmp_path / "data" / "k.json"

    def cut(fd: int) -> None:
        raise OSError("power cut")

    # a write cut short leaves no key file at all (an empty one would be taken for a key)
    with monkeypatch.context() as m:
        m.setattr(os, "fsync", cut)
        with pytest.raises(OSError, match="power cut"):
            create_private(path, "secret")
    assert os.listdir(path.parent) == []
    create_private(path, "secret")
    assert path.read_text() == "secret" and (path.stat().st_mode & 0o777) == 0o600
    with pytest.raises(FileExistsError):
        create_private(path, "other")
    assert path.read_text() == "secret"
    assert os.listdir(path.parent) == ["k.json"]  # no temporary file left behind
