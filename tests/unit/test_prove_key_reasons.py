"""`prove` and `conformity --prove` name the node key's problem, not the buffer, when the key
that salted a period's leaves cannot be unlocked.

A real node (simulated sensors, the embedded py-evm chain, fast simulated time) seals and
commits a few periods over salted leaves once for the module; each test then works on its own
copy of that data dir, with a config whose chain is unreachable: a proof that gets past the
rebuilt tree stops at the chain, so the key is the only thing a test changes.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from eth_account import Account

from daisee_node import cli
from daisee_node.config import load_config
from daisee_node.daemon import Node
from tests.conftest import sim_sensors, write_config

UNREACHABLE = "http://127.0.0.1:9"


def _config(folder: Path, data: Path, rpc_url: str) -> Path:
    ledger = {} if rpc_url == "embedded" else {"ledger_address": "0x" + "11" * 20}
    return write_config(
        folder / "node.toml",
        {
            "node": {
                "id": "k1",
                "data_dir": str(data),
                "time_speed": 200,
                "time_start": "2026-06-21T10:00:00Z",
            },
            "store": {"flush_interval_s": 0.05},
            "sensors": sim_sensors(1.0),
            "chain": {
                "rpc_url": rpc_url,
                "period_s": 60,
                "seal_delay_s": 10,
                "submit_interval_s": 0.2,
                "confirmations": 1,
                "import_channel": "grid.import_wh",
                "export_channel": "pv.energy_wh",
                **ledger,
            },
        },
    )


async def _run_until_committed(path: Path) -> None:
    node = Node(load_config(path), config_path=path)
    task = asyncio.create_task(node.run())
    await asyncio.wait_for(node.started.wait(), 10)
    svc = node.ledger
    assert svc is not None

    async def poll() -> None:
        while (await svc.outbox.summary(svc.address))["confirmed_seq"] < 1:
            await asyncio.sleep(0.05)

    await asyncio.wait_for(poll(), 30)
    node.request_stop()
    assert await asyncio.wait_for(task, 8) == 0


@pytest.fixture(scope="module")
def sealed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A node's data dir holding periods committed over salted leaves, and its key."""
    folder = tmp_path_factory.mktemp("sealed")
    data = folder / "data"
    data.mkdir(mode=0o700)
    keystore, password = data / "node-key.json", data / "node-key.pass"
    password.write_text("right\n")
    # Few PBKDF2 rounds: every command here decrypts it.
    encrypted = Account.encrypt(Account.create().key, "right", kdf="pbkdf2", iterations=2)
    keystore.write_text(json.dumps(encrypted))
    for path in (keystore, password):
        os.chmod(path, 0o600)
    asyncio.run(_run_until_committed(_config(folder, data, "embedded")))
    return data


def _spoil_mode(password: Path) -> None:
    password.chmod(0o644)


def _spoil_missing(password: Path) -> None:
    password.unlink()


def _spoil_wrong(password: Path) -> None:
    password.write_text("wrong\n")


CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "open to others": (_spoil_mode, "is open to others (mode 644); chmod 600 it"),
    "missing": (_spoil_missing, "cannot read the key password"),
    "wrong password": (_spoil_wrong, "(wrong password?)"),
}


def _node(tmp_path: Path, sealed: Path) -> tuple[Path, Path]:
    """A copy of the sealed node's data dir, and a config over it with an unreachable chain."""
    data = tmp_path / "data"
    shutil.copytree(sealed, data)
    return _config(tmp_path, data, UNREACHABLE), data


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("case", list(CASES))
def test_prove_names_why_the_node_key_cannot_be_unlocked(
    case: str, tmp_path: Path, sealed: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spoil, reason = CASES[case]
    config, data = _node(tmp_path, sealed)
    password = data / "node-key.pass"
    spoil(password)
    before = (data / "node.db").read_bytes()

    for command in (
        ("prove", "-c", str(config), "--channel", "grid.export_wh"),
        ("conformity", "-c", str(config), "--period", "seq:1", "--prove"),
    ):
        code, out, err = _run(capsys, *command)
        assert code == 1, (command, err)
        assert out == "" and "Traceback" not in err
        lines = err.strip().splitlines()
        assert len(lines) == 1, err
        assert "cannot unlock the node key to rebuild salted leaves" in lines[0]
        assert reason in lines[0] and str(password) in lines[0]
        assert "readings removed" not in lines[0]
    # without --prove, the report is shown and its signed-root check says the same
    code, out, err = _run(capsys, "conformity", "-c", str(config), "--period", "seq:1", "--json")
    signed = json.loads(out)["signed_check"]
    assert "cannot unlock the node key to rebuild salted leaves" in str(signed)
    assert reason in str(signed)
    assert (data / "node.db").read_bytes() == before  # read only: nothing lost


def test_with_its_key_unlocked_the_proof_gets_past_the_tree(
    tmp_path: Path, sealed: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, _ = _node(tmp_path, sealed)
    code, out, err = _run(capsys, "prove", "-c", str(config), "--channel", "grid.export_wh")
    # the tree matched the commitment: only the (unreachable) chain is left to ask
    assert code == 1 and out == ""
    assert "cannot reach the chain" in err and "node key" not in err
