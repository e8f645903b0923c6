"""Three daemons, each on its own chain node of a real three-signer Clique chain (geth 1.13.15),
with one MQTT broker: relayed commitments, a signer killed and restarted, a partition healed,
a follower added later."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils import keccak, to_checksum_address
from web3 import Web3

from daisee_node.ledger import chain as chainlib
from daisee_node.ledger import merkle
from daisee_node.ledger.keys import keystore_address, new_keystore
from daisee_node.ledger.market import channel_id
from tests.conftest import Daemon, db_rows, run_cli, sim_sensors, wait_for, write_config
from tests.support import market as mk
from tests.support.clocks import sunny_longitude
from tests.support.geth import CliqueNetwork, GethNode, connect

# Waits on geth's 2 s blocks far more than it computes: run beside the rest of the suite.
pytestmark = [pytest.mark.slow, pytest.mark.beside]

#: a period is two seconds of real time (60 s of node time at ×30)
SPEED, PERIOD_S = 30, 60
#: Clique has no finality: a commitment counts once its block is this deep
CONFIRMATIONS = 3
#: Rejected(reason 3): both relays sent a peer's commitment; the second one is refused, harmless
STALE_SEQ = 3


@dataclass
class Community:
    """The chain, the ledger on it, and three daemons: a and b submit (and relay peers'
    commitments), c signs and publishes only, each talking to its own signer."""

    net: CliqueNetwork
    gov: LocalAccount
    ledger: chainlib.Ledger
    configs: dict[str, Path]
    addresses: dict[str, str]
    nodes: dict[str, GethNode]
    procs: dict[str, Daemon] = field(default_factory=dict)

    def on_chain(self, name: str, ledger: chainlib.Ledger | None = None) -> int:
        return (ledger or self.ledger).head(self.addresses[name]).seq

    def wait_on_chain(self, at_least: dict[str, int], timeout: float = 60.0) -> None:
        wait_for(
            lambda: all(self.on_chain(n) >= seq for n, seq in at_least.items()),
            timeout=timeout,
            every=0.5,
        )

    def stop_daemons(self) -> None:
        for proc in self.procs.values():
            proc.signal(signal.SIGTERM)
        for name, proc in self.procs.items():
            code, out = proc.wait(20)
            assert code == 0, (name, out[-3000:])


def node_config(tmp_path: Path, name: str, node: GethNode, others: list[GethNode], ledger: str,
                broker: Any, **chain: Any) -> Path:  # fmt: skip
    data = tmp_path / name
    sections: dict[str, Any] = {
        "node": {"id": name, "data_dir": str(data), "time_speed": SPEED},
        # the roof in full sun whatever the hour: the nodes export, and earn credits
        # (a full battery: the surplus goes to the grid)
        "simulation": {
            "latitude_deg": 0.0,
            "longitude_deg": sunny_longitude(),
            "cloudiness": 0.0,
            "battery_initial_soc_pct": 100.0,
        },
        "store": {"flush_interval_s": 0.05},
        "sensors": sim_sensors(2.0),
        "chain": {
            "rpc_url": node.url,
            "rpc_fallback_urls": [o.url for o in others],
            "ledger_address": ledger,
            "chain_id": node.chain_id,
            "period_s": PERIOD_S,
            "seal_delay_s": 5,
            "submit_interval_s": 0.5,
            "confirmations": CONFIRMATIONS,
            "retry_max_s": 1,
            "rpc_timeout_s": 5,
            # node time: 20 s of real time before a batch not yet mined gets a higher fee
            "stuck_after_s": 600,
            "export_channel": "grid.export_wh",
            **chain,
        },
        "mqtt": {
            "host": broker.host,
            "port": broker.port,
            "username": "node",
            "password_file": str(broker.password_file("node")),
            "discovery": False,
        },
    }
    new_keystore(data / "node-key.json", data / "node-key.pass")
    return write_config(tmp_path / f"{name}.toml", sections)


def send_all(w3: Web3, sender: LocalAccount, txs: list[dict[str, Any]]) -> None:
    """Send transactions back to back (consecutive nonces), then wait for every receipt:
    one or two blocks for all of them instead of one each."""
    nonce = w3.eth.get_transaction_count(sender.address, "pending")
    fees = chainlib.fee_fields(w3)
    hashes = []
    for i, body in enumerate(txs):
        tx = {"from": sender.address, "chainId": w3.eth.chain_id, "nonce": nonce + i, **body}
        tx.setdefault("gas", chainlib.estimate_gas(w3, tx, 500_000))
        tx.update(fees)
        hashes.append(w3.eth.send_raw_transaction(sender.sign_transaction(tx).raw_transaction))
    for h in hashes:
        assert w3.eth.wait_for_transaction_receipt(h, timeout=60)["status"] == 1


def register_txs(
    ledger: chainlib.Ledger, addresses: list[str], capacity_w: int
) -> list[dict[str, Any]]:
    """The governance's transactions that register `addresses` (gas given: the ledger may
    not be deployed yet when they are signed)."""
    add = ledger.contract.functions.addNode
    return [
        {
            "to": ledger.address,
            "data": add(a, capacity_w)._encode_transaction_data(),
            "gas": 200_000,
        }
        for a in addresses
    ]


@pytest.fixture
def community(tmp_path: Path, daemon: Any, broker: Any) -> Iterator[Community]:
    gov = Account.create()
    net = CliqueNetwork(tmp_path / "chain", signers=3, period_s=2, funds={gov.address: 10**21})
    try:
        net.start()
        s0, s1, s2 = net.signers
        # the test reads the chain as a daemon does: from a node that answers
        w3 = chainlib.connect(s0.url, fallback_urls=[s1.url, s2.url])
        # The ledger's address follows from the deployer's nonce: deployment, registrations
        # and gas money go out together, and land in one or two blocks.
        nonce = w3.eth.get_transaction_count(gov.address, "pending")
        ledger = chainlib.Ledger(w3, get_create_address(gov.address, nonce))
        nodes = {"a": s0, "b": s1, "c": s2}
        configs = {
            name: node_config(
                tmp_path,
                name,
                node,
                [o for o in net.signers if o is not node],
                ledger.address,
                broker,
                **({"submit": False} if name == "c" else {"relay_peers": True}),
            )
            for name, node in nodes.items()
        }
        addresses = {n: keystore_address(tmp_path / n / "node-key.json") for n in configs}
        constructor_args = w3.codec.encode(["address", "uint256"], [gov.address, 1000])
        txs: list[dict[str, Any]] = [
            {"data": chainlib.artifact("DaiseeLedger")["bytecode"] + constructor_args.hex()}
        ]
        txs += register_txs(ledger, list(addresses.values()), chainlib.DEFAULT_CAPACITY_W)
        # c has no gas money: its commitments reach the chain in a's and b's transactions
        txs += [{"to": addresses[n], "value": 10**18, "gas": 21_000} for n in ("a", "b")]
        send_all(w3, gov, txs)
        c = Community(net, gov, ledger, configs, addresses, nodes)
        for name, cfg in configs.items():
            c.procs[name] = daemon(cfg)
        yield c
    finally:
        net.stop()


def get_create_address(sender: str, nonce: int) -> str:
    """The address of the contract `sender` creates with its transaction number `nonce`."""
    import rlp

    return to_checksum_address(keccak(rlp.encode([bytes.fromhex(sender[2:]), nonce]))[12:])


def outbox(config: Path, sql: str) -> list[tuple[Any, ...]]:
    return db_rows(config.parent / config.stem / "node.db", sql)


def sealed_seq(config: Path) -> int:
    rows = outbox(config, "SELECT max(seq) FROM commitments WHERE own = 1")
    return (rows[0][0] or 0) if rows else 0


def check_ledger(c: Community, ledger: chainlib.Ledger) -> None:
    """Every node's commitments on chain exactly once and in order; nothing refused but a
    relay's duplicate; c paid nothing; the credits are the committed export."""
    w3 = ledger.w3
    credited = 0
    for name, address in c.addresses.items():
        logs = ledger.contract.events.Committed().get_logs(
            argument_filters={"node": address}, from_block=0
        )
        seqs = [ev["args"]["seq"] for ev in logs]
        assert seqs == list(range(1, len(seqs) + 1)), (name, seqs)
        refused = ledger.contract.events.Rejected().get_logs(
            argument_filters={"node": address}, from_block=0
        )
        assert [ev["args"]["reason"] for ev in refused if ev["args"]["reason"] != STALE_SEQ] == []
        if name == "c":
            senders = {w3.eth.get_transaction(ev["transactionHash"])["from"] for ev in logs}
            assert senders and senders <= {c.addresses["a"], c.addresses["b"]}
            assert w3.eth.get_balance(address) == 0
        rows = outbox(
            c.configs[name],
            f"SELECT body FROM commitments WHERE own = 1 AND seq <= {len(seqs)}",
        )
        assert len(rows) == len(seqs)
        exported = sum(json.loads(b)["export_wh"] for (b,) in rows)
        assert ledger.credit().functions.balanceOf(address).call() == exported * 10**15
        credited += exported
    assert credited > 0


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    result = run_cli(*args, timeout=120)
    assert result.returncode == 0, (args, result.stdout, result.stderr)
    return result


