"""The node key: created once, private to its owner, and clear about what is wrong."""

from __future__ import annotations

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
