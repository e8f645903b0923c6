"""Wh counters integrated from power channels a config marks (`energy` on a sensor): signed power
split in two counters, nothing invented over gaps or bad readings, continued across restarts."""

from __future__ import annotations

import asyncio
import itertools
import math
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from daisee_node.config import load_config
from daisee_node.daemon import Node
from daisee_node.readings import Channel, Quality, Reading
from daisee_node.sensors.base import EnergySpec
from daisee_node.sensors.energy import EnergyIntegrator
from tests.conftest import until, write_config
from tests.support.clocks import sunny_longitude

POWER = Channel("battery.power_w", "W", min=-5000, max=5000)
SPEC = EnergySpec.model_validate(
    {"power": "power_w", "positive": "charge_wh", "negative": "discharge_wh"}
)


def integrator(latest: dict[str, Reading] | None = None) -> EnergyIntegrator:
    return EnergyIntegrator("battery", [SPEC], {POWER.name: POWER}, latest or {}, max_gap_s=60.0)


def totals(readings: list[Reading]) -> dict[str, float]:
    return {r.channel: r.value for r in readings}


def feed(e: EnergyIntegrator, *points: tuple[float, float, Quality]) -> dict[str, float]:
    out: dict[str, float] = {}
    for t_s, watts, quality in points:
        out = totals(e.add([Reading(POWER.name, int(t_s * 1000), watts, quality)]))
    return out


G = Quality.GOOD


def test_signed_power_is_split_into_a_charge_and_a_discharge_counter() -> None:
    e = integrator()
    assert [c.name for c in e.channels] == ["battery.charge_wh", "battery.discharge_wh"]
    assert all(c.unit == "Wh" and c.state_class == "total_increasing" for c in e.channels)
    assert e.channels[0].max_rate_per_s == pytest.approx(5000 / 3600)
    got = feed(e, (0, 3600, G), (1, 3600, G), (2, -1800, G), (3, -1800, G))
    # 1 s at 3.6 kW = 1 Wh charged; 1→2 s averages +900 W: 0.25 Wh more; 2→3 s at -1.8 kW: 0.5 Wh
    assert got == {"battery.charge_wh": 1.25, "battery.discharge_wh": 0.5}


def test_nothing_is_invented_over_bad_readings_out_of_range_values_or_long_gaps() -> None:
    e = integrator()
    got = feed(
        e,
        (0, 3600, G),
        (1, math.nan, Quality.SOURCE_ERROR),  # a failed read: the stretch ends
        (2, 3600, G),
        (3, 9000, G),  # beyond the channel's range: not trusted
        (4, 3600, G),
        (5, 3600, G),  # the only measured second: 1 Wh
        (200, 3600, G),  # 195 s without a reading (> 60 s): not integrated
    )
    assert got == {"battery.charge_wh": 1.0, "battery.discharge_wh": 0.0}
    e.interrupt()  # a read that raised
    assert feed(e, (201, 3600, G))["battery.charge_wh"] == 1.0


@pytest.mark.parametrize(
    ("stored", "start"),
    [
        (Reading("battery.charge_wh", 0, 1234567.8), 1234567.8),
        (Reading("battery.charge_wh", 0, 1234567.8, Quality.LATE), 1234567.8),
        (Reading("battery.charge_wh", 0, math.nan, Quality.SOURCE_ERROR), 0.0),
    ],
)
def test_counters_continue_from_their_newest_stored_value(stored: Reading, start: float) -> None:
    e = integrator({stored.channel: stored})
    assert feed(e, (0, 3600, G), (1, 3600, G))["battery.charge_wh"] == start + 1.0


@pytest.mark.parametrize(
    ("written", "names"),
    [
        ("power_w", ["energy_in_wh", "energy_out_wh"]),
        ("l1_power_w", ["l1_energy_in_wh", "l1_energy_out_wh"]),
        ({"power": "power_w", "positive": "energy_wh"}, ["energy_wh"]),
    ],
)
def test_counter_names(written: Any, names: list[str]) -> None:
    assert [q for q, _ in EnergySpec.model_validate(written).counters()] == names


# -- in a node: stored like any reading, continued across a restart ------------------------------


def node_file(tmp_path: Path) -> Path:
    return write_config(
        tmp_path / "node.toml",
        {
            "node": {"id": "e1", "data_dir": str(tmp_path / "data")},
            "store": {"flush_interval_s": 0.05},
            # solar noon now, wherever the test's clock stands: the roof produces
            "simulation": {
                "longitude_deg": sunny_longitude(),
                "latitude_deg": 0.0,
                "noise_pct": 0.0,
            },
            "sensors": [
                {
                    "name": "pv",
                    "kind": "simulated",
                    "model": "pv",
                    "interval_s": 0.05,
                    "energy": ["power_w"],
                },
                {
                    "name": "battery",
                    "kind": "simulated",
                    "model": "battery",
                    "interval_s": 0.05,
                    "energy": [
                        {"power": "power_w", "positive": "charge_wh", "negative": "discharge_wh"}
                    ],
                },
            ],
        },
    )