def test_every_commitment_once_and_in_order_relayed_and_verified_on_a_later_follower(
    community: Community,
) -> None:
    c = community
    c.wait_on_chain({"a": 4, "b": 4, "c": 4})
    # blocks really come from several signers
    head = c.net.signers[0].head()
    signers = {c.net.signers[0].signer_of(n).lower() for n in range(max(1, head - 5), head + 1)}
    assert len(signers) >= 2

    follower = c.net.add_follower()
    wait_for(lambda: follower.head() >= c.net.signers[0].head() - 1, timeout=30, every=0.2)
    c.stop_daemons()
    c.net.settle()
    final = {n: c.on_chain(n) for n in c.configs}
    # the follower serves the ledger as the signers do
    on_follower = chainlib.Ledger(chainlib.connect(follower.url), c.ledger.address)
    assert {n: c.on_chain(n, on_follower) for n in c.configs} == final
    check_ledger(c, on_follower)

    # a reading of c (relayed by a or b) proven from c's data and verified on the follower
    cfg = c.configs["c"]
    (t0, t1) = outbox(cfg, "SELECT t0, t1 FROM commitments WHERE seq = 1")[0]
    proof = cli("prove", "-c", str(cfg), "--channel", "battery.soc_pct", "--at", str(t1 - 1))
    path = cfg.parent / "proof.json"
    path.write_text(proof.stdout)
    verified = json.loads(cli("verify", str(path), "--rpc", follower.url).stdout)
    assert verified["valid"] is True
    assert t0 <= json.loads(proof.stdout)["t_ms"] < t1


