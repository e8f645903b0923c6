"""The `daisee-node` command."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import threading
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from daisee_node import __version__
from daisee_node.demo import DEMO_DATA_DIR
from daisee_node.errors import ConfigError, DaiseeError
from daisee_node.paths import DEFAULT_CONFIG_PATH

if TYPE_CHECKING:
    from daisee_node.config import Config
    from daisee_node.daemon import Node

# The config models (pydantic, every sensor kind) and logging are imported by the commands that
# use them: `--help` and argument errors answer without them.

EXIT_OK, EXIT_ERROR, EXIT_CONFIG = 0, 1, 2
__all__ = ["DEMO_DATA_DIR", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_CONFIG
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        return EXIT_CONFIG
    except DaiseeError as exc:
        print(f"daisee-node: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # the reader went away (`… | head`): nothing is wrong with the node; keep Python from
        # complaining again while flushing stdout at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_ERROR


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="daisee-node",
        description="The daemon of one node of a citizen-run microgrid.",
    )
    p.add_argument("--version", action="version", version=f"daisee-node {__version__}")
    sub = p.add_subparsers(title="commands", metavar="COMMAND")

    run = sub.add_parser("run", help="run the node daemon")
    run.add_argument(
        "-c",
        "--config",
        type=Path,
        default=DEFAULT_CONFIG_PATH,
        help=f"config file (default {DEFAULT_CONFIG_PATH})",
    )
    run.set_defaults(func=cmd_run)

    check = sub.add_parser(
        "check-config", help="validate a config file: exit 0, or 2 listing every problem"
    )
    check.add_argument("file", type=Path, help="the node's config file (TOML)")
    check.set_defaults(func=cmd_check_config)

    demo = sub.add_parser(
        "demo",
        help="run a simulated node (PV, load, battery, grid meter) and its own chain: "
        "no hardware, no config",
        description="A simulated home (PV roof, household load, battery, grid meter) with a "
        "CT clamp read through the ADS1115 driver, in faster-than-real time. Every 15 simulated "
        "minutes it seals its readings into a signed commitment on its own in-process chain, "
        "kept in the data dir: after it stops, `status` shows what it stored and `prove` / "
        "`verify` prove any committed reading. A second run goes on where the last one stopped.",
    )
    demo.add_argument(
        "--data-dir",
        type=Path,
        default=DEMO_DATA_DIR,
        help=f"where its readings and its chain are kept (default ./{DEMO_DATA_DIR})",
    )
    demo.add_argument(
        "--speed", type=float, default=60.0, help="simulated seconds per real second (default 60)"
    )
    demo.add_argument(
        "--start",
        type=_iso_time,
        default=None,
        help="simulated start time, ISO 8601 (default: where the last run stopped, else "
        "today at 10:00 solar time of the simulated home, when its roof produces)",
    )
    demo.add_argument(
        "--seed",
        type=int,
        default=1,
        help="seed of the simulated weather, load and noise: with the same seed and --start, "
        "every simulated second has the same values (default 1)",
    )
    demo.add_argument(
        "--duration",
        type=float,
        default=None,
        help="stop after this many real seconds (default: until Ctrl-C)",
    )
    demo.set_defaults(func=cmd_demo)

    community = sub.add_parser(
        "community-demo",
        help="several simulated homes, each with its own daemon, trading on a three-signer chain",
        description="A producer with a PV roof, consumers with batteries and a shared building "
        "meter, each its own daemon with its own node key, on a chain of three geth signers and "
        "a follower (anvil when geth is missing), with one MQTT broker, in real time. Every "
        "period a line per home says what it committed and traded; Ctrl-C stops everything and "
        "prints the community's statement from the chain. A fresh community every run.",
    )
    community.add_argument(
        "--data-dir",
        type=Path,
        default=Path("daisee-community"),
        help="its homes, chain and broker (default ./daisee-community); a folder an earlier "
        "run made is emptied first, any other must be new or empty",
    )
    community.add_argument(
        "--period", type=int, default=30, help="settlement period in seconds (default 30)"
    )
    community.add_argument(
        "--duration", type=float, default=None, help="stop after this many seconds"
    )
    community.set_defaults(func=cmd_community_demo)

    calibrate = sub.add_parser(
        "calibrate",
        help="measure the zero-current output of ADS1115 current sensors "
        "(with no load!) and store it in the data dir",
    )
    calibrate.add_argument(
        "-c",
        "--config",
        type=Path,
        default=DEFAULT_CONFIG_PATH,
        help=f"the node's config file (default {DEFAULT_CONFIG_PATH})",
    )
    calibrate.add_argument(
        "--sensor",
        action="append",
        default=None,
        help="only this sensor (repeatable); default: every DC sensor",
    )
    calibrate.add_argument(
        "--seconds", type=float, default=2.0, help="how long to average each input (default 2)"
    )
    calibrate.set_defaults(func=cmd_calibrate)

    safe = sub.add_parser(
        "safe-state",
        help="drive every relay to its safe state (systemd runs this after any stop)",
        description="Drive every relay of the config to its safe state, group by group, break "
        "before make; refused while the node runs (it drives the pins). Exits 0 once every "
        "relay is in its safe state.",
    )
    safe.add_argument(
        "-c",
        "--config",
        type=Path,
        default=DEFAULT_CONFIG_PATH,
        help=f"the node's config file (default {DEFAULT_CONFIG_PATH})",
    )
    safe.set_defaults(func=cmd_safe_state)

    from daisee_node.ledger.commands import add_parsers

    add_parsers(sub, DEFAULT_CONFIG_PATH)

    from daisee_node.ledger.chain_node_command import add_parser as add_chain_node_parser

    add_chain_node_parser(sub, DEFAULT_CONFIG_PATH)

    from daisee_node.conformity_command import add_parser as add_conformity_parser

    add_conformity_parser(sub, DEFAULT_CONFIG_PATH)

    from daisee_node.export import add_parser as add_export_parser

    add_export_parser(sub, DEFAULT_CONFIG_PATH)

    from daisee_node.community.commands import add_parsers as add_community_parsers

    add_community_parsers(sub)

    status = sub.add_parser("status", help="what a node is doing, from its data dir")
    where = status.add_mutually_exclusive_group()
    where.add_argument(
        "-c",
        "--config",
        type=Path,
        default=None,
        help=f"the node's config (default {DEFAULT_CONFIG_PATH}, or the demo's "
        "data dir when that file does not exist)",
    )
    where.add_argument(
        "--data-dir", type=Path, default=None, help="the data dir to read (instead of a config)"
    )
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=cmd_status)
    return p


def _iso_time(text: str) -> datetime:
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


# -- run / check-config ---------------------------------------------------------------------------


def cmd_community_demo(args: argparse.Namespace) -> int:
    from daisee_node import community_demo

    if not 10 <= args.period <= 86_400:
        raise DaiseeError("--period: from 10 s (the chain's shortest settlement period) to a day")
    if args.duration is not None and not 0 < args.duration < math.inf:
        raise DaiseeError("--duration: a positive number of seconds")
    return community_demo.run(args.data_dir, period_s=args.period, duration=args.duration)


def cmd_check_config(args: argparse.Namespace) -> int:
    from daisee_node.config import load_config

    config = load_config(args.file)
    print(
        f"{args.file}: ok — node {config.node.id!r}, {_count(config.sensors, 'sensor')}, "
        f"{_count(config.relays, 'relay')}, {_count(config.rules, 'rule')}, "
        f"data in {config.node.data_dir}"
    )
    if config.chain_node is not None:
        # The daemon does not need these files, and a node waits for its community's genesis
        # for a while after its first boot: a warning, so `check-config && reload` still works.
        from daisee_node.ledger.chain_node import file_problems

        for problem in file_problems(config.chain_node):
            print(
                f"warning: the chain client (daisee-chain.service) cannot start: "
                f"{problem.path}: {problem.message}",
                file=sys.stderr,
            )
    return EXIT_OK


def _count(items: Sequence[object], noun: str) -> str:
    return f"{len(items)} {noun}{'' if len(items) == 1 else 's'}"


def cmd_run(args: argparse.Namespace) -> int:
    from daisee_node import logs
    from daisee_node.config import load_config

    config = load_config(args.config)
    logs.configure(config.log.level, config.log.format)
    return _run_node(config, config_path=args.config)


def _run_node(
    config: Config,
    *,
    config_path: Path | None = None,
    body: Callable[[Node], Awaitable[int]] | None = None,
) -> int:
    """Run a node until it stops; `body` (the demo) runs it and reports meanwhile."""
    from daisee_node.daemon import Node

    async def main() -> int:
        node = Node(config, config_path=config_path)
        code = await node.run() if body is None else await body(node)
        # asyncio.run joins the default executor's threads before returning: a source blocked
        # in a thread (a hung serial port, say) must not keep a stopped node alive.
        _exit_soon(code, EXIT_GRACE_S)
        return code

    return asyncio.run(main())


#: after the node has stopped, how long the process may take to wind down its threads
EXIT_GRACE_S = 2.0


def _exit_soon(code: int, delay_s: float) -> None:
    """End the process with `code` after `delay_s` unless it has ended by itself."""

    def leave() -> None:
        sys.stderr.flush()
        os._exit(code)

    timer = threading.Timer(delay_s, leave)
    timer.daemon = True
    timer.start()


def cmd_calibrate(args: argparse.Namespace) -> int:
    from daisee_node import logs
    from daisee_node.clock import make_clock
    from daisee_node.config import load_config
    from daisee_node.datadir import make_private_dir, running_pid
    from daisee_node.sensors.ads1115 import Ads1115Config, Ads1115Sensor
    from daisee_node.sensors.base import SensorContext

    config = load_config(args.config)
    logs.configure("warning", config.log.format)
    data_dir = config.node.data_dir
    pid = running_pid(data_dir) if data_dir.exists() else None
    if pid is not None:
        raise DaiseeError(
            f"the node is running (pid {pid}); stop it first "
            "(sudo systemctl stop daisee-node): it holds the ADC"
        )
    chosen = [
        s
        for s in config.sensors
        if isinstance(s, Ads1115Config) and (args.sensor is None or s.name in args.sensor)
    ]
    unknown = set(args.sensor or ()) - {s.name for s in chosen}
    if unknown:
        raise DaiseeError(f"no ADS1115 sensor named {', '.join(sorted(unknown))} in {args.config}")
    if not chosen:
        raise DaiseeError(f"no ADS1115 sensor in {args.config}")
    make_private_dir(data_dir)

    async def run() -> None:
        ctx = SensorContext(
            make_clock(config.node.time_speed, config.node.time_start), data_dir, config.simulation
        )
        for sensor_config in chosen:
            if sensor_config.mode == "ac":
                print(
                    f"{sensor_config.name}: skipped — in AC mode the zero is taken from "
                    "every window"
                )
                continue
            sensor = Ads1115Sensor(sensor_config, ctx)
            await sensor.setup()
            try:
                entry = await sensor.calibrate(args.seconds)
            finally:
                await sensor.close()
            print(
                f"{sensor_config.name}: zero {entry['zero_v']:.4f} V "
                f"(datasheet {entry['datasheet_zero_v']:.4f} V, noise "
                f"{entry['noise_v_rms'] * 1000:.2f} mV RMS, {entry['samples']} samples)"
            )

    print("Calibrating with NO current in the conductors.")
    asyncio.run(run())
    print(f"saved in {data_dir / 'calibration.json'}; the node uses it from its next start")
    return EXIT_OK


def cmd_safe_state(args: argparse.Namespace) -> int:
    from daisee_node.actuators.relays import RelayController
    from daisee_node.config import load_config

    config = load_config(args.config)
    if not config.relays:
        print("no relays configured")
        return EXIT_OK
    from daisee_node.datadir import running_pid

    data_dir = config.node.data_dir
    pid = running_pid(data_dir) if data_dir.exists() else None
    if pid is not None:
        # Two processes driving the same pins would defeat the interlock.
        raise DaiseeError(
            f"the node is running (pid {pid}) and drives the relays; stop it first "
            "(sudo systemctl stop daisee-node): its stop leaves them safe"
        )
    controller = RelayController(config.relays, config.gpio, data_dir)
    controller.open(force_safe=True)
    try:
        asyncio.run(controller.all_safe())
        for name, r in controller.relays.items():
            print(f"{name}: {'on' if r.on else 'off'} (safe state, GPIO{r.config.pin})")
    finally:
        controller.close()
    return EXIT_OK


# -- demo -----------------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    if args.speed < 1:
        raise DaiseeError("--speed must be at least 1")
    from daisee_node import demo, logs

    config = demo.prepare(args.data_dir, speed=args.speed, start=args.start, seed=args.seed)
    logs.configure("warning", "auto")
    start = config.node.time_start or datetime.now(UTC)
    print(
        f"daisee-node demo: a simulated home (PV roof, household load, battery, grid meter), "
        f"time x{args.speed:g} from {start.astimezone(UTC):%Y-%m-%d %H:%M} UTC; readings and "
        f"its chain kept in {config.node.data_dir}. "
        + ("Ctrl-C stops." if args.duration is None else f"Stops after {args.duration:g} s."),
        flush=True,
    )
    options = demo.DemoOptions(args.duration)
    return _run_node(config, body=lambda node: demo.watch(node, options))


# -- status ---------------------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    from daisee_node.config import load_config
    from daisee_node.status import read_status, render_status

    if args.data_dir is not None:
        data_dir = args.data_dir
    elif args.config is not None:
        data_dir = load_config(args.config).node.data_dir
    elif DEFAULT_CONFIG_PATH.exists():
        data_dir = load_config(DEFAULT_CONFIG_PATH).node.data_dir
    else:
        data_dir = DEMO_DATA_DIR
    report = read_status(data_dir)
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        print(render_status(report))
    return EXIT_OK
