"""The node key: created once, private to its owner, and clear about what is wrong."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from daisee_node.ledger.keys import (
    KeyStoreError,
    keystore_address,
    load_account,
    new_keystore,
)


def test_a_new_key_is_private_and_never_replaced(tmp_path):
    keystore, password = tmp_path / "k.json", tmp_path / "k.pass"
    address = new_keystore(keystore, password)
    assert stat.S_IMODE(keystore.stat().st_mode) == 0o600
    assert stat.S_IMODE(password.stat().st_mode) == 0o600
    assert keystore_address(keystore) == address
    assert load_account(keystore, password).address == address
    before = keystore.read_bytes()
    with pytest.raises(KeyStoreError, match="refusing to replace"):
        new_keystore(keystore, password)
    assert keystore.read_bytes() == before


def test_wrong_password_loose_mode_and_missing_file_are_clear_errors(tmp_path):
    keystore, password = tmp_path / "k.json", tmp_path / "k.pass"
    new_keystore(keystore, password)
    wrong = tmp_path / "wrong.pass"
    wrong.write_text("not it\n")
    wrong.chmod(0o600)
    with pytest.raises(KeyStoreError, match="cannot decrypt"):
        load_account(keystore, wrong)
    keystore.chmod(0o644)
    with pytest.raises(KeyStoreError, match="readable by others"):
        load_account(keystore, password)
    with pytest.raises(KeyStoreError, match="keys new"):
        keystore_address(tmp_path / "none.json")


def test_a_password_file_open_to_others_is_refused(tmp_path: Path) -> None:
    keystore, password = tmp_path / "k.json", tmp_path / "k.pass"
    new_keystore(keystore, password)
    password.chmod(0o644)
    with pytest.raises(KeyStoreError, match=r"open to others.*chmod 600"):
        load_account(keystore, password)
    password.chmod(0o640)  # the image's way: readable by the node's group only
    assert load_account(keystore, password).address


def test_a_folder_made_for_a_new_key_is_private(tmp_path: Path) -> None:
    data = tmp_path / "data"
    new_keystore(data / "node-key.json", data / "node-key.pass")
    assert data.stat().st_mode & 0o777 == 0o700


def _image_config(tmp_path: Path) -> Path:
    """The image's config template as a fresh node has it after its first boot (`[chain]`
    still commented out), its data dir moved into the test's folder."""
    template = Path(__file__).parents[2] / "firmware/files/config.toml"
    text = template.read_text()
    assert "\n[chain]" not in text  # the case under test: no [chain] yet
    config = tmp_path / "config.toml"
    data = tmp_path / "data"
    text = text.replace('"/var/lib/daisee-node"', f'"{data}"', 1)
    config.write_text(text.replace('"CHANGE-ME"', '"node-1"', 1))  # as the first boot sets it
    return config


def test_keys_show_on_a_fresh_image_reads_the_default_node_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from daisee_node import cli

    config = _image_config(tmp_path)
    keystore = tmp_path / "data" / "node-key.json"
    # as the first boot makes it
    address = new_keystore(keystore, tmp_path / "data" / "node-key.pass")
    assert cli.main(["keys", "show", "-c", str(config)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown == {"address": address, "keystore": str(keystore)}


def test_keys_show_without_chain_or_key_names_the_file_it_looked_for(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from daisee_node import cli

    config = _image_config(tmp_path)
    assert cli.main(["keys", "show", "-c", str(config)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert f"no keystore at {tmp_path / 'data' / 'node-key.json'}" in err
    assert "keys new" in err
