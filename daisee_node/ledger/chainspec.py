"""Genesis files for the community's PoA chain, for a list of validator addresses.

- Besu QBFT (recommended for new networks; ≥ 4 validators tolerate one faulty);
- Nethermind AuRa, in the Parity chainspec format the first DAISEE prototype used;
- Clique, geth-style: what go-ethereum 1.13 (the last release that seals Clique) accepts,
  London rules and nothing after (its Clique refuses Shanghai), the signers in `extraData`.

Every one activates forks up to London/Paris-era opcodes only: the ledger's bytecode targets EVM
`paris`, which every engine named here runs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import rlp
from eth_utils import to_checksum_address

from daisee_node.ledger import DEFAULT_CHAIN_ID

DEFAULT_GAS_LIMIT = 30_000_000
FILES = {
    "qbft": "besu-qbft-genesis.json",
    "aura": "nethermind-aura-chainspec.json",
    "clique": "clique-genesis.json",
}


def parse_address(text: str) -> str:
    """`text` as a checksummed address; a ValueError that says what is wrong with it."""
    from eth_utils import is_checksum_address

    if not text:
        raise ValueError("empty")
    if not text.startswith(("0x", "0X")):
        raise ValueError("an address starts with 0x")
    digits = text[2:]
    bad = sorted({c for c in digits if c not in "0123456789abcdefABCDEF"})
    if bad:
        raise ValueError(f"{''.join(bad)!r} is not a hexadecimal digit")
    if len(digits) != 40:
        raise ValueError(f"{len(digits)} hex digits; an address has 40")
    if digits != digits.lower() and digits != digits.upper() and not is_checksum_address(text):
        raise ValueError(
            "its upper- and lower-case letters do not match its EIP-55 checksum: "
            "probably a typo (check it against its source)"
        )
    return to_checksum_address(text)


def _addr_bytes(address: str) -> bytes:
    return bytes.fromhex(to_checksum_address(address)[2:])


def _alloc(funds: Mapping[str, int]) -> dict[str, dict[str, str]]:
    return {to_checksum_address(a)[2:].lower(): {"balance": hex(w)} for a, w in funds.items()}


def qbft_extra_data(validators: list[str]) -> str:
    """RLP([vanity, validators, vote, round, seals]) with no vote, round 0 and no seals."""
    encoded = rlp.encode([b"\x00" * 32, [_addr_bytes(v) for v in validators], [], b"", []])
    return "0x" + encoded.hex()


def clique_extra_data(signers: list[str]) -> str:
    """32 bytes of vanity, the signer addresses, then room for a 65-byte seal."""
    return "0x" + (b"\x00" * 32 + b"".join(_addr_bytes(s) for s in signers) + b"\x00" * 65).hex()


def besu_qbft(
    validators: list[str], chain_id: int, block_period_s: int, funds: Mapping[str, int]
) -> dict[str, Any]:
    return {
        "config": {
            "chainId": chain_id,
            "berlinBlock": 0,
            "londonBlock": 0,
            "zeroBaseFee": True,  # a community chain: gas is metered but costs nothing
            "qbft": {
                "blockperiodseconds": block_period_s,
                "epochlength": 30_000,
                "requesttimeoutseconds": max(4, 2 * block_period_s),
            },
        },
        "nonce": "0x0",
        "timestamp": "0x0",
        "gasLimit": hex(DEFAULT_GAS_LIMIT),
        "difficulty": "0x1",
        "mixHash": "0x63746963616c2062797a616e74696e65206661756c7420746f6c6572616e6365",
        "coinbase": "0x" + "00" * 20,
        "extraData": qbft_extra_data(validators),
        "alloc": _alloc(funds),
    }


def clique(
    signers: list[str], chain_id: int, block_period_s: int, funds: Mapping[str, int]
) -> dict[str, Any]:
    forks = [
        "homesteadBlock",
        "eip150Block",
        "eip155Block",
        "eip158Block",
        "byzantiumBlock",
        "constantinopleBlock",
        "petersburgBlock",
        "istanbulBlock",
        "berlinBlock",
        "londonBlock",
    ]
    return {
        "config": {
            "chainId": chain_id,
            **dict.fromkeys(forks, 0),
            "clique": {"period": block_period_s, "epoch": 30_000},
        },
        "nonce": "0x0",
        "timestamp": "0x0",
        "gasLimit": hex(DEFAULT_GAS_LIMIT),
        "difficulty": "0x1",
        "mixHash": "0x" + "00" * 32,
        "coinbase": "0x" + "00" * 20,
        "extraData": clique_extra_data(signers),
        "baseFeePerGas": hex(1_000_000_000),
        "alloc": _alloc(funds),
    }


def _builtin(name: str, pricing: dict[str, Any], activate: int = 0) -> dict[str, Any]:
    return {"builtin": {"name": name, "activate_at": hex(activate), "pricing": pricing}}


def nethermind_aura(
    validators: list[str], chain_id: int, step_s: int, funds: Mapping[str, int]
) -> dict[str, Any]:
    transitions = [
        "eip140",
        "eip145",
        "eip150",
        "eip155",
        "eip160",
        "eip161abc",
        "eip161d",
        "eip211",
        "eip214",
        "eip658",
        "eip1014",
        "eip1052",
        "eip1283",
        "eip1283Disable",
        "eip1344",
        "eip1706",
        "eip1884",
        "eip2028",
        "eip2200",
        "eip2565",
        "eip2929",
        "eip2930",
        "eip3198",
        "eip3529",
        "eip3541",
        "eip1559",
    ]
    accounts: dict[str, Any] = {
        "0x0000000000000000000000000000000000000001": _builtin(
            "ecrecover", {"linear": {"base": 3000, "word": 0}}
        ),
        "0x0000000000000000000000000000000000000002": _builtin(
            "sha256", {"linear": {"base": 60, "word": 12}}
        ),
        "0x0000000000000000000000000000000000000003": _builtin(
            "ripemd160", {"linear": {"base": 600, "word": 120}}
        ),
        "0x0000000000000000000000000000000000000004": _builtin(
            "identity", {"linear": {"base": 15, "word": 3}}
        ),
        "0x0000000000000000000000000000000000000005": _builtin("modexp", {"modexp2565": {}}),
        "0x0000000000000000000000000000000000000006": _builtin(
            "alt_bn128_add", {"alt_bn128_const_operations": {"price": 150}}
        ),
        "0x0000000000000000000000000000000000000007": _builtin(
            "alt_bn128_mul", {"alt_bn128_const_operations": {"price": 6000}}
        ),
        "0x0000000000000000000000000000000000000008": _builtin(
            "alt_bn128_pairing", {"alt_bn128_pairing": {"base": 45000, "pair": 34000}}
        ),
        "0x0000000000000000000000000000000000000009": _builtin(
            "blake2_f", {"blake2_f": {"gas_per_round": 1}}
        ),
    }
    for address, wei in funds.items():
        accounts[to_checksum_address(address)] = {"balance": hex(wei)}
    return {
        "name": "DAISEE community chain",
        "engine": {
            "authorityRound": {
                "params": {
                    "stepDuration": step_s,
                    "blockReward": "0x0",
                    "maximumUncleCountTransition": 0,
                    "maximumUncleCount": 0,
                    "validators": {
                        "multi": {"0": {"list": [to_checksum_address(v) for v in validators]}}
                    },
                }
            }
        },
        "params": {
            "gasLimitBoundDivisor": "0x400",
            "accountStartNonce": "0x0",
            "maximumExtraDataSize": "0x20",
            "minGasLimit": "0x1388",
            "networkID": hex(chain_id),
            "chainID": hex(chain_id),
            "maxCodeSize": "0x6000",
            "maxCodeSizeTransition": "0x0",
            **{f"{t}Transition": "0x0" for t in transitions},
            "eip1559BaseFeeMinValue": "0x0",
            "eip1559BaseFeeMinValueTransition": "0x0",
        },
        "genesis": {
            "seal": {"authorityRound": {"step": "0x0", "signature": "0x" + "00" * 65}},
            "difficulty": "0x20000",
            "gasLimit": hex(DEFAULT_GAS_LIMIT),
            "baseFeePerGas": "0x0",
        },
        "accounts": accounts,
    }


def write_specs(
    out_dir: Path,
    validators: list[str],
    *,
    chain_id: int = DEFAULT_CHAIN_ID,
    block_period_s: int = 5,
    funds: Mapping[str, int] | None = None,
    engines: tuple[str, ...] = ("qbft", "aura", "clique"),
) -> list[Path]:
    """Write one file per engine into `out_dir`; return their paths."""
    if not validators:
        raise ValueError("at least one validator address is needed")
    validators = [to_checksum_address(v) for v in validators]
    funds = funds or {}
    builders = {"qbft": besu_qbft, "aura": nethermind_aura, "clique": clique}
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for engine in engines:
        spec = builders[engine](validators, chain_id, block_period_s, funds)
        path = out_dir / FILES[engine]
        path.write_text(json.dumps(spec, indent=2) + "\n")
        written.append(path)
    return written
