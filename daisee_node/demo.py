"""The demo node: one simulated home (PV roof, household load, battery, grid meter), a CT clamp
read through the real ADS1115 driver, and an in-process chain, in faster-than-real time."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from daisee_node.config import Config
    from daisee_node.daemon import Node


#: where the demo keeps its readings and chain, relative to the current directory
DEMO_DATA_DIR = Path("daisee-demo")
#: the demo's simulated day starts at this local solar hour: the roof produces from the first line
START_SOLAR_HOUR = 10.0
#: how the demo's hints name the command (`./run` sets "./run daisee-node")
COMMAND_ENV = "DAISEE_NODE_COMMAND"


def command_name() -> str:
    """The `daisee-node` command as the user can type it here."""
    return os.environ.get(COMMAND_ENV) or "daisee-node"


def default_start(now: datetime | None = None, longitude_deg: float | None = None) -> datetime:
    """Today (UTC) at `START_SOLAR_HOUR` solar time where the simulated home stands, rounded up
    to a settlement period's start: the same whatever the user's time zone or season."""
    if longitude_deg is None:
        from daisee_node.sensors.simulated import SimulationConfig

        longitude_deg = SimulationConfig().longitude_deg
    now = now or datetime.now(UTC)
    utc_hours = (START_SOLAR_HOUR - longitude_deg / 15.0) % 24.0
    quarter_hours = math.ceil(utc_hours * 4 - 1e-9) % 96  # within today's UTC date
    midnight = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return midnight + timedelta(minutes=15 * quarter_hours)


class DemoOptions:
    """How the demo runs and reports."""

    def __init__(self, duration: float | None, summary_every_s: float = 1.0) -> None:
        self.duration = duration
        self.summary_every_s = summary_every_s


def prepare(
    data_dir: Path, *, speed: float = 60.0, start: datetime | None = None, seed: int = 1
) -> Config:
    """The demo's config, going on from where the last run in `data_dir` stopped, with a key
    for its chain account made on first use. Its chain is kept in `data_dir`, so its readings
    can be proven after it stops."""
    from daisee_node.ledger import embedded
    from daisee_node.status import newest_reading_ms

    newest = newest_reading_ms(data_dir)
    if start is None and newest is not None:
        # Go on from where the last demo run stopped rather than re-sampling the same times.
        start = datetime.fromtimestamp(newest / 1000 + 1, UTC)
    config = demo_config(data_dir, speed=speed, start=start, seed=seed)
    assert config.chain is not None
    keystore = config.chain.keystore_path(config.data_dir)
    if not keystore.exists():
        from daisee_node.ledger.keys import new_keystore

        new_keystore(keystore, config.chain.password_path(config.data_dir))
    embedded.keep_in(embedded.chain_dir(config.data_dir))
    return config


def demo_config(
    data_dir: Path, *, speed: float = 60.0, start: datetime | None = None, seed: int = 1
) -> Config:
    """The demo node: one simulated home (PV roof, household load, battery, grid meter)."""
    from daisee_node.config import config_from_dict

    if start is None:
        start = default_start()
    sensors: list[dict[str, Any]] = [
        {"name": model, "kind": "simulated", "model": model, "interval_s": 1.0}
        for model in ("pv", "load", "battery", "grid")
    ]
    # A CT clamp on the PV line, read through the real ADS1115 driver on the fake I2C bus: its
    # current follows the simulated PV output.
    sensors.append(
        {
            "name": "pv_line",
            "kind": "ads1115",
            "bus": "fake",
            "channel": 0,
            "current_sensor": "sct013-030",
            "mode": "ac",
            "voltage_v": 230.0,
            "direction": "export",
            # an AC reading samples 10 mains cycles (0.2 s of wall time, whatever the speed):
            # at least 0.5 s of wall time between readings, so the sensor keeps its interval
            # and the periods' conformity reports find every reading they expect
            "interval_s": max(5.0, 0.5 * speed),
            "fake": {"ac_rms_a": 10.0, "noise_a": 0.02, "follow_channel": "pv.power_w"},
        }
    )
    return config_from_dict(
        {
            "node": {
                "id": "demo",
                "data_dir": str(data_dir.resolve()),
                "time_speed": speed,
                "time_start": start,
            },
            "simulation": {"seed": seed},
            "sensors": sensors,
            # An in-process chain, kept under the data dir: 15-minute periods are sealed and
            # committed every 15 s at x60.
            "chain": {
                "rpc_url": "embedded",
                "period_s": 900,
                "seal_delay_s": 10,
                "submit_interval_s": 2,
                "confirmations": 1,
                "import_channel": "grid.import_wh",
                "export_channel": "grid.export_wh",
            },
        },
        source="demo",
    )


async def watch(node: Node, options: DemoOptions) -> int:
    """Run the node, print a summary line every `summary_every_s`, stop after `duration`."""
    runner = asyncio.create_task(node.run(), name="node")
    await asyncio.wait(
        [runner, asyncio.create_task(node.started.wait())], return_when=asyncio.FIRST_COMPLETED
    )
    loop = asyncio.get_running_loop()
    ends = None if options.duration is None else loop.time() + options.duration
    while not runner.done():
        if ends is not None and loop.time() >= ends:
            node.request_stop()
            break
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(runner), timeout=options.summary_every_s)
        if not runner.done():
            ledger = await node.ledger.state() if node.ledger and node.started.is_set() else None
            print(summary_line(node, ledger), flush=True)
    code = await runner
    print(stopped_line(node), flush=True)
    return int(code)


def stopped_line(node: Node) -> str:
    """What the demo says when it stops: how to look at what it stored, typed as here."""
    command = command_name()
    data_dir = node.config.node.data_dir
    where = "" if _is_default_dir(data_dir) else f" --data-dir {data_dir}"
    text = (
        f"stopped; {node.store.stats.written} readings stored. "
        f"See them with: {command} status{where}"
    )
    if node.ledger is not None:
        text += (
            f"\nProve one against the demo's chain: {command} prove{where} --channel "
            f"pv.energy_wh -o proof.json && {command} verify proof.json{where}"
        )
    return text


def _is_default_dir(data_dir: Path) -> bool:
    from daisee_node.paths import DEFAULT_CONFIG_PATH

    # `status` and `prove` fall back to the demo's folder only without a node config here.
    return data_dir.resolve() == DEMO_DATA_DIR.resolve() and not DEFAULT_CONFIG_PATH.exists()


def summary_line(node: Node, ledger: dict[str, Any] | None = None) -> str:
    latest = node.latest

    def v(channel: str) -> float:
        r = latest.get(channel)
        return float("nan") if r is None else r.value

    t = datetime.fromtimestamp(node.clock.now(), UTC).strftime("%Y-%m-%d %H:%M")
    battery = v("battery.power_w")
    line = v("pv_line.current_a")
    return (
        f"{t} UTC  pv {v('pv.power_w'):6.0f} W  load {v('load.power_w'):6.0f} W  "
        f"battery {v('battery.soc_pct'):5.1f} % ({battery:+6.0f} W)  "
        f"grid {v('grid.power_w'):+6.0f} W  PV line {line:5.2f} A (ADS1115)  "
        f"| stored {node.store.stats.written}"
        + (
            f" | periods sealed {ledger['sealed_seq']}, on chain {ledger['confirmed_seq']}"
            if ledger
            else ""
        )
    )
