"""`community allocate | bill` against commitments of another period length than `--period-s`
(anvil, real signed commitments): refused in one line that says the nodes' period and what to
give, exit 1; the same range with the right `--period-s` is computed; a node's lone shorter
first period still counts as `partial`, not as a wrong period."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_hash.auto import keccak

from daisee_node.cli import main
from daisee_node.community import key_hash, load_key
from daisee_node.community.registry import Registry
from daisee_node.ledger import chain as chainlib
from daisee_node.ledger.commitment import Commitment, sign
from tests.support.chains import AnvilLedger, anvil_with_registry
from tests.support.community import write_members

pytestmark = pytest.mark.beside  # mostly waits on anvil

DEMO_S = 30  # the period community-demo's nodes commit


@pytest.fixture
def chain(tmp_path: Path) -> Iterator[tuple[AnvilLedger, Registry]]:
    with anvil_with_registry(tmp_path) as ledger_and_registry:
        yield ledger_and_registry


def commit(anvil: AnvilLedger, node: LocalAccount, periods: list[tuple[int, int]]) -> None:
    """The node's commitments of `periods` (t0, t1), in one batch, 5 Wh imported in each."""
    signed, prev = [], b"\0" * 32
    for seq, (t0, t1) in enumerate(periods, start=1):
        c = Commitment(node.address, seq, t0, t1, b"\0" * 32, 0, 5, 0, prev, keccak(b"rules"))
        prev = c.struct_hash()
        signed.append((c, sign(c, node.key, anvil.ledger.chain_id, anvil.ledger.address)))
    receipt = chainlib.send(
        anvil.w3,
        anvil.gov,
        {"to": anvil.ledger.address, "data": anvil.ledger.batch_data(signed)},
    )
    ok, rejected = anvil.ledger.outcome(receipt)
    assert rejected == [] and len(ok) == len(periods)


