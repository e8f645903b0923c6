"""The community end to end: three real daemons (one producer, two consumers) commit their periods
on anvil with their node keys; governance records two keys in the registry beforehand. The
`community` command, reading the chain alone, allocates and bills: its allocation equals the one
computed from the nodes' own databases, the producer's bill reproduces by hand, and a key file
whose hash is not the recorded one is refused."""

from __future__ import annotations

import calendar
import csv
import json
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account

from daisee_node.community import key_hash, load_key
from daisee_node.community.billing import (
    Committed,
    KeyInForce,
    gather,
    period_range,
    periods,
    translate_key,
    utc_text,
)
from daisee_node.community.files import load_members
from daisee_node.community.outputs import PeriodWriter
from daisee_node.community.registry import Registry, deploy
from daisee_node.ledger.commitment import Commitment
from tests.conftest import ROOT, db_rows, wait_for, write_config
from tests.support.chains import AnvilLedger
from tests.support.clocks import sunny_longitude

pytestmark = [pytest.mark.slow, pytest.mark.beside]  # waits on daemons and the chain

PERIOD_S = 10  # the shortest period a node commits
PERIOD_MS = PERIOD_S * 1000
PRORATA_PERIODS, TIERS_PERIODS = 1, 1
NAMES = ("sol", "alice", "bob")


def node_config(tmp_path: Path, name: str, key: tuple[Path, Path, str], anvil: AnvilLedger) -> Path:
    """A node reading its simulated grid meter every 0.2 s and committing every 10 s. sol has a
    big roof and a small load; alice and bob only consume (no roof, no battery to draw from)."""
    producer = name == "sol"
    simulation: dict[str, Any] = {
        "latitude_deg": 0.0,
        "longitude_deg": sunny_longitude(),
        "cloudiness": 0.0,
        "noise_pct": 0.0,
        "pv_peak_w": 6000.0 if producer else 0.0,
        "load_base_w": 200.0 if producer else (5000.0 if name == "alice" else 3000.0),
        "load_peak_w": 0.0,
        "battery_max_charge_w": 0.0,
        "battery_max_discharge_w": 0.0,
        "seed": len(name),
    }
    keystore, password, _ = key
    return write_config(
        tmp_path / f"{name}.toml",
        {
            "node": {"id": name, "data_dir": str(tmp_path / f"{name}-data")},
            "store": {"flush_interval_s": 0.05},
            "simulation": simulation,
            "sensors": [{"name": "grid", "kind": "simulated", "model": "grid", "interval_s": 0.2}],
            "chain": {
                "rpc_url": anvil.anvil.url,
                "ledger_address": anvil.ledger.address,
                "keystore": str(keystore),
                "password_file": str(password),
                "period_s": PERIOD_S,
                "seal_delay_s": 0.5,
                "submit_interval_s": 0.5,
                "confirmations": 1,
                "import_channel": "grid.import_wh",
                "export_channel": "grid.export_wh",
            },
        },
    )


def own_commitments(tmp_path: Path, name: str) -> list[Commitment]:
    """The node's own commitments on the chain, from its own database."""
    rows = db_rows(
        tmp_path / f"{name}-data" / "node.db",
        "SELECT body FROM commitments WHERE own = 1 AND state IN ('included', 'confirmed') "
        "ORDER BY seq",
    )
    return [Commitment.from_json(json.loads(body)) for (body,) in rows]