def test_a_killed_signer_blocks_go_on_and_its_daemon_fails_over(community: Community) -> None:
    c = community
    s0, s1, _ = c.net.signers
    c.wait_on_chain({"a": 2, "b": 2})
    s0.kill()  # a's own chain node, a power cut
    at_kill = {n: sealed_seq(cfg) for n, cfg in c.configs.items()}
    head = s1.head()
    # two signers of three keep sealing, and a's commitments go on through another node
    wait_for(lambda: s1.head() >= head + 3, timeout=30, every=0.2)
    wait_for(
        lambda: "chain node unreachable; using another" in c.procs["a"].output(),
        timeout=30,
        every=0.2,
    )
    c.wait_on_chain({n: seq + 2 for n, seq in at_kill.items()})
    c.stop_daemons()
    c.net.settle()
    check_ledger(c, c.ledger)


def test_a_signer_restarted_from_its_data_dir_rejoins_and_its_daemon_returns(
    community: Community,
) -> None:
    c = community
    s0, s1, _ = c.net.signers
    c.wait_on_chain({"a": 1, "b": 1})
    s0.kill()
    wait_for(lambda: "chain node unreachable" in c.procs["a"].output(), timeout=30, every=0.2)
    before = s1.head() + 1
    wait_for(lambda: s1.head() >= before, timeout=30, every=0.2)

    # back from its data dir: it catches up, seals again, and a goes back to it
    c.net.restart(s0)
    address = (s0.address or "").lower()
    wait_for(
        lambda: any(s1.signer_of(n).lower() == address for n in range(before + 1, s1.head() + 1)),
        timeout=30,
        every=0.5,
    )
    wait_for(lambda: "back on the own chain node" in c.procs["a"].output(), timeout=30)
    target = {n: sealed_seq(cfg) for n, cfg in c.configs.items()}
    c.wait_on_chain(target)
    c.stop_daemons()
    c.net.settle()
    check_ledger(c, c.ledger)


