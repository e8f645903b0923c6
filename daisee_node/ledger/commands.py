"""`daisee-node keys | deploy | register-node | prove | verify | chain-spec`."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daisee_node.errors import ConfigError, ConfigProblem, DaiseeError
from daisee_node.ledger.cli_errors import chain_errors as _chain_errors

if TYPE_CHECKING:
    from daisee_node.config import Config

EXIT_OK, EXIT_INVALID = 0, 1


def add_parsers(sub: Any, default_config: Path) -> None:
    """Register the ledger's commands on the main parser's subparsers."""

    def key_options(p: argparse.ArgumentParser, who: str) -> None:
        p.add_argument("-c", "--config", type=Path, default=None, help="take paths from here")
        p.add_argument("--keystore", type=Path, default=None, help=f"{who}'s keystore")
        p.add_argument("--password-file", type=Path, default=None)

    keys = sub.add_parser("keys", help="the node's signing key")
    keys_sub = keys.add_subparsers(title="actions", metavar="ACTION", required=True)
    new = keys_sub.add_parser("new", help="create the key (never replaces one)")
    key_options(new, "the node")
    new.set_defaults(func=cmd_keys_new)
    show = keys_sub.add_parser("show", help="print the node's address")
    key_options(show, "the node")
    show.set_defaults(func=cmd_keys_show)

    deploy = sub.add_parser("deploy", help="deploy the ledger and its energy-credit token")
    deploy.add_argument("--rpc", required=True, help="JSON-RPC URL of a chain node")
    key_options(deploy, "the deployer")
    deploy.add_argument("--governance", default=None, help="registry owner (default: deployer)")
    deploy.add_argument("--wh-per-credit", type=int, default=1000)
    deploy.add_argument(
        "--market",
        action="store_true",
        help="also deploy the energy market beside the ledger (default settings; "
        "`market deploy` sets them)",
    )
    deploy.set_defaults(func=cmd_deploy)

    register = sub.add_parser("register-node", help="add (or --remove) a node in the registry")
    register.add_argument("address")
    register.add_argument("--rpc", required=True)
    register.add_argument("--ledger", required=True, help="ledger contract address")
    key_options(register, "the governance account")
    register.add_argument("--remove", action="store_true")
    register.add_argument(
        "--capacity-w",
        type=int,
        default=None,
        help=(
            "the most power (W) the node's connection can import or export; the ledger refuses "
            "commitments claiming more over their period (default 36000: the largest French "
            "household connection; with --set-capacity, required)"
        ),
    )
    register.add_argument(
        "--set-capacity",
        action="store_true",
        help="only change a registered node's --capacity-w",
    )
    register.add_argument("--fund-eth", type=float, default=0.0, help="also send it gas money")
    register.set_defaults(func=cmd_register)

    from daisee_node.demo import DEMO_DATA_DIR

    prove = sub.add_parser(
        "prove",
        help="a committed reading with its Merkle proof and its commitment, as JSON",
        description="Find a stored reading, rebuild its period's Merkle tree, check it against "
        "the commitment the node signed and add the proof of that commitment's batch on the "
        "chain: the JSON anyone can check with `verify`. Only readings of periods already on "
        "the chain can be proven.",
    )
    where = prove.add_mutually_exclusive_group()
    where.add_argument(
        "-c",
        "--config",
        type=Path,
        default=None,
        help=f"the node's config (default {default_config}, or the demo's data dir "
        "when that file does not exist)",
    )
    where.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help=f"a demo's data dir (default ./{DEMO_DATA_DIR}): its readings and its chain",
    )
    prove.add_argument(
        "--channel",
        required=True,
        help="the reading's channel, e.g. grid.export_wh (`status` lists them)",
    )
    prove.add_argument(
        "--at",
        type=_at_ms,
        default=None,
        help="an ISO 8601 time with its zone (2026-11-21T12:00:00Z) or ms since the epoch: the "
        "reading at or just before it is proven (default: the newest one on the chain)",
    )
    prove.add_argument(
        "-o", "--output", type=Path, default=None, help="write it here (default: standard output)"
    )
    prove.set_defaults(func=cmd_prove, default_config=default_config)

    verify = sub.add_parser(
        "verify",
        help="check a proof against the chain: exit 0 when the ledger accepts it, 1 otherwise",
    )
    verify.add_argument("proof", type=Path, help="file written by `prove` ('-' for stdin)")
    chain_of = verify.add_mutually_exclusive_group()
    chain_of.add_argument("--rpc", default=None, help="JSON-RPC URL of a node of the chain")
    chain_of.add_argument(
        "-c",
        "--config",
        type=Path,
        default=None,
        help=f"the chain of this node config (default, without --rpc: {default_config}, or "
        "the demo's chain when that file does not exist)",
    )
    chain_of.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help=f"the chain kept in a demo's data dir (default ./{DEMO_DATA_DIR})",
    )
    verify.set_defaults(func=cmd_verify, default_config=default_config)

    spec = sub.add_parser("chain-spec", help="genesis files (Besu QBFT, Nethermind AuRa, Clique)")
    spec.add_argument(
        "--validators", required=True, help="the validators' addresses, comma-separated"
    )
    spec.add_argument(
        "--out",
        type=Path,
        default=Path("chain-spec"),
        help="folder the files are written to (default ./chain-spec)",
    )
    from daisee_node.ledger import DEFAULT_CHAIN_ID

    spec.add_argument(
        "--chain-id", type=int, default=None, help=f"the chain's id (default {DEFAULT_CHAIN_ID})"
    )
    spec.add_argument("--block-period", type=int, default=5, help="seconds between blocks")
    spec.add_argument(
        "--fund",
        action="append",
        default=[],
        metavar="ADDRESS=ETH",
        help="pre-fund an account (repeatable)",
    )
    spec.add_argument(
        "--engine",
        choices=("qbft", "aura", "clique", "all"),
        default="all",
        help="which engine's file (default: all three)",
    )
    spec.set_defaults(func=cmd_chain_spec)

    from daisee_node.ledger.market_commands import add_parsers as add_market_parsers

    add_market_parsers(sub)


# -- keys ------------------------------------------------------------------------------------


def _key_paths(
    args: argparse.Namespace, *, default_without_chain: bool = False
) -> tuple[Path, Path]:
    """The keystore and password file: the options', else the config's `[chain]` ones.
    `default_without_chain`: a config without `[chain]` (a fresh image's) names the key the
    daemon and the image use, `<data_dir>/node-key.json`, rather than failing."""
    from daisee_node.config import load_config

    config_path = args.config
    if config_path is None and args.keystore is None:
        from daisee_node.config import DEFAULT_CONFIG_PATH

        if DEFAULT_CONFIG_PATH.exists():
            config_path = DEFAULT_CONFIG_PATH
    if config_path is not None:
        config = load_config(config_path)
        if config.chain is None:
            if not default_without_chain:
                raise DaiseeError(f"{config_path} has no [chain] section")
            # The same defaults as ChainSection.keystore_path / password_path.
            keystore = args.keystore or config.data_dir / "node-key.json"
            password = args.password_file or config.data_dir / "node-key.pass"
            return keystore, password
        keystore = args.keystore or config.chain.keystore_path(config.data_dir)
        password = args.password_file or config.chain.password_path(config.data_dir)
        return keystore, password
    if args.keystore is None:
        raise DaiseeError("give -c CONFIG or --keystore (and --password-file)")
    return args.keystore, args.password_file or args.keystore.with_suffix(".pass")


def cmd_keys_new(args: argparse.Namespace) -> int:
    from daisee_node.ledger.keys import new_keystore

    keystore, password = _key_paths(args)
    address = new_keystore(keystore, password)
    print(
        json.dumps({"address": address, "keystore": str(keystore), "password_file": str(password)})
    )
    return EXIT_OK


def cmd_keys_show(args: argparse.Namespace) -> int:
    """Print the node's address and the keystore it was read from (public: no password)."""
    from daisee_node.ledger.keys import keystore_address

    keystore, _ = _key_paths(args, default_without_chain=True)
    print(json.dumps({"address": keystore_address(keystore), "keystore": str(keystore)}))
    return EXIT_OK


def _account(args: argparse.Namespace) -> Any:
    from daisee_node.ledger.keys import load_account

    keystore, password = _key_paths(args)
    return load_account(keystore, password)


# -- contracts -------------------------------------------------------------------------------


@_chain_errors
def cmd_deploy(args: argparse.Namespace) -> int:
    from eth_utils import to_checksum_address

    from daisee_node.ledger import chain

    w3 = chain.connect(args.rpc)
    account = _account(args)
    address = chain.deploy(w3, account, args.governance, args.wh_per_credit)
    ledger = chain.Ledger(w3, address)
    out = {
        "ledger": address,
        "credit": ledger.credit().address,
        "chain_id": ledger.chain_id,
        "governance": to_checksum_address(args.governance or account.address),
        "block": w3.eth.block_number,
    }
    if args.market:
        from daisee_node.ledger import market

        out["market"] = market.deploy(w3, account, address)
        out["block"] = w3.eth.block_number
    print(json.dumps(out))
    return EXIT_OK


@_chain_errors
def cmd_register(args: argparse.Namespace) -> int:
    """Add, re-add or remove a node, or change its capacity. Without --capacity-w a node the
    ledger already knows keeps the capacity governance gave it: running this again (to
    --fund-eth, say) never raises it back to the default."""
    from eth_utils import to_checksum_address

    from daisee_node.ledger import chain

    if args.capacity_w is not None and not 0 < args.capacity_w < 2**32:
        raise DaiseeError(
            f"--capacity-w {args.capacity_w}: give a power in W, from 1 to {2**32 - 1}"
        )
    if args.set_capacity and (args.remove or args.capacity_w is None):
        raise DaiseeError("--set-capacity needs --capacity-w and no --remove")
    w3 = chain.connect(args.rpc)
    account = _account(args)
    ledger = chain.Ledger(w3, args.ledger)
    ledger.check_deployed()
    node = to_checksum_address(args.address)
    before = ledger.head(node)
    # A removed node keeps its capacity on chain too: re-adding it keeps that as well.
    kept = args.capacity_w is None and not args.remove and before.capacity_w > 0
    if args.set_capacity:
        ledger.set_capacity(account, node, args.capacity_w)
    elif args.remove:
        ledger.set_node(account, node, registered=False)
    elif kept and before.registered:
        pass  # nothing to change on chain: registered, capacity as it is
    else:
        capacity_w = before.capacity_w if kept else args.capacity_w or chain.DEFAULT_CAPACITY_W
        ledger.set_node(account, node, registered=True, capacity_w=capacity_w)
    if args.fund_eth > 0:
        chain.fund(w3, account, node, int(args.fund_eth * 10**18))
    head = ledger.head(node)
    if kept:
        print(
            f"{node} {'is' if before.registered else 'was'} registered with a capacity of "
            f"{head.capacity_w} W: kept (give --capacity-w W to change it)",
            file=sys.stderr,
        )
    print(
        json.dumps(
            {
                "node": node,
                "registered": head.registered,
                "seq": head.seq,
                "capacity_w": head.capacity_w,
            }
        )
    )
    return EXIT_OK


# -- proofs ----------------------------------------------------------------------------------


def _at_ms(text: str) -> int:
    """`--at`: ms since the epoch, or an ISO 8601 time with its zone."""
    from daisee_node.clock import zoned_ms

    if text.isdigit():
        return int(text)
    hint = "not an ISO time (like 2026-11-21T12:00:00Z) nor ms since the epoch"
    return zoned_ms(text, repr(text), hint, argparse.ArgumentTypeError)


def _node_config(args: argparse.Namespace) -> tuple[Config, Path | None]:
    """The config `prove` / `verify` act on, and where the chain is kept if it is embedded:
    `-c`, else `--data-dir` (a demo's), else the default config, else the demo's folder."""
    from daisee_node import demo
    from daisee_node.config import load_config
    from daisee_node.ledger import chain as chainlib
    from daisee_node.ledger import embedded

    if args.config is not None:
        config = load_config(args.config)
    elif args.data_dir is None and args.default_config.exists():
        config = load_config(args.default_config)
    else:
        data_dir = args.data_dir or demo.DEMO_DATA_DIR
        if not (data_dir / "node.db").exists():
            raise DaiseeError(
                f"no node data in {data_dir}: run the demo first (`{demo.command_name()} demo`), "
                "or give -c CONFIG"
            )
        config = demo.demo_config(data_dir)
    if config.chain is None:
        source = str(args.config or args.default_config)
        raise ConfigError(
            source,
            [ConfigProblem("chain", "no [chain] section: this node commits nothing to prove")],
        )
    kept = None
    if config.chain.rpc_url == chainlib.EMBEDDED:
        if not embedded.is_kept(config.data_dir):
            raise DaiseeError(
                f"the chain of {config.data_dir} is an in-process one that was not kept "
                "(only the demo keeps its chain): nothing to check against"
            )
        kept = embedded.chain_dir(config.data_dir)
    return config, kept


@_chain_errors
def cmd_prove(args: argparse.Namespace) -> int:
    from daisee_node.ledger.proofs import build_proof

    config, kept = _node_config(args)
    proof = asyncio.run(build_proof(config, args.channel, args.at, keep_in=kept))
    text = json.dumps(proof, indent=2)
    if args.output:
        args.output.write_text(text + "\n")
    else:
        print(text)
    return EXIT_OK


@_chain_errors
def cmd_verify(args: argparse.Namespace) -> int:
    from daisee_node.ledger.proofs import check_proof, parse_proof

    try:
        text = sys.stdin.read() if str(args.proof) == "-" else args.proof.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise DaiseeError(f"cannot read the proof {args.proof}: {reason}") from None
    try:
        proof = parse_proof(text)
    except DaiseeError as exc:
        raise DaiseeError(f"{args.proof}: {exc}") from exc
    rpc, kept = args.rpc, None
    fallbacks: tuple[str, ...] = ()
    if rpc is None:
        try:
            config, kept = _node_config(args)
        except DaiseeError as exc:
            if isinstance(exc, ConfigError) or args.data_dir is not None:
                raise
            raise DaiseeError(
                f"give --rpc URL (or -c CONFIG) to say which chain to check against ({exc})"
            ) from None
        assert config.chain is not None
        rpc, fallbacks = config.chain.rpc_url, tuple(config.chain.rpc_fallback_urls)
    result = check_proof(proof, rpc, keep_in=kept, fallback_urls=fallbacks)
    print(json.dumps(result))
    return EXIT_OK if result["valid"] else EXIT_INVALID


# -- chain spec -------------------------------------------------------------------------------


def cmd_chain_spec(args: argparse.Namespace) -> int:
    from daisee_node.ledger import chainspec

    validators = []
    for i, text in enumerate(v.strip() for v in args.validators.split(",")):
        try:
            validators.append(chainspec.parse_address(text))
        except ValueError as exc:
            raise DaiseeError(f"--validators, address {i + 1} {text!r}: {exc}") from None
    if not validators:
        raise DaiseeError("--validators: give at least one validator address")
    funds: dict[str, int] = {}
    for item in args.fund:
        address, sep, eth = item.partition("=")
        try:
            checked = chainspec.parse_address(address.strip())
        except ValueError as exc:
            raise DaiseeError(f"--fund {item!r}: address {address.strip()!r}: {exc}") from None
        try:
            wei = int(float(eth) * 10**18) if sep else 1000 * 10**18
        except ValueError:
            raise DaiseeError(f"--fund {item!r}: expected ADDRESS=ETH, ETH a number") from None
        funds[checked] = wei
    engines = ("qbft", "aura", "clique") if args.engine == "all" else (args.engine,)
    paths = chainspec.write_specs(
        args.out,
        validators,
        chain_id=args.chain_id or chainspec.DEFAULT_CHAIN_ID,
        block_period_s=args.block_period,
        funds=funds,
        engines=engines,
    )
    for path in paths:
        print(path)
    return EXIT_OK
