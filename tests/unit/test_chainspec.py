"""Genesis files for the three PoA engines carry the validators each engine expects."""

from __future__ import annotations

import json

import rlp
from eth_account import Account

from tests.conftest import run_cli


def test_chain_spec_writes_qbft_aura_and_clique_for_the_validators(tmp_path):
    validators = sorted((Account.create().address for _ in range(4)), key=str.lower)
    funded = Account.create().address
    out = tmp_path / "spec"
    result = run_cli(
        "chain-spec",
        "--validators",
        ",".join(validators),
        "--chain-id",
        "777",
        "--block-period",
        "5",
        "--fund",
        f"{funded}=12",
        "--out",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.split()) == 3
    raw = {v.lower()[2:] for v in validators}

    qbft = json.loads((out / "besu-qbft-genesis.json").read_text())
    assert qbft["config"]["chainId"] == 777
    assert qbft["config"]["qbft"]["blockperiodseconds"] == 5
    vanity, listed, vote, round_, seals = rlp.decode(bytes.fromhex(qbft["extraData"][2:]))
    assert vanity == b"\0" * 32 and (vote, round_, seals) == ([], b"", [])
    assert {v.hex() for v in listed} == raw
    assert int(qbft["alloc"][funded.lower()[2:]]["balance"], 16) == 12 * 10**18

    aura = json.loads((out / "nethermind-aura-chainspec.json").read_text())
    params = aura["engine"]["authorityRound"]["params"]
    assert params["stepDuration"] == 5
    assert {v.lower()[2:] for v in params["validators"]["multi"]["0"]["list"]} == raw
    assert int(aura["params"]["chainID"], 16) == 777
    # the ledger needs ecrecover, and the paris-era opcodes
    assert aura["accounts"]["0x0000000000000000000000000000000000000001"]["builtin"]["name"] == (
        "ecrecover"
    )
    assert aura["params"]["eip1559Transition"] == "0x0"

    clique = json.loads((out / "clique-genesis.json").read_text())
    extra = bytes.fromhex(clique["extraData"][2:])
    assert len(extra) == 32 + 20 * 4 + 65
    signers = {extra[32 + 20 * i : 52 + 20 * i].hex() for i in range(4)}
    assert signers == raw
    assert clique["config"]["clique"]["period"] == 5


def test_chain_spec_refuses_a_bad_address(tmp_path):
    result = run_cli("chain-spec", "--validators", "0x1234", "--out", str(tmp_path))
    assert result.returncode == 1
    assert "--validators" in result.stderr and "Traceback" not in result.stderr