def test_a_power_cut_of_the_whole_community_every_signer_seals_again_and_nothing_is_lost(
    community: Community, daemon: Any
) -> None:
    """A neighbourhood outage: every chain node and every daemon killed at one instant, then all
    started again together, each signer sealing from its start (as `--mine` makes it) before it
    is peered with the others. They agree on one chain again and it goes on; every commitment
    sealed before the cut, and after, reaches it once and in order."""
    c = community
    c.wait_on_chain({"a": 2, "b": 2, "c": 2})
    for proc in c.procs.values():
        proc.kill()
    heads = {}
    for node in c.net.signers:
        heads[node.name] = node.head()
        node.kill()
    sealed = {n: sealed_seq(cfg) for n, cfg in c.configs.items()}

    for node in c.net.signers:
        node.launch()
    for node in c.net.signers:
        node.wait_ready()
    # Each kept every block it had: with state written only from time to time, each would go
    # back to its last state on disk, and the blocks after it would be gone from every copy.
    assert {n.name: n.head() for n in c.net.signers} == heads
    for node in c.net.signers:
        node.seal()
    for name, cfg in c.configs.items():
        c.procs[name] = daemon(cfg)
    signers = c.net.signers
    for i, a in enumerate(signers):
        for b in signers[i + 1 :]:
            connect(a, b)
    agreed = c.net.wait_agree(timeout=90)
    wait_for(lambda: c.net.wait_agree(timeout=30) >= agreed + 3, timeout=90, every=0.5)
    c.wait_on_chain({n: seq + 2 for n, seq in sealed.items()}, timeout=120)
    c.stop_daemons()
    c.net.settle()
    check_ledger(c, c.ledger)


def test_a_partitioned_node_rejoins_its_fork_is_reorganised_and_nothing_is_lost(
    community: Community,
) -> None:
    c = community
    c.wait_on_chain({"a": 2, "b": 2})
    # Cut off a's or b's node, whichever did not seal the last block: alone, it may seal one
    # more block (one of every two in a row, with three signers), a fork of its own.
    target, forked_at = None, 0
    for _ in range(4):
        head = c.net.signers[1].head()
        last = c.net.signers[1].signer_of(head).lower()
        name = "a" if (c.nodes["a"].address or "").lower() != last else "b"
        node = c.nodes[name]
        c.net.partition(node)
        start = node.head()
        try:
            wait_for(
                lambda n=node, s=start: (
                    n.head() > s and n.signer_of(n.head()).lower() == (n.address or "").lower()
                ),
                timeout=3 * c.net.period_s,
                every=0.1,
            )
            target, forked_at = name, node.head()
            break
        except AssertionError:  # the last block was its own after all: try again
            c.net.heal(node)
            c.net.wait_agree()
    assert target is not None, "the cut-off signer never sealed a block of its own"
    node = c.nodes[target]
    orphan = node.block_hash(forked_at)
    orphan_txs = node.call("eth_getBlockByNumber", [hex(forked_at), False])["transactions"]
    others = [n for n in c.net.signers if n is not node]
    # the others go on without it, well past its fork
    wait_for(lambda: others[0].head() >= forked_at + 3, timeout=30, every=0.2)
    assert node.head() == forked_at  # alone, it cannot seal twice in a row

    c.net.heal(node)
    c.net.wait_agree()
    assert node.block_hash(forked_at) != orphan  # its block was reorganised away
    target_seq = {n: sealed_seq(cfg) for n, cfg in c.configs.items()}
    c.wait_on_chain(target_seq)
    c.stop_daemons()
    c.net.settle()
    check_ledger(c, c.ledger)
    cfg = c.configs[target]
    own_txs = {
        ("0x" + bytes(r[0]).hex()).lower() for r in outbox(cfg, "SELECT tx_hash FROM ledger_txs")
    }
    if own_txs & {t.lower() for t in orphan_txs}:
        # its own batch was in the orphaned block: the daemon saw the reorg and sent again
        reorged = outbox(cfg, "SELECT value FROM counters WHERE name = 'ledger.reorged'")
        assert reorged and reorged[0][0] >= 1


