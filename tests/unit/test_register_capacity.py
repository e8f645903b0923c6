"""`daisee-node register-node` run again on py-evm: a node's capacity is governance's to change.

The chain is an embedded one kept in the test's folder, so the command (run in-process through
the CLI's `main`) and the test share it and its real ledger contract.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account

from daisee_node import cli
from daisee_node.ledger import chain, embedded


class Registry:
    """A kept embedded chain with a deployed ledger, and its governance's keystore."""

    def __init__(self, folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
        embedded.keep_in(folder / "chain")
        self.w3 = chain.connect(chain.EMBEDDED)
        gov = Account.from_key(chain.TESTER_KEYS[0])
        self.ledger = chain.Ledger(self.w3, chain.deploy(self.w3, gov, None, 1000))
        self.keystore, self.password = folder / "gov.json", folder / "gov.pass"
        self.password.write_text("governance\n")
        # Few PBKDF2 rounds: the command decrypts it each run.
        data = Account.encrypt(gov.key, "governance", kdf="pbkdf2", iterations=2)
        self.keystore.write_text(json.dumps(data))
        for path in (self.keystore, self.password):
            os.chmod(path, 0o600)
        self.capsys = capsys

    def register(self, node: str, *extra: str) -> tuple[dict[str, Any], str]:
        """`register-node NODE … EXTRA` as governance: (its JSON, its standard error)."""
        self.capsys.readouterr()
        code = cli.main(
            [
                "register-node", node, "--rpc", "embedded", "--ledger", self.ledger.address,
                "--keystore", str(self.keystore), "--password-file", str(self.password), *extra,
            ]
        )  # fmt: skip
        out, err = self.capsys.readouterr()
        assert code == 0, err
        return json.loads(out), err


@pytest.fixture
def registry(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Iterator[Registry]:
    try:
        yield Registry(tmp_path, capsys)
    finally:
        embedded.keep_in(None)


def test_registering_again_keeps_the_capacity_governance_set(registry: Registry) -> None:
    node = Account.create().address
    first, _ = registry.register(node)
    assert first["registered"] and first["capacity_w"] == chain.DEFAULT_CAPACITY_W
    capped, _ = registry.register(node, "--set-capacity", "--capacity-w", "12000")
    assert capped["capacity_w"] == 12000

    # the README's step 5 again, to give it gas money: the cap stays, and the output says so
    funded, note = registry.register(node, "--fund-eth", "1")
    assert funded == {"node": node, "registered": True, "seq": 0, "capacity_w": 12000}
    assert registry.ledger.head(node).capacity_w == 12000
    assert "12000 W: kept" in note and "--capacity-w" in note
    assert registry.w3.eth.get_balance(node) == 10**18

    # an explicit --capacity-w still changes it, without a "kept" note
    changed, note = registry.register(node, "--capacity-w", "9000")
    assert changed["capacity_w"] == 9000 == registry.ledger.head(node).capacity_w
    assert "kept" not in note


def test_a_removed_node_comes_back_with_its_capacity(registry: Registry) -> None:
    node = Account.create().address
    registry.register(node, "--capacity-w", "6000")
    removed, _ = registry.register(node, "--remove")
    assert not removed["registered"] and removed["capacity_w"] == 6000
    back, note = registry.register(node)
    assert back["registered"] and back["capacity_w"] == 6000
    assert "was registered with a capacity of 6000 W: kept" in note


def test_a_new_node_gets_the_default_and_a_bad_capacity_is_refused(
    registry: Registry, capsys: pytest.CaptureFixture[str]
) -> None:
    node = Account.create().address
    fresh, note = registry.register(node)
    assert fresh["capacity_w"] == chain.DEFAULT_CAPACITY_W and "kept" not in note
    capsys.readouterr()
    code = cli.main(
        [
            "register-node", node, "--rpc", "embedded", "--ledger", registry.ledger.address,
            "--keystore", str(registry.keystore), "--password-file", str(registry.password),
            "--capacity-w", "0",
        ]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and "--capacity-w 0: give a power in W" in err and "Traceback" not in err
    assert registry.ledger.head(node).capacity_w == chain.DEFAULT_CAPACITY_W
