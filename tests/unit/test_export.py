"""Export files: the node's signature over their canonical JSON, and their check on py-evm against
the ledger and the registry's grants (every problem named: an altered value, a dropped reading,
another signer, a revoked, ended or never made grant, totals that do not add up)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount

from daisee_node import export
from daisee_node.community.registry import Registry, deploy
from daisee_node.ledger import merkle
from tests.support.market import PERIOD_MS, Market, Recorded, new_market, window_start

VALUES = {"grid.power_w": 812.25, "house.load_w": 430.5}


def test_the_signature_covers_every_field_but_itself_and_names_its_signer() -> None:
    key, other = Account.create(), Account.create()
    body = {"role": "own", "periods": [{"readings": [{"value": 1.5}]}], "node": key.address}
    signed = export.sign(body, key)
    assert export.canonical(signed) == export.canonical(body)
    assert export.canonical(body) == (
        b'{"node":"' + key.address.encode() + b'","periods":[{"readings":[{"value":1.5}]}],'
        b'"role":"own"}'
    )
    assert export.signer(signed) == key.address
    changed = copy.deepcopy(signed)
    changed["periods"][0]["readings"][0]["value"] = 1.6
    assert export.signer(changed) not in (None, key.address)
    assert export.signer(export.sign(body, other)) == other.address
    assert export.signer(body) is None
    assert export.signer({**body, "sig": "0x" + "00" * 65}) is None
    assert export.signer({**body, "sig": "0x12"}) is None


@pytest.mark.parametrize(
    ("text", "ms"),
    [("1700000000000", 1_700_000_000_000), ("2023-11-14T22:13:20Z", 1_700_000_000_000)],
)
def test_times_are_ms_or_iso_with_a_zone(text: str, ms: int) -> None:
    assert export.time_arg(text) == ms


def test_a_time_without_its_zone_is_refused() -> None:
    import argparse

    with pytest.raises(argparse.ArgumentTypeError, match="time zone"):
        export.time_arg("2023-11-14T22:13:20")


# -- on py-evm ------------------------------------------------------------------------------


@pytest.fixture
def m() -> Market:
    return new_market()


def commit_periods(m: Market, node: LocalAccount, t0: int, n: int) -> list[Recorded]:
    """`n` periods of the node from `t0`, three minutes of both channels each."""
    made = []
    for k in range(n):
        start = t0 + k * PERIOD_MS
        rows = [
            (merkle.channel_id(name), start + i * 60_000, merkle.value_micro(v + i), 0)
            for i in range(3)
            for name, v in VALUES.items()
        ]
        made += m.commit((node, start, start + PERIOD_MS, 100 + k, 7 * k, rows))
    return made


def period_json(r: Recorded, role: str) -> dict[str, Any]:
    """One period as `export` writes it (readings in leaf order, each with its proof)."""
    names = {merkle.channel_id(n): n for n in VALUES}
    period: dict[str, Any] = {
        "commitment": r.c.to_json(),
        "tx": "0x" + "00" * 32,
        "batch_proof": ["0x" + p.hex() for p in r.batch_proof],
    }
    if role == "own":
        period["complete"] = True
        period["report"] = None
        period["readings"] = [
            {
                "channel": names[cid],
                "channel_id": "0x" + cid.hex(),
                "t_ms": t,
                "value": micro / 1e6,
                "value_micro": micro,
                "quality": q,
                "proof": ["0x" + p.hex() for p in merkle.proof(r.tree, i)],
            }
            for i, (cid, t, micro, q) in enumerate(r.rows)
        ]
    return period


def make_export(
    m: Market, reg: Registry, node: LocalAccount, recipient: str, role: str, made: list[Recorded]
) -> dict[str, Any]:
    periods = [period_json(r, role) for r in made]
    body: dict[str, Any] = {
        "format": export.FORMAT,
        "role": role,
        "recipient": recipient,
        "node": node.address,
        "from_ms": made[0].c.t0,
        "to_ms": made[-1].c.t1,
        "channels": None,
        "chain_id": m.ledger.chain_id,
        "ledger": m.ledger.address,
        "registry": reg.address,
        "grant": {"until_ms": 0, "checked_block": 0},
        "created_ms": 0,
        "periods": periods,
        "missing": [],
    }
    if role != "own":
        body["totals"] = export._totals(periods)
    return export.sign(body, node)


def test_an_own_export_verifies_and_every_tampering_is_named(m: Market) -> None:
    reg = Registry(m.w3, deploy(m.w3, m.gov, m.ledger.address))
    recipient = Account.create().address
    made = commit_periods(m, m.seller, window_start(m, -1), 2)
    data = make_export(m, reg, m.seller, recipient, "own", made)
    # no grant yet
    result = export.verify_export(data, m.w3)
    assert result["problems"] == [
        f"the grant of 'own' by {m.seller.address} to {recipient} was never made"
    ]
    reg.grant(m.seller, recipient, "own", m.now_ms() + 3_600_000)
    result = export.verify_export(data, m.w3)
    assert result["valid"], result["problems"]
    assert (result["periods"], result["readings"], result["readings_on_chain"]) == (2, 12, 2)
    assert any("2 commitments against the ledger" in line for line in result["checked"])
    every = export.verify_export(data, m.w3, every_reading_on_chain=True)
    assert every["valid"] and every["readings_on_chain"] == 12

    seq = made[0].c.seq
    # a value changed, with its micro-units to match: no longer a leaf of the root
    altered = copy.deepcopy(data)
    reading = altered["periods"][0]["readings"][1]
    reading["value"] += 100
    reading["value_micro"] = merkle.value_micro(reading["value"])
    problems = export.verify_export(altered, m.w3)["problems"]
    assert problems[0].startswith("signed by ")
    assert problems[1:] == [
        f"period seq {seq}: reading {reading['channel']} at {reading['t_ms']}: not a leaf of "
        "the commitment's root (value or proof altered)"
    ]
    # a value changed alone: it no longer says what its micro-units say
    altered = copy.deepcopy(data)
    altered["periods"][0]["readings"][0]["value"] = 1.0
    assert any(
        "value does not match value_micro" in p
        for p in export.verify_export(altered, m.w3)["problems"]
    )
    # a reading dropped, even re-signed by the node itself: the period is short of its count
    dropped = copy.deepcopy(data)
    del dropped["periods"][1]["readings"][3]
    dropped = export.sign(dropped, m.seller)
    assert export.verify_export(dropped, m.w3)["problems"] == [
        f"period seq {seq + 1}: 5 readings exported of the 6 the commitment counts"
    ]
    # a period dropped: a gap in the seqs
    more = commit_periods(m, m.seller, made[-1].c.t1, 1)
    gap = make_export(m, reg, m.seller, recipient, "own", [made[0], more[0]])
    assert (
        f"periods seq {seq + 1}..{seq + 1} are neither exported nor listed missing"
        in (export.verify_export(gap, m.w3)["problems"])
    )
    # signed by another key
    other = export.sign(data, m.buyer)
    assert export.verify_export(other, m.w3)["problems"] == [
        f"signed by {m.buyer.address}, not by the node {m.seller.address}"
    ]
    # another node's data under the seller's grant: not the node's commitments, nor its grant
    theirs = make_export(
        m, reg, m.buyer, recipient, "own", commit_periods(m, m.buyer, made[0].c.t0, 1)
    )
    assert export.verify_export(theirs, m.w3)["problems"] == [
        f"the grant of 'own' by {m.buyer.address} to {recipient} was never made"
    ]
    # a commitment the ledger never recorded
    forged = copy.deepcopy(data)
    forged["periods"][0]["commitment"]["import_wh"] += 1
    assert (
        f"period seq {seq}: the ledger did not record this commitment (or not with this proof)"
        in export.verify_export(forged, m.w3)["problems"]
    )

    reg.revoke(m.seller, recipient, "own")
    (problem,) = export.verify_export(data, m.w3)["problems"]
    assert problem.startswith(
        f"the grant of 'own' by {m.seller.address} to {recipient} was revoked"
    )


def test_a_supplier_export_carries_totals_and_an_ended_grant_is_flagged(m: Market) -> None:
    reg = Registry(m.w3, deploy(m.w3, m.gov, m.ledger.address))
    recipient = Account.create().address
    made = commit_periods(m, m.seller, window_start(m, -1), 3)
    until = m.now_ms() + 60_000
    reg.grant(m.seller, recipient, "supplier", until)
    data = make_export(m, reg, m.seller, recipient, "supplier", made)
    assert data["totals"] == {"periods": 3, "import_wh": 303, "export_wh": 21}
    assert "readings" not in data["periods"][0]
    assert export.verify_export(data, m.w3)["valid"]
    # the grant is for the supplier role only
    as_grid = export.sign({**data, "role": "grid"}, m.seller)
    assert export.verify_export(as_grid, m.w3)["problems"] == [
        f"the grant of 'grid' by {m.seller.address} to {recipient} was never made"
    ]
    inflated = export.sign({**data, "totals": {**data["totals"], "export_wh": 9999}}, m.seller)
    assert export.verify_export(inflated, m.w3)["problems"] == [
        "the totals are not the sum of the periods' commitments"
    ]
    m.travel_to(until)
    (problem,) = export.verify_export(data, m.w3)["problems"]
    assert problem.startswith(f"the grant of 'supplier' by {m.seller.address} to {recipient} ended")


def test_a_file_that_is_not_an_export_is_refused_with_its_reason(m: Market) -> None:
    result = export.verify_export({"format": "something else"}, m.w3)
    assert not result["valid"]
    assert result["problems"] == [
        "not an export file (format is 'something else', not 'daisee-export/1')"
    ]