def test_the_chain_spec_genesis_runs_the_ledger_and_the_market_on_geth(tmp_path: Path) -> None:
    signer, gov = Account.create(), Account.create()
    spec_dir = tmp_path / "spec"
    cli("chain-spec", "--engine", "clique", "--validators", signer.address, "--block-period", "1",
        "--chain-id", "4244", "--fund", f"{gov.address}=1000", "--out", str(spec_dir))  # fmt: skip
    genesis = spec_dir / "clique-genesis.json"
    config = json.loads(genesis.read_text())["config"]
    # London rules, nothing after: geth 1.13's Clique refuses Shanghai (and the merge)
    assert config["londonBlock"] == 0 and config["clique"]["period"] == 1
    assert not {"shanghaiTime", "cancunTime", "terminalTotalDifficulty"} & set(config)

    node = GethNode(tmp_path, "signer", genesis, signer)
    node.init()
    node.start()
    try:
        node.seal()
        w3 = chainlib.connect(node.url)
        ledger = chainlib.Ledger(w3, chainlib.deploy(w3, gov, None, mk.WH_PER_CREDIT))
        market = mk.deploy_market(w3, gov, ledger.address)
        seller, buyer, other = (Account.create() for _ in range(3))
        funded = (seller, buyer, other)
        txs = register_txs(ledger, [n.address for n in funded], mk.CAPACITY_W)
        txs += [{"to": n.address, "value": 10**18, "gas": 21_000} for n in funded]
        send_all(w3, gov, txs)
        m = mk.Market(w3, gov, ledger, ledger.credit(), market, seller, buyer, other)
        # a batch of signed commitments mints credits for the export, and proves a reading
        rows = [(channel_id("grid.export_wh"), 1_000, 5_000_000, 0)]
        recorded = m.commit(
            (seller, 0, mk.PERIOD_MS, 0, 20_000, rows), (buyer, 0, mk.PERIOD_MS, 0, 10_000, [])
        )
        assert m.balance(buyer) == 10_000 * mk.UNIT
        sealed = recorded[0]
        assert ledger.verify_reading(
            sealed.c, sealed.batch_proof, rows[0], merkle.proof(sealed.tree, 0)
        )
        # the market: an order escrowed by the buyer, taken by the seller
        t0 = mk.window_start(m)
        order_id = m.open(buyer, seller, 2_000, 1_000 * mk.UNIT, t0, t0 + mk.PERIOD_MS)
        m.send(seller, market.functions.accept(order_id))
        assert m.order(order_id)["state"] == mk.ACCEPTED
        assert m.balance(buyer) == 8_000 * mk.UNIT
        # and the blocks are Clique-sealed by the genesis's signer
        assert node.signer_of(node.head()).lower() == signer.address.lower()
    finally:
        node.stop()


