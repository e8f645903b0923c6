"""Bad input to the ledger's paths: a clear error, nothing lost, the node carries on."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiomqtt
from eth_account import Account

from daisee_node.config import load_config
from daisee_node.daemon import Node
from daisee_node.ledger.commitment import Commitment, sign, signed_to_json
from daisee_node.ledger.keys import new_keystore
from tests.conftest import db_rows, run_cli, sim_sensors, until, write_config


def test_verify_refuses_a_file_that_is_not_a_proof_and_an_unreachable_chain(tmp_path: Path):
    junk = tmp_path / "junk.json"
    junk.write_text('{"channel": "grid.power_w"}')
    result = run_cli("verify", str(junk), "--rpc", "http://127.0.0.1:9")
    assert result.returncode == 1
    assert "not a proof written by `prove`" in result.stderr
    assert "Traceback" not in result.stderr

    proof = {
        "node": Account.create().address,
        "channel": "a.b",
        "channel_id": "0x" + "00" * 32,
        "t_ms": 1,
        "value": None,
        "value_micro": 0,
        "quality": 0,
        "proof": [],
        "batch_proof": [],
        "ledger": Account.create().address,
        "commitment": {
            "node": Account.create().address,
            "seq": 1,
            "t0": 0,
            "t1": 1,
            "root": "0x" + "00" * 32,
            "count": 0,
            "import_wh": 0,
            "export_wh": 0,
            "prev_hash": "0x" + "00" * 32,
            "rules_hash": "0x" + "00" * 32,
        },
    }
    good_shape = tmp_path / "proof.json"
    good_shape.write_text(json.dumps(proof))
    result = run_cli("verify", str(good_shape), "--rpc", "http://127.0.0.1:9")
    assert result.returncode == 1
    assert "cannot reach the chain" in result.stderr and "Traceback" not in result.stderr
    assert "at http://127.0.0.1:9" in result.stderr  # which endpoint did not answer


def test_prove_says_why_it_cannot(tmp_path: Path):
    config = write_config(tmp_path / "node.toml", {"node": {"id": "p1", "data_dir": "data"}})
    # Both are usage or config problems: exit 2, as the README's exit codes say.
    result = run_cli("prove", "-c", str(config), "--channel", "grid.power_w", "--at", "noon")
    assert result.returncode == 2 and "not an ISO time" in result.stderr
    result = run_cli("prove", "-c", str(config), "--channel", "grid.power_w", "--at", "1000")
    assert result.returncode == 2 and "no [chain] section" in result.stderr
    assert "Traceback" not in result.stderr


async def test_a_relay_drops_garbage_and_forged_peer_commitments_and_keeps_good_ones(
    tmp_path: Path, broker
):
    data = tmp_path / "data"
    new_keystore(data / "node-key.json", data / "node-key.pass")
    path = write_config(
        tmp_path / "relay.toml",
        {
            "node": {"id": "relay", "data_dir": str(data)},
            "store": {"flush_interval_s": 0.05},
            "sensors": sim_sensors(1.0),
            "chain": {"rpc_url": "embedded", "relay_peers": True, "submit_interval_s": 60},
            "mqtt": {
                "host": broker.host,
                "port": broker.port,
                "username": "node",
                "password_file": str(broker.password_file("node")),
                "discovery": False,
            },
        },
    )
    node = Node(load_config(path), config_path=path)
    task = asyncio.create_task(node.run())
    ledger = node.ledger
    assert ledger is not None and node.mqtt is not None
    await asyncio.wait_for(node.mqtt.link.connected.wait(), 20)
    while ledger.chain_id is None or ledger.contract is None:
        await asyncio.sleep(0.05)

    peer, stranger = Account.create(), Account.create()
    c = Commitment(peer.address, 1, 0, 900_000, b"\1" * 32, 10, 0, 5, b"\0" * 32, b"\2" * 32)
    good = signed_to_json(c, sign(c, peer.key, ledger.chain_id, ledger.contract))
    forged = signed_to_json(c.with_(seq=2), sign(c, stranger.key, ledger.chain_id, ledger.contract))
    async with aiomqtt.Client(
        broker.host,
        broker.port,
        username="node",
        password=broker.password_file("node").read_text().strip(),
    ) as cl:
        for payload in ("not json", '{"commitment": {}}', forged, good):
            await cl.publish("daisee/peer-1/commitment", payload, qos=1)

    db = data / "node.db"
    # The four arrive in the order sent; once the last (genuine) one is kept and the forged
    # one counted, each has been handled.
    await until(
        lambda: (
            db_rows(db, "SELECT count(*) FROM commitments WHERE own = 0") == [(1,)]
            and db_rows(db, "SELECT value FROM counters WHERE name = 'ledger.peer_bad_signatures'")
        )
    )
    assert not task.done()  # still running
    node.request_stop()
    assert await asyncio.wait_for(task, 10) == 0
    # only the genuine one is kept (and handed to the submitter)
    rows = db_rows(db, "SELECT node, seq FROM commitments WHERE own = 0")
    assert rows == [(peer.address, 1)]
    bad = db_rows(db, "SELECT value FROM counters WHERE name = 'ledger.peer_bad_signatures'")
    assert bad == [(1,)]
