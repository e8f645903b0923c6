"""On anvil: commitments only in order (an early one changes nothing and waits at the relay),
a node that lost its database resumes from the chain's head, and the capacity governance sets
with `register-node` bounds what a commitment may claim."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from eth_hash.auto import keccak

from daisee_node.clock import Clock
from daisee_node.ledger import chain as chainlib
from daisee_node.ledger.commitment import Commitment, sign
from daisee_node.ledger.keys import new_keystore
from daisee_node.ledger.service import LedgerService
from daisee_node.ledger.settings import ChainSection
from daisee_node.store import Retention, Store
from tests.conftest import run_cli, wait_for
from tests.integration.test_ledger_chains import address_of, committed_logs, node_config, outbox
from tests.support.chains import ANVIL_KEY, AnvilLedger

pytestmark = pytest.mark.slow

PERIOD_MS = 900_000
T0 = 1_781_000_000_000 // PERIOD_MS * PERIOD_MS
ZERO = b"\0" * 32


def period(node: Any, seq: int, prev: bytes, export_wh: int = 0) -> Commitment:
    t0 = T0 + (seq - 1) * PERIOD_MS
    return Commitment(
        node.address, seq, t0, t0 + PERIOD_MS, keccak(b"root"), 1, 0, export_wh, prev,
        keccak(b"rules"),
    )  # fmt: skip


def submit(chain: AnvilLedger, node: Any, *cs: Commitment) -> Any:
    """Submit signed commitments from governance's account, as any relay could."""
    ledger = chain.ledger
    items = [(c, sign(c, node.key, ledger.chain_id, ledger.address)) for c in cs]
    receipt = chainlib.send(
        chain.w3, chain.gov, {"to": ledger.address, "data": ledger.batch_data(items)}
    )
    return ledger.outcome(receipt)


async def test_an_early_commitment_changes_nothing_and_the_relay_sends_it_after_the_missing_one(
    tmp_path: Path, anvil: AnvilLedger
) -> None:
    peer = Account.create()  # signs and publishes; has no gas money
    anvil.enrol(peer.address, funded=False)
    c1 = period(peer, 1, ZERO, export_wh=10)
    c2 = period(peer, 2, c1.struct_hash(), export_wh=20)
    c3 = period(peer, 3, c2.struct_hash(), export_wh=30)
    submit(anvil, peer, c1)
    ledger = anvil.ledger
    credit = ledger.credit().functions
    before, supply = ledger.head(peer.address), credit.totalSupply().call()

    # A relay (or a front-runner) that has seq 3 but not seq 2 sends it: refused, no change.
    ok, rejected = submit(anvil, peer, c3)
    assert ok == [] and rejected == [(peer.address, 3, "seq is not the next one")]
    assert ledger.head(peer.address) == before and credit.totalSupply().call() == supply

    # A relaying node gets seq 3 first over MQTT: it keeps it and waits for seq 2.
    data = tmp_path / "relay"
    new_keystore(data / "node-key.json", data / "node-key.pass")
    settings = ChainSection(
        rpc_url=anvil.anvil.url,
        ledger_address=ledger.address,
        relay_peers=True,
        confirmations=1,
        submit_interval_s=0.2,
    )
    store = Store(data / "node.db", retention=Retention(flush_interval_s=0.02))
    await store.open()
    writer = asyncio.create_task(store.run())
    relay = LedgerService(settings, store, Clock(), data, [], {})
    anvil.enrol(relay.address)
    await relay.connect()
    assert relay.submitter is not None

    def signed(c: Commitment) -> bytes:
        return sign(c, peer.key, ledger.chain_id, ledger.address)

    assert await relay.accept_peer(c3, signed(c3))
    for _ in range(3):
        assert await relay.submitter.round() is False  # nothing to send, nothing in flight
    assert await store.query("SELECT count(*) FROM ledger_txs") == [(0,)]
    assert (await relay.outbox.get(peer.address, 3)).state == "pending"  # type: ignore[union-attr]

    assert await relay.accept_peer(c2, signed(c2))

    async def both_confirmed() -> bool:
        await relay.submitter.round()  # type: ignore[union-attr]
        rows = await store.query(
            "SELECT count(*) FROM commitments WHERE node = ? AND state = 'confirmed'",
            (peer.address,),
        )
        return rows[0][0] == 2

    for _ in range(200):
        if await both_confirmed():
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("seq 2 and 3 were not both confirmed")
    logs = committed_logs(ledger, peer.address)
    assert [seq for seq, _ in logs] == [1, 2, 3]
    assert logs[1][1] == logs[2][1]  # seq 2 then 3, in the relay's one batch
    assert ledger.head(peer.address).follows(c3.struct_hash())
    assert credit.balanceOf(peer.address).call() == 60 * 10**15
    store.stop()
    await writer
    await store.close()