def test_a_signer_is_added_and_removed_by_vote_never_by_editing_the_genesis(
    tmp_path: Path,
) -> None:
    """docs/chain.md's procedure on three signers: one vote is not a majority; two add a fourth
    signer, which then seals; three of the four remove one, whose key then seals nothing."""
    net = CliqueNetwork(tmp_path, signers=3, period_s=2)
    try:
        net.start()
        s0, s1, s2 = net.signers
        newcomer = Account.create()
        joiner = net.add_follower("newcomer", key=newcomer)
        k0, k1, k2 = (k.address.lower() for k in net.keys)
        new, old = newcomer.address.lower(), k2

        def everywhere(check: Any) -> bool:
            return all(check(n.signers_at()) for n in net.nodes)

        def sealed_by(node: GethNode, first: int) -> set[str]:
            return {node.signer_of(b).lower() for b in range(first, node.head() + 1)}

        # one signer of three votes: no majority, however many blocks it puts its vote into
        s0.call("clique_propose", [newcomer.address, True])
        start = s0.head()
        wait_for(lambda: k0 in sealed_by(s0, start + 1), timeout=60, every=0.5)
        wait_for(lambda: s0.head() >= start + 6, timeout=60, every=0.5)
        assert everywhere(lambda signers: new not in signers and len(signers) == 3)

        # a second vote passes it: every node changes its list at the same block
        s1.call("clique_propose", [newcomer.address, True])
        wait_for(lambda: everywhere(lambda signers: new in signers), timeout=90, every=0.5)
        added = next(b for b in range(start, s0.head() + 1) if new in s0.signers_at(b))
        assert all(new in n.signers_at(added) and new not in n.signers_at(added - 1)
                   for n in net.nodes)  # fmt: skip
        for s in (s0, s1):
            s.call("clique_discard", [newcomer.address])
        joiner.seal()
        wait_for(lambda: new in sealed_by(s0, added + 1), timeout=90, every=0.5)

        # four signers: removing one takes three votes (more than half), the newcomer's included
        for s in (s0, s1, joiner):
            s.call("clique_propose", [net.keys[2].address, False])
        wait_for(lambda: everywhere(lambda signers: old not in signers), timeout=120, every=0.5)
        removed = next(b for b in range(added, s0.head() + 1) if old not in s0.signers_at(b))
        for s in (s0, s1, joiner):
            s.call("clique_discard", [net.keys[2].address])
        # blocks go on without it, although its node still runs and still tries to seal
        assert s2.running
        wait_for(lambda: s0.head() >= removed + 8, timeout=90, every=0.5)
        net.wait_agree()
        assert old not in sealed_by(s0, removed + 1)
        assert sealed_by(s0, removed + 1) <= {k0, k1, new}
    finally:
        net.stop()


def test_fallback_urls_are_checked_with_the_config() -> None:
    from daisee_node.config import ConfigError, parse_config

    base = '[node]\nid = "a"\ndata_dir = "/tmp/x"\n[chain]\nledger_address = "0x' + "1" * 40 + '"\n'
    good = parse_config(
        base + 'rpc_url = "http://127.0.0.1:8545"\n'
        'rpc_fallback_urls = ["http://10.0.0.2:8545", "https://chain.example:8545"]\n'
    )
    assert good.chain is not None
    assert good.chain.rpc_fallback_urls == ["http://10.0.0.2:8545", "https://chain.example:8545"]
    with pytest.raises(ConfigError) as bad:
        parse_config(
            base + 'rpc_url = "http://127.0.0.1:8545"\nrpc_fallback_urls = ["ws://10.0.0.2"]\n'
        )
    assert "chain.rpc_fallback_urls[0]" in str(bad.value)
    with pytest.raises(ConfigError) as embedded:
        parse_config(base + 'rpc_url = "embedded"\nrpc_fallback_urls = ["http://10.0.0.2"]\n')
    assert "an embedded chain has no other node" in str(embedded.value)