def stored(tmp_path: Path, channel: str) -> list[tuple[int, float, int]]:
    conn = sqlite3.connect(tmp_path / "data" / "node.db")
    try:
        return conn.execute(
            "SELECT r.t_ms, r.value, r.quality FROM readings r JOIN channels c "
            "ON c.id = r.channel_id WHERE c.name = ? ORDER BY r.t_ms",
            (channel,),
        ).fetchall()
    finally:
        conn.close()


async def run_until(path: Path, condition: Any) -> Node:
    node = Node(load_config(path), config_path=path)
    task = asyncio.create_task(node.run())
    await asyncio.wait_for(node.started.wait(), 10)
    await until(lambda: condition(node), 20)
    node.request_stop()
    assert await asyncio.wait_for(task, 6) == 0
    return node


async def test_a_node_stores_the_counters_and_continues_them_after_a_restart(
    tmp_path: Path,
) -> None:
    path = node_file(tmp_path)
    node = await run_until(
        path, lambda n: n.latest.get("pv.energy_in_wh", Reading("", 0, 0.0)).value > 2.0
    )
    assert {"battery.charge_wh", "battery.discharge_wh", "pv.energy_out_wh"} <= set(node.latest)
    first = stored(tmp_path, "pv.energy_in_wh")
    site = {t: v for t, v, _ in stored(tmp_path, "pv.energy_wh")}
    assert all(q == Quality.GOOD for _, _, q in first)
    assert all(b[1] >= a[1] for a, b in itertools.pairwise(first))
    # The same power, integrated by the simulated site on its one-second grid, agrees between
    # two readings just after whole seconds (each at most 100 ms off the site's grid).
    on_grid = [(t, v) for t, v, _ in first if t % 1000 < 100]
    (t0, v0), (t1, v1) = on_grid[0], on_grid[-1]
    assert t1 - t0 >= 1900
    ours, theirs = v1 - v0, site[t1] - site[t0]
    peak = max(v for _, v, _ in stored(tmp_path, "pv.power_w"))
    assert ours == pytest.approx(theirs, abs=peak * 0.2 / 3600 + 0.01 * theirs)
    assert {v for _, v, _ in stored(tmp_path, "pv.energy_out_wh")} == {0.0}  # PV never draws

    end = first[-1][1]
    await run_until(path, lambda n: len(stored(tmp_path, "pv.energy_in_wh")) > len(first) + 5)
    second = stored(tmp_path, "pv.energy_in_wh")[len(first) :]
    assert second[0][1] == end  # the downtime is not integrated: it starts where it stopped
    assert second[-1][1] > end


async def test_the_counters_reach_home_assistant_as_energy_entities(
    tmp_path: Path, broker: Any
) -> None:
    import json

    import aiomqtt

    path = write_config(
        tmp_path / "node.toml",
        {
            "node": {"id": "e2", "data_dir": str(tmp_path / "data")},
            "sensors": [
                {
                    "name": "battery",
                    "kind": "simulated",
                    "model": "battery",
                    "interval_s": 0.1,
                    "energy": [
                        {"power": "power_w", "positive": "charge_wh", "negative": "discharge_wh"}
                    ],
                }
            ],
            "mqtt": {
                "host": broker.host,
                "port": broker.port,
                "username": "node",
                "password_file": str(broker.password_file("node")),
                "reading_interval_s": 0,
            },
        },
    )
    seen: dict[str, bytes] = {}
    async with aiomqtt.Client(
        broker.host,
        broker.port,
        username="viewer",
        password=broker.password_file("viewer").read_text().strip(),
    ) as client:
        await client.subscribe("#")

        async def listen() -> None:
            async for msg in client.messages:
                seen[msg.topic.value] = bytes(msg.payload)  # type: ignore[arg-type]

        listener = asyncio.create_task(listen())

        def discovered() -> dict[str, Any] | None:
            for topic, payload in seen.items():
                if topic.startswith("homeassistant/") and payload:
                    config = json.loads(payload)
                    if config.get("state_topic") == "daisee/e2/reading/battery.discharge_wh":
                        return dict(config)
            return None

        node = await run_until(
            path,
            lambda n: discovered() is not None and "daisee/e2/reading/battery.discharge_wh" in seen,
        )
        listener.cancel()
    config = discovered()
    assert config is not None
    assert config["device_class"] == "energy" and config["state_class"] == "total_increasing"
    assert config["unit_of_measurement"] == "Wh"
    assert float(seen["daisee/e2/reading/battery.discharge_wh"]) >= 0
    assert "battery.charge_wh" in node.latest