def cli_together(*commands: list[str]) -> list[subprocess.CompletedProcess[str]]:
    """Run `daisee-node` commands side by side (the test waits on processes, not on the CPU)."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "daisee_node", *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for argv in commands
    ]
    done = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return done


def enrol_at_once(anvil: AnvilLedger, tmp_path: Path) -> dict[str, tuple[Path, Path, str]]:
    """A node key per member, registered and funded by governance in one block or two (the
    transactions go out together, then the last receipt is awaited)."""
    from daisee_node.ledger import chain as chainlib
    from daisee_node.ledger.commitment import DEFAULT_CAPACITY_W
    from daisee_node.ledger.keys import new_keystore

    w3, gov, ledger = anvil.w3, anvil.gov, anvil.ledger
    keys = {}
    nonce = w3.eth.get_transaction_count(gov.address, "pending")
    fees = chainlib.fee_fields(w3, bump=2.0)
    sent = None
    for name in NAMES:
        keystore, password = tmp_path / f"{name}-key.json", tmp_path / f"{name}-key.pass"
        address = new_keystore(keystore, password)
        keys[name] = (keystore, password, address)
        add = ledger.contract.functions.addNode(address, DEFAULT_CAPACITY_W)
        for tx in (
            {"to": ledger.address, "data": add._encode_transaction_data(), "gas": 200_000},
            {"to": address, "value": 10**18, "gas": 21_000},
        ):
            signed = gov.sign_transaction(
                {**tx, **fees, "nonce": nonce, "chainId": ledger.chain_id}
            )
            sent = w3.eth.send_raw_transaction(signed.raw_transaction)
            nonce += 1
    w3.eth.wait_for_transaction_receipt(sent, timeout=30)
    return keys


def test_allocation_from_the_chain_alone_equals_the_nodes_own_and_bills_by_hand(
    tmp_path: Path, anvil: AnvilLedger, daemon: Any
) -> None:
    keys = enrol_at_once(anvil, tmp_path)
    address = {name: keys[name][2].lower() for name in NAMES}
    members = tmp_path / "members.toml"
    members.write_text(
        'name = "Toit"\n[members]\n' + "".join(f'"{address[n]}" = "{n}"\n' for n in NAMES)
    )
    prorata = tmp_path / "prorata.toml"
    prorata.write_text('version = 1\nkind = "prorata"\nname = "default key"\n')
    tiers = tmp_path / "tiers.toml"
    tiers.write_text('kind = "tiers"\ntiers = [["bob"]]\n')  # bob first, then alice

    # Governance deploys the registry and records both keys before the periods they share.
    registry = Registry(anvil.w3, deploy(anvil.w3, anvil.gov, anvil.ledger.address))
    now_ms = int(anvil.w3.eth.get_block("latest")["timestamp"]) * 1000
    start = (now_ms + 4000) // PERIOD_MS * PERIOD_MS + PERIOD_MS  # 4 to 14 s from now
    switch = start + PRORATA_PERIODS * PERIOD_MS
    end = switch + TIERS_PERIODS * PERIOD_MS
    registry.record_key(anvil.gov, key_hash(load_key(prorata)), start)

    configs = {name: node_config(tmp_path, name, keys[name], anvil) for name in NAMES}
    daemons = {name: daemon(config) for name, config in configs.items()}

    # The second key with the command, as governance does, while the nodes start.
    gov_keystore, gov_password = tmp_path / "gov.json", tmp_path / "gov.pass"
    gov_password.write_text("governance")
    gov_keystore.write_text(json.dumps(Account.encrypt(anvil.gov.key, "governance")))
    for secret in (gov_keystore, gov_password):
        secret.chmod(0o600)
    (recorded,) = cli_together(
        ["community", "key", "record", str(tiers), "--registry", registry.address,
         "--from", str(switch), "--period-s", str(PERIOD_S), "--members", str(members),
         "--rpc", anvil.anvil.url,
         "--keystore", str(gov_keystore), "--password-file", str(gov_password)]
    )  # fmt: skip
    assert recorded.returncode == 0, recorded.stderr
    assert json.loads(recorded.stdout)["hash"] == key_hash(load_key(tiers))

    # bob's node stalls for 3 s in the second period: that period's report will say so.
    wait_for(lambda: time.time() * 1000 >= switch + 2000, timeout=40, every=0.05)
    daemons["bob"].signal(signal.SIGSTOP)
    try:
        wait_for(lambda: time.time() * 1000 >= switch + 5000, timeout=10, every=0.05)
    finally:
        daemons["bob"].signal(signal.SIGCONT)

    def committed_to_end() -> bool:
        return all(any(c.t1 >= end for c in own_commitments(tmp_path, n)) for n in NAMES)

    wait_for(committed_to_end, timeout=45, every=0.5)
    block = anvil.w3.eth.block_number
    common = [
        "--rpc", anvil.anvil.url, "--ledger", anvil.ledger.address,
        "--registry", registry.address, "--members", str(members),
        "--key", str(prorata), "--key", str(tiers),
        "--from", str(start), "--to", str(end), "--period-s", str(PERIOD_S),
        "--block", str(block),
    ]  # fmt: skip

    # From the chain alone: the allocation and the bills.
    tariff = tmp_path / "tariff.toml"
    tariff.write_text(
        'currency = "EUR"\nlocal_price = "0.18"\nproducer_price = "0.12"\n'
        'surplus_price = "0.05"\nmonthly_fee = "1.50"\n'
    )
    result, billed = cli_together(
        ["community", "allocate", *common, "--json", "--keys-csv", str(tmp_path / "keys.csv"),
         "--periods-csv", str(tmp_path / "periods")],
        ["community", "bill", *common, "--tariff", str(tariff), "--json",
         "--html", str(tmp_path / "statements")],
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    # every period's allocation passed the community checks (sums to production, nobody
    # allocated beyond its consumption)
    periods_in_range = PRORATA_PERIODS + TIERS_PERIODS
    assert f"community checks: {periods_in_range} periods, all passed" in result.stderr
    chain_view = json.loads(result.stdout)
    assert [k["hash"] for k in chain_view["keys"]] == [
        key_hash(load_key(prorata)),
        key_hash(load_key(tiers)),
    ]
    rows = chain_view["periods"]
    assert len(rows) == (PRORATA_PERIODS + TIERS_PERIODS) * len(NAMES)
    assert {r["status"] for r in rows} == {"ok"}  # every node committed every period

    # From the nodes' own databases: the same totals give the same allocation, row for row.
    own = [
        Committed(c.node.lower(), c.t0, c.t1, c.import_wh, c.export_wh)
        for n in NAMES
        for c in own_commitments(tmp_path, n)
    ]
    names = {address[n]: n for n in NAMES}
    in_force = [
        KeyInForce(start, key_hash(load_key(prorata)), load_key(prorata)),
        KeyInForce(
            switch,
            key_hash(load_key(tiers)),
            translate_key(load_key(tiers), load_members(members).address_of, str(tiers)),
        ),
    ]
    data = gather(
        list(names), names, PERIOD_MS, period_range(start, end, PERIOD_MS), own, [], in_force
    )
    writer = PeriodWriter(data, rows=[])
    for r in periods(data):
        writer(r)
    assert writer.digest() == chain_view["digest"]
    as_text = [
        ",".join(
            [r["timestamp"], r["member"]]
            + [str(r[f]) for f in ("consumption_wh", "allocated_wh", "p2p_bought_wh",
                                   "grid_import_wh", "production_wh", "p2p_sold_wh",
                                   "surplus_wh")]
            + [r["status"]]
        )
        for r in rows
    ]  # fmt: skip
    assert as_text == writer.rows
    # The producer exported in every period and consumers imported: there was energy to share.
    by_member: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_member.setdefault(r["member"], []).append(r)
    assert all(r["production_wh"] > 0 for r in by_member["sol"])
    assert sum(r["allocated_wh"] for r in by_member["alice"] + by_member["bob"]) > 0

    # The operators' files: one share per member and period, one 15-minute row per period.
    with (tmp_path / "keys.csv").open() as f:
        shares = list(csv.DictReader(f))
    assert len(shares) == len(rows) and {s["member"] for s in shares} == set(NAMES)
    for n in NAMES:
        with (tmp_path / "periods" / f"{n}.csv").open() as f:
            assert len(list(csv.DictReader(f))) == PRORATA_PERIODS + TIERS_PERIODS

    # The bill, and sol's reproduced by hand: with one producer, whatever the key, the members
    # take min(P, C) of each period and the rest is surplus.
    assert billed.returncode == 0, billed.stderr
    bills = json.loads(billed.stdout)
    assert bills["digest"] == chain_view["digest"]
    sol_bills = [b for b in bills["bills"] if b["name"] == "sol"]
    supplied = surplus = 0
    for t0 in range(start, end, PERIOD_MS):
        period = [r for r in rows if r["timestamp"] == utc_text(t0)]
        p = sum(r["production_wh"] for r in period)
        c = sum(r["consumption_wh"] for r in period)
        supplied += min(p, c)
        surplus += max(p - c, 0)

    def money(x: Decimal) -> Decimal:
        return x.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)

    months = len(sol_bills)
    # the fee, pro rata of the month's periods the range covers (the tariff's months are UTC's)
    first_day = datetime.fromtimestamp(start / 1000, UTC)
    in_month = calendar.monthrange(first_day.year, first_day.month)[1] * 86_400 // PERIOD_S
    fee = money(Decimal("1.50") * ((end - start) // PERIOD_MS) / in_month)
    expected = money(
        -money(Decimal(supplied) * Decimal("0.12") / 1000)
        - money(Decimal(surplus) * Decimal("0.05") / 1000)
        + fee
    )
    if months == 1:  # the range may straddle midnight at the end of a month
        assert Decimal(sol_bills[0]["total"]) == expected
        assert sol_bills[0]["supplied"] == supplied and sol_bills[0]["surplus"] == surplus
    else:
        assert sum(b["supplied"] for b in sol_bills) == supplied
    page = (tmp_path / "statements" / "sol.html").read_text()
    assert "Statement of sol" in page and bills["digest"] in page

    # Conformity: each node's signed report of each period, proven against the chain, flags
    # the member-periods whose report failed; a report that does not prove is left out.
    reports = tmp_path / "reports"
    reports.mkdir()
    proved = cli_together(
        *(
            ["conformity", "-c", str(configs[n]), "--period", str(t0 + 1), "--prove",
             "-o", str(reports / f"{n}-{t0}.json")]
            for n in NAMES
            for t0 in range(start, end, PERIOD_MS)
        )
    )  # fmt: skip
    assert all(r.returncode in (0, 1) for r in proved), [r.stderr for r in proved]
    verdicts = {}
    for f in reports.glob("*.json"):
        name, t0 = f.stem.split("-")
        verdicts[(name, utc_text(int(t0)))] = json.loads(f.read_text())["report"]["passed"]
    assert len(verdicts) == len(rows)
    assert verdicts[("bob", utc_text(switch))] is False  # the stall
    forged = json.loads((reports / f"sol-{start}.json").read_text())
    forged["report"]["passed"] = not forged["report"]["passed"]
    (reports / "forged.json").write_text(json.dumps(forged))
    (flagged,) = cli_together(["community", "allocate", *common, "--reports", str(reports),
                               "--json"])  # fmt: skip
    assert flagged.returncode == 0, flagged.stderr
    assert "conformity report left out, forged.json" in flagged.stderr
    statuses = {
        (r["member"], r["timestamp"]): r["status"] for r in json.loads(flagged.stdout)["periods"]
    }
    assert statuses == {k: ("ok" if passed else "nonconforming") for k, passed in verdicts.items()}

    # A key file that says something else than the recorded one is refused.
    prorata.write_text('version = 1\nkind = "prorata"\nname = "another key"\n')
    refused, shown, deployed = cli_together(
        ["community", "allocate", *common],
        ["community", "key", "show", "--rpc", anvil.anvil.url,
         "--registry", registry.address, "--key", str(tiers), "--json"],
        ["community", "deploy", "--rpc", anvil.anvil.url, "--ledger", anvil.ledger.address,
         "--keystore", str(gov_keystore), "--password-file", str(gov_password)],
    )  # fmt: skip
    assert deployed.returncode == 0, deployed.stderr
    another = Registry(anvil.w3, json.loads(deployed.stdout)["registry"])
    assert another.ledger_address() == anvil.ledger.address and another.records() == []
    assert refused.returncode == 1 and refused.stdout == ""
    assert "is not one the registry records" in refused.stderr
    assert refused.stderr.count("\n") == 1 and "Traceback" not in refused.stderr
    assert shown.returncode == 0, shown.stderr
    recorded = json.loads(shown.stdout)["keys"]
    assert [(k["from_ms"], k["file"]) for k in recorded] == [(start, None), (switch, str(tiers))]