def community(
    chain: tuple[AnvilLedger, Registry], folder: Path, shape: dict[str, list[tuple[int, int]]]
) -> tuple[list[str], int]:
    """Nodes committing the periods `shape` gives each (as offsets from a start ahead of the
    chain's clock, in s), the prorata key recorded from that start, the members file; the
    command-line options that read them, and the start (ms)."""
    anvil, registry = chain
    now_ms = int(anvil.w3.eth.get_block("latest")["timestamp"]) * 1000
    start = (now_ms // 900_000 + 1) * 900_000
    members: dict[str, str] = {}
    for name, periods in shape.items():
        node = Account.create()
        anvil.enrol(node.address, funded=False)
        commit(anvil, node, [(start + a * 1000, start + b * 1000) for a, b in periods])
        members[node.address] = name
    write_members(folder / "members.toml", members)
    (folder / "key.toml").write_text('kind = "prorata"\n')
    registry.record_key(anvil.gov, key_hash(load_key(folder / "key.toml")), start)
    (folder / "tariff.toml").write_text('local_price = "0.15"\nmonthly_fee = "1"\n')
    options = [
        "--rpc",
        anvil.anvil.url,
        "--ledger",
        anvil.ledger.address,
        "--registry",
        registry.address,
        "--members",
        str(folder / "members.toml"),
        "--key",
        str(folder / "key.toml"),
    ]
    return options, start


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def every(length_s: int, count: int, offset_s: int = 0) -> list[tuple[int, int]]:
    return [(offset_s + k * length_s, offset_s + (k + 1) * length_s) for k in range(count)]


def test_thirty_second_commitments_billed_as_quarter_hours_are_refused_with_the_period_to_give(
    chain: tuple[AnvilLedger, Registry], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    options, start = community(
        chain, tmp_path, {"roof": every(DEMO_S, 10), "ana": every(DEMO_S, 10)}
    )
    span = ["--from", str(start), "--to", str(start + 900_000)]
    # the default --period-s 900: each quarter hour would be `partial`, the digest wrong
    code, out, err = cli(capsys, "community", "allocate", *options, *span)
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "commits 30-s periods, not the 900-s periods of --period-s" in err
    assert err.rstrip().endswith("give --period-s 30")
    tariff = ["--tariff", str(tmp_path / "tariff.toml")]
    code, out, err = cli(capsys, "community", "bill", *options, *tariff, *span, "--json")
    assert code == 1 and out == "" and "give --period-s 30" in err
    # longer periods than --period-s are refused the same way
    code, _, err = cli(capsys, "community", "allocate", *options, *span, "--period-s", "10")
    assert code == 1 and "commits 30-s periods, not the 10-s periods" in err
    # the periods they commit: computed, every member-period whole
    right = ["--from", str(start), "--to", str(start + 10 * DEMO_S * 1000), "--period-s", "30"]
    code, out, err = cli(capsys, "community", "allocate", *options, *right)
    assert code == 0, err
    rows = [line for line in out.splitlines() if line.startswith("20")]
    assert len(rows) == 20 and all(row.endswith(",ok") for row in rows)


def test_periods_of_the_right_length_off_the_grid_are_refused(
    chain: tuple[AnvilLedger, Registry], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # 60-s periods starting 20 s after each minute: the node's clock grid is not the community's
    options, start = community(chain, tmp_path, {"roof": every(60, 5, offset_s=20)})
    span = ["--from", str(start), "--to", str(start + 360_000), "--period-s", "60"]
    code, out, err = cli(capsys, "community", "allocate", *options, *span)
    assert code == 1 and out == "" and err.count("\n") == 1
    assert "commits periods off the grid of --period-s 60" in err
    assert "give the period its node commits" in err


def test_a_lone_shorter_first_period_is_partial_not_refused(
    chain: tuple[AnvilLedger, Registry], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # a node started 40 s into a minute: its first period is 20 s, the next ones whole
    options, start = community(chain, tmp_path, {"roof": [(40, 60), *every(60, 3, offset_s=60)]})
    span = ["--from", str(start), "--to", str(start + 240_000), "--period-s", "60"]
    code, out, err = cli(capsys, "community", "allocate", *options, *span)
    assert code == 0, err
    statuses = [line.rsplit(",", 1)[1] for line in out.splitlines() if line.startswith("20")]
    assert statuses == ["partial", "ok", "ok", "ok"]


@pytest.mark.slow  # deploys the demo's contracts
def test_the_demo_s_chain_json_names_everything_an_auditor_gives(tmp_path: Path) -> None:
    """community-demo's set-up on anvil: chain.json names the registry (the one recording the
    key), the market, the period its nodes commit and the first block; an auditor reading it
    alone gets a command that runs. anvil keeps nothing: the hint says so, promising no restart;
    a geth home's hint names the chain node config to start again."""
    import json

    from daisee_node import community_demo as demo
    from daisee_node.ledger.keys import new_keystore

    anvil = demo.find_anvil()
    assert anvil is not None
    c = demo.Community(tmp_path, 30)
    homes = demo.HOMES[:2]  # roof and ana: one seller, one buyer
    for h in homes:
        (tmp_path / h.name).mkdir()
        c.addresses[h.name] = new_keystore(
            tmp_path / h.name / "node-key.json", tmp_path / h.name / "node-key.pass"
        )
    try:
        demo.start_anvil_chain(c, homes, anvil)
        demo.deploy(c, homes)
        written = json.loads((tmp_path / "chain.json").read_text())
        assert (written["period_s"], written["from_block"]) == (30, c.from_block)
        assert (written["registry"], written["market"]) == (c.registry, c.market)
        url = next(iter(written["rpc"].values()))
        assert demo.statement_url(c, homes) == url
        registry = Registry(chainlib.connect(url), written["registry"])
        assert [r.from_ms for r in registry.records()] == [c.key_from_ms]
        assert "anvil keeps nothing once the demo stops" in demo.restart_hint(c, url)
        code = main(
            [
                "community", "allocate", "--rpc", url, "--ledger", written["ledger"],
                "--registry", written["registry"], "--market", written["market"],
                "--members", str(tmp_path / "members.toml"), "--key", str(tmp_path / "key.toml"),
                "--from", str(c.key_from_ms), "--to", str(c.key_from_ms + 60_000),
                "--period-s", str(written["period_s"]), "--from-block", "0",
            ]
        )  # fmt: skip
        assert code == 0
    finally:
        c.stop()
    c.chain_configs["roof"] = tmp_path / "roof" / "chain.toml"
    hint = demo.restart_hint(c, c.rpc_urls["roof"])
    assert f"chain-node run -c {tmp_path / 'roof' / 'chain.toml'}" in hint
    assert f"answers on {c.rpc_urls['roof']}" in hint


def test_a_few_commitments_off_the_grid_pass_to_be_reported_most_are_refused() -> None:
    from daisee_node.community.billing import Committed
    from daisee_node.community.commands import check_period_grid
    from daisee_node.errors import DaiseeError

    node = "0x" + "a1" * 20
    names = {node: "alice"}
    starts = [k * 30_000 for k in range(60)]
    # an hour-long commitment before the node moved to 30-s periods: one of 31, reported later
    changed = [Committed(node, 0, 3_600_000, 0, 0)] + [
        Committed(node, t, t + 30_000, 0, 0) for t in range(0, 900_000, 30_000)
    ]
    check_period_grid(changed, names, starts, 30_000)
    # most of them do not fit: refused, the node's period named
    with pytest.raises(DaiseeError, match=r"node 0x(a1){20} \(alice\) commits 30-s periods"):
        check_period_grid(changed, names, [0, 900_000], 900_000)
    # outside the range, or of another node than a member's: not looked at
    check_period_grid(changed, names, [7_200_000], 900_000)
    check_period_grid(changed, {}, [0, 900_000], 900_000)