def test_a_node_whose_database_is_moved_aside_resumes_from_the_chain_head(
    tmp_path: Path, daemon: Any, anvil: AnvilLedger
) -> None:
    cfg = node_config(tmp_path, "m", anvil.anvil.url, anvil.ledger.address)
    node = address_of(cfg)
    anvil.enrol(node)
    proc = daemon(cfg)
    wait_for(lambda: anvil.ledger.head(node).seq >= 2, timeout=60)
    proc.signal(signal.SIGTERM)
    assert proc.wait(15)[0] == 0
    # A batch sent just before the stop may still wait for anvil's next block: the head is
    # read once the node has nothing pending, or the restarted node's first seq would be
    # compared with a head that moves under it.
    eth = anvil.w3.eth
    wait_for(
        lambda: eth.get_transaction_count(node, "pending") == eth.get_transaction_count(node),
        timeout=30,
    )
    before = anvil.ledger.head(node).seq

    # As a failed integrity check does: the file (and its outbox) is moved aside.
    db = cfg.parent / cfg.stem / "node.db"
    for path in db.parent.glob("node.db*"):
        path.rename(path.with_name(path.name.replace("node.db", "node.db.corrupt-test")))
    proc = daemon(cfg)
    wait_for(lambda: anvil.ledger.head(node).seq >= before + 2, timeout=60)
    proc.signal(signal.SIGTERM)
    assert proc.wait(15)[0] == 0

    own = outbox(cfg, "SELECT seq, state FROM commitments WHERE own = 1 ORDER BY seq")
    assert own[0][0] == before + 1  # not seq 1 again
    assert "rejected" not in {state for _, state in own}
    seqs = [seq for seq, _ in committed_logs(anvil.ledger, node)]
    assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) >= before + 2


def test_confirmed_commitments_the_chain_lost_are_sent_again_in_order(
    tmp_path: Path, daemon: Any, anvil: AnvilLedger
) -> None:
    """Every chain node went back to an older state at once (a power cut of the whole
    community): the node's confirmed commitments are gone from the chain, however deep they
    were. The node sends them again, in order, and goes on after them."""
    cfg = node_config(tmp_path, "w", anvil.anvil.url, anvil.ledger.address)
    node = address_of(cfg)
    anvil.enrol(node)
    snapshot = anvil.anvil.call("evm_snapshot", [])
    proc = daemon(cfg)
    confirmed_sql = "SELECT seq FROM commitments WHERE own = 1 AND state = 'confirmed'"
    wait_for(lambda: len(outbox(cfg, confirmed_sql)) >= 3, timeout=60)
    assert anvil.anvil.call("evm_revert", [snapshot]) is True
    lost = max(seq for (seq,) in outbox(cfg, confirmed_sql))
    assert anvil.ledger.head(node).seq == 0  # the chain holds none of them now

    wait_for(lambda: anvil.ledger.head(node).seq >= lost + 2, timeout=90)
    proc.signal(signal.SIGTERM)
    code, output = proc.wait(15)
    assert code == 0, output[-3000:]
    assert "gone from the chain" in output
    (rewound,) = outbox(cfg, "SELECT value FROM counters WHERE name = 'ledger.rewound'")[0]
    assert rewound >= 3
    seqs = [seq for seq, _ in committed_logs(anvil.ledger, node)]
    assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) >= lost + 2
    states = {state for (state,) in outbox(cfg, "SELECT state FROM commitments WHERE own = 1")}
    assert "rejected" not in states


def test_register_node_sets_the_capacity_the_ledger_enforces(
    tmp_path: Path, anvil: AnvilLedger
) -> None:
    gov_keystore, gov_pass = tmp_path / "gov.json", tmp_path / "gov.pass"
    gov_pass.write_text("governance")
    gov_keystore.write_text(json.dumps(Account.encrypt(ANVIL_KEY, "governance")))
    gov_keystore.chmod(0o600)
    gov_pass.chmod(0o600)
    node = Account.create()

    def register(*extra: str) -> dict[str, Any]:
        result = run_cli(
            "register-node", node.address, "--rpc", anvil.anvil.url,
            "--ledger", anvil.ledger.address, "--keystore", str(gov_keystore),
            "--password-file", str(gov_pass), *extra,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    assert register("--capacity-w", "1000") == {
        "node": node.address,
        "registered": True,
        "seq": 0,
        "capacity_w": 1000,
    }
    # 1 kW over 15 minutes is 250 Wh
    ok, rejected = submit(anvil, node, period(node, 1, ZERO, export_wh=251))
    assert ok == [] and rejected[0][2] == "totals exceed the node's capacity"
    assert anvil.ledger.credit().functions.totalSupply().call() == 0
    ok, _ = submit(anvil, node, c1 := period(node, 1, ZERO, export_wh=250))
    assert [i.seq for i in ok] == [1]

    assert register("--set-capacity", "--capacity-w", "2000")["capacity_w"] == 2000
    ok, _ = submit(anvil, node, period(node, 2, c1.struct_hash(), export_wh=500))
    assert [i.seq for i in ok] == [2]
    assert anvil.ledger.credit().functions.balanceOf(node.address).call() == 750 * 10**15
