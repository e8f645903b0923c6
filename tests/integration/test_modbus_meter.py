"""Modbus meters against a real pymodbus server on loopback (and over RTU through a pty pair)."""

from __future__ import annotations

import asyncio
import contextlib
import math
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from daisee_node.clock import Clock
from daisee_node.config import config_from_dict
from daisee_node.daemon import Node
from daisee_node.readings import Quality, Reading
from daisee_node.sensors.base import SensorContext, SourceUnavailable
from daisee_node.sensors.modbus_meter import ModbusConfig, ModbusMeter, plan_blocks
from tests.conftest import free_port
from tests.support.meters import (
    SDM120_INPUT,
    SDM630_INPUT,
    EmulatedMeter,
    MeterServer,
    sdm630_values,
)


def meter_config(port: int, **extra: Any) -> ModbusConfig:
    base = {
        "name": "grid",
        "kind": "modbus",
        "model": "sdm630",
        "host": "127.0.0.1",
        "port": port,
        "timeout_s": 0.3,
        "retries": 0,
        "interval_s": 0.05,
    }
    return ModbusConfig(**{**base, **extra})


@pytest.fixture
async def sdm630():
    meter = EmulatedMeter(1, SDM630_INPUT, sdm630_values())
    server = MeterServer([meter], port=free_port())
    await server.start()
    yield meter, server
    await server.stop()


async def opened(config: ModbusConfig, tmp_path: Path) -> ModbusMeter:
    sensor = ModbusMeter(config, SensorContext(Clock(), tmp_path))
    await sensor.setup()
    return sensor


async def test_sdm630_values_arrive_as_channels_in_si_units(sdm630, tmp_path: Path) -> None:
    _, server = sdm630
    sensor = await opened(meter_config(server.port), tmp_path)
    readings = {r.channel: r for r in await sensor.read()}
    await sensor.close()
    expected = sdm630_values()
    for key, value in expected.items():
        if key.endswith("_kwh"):
            channel, value = f"grid.{key[:-4]}_wh", value * 1000
        else:
            channel = f"grid.{key}"
        assert readings[channel].value == pytest.approx(value, rel=1e-6), channel
        assert readings[channel].good
    assert set(readings) == {c.name for c in sensor.channels}


async def test_contiguous_registers_are_read_in_one_request(sdm630, tmp_path: Path) -> None:
    meter, server = sdm630
    sensor = await opened(meter_config(server.port), tmp_path)
    await sensor.read()
    await sensor.close()
    # Voltages, currents and phase powers (0..17) are one run; total power, power factor and
    # the frequency/energy run (70..75) are three more.
    assert sorted(meter.requests) == [(4, 0, 18), (4, 52, 2), (4, 62, 2), (4, 70, 6)]


def test_block_planning_splits_at_gaps_functions_and_the_protocol_limit() -> None:
    cfg = ModbusConfig(
        name="m",
        kind="modbus",
        model="custom",
        registers=[
            {"quantity": "a", "address": 0, "type": "uint16", "function": 3},
            {"quantity": "b", "address": 1, "type": "int32", "function": 3},
            {"quantity": "c", "address": 10, "type": "uint16", "function": 3},
            {"quantity": "d", "address": 0, "type": "float32", "function": 4},
            {"quantity": "e", "address": 122, "type": "float32", "function": 4},
            {"quantity": "f", "address": 124, "type": "float32", "function": 4},
        ]
        + [
            {"quantity": f"g{i}", "address": 2 + 2 * i, "type": "float32", "function": 4}
            for i in range(60)
        ],
    )
    blocks = [(b.function, b.address, b.count) for b in plan_blocks(cfg.register_map())]
    assert blocks == [(3, 0, 3), (3, 10, 1), (4, 0, 124), (4, 124, 2)]
    assert all(b[2] <= 125 for b in blocks)


async def test_a_custom_map_decodes_types_word_order_and_scale(sdm630, tmp_path: Path) -> None:
    meter, server = sdm630
    meter.holding = {
        100: 0xFFF6,  # int16 -10
        101: 0x0001,
        102: 0x86A0,  # uint32 100000, high word first
        103: 0x86A0,
        104: 0x0001,  # uint32 100000, low word first
    }
    config = meter_config(
        server.port,
        model="custom",
        registers=[
            {"quantity": "temp_c", "address": 100, "function": 3, "type": "int16", "scale": 0.5},
            {
                "quantity": "energy_wh",
                "address": 101,
                "function": 3,
                "type": "uint32",
                "state_class": "total_increasing",
            },
            {
                "quantity": "other_wh",
                "address": 103,
                "function": 3,
                "type": "uint32",
                "word_order": "little",
                "scale": 0.001,
                "offset": 1,
            },
        ],
    )
    sensor = await opened(config, tmp_path)
    values = {r.channel: r.value for r in await sensor.read()}
    await sensor.close()
    assert values == {
        "grid.temp_c": -5.0,
        "grid.energy_wh": 100000.0,
        "grid.other_wh": pytest.approx(101.0),
    }


