"""`daisee-node chain-node run|id|args`: the chain client of `[chain_node]` (see
`daisee_node.ledger.chain_node`; imported only when the command runs, so that every other
command starts without the config models)."""

from __future__ import annotations

import argparse
from pathlib import Path

from daisee_node.errors import ConfigError, ConfigProblem


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], config: Path) -> None:
    """`daisee-node chain-node run|id|args`."""
    p = sub.add_parser("chain-node", help="the community chain's client on this node (geth)")
    p.add_argument(
        "action",
        choices=("run", "id", "args"),
        help="run: prepare and become geth (what daisee-chain.service runs); id: this node's "
        "enode and sealing address, for the other nodes; args: geth's command line",
    )
    p.add_argument("-c", "--config", type=Path, default=config, help=f"default {config}")
    p.add_argument(
        "--host",
        type=_host,
        default=None,
        help="id: the address others reach it at (an IP address or a host name; default: "
        'the address of [chain_node] nat = "extip:…", else 127.0.0.1)',
    )
    p.set_defaults(func=_command)


def _host(value: str) -> str:
    from daisee_node.ledger.chain_node import host_problem

    problem = host_problem(value)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return value


def _command(args: argparse.Namespace) -> int:
    from daisee_node.config import load_config
    from daisee_node.ledger.chain_node import file_problems, geth_args, identity, prepare, run

    # `id` runs before the community's genesis exists (its output is what the genesis lists):
    # it needs the data dir only; `run` and `args` need every file the section names.
    needs_all = args.action != "id"
    config = load_config(args.config, files=needs_all)
    section = config.chain_node
    if section is None:
        problem = ConfigProblem("chain_node", "no [chain_node] section: add one (role = …)")
        raise ConfigError(str(args.config), [problem])
    if not needs_all:
        problems = file_problems(section, identity_only=True)
        if problems:
            raise ConfigError(str(args.config), problems)
    if args.action == "run":
        run(section)
    if args.action == "id":
        host = args.host
        if host is None:
            # what geth itself announces with `--nat extip:IP`: the enode others can dial
            nat = section.nat or ""
            host = nat.removeprefix("extip:") if nat.startswith("extip:") else "127.0.0.1"
        me = identity(section, host)
        print(f"enode  {me.enode}")
        if me.signer is not None:
            print(f"signer {me.signer}")
        return 0
    print(" ".join(geth_args(section, prepare(section))))
    return 0
