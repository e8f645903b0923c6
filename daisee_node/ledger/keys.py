"""The node's signing key: an encrypted keystore (JSON v3) readable only by its owner.

eth_account (and eth_utils under it: some 10 MB and a few hundred ms of imports) loads only when a
key is created or decrypted, not when this module is imported.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Final

from daisee_node.durable import create_private
from daisee_node.errors import DaiseeError
from daisee_node.secretfiles import read_secret

if TYPE_CHECKING:
    from eth_account.signers.local import LocalAccount

# PBKDF2 rather than scrypt: scrypt's default needs 256 MB, half a Pi Zero 2 W's memory.
KDF: Final = "pbkdf2"
KDF_ITERATIONS = 262_144


class KeyStoreError(DaiseeError):
    """The keystore or its password cannot be used."""


def ensure_password(password_file: Path) -> str:
    """Read the keystore password, creating a random one (mode 0600) when the file is absent."""
    if not password_file.exists():
        create_private(password_file, secrets.token_urlsafe(24) + "\n")
    return read_password(password_file)


def read_password(password_file: Path) -> str:
    """The key password; refused when the file is open to others, as the keystore is."""
    try:
        return read_secret(password_file, "the key password")
    except DaiseeError as exc:
        raise KeyStoreError(str(exc)) from None


def new_keystore(keystore: Path, password_file: Path) -> str:
    """Create a new key in `keystore` (never overwriting one); return its address."""
    if keystore.exists():
        raise KeyStoreError(f"{keystore} already exists; refusing to replace a node key")
    from eth_account import Account

    password = ensure_password(password_file)
    account = Account.create()
    data = Account.encrypt(account.key, password, kdf=KDF, iterations=KDF_ITERATIONS)
    create_private(keystore, json.dumps(data))
    return account.address


def keystore_address(keystore: Path) -> str:
    """The address a keystore holds (public: no password needed)."""
    from eth_utils import to_checksum_address

    try:
        data = json.loads(keystore.read_text())
        return to_checksum_address("0x" + str(data["address"]).removeprefix("0x"))
    except FileNotFoundError as exc:
        raise KeyStoreError(
            f"no keystore at {keystore}; create one with `daisee-node keys new`"
        ) from exc
    except (OSError, ValueError, KeyError) as exc:
        raise KeyStoreError(f"{keystore} is not a keystore: {exc}") from exc


def load_account(keystore: Path, password_file: Path) -> LocalAccount:
    """Decrypt the node key. Warns nothing, fails clearly: wrong password, bad file, bad mode."""
    from eth_account import Account

    mode = keystore.stat().st_mode & 0o777 if keystore.exists() else 0
    if mode & 0o077:
        raise KeyStoreError(f"{keystore} is readable by others (mode {mode:o}); chmod 600 it")
    keystore_address(keystore)
    try:
        key = Account.decrypt(json.loads(keystore.read_text()), read_password(password_file))
    except ValueError as exc:
        # A MAC mismatch is what a wrong password looks like: say which file holds it.
        raise KeyStoreError(
            f"cannot decrypt {keystore} with the password in {password_file}: {exc} "
            "(wrong password?)"
        ) from exc
    return Account.from_key(key)