async def test_a_meter_that_disappears_is_marked_unavailable_polled_less_and_returns(
    sdm630, tmp_path: Path
) -> None:
    _, server = sdm630
    sensor = await opened(
        meter_config(server.port, unavailable_after=3, max_backoff_s=0.4), tmp_path
    )
    assert (await sensor.read())[0].good
    await server.stop()
    errors: list[type[BaseException]] = []
    attempts = 0
    t_end = time.monotonic() + 2.0
    while time.monotonic() < t_end:
        polls_before = sensor.failures_in_row
        try:
            result = await sensor.read()
            assert result == []  # skipped while backing off
        except Exception as exc:
            errors.append(type(exc))
        attempts += sensor.failures_in_row - polls_before
        await asyncio.sleep(0.05)
    assert errors[:2] == [errors[0]] * 2 and not issubclass(errors[0], SourceUnavailable)
    assert errors[2] is SourceUnavailable
    assert sensor.unavailable
    assert attempts < 20, "an unavailable meter must be polled less often than every interval"

    await server.start()
    deadline = time.monotonic() + 5
    readings: list[Reading] = []
    while time.monotonic() < deadline and not readings:
        with contextlib.suppress(Exception):
            readings = list(await sensor.read())
        await asyncio.sleep(0.05)
    await sensor.close()
    assert readings and all(r.good for r in readings)
    assert not sensor.unavailable


async def test_a_missing_unit_is_an_error_not_a_crash(sdm630, tmp_path: Path) -> None:
    _, server = sdm630
    sensor = await opened(meter_config(server.port, unit=9), tmp_path)
    with pytest.raises(OSError, match="refused"):
        await sensor.read()
    await sensor.close()


async def test_meters_behind_one_gateway_are_polled_one_at_a_time(tmp_path: Path) -> None:
    values = sdm630_values()
    m1 = EmulatedMeter(1, SDM630_INPUT, values)
    m2 = EmulatedMeter(
        2, SDM120_INPUT, {k: values.get(k, 1.0) for k in SDM120_INPUT} | {"voltage_v": 240.0}
    )
    for m in (m1, m2):
        m.delay_s = 0.02
    server = MeterServer([m1, m2], port=free_port())
    await server.start()
    ctx = SensorContext(Clock(), tmp_path)
    a = ModbusMeter(meter_config(server.port, name="house", unit=1), ctx)
    b = ModbusMeter(meter_config(server.port, name="heatpump", model="sdm120", unit=2), ctx)
    await a.setup()
    await b.setup()
    results = await asyncio.gather(*(s.read() for s in (a, b, a, b)))
    await a.close()
    await b.close()
    await server.stop()
    assert max(m1.max_in_flight, m2.max_in_flight) == 1
    assert m1.in_flight == m2.in_flight == 0
    by_channel = {r.channel: r.value for batch in results for r in batch}
    assert by_channel["heatpump.voltage_v"] == 240.0
    assert by_channel["house.l1_voltage_v"] == pytest.approx(231.5)
    assert ctx.resources == {}  # the shared client closed with its last meter


async def test_in_a_node_counter_resets_and_implausible_values_are_flagged(
    sdm630, tmp_path: Path
) -> None:
    meter, server = sdm630
    config = config_from_dict(
        {
            "node": {"id": "meter-node", "data_dir": str(tmp_path / "data")},
            "store": {"flush_interval_s": 0.05},
            "sensors": [
                {
                    "name": "grid",
                    "kind": "modbus",
                    "model": "sdm630",
                    "host": "127.0.0.1",
                    "port": server.port,
                    "interval_s": 0.05,
                    "timeout_s": 0.3,
                }
            ],
        }
    )
    node = Node(config)
    task = asyncio.create_task(node.run())
    await asyncio.wait_for(node.started.wait(), 10)

    async def quality_of(channel: str, expected: Quality) -> None:
        while (r := node.latest.get(channel)) is None or r.quality != expected:
            await asyncio.sleep(0.02)

    await asyncio.wait_for(quality_of("grid.import_wh", Quality.GOOD), 5)
    meter.values["import_kwh"] = 10.0  # the meter was replaced: its counter starts again
    meter.values["frequency_hz"] = 0.0  # and a glitch
    await asyncio.wait_for(quality_of("grid.import_wh", Quality.COUNTER_BACKWARDS), 5)
    await asyncio.wait_for(quality_of("grid.frequency_hz", Quality.OUT_OF_RANGE), 5)
    meter.values["import_kwh"] = 10.5
    await asyncio.wait_for(quality_of("grid.import_wh", Quality.GOOD), 5)
    assert node.latest["grid.import_wh"].value == pytest.approx(10_500)
    node.request_stop()
    assert await asyncio.wait_for(task, 8) == 0


@pytest.fixture
def pty_pair(tmp_path: Path):
    socat = shutil.which("socat")
    if socat is None:
        pytest.fail("socat is needed for the RTU test (./run test installs it)")
    a, b = tmp_path / "ttyA", tmp_path / "ttyB"
    proc = subprocess.Popen(
        [socat, f"pty,raw,echo=0,link={a}", f"pty,raw,echo=0,link={b}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 5
    while not (a.exists() and b.exists()):
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("socat did not create the pty pair")
        time.sleep(0.02)
    yield str(a), str(b)
    proc.terminate()
    proc.wait(timeout=5)


async def test_rtu_over_a_serial_line(pty_pair, tmp_path: Path) -> None:
    server_end, client_end = pty_pair
    meter = EmulatedMeter(3, SDM630_INPUT, sdm630_values())
    server = MeterServer([meter], serial_port=server_end)
    await server.start()
    try:
        config = ModbusConfig(
            name="grid",
            kind="modbus",
            model="sdm630",
            transport="rtu",
            device=client_end,
            baudrate=19200,
            unit=3,
            timeout_s=1.0,
        )
        sensor = ModbusMeter(config, SensorContext(Clock(), tmp_path))
        await sensor.setup()
        readings = {r.channel: r.value for r in await sensor.read()}
        await sensor.close()
    finally:
        await server.stop()
    assert readings["grid.power_w"] == pytest.approx(1190.0)
    assert readings["grid.export_wh"] == pytest.approx(321_250.0)
    assert not any(math.isnan(v) for v in readings.values())
