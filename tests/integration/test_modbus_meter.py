"""Modbus meters against a real pymodbus server on loopback (and over RTU through a pty pair)."""

from __future__ import annotations

import asyncio
import contextlib
import math
import shutil
import signal
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
from tests.conftest import Daemon, db_rows, free_port, wait_for, write_config
from tests.support.meters import (
    SDM120_INPUT,
    SDM630_INPUT,
    EmulatedMeter,
    MeterServer,
    SilentServer,
    ThreadedMeterServer,
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


def node_config(tmp_path: Path, port: int, model: str = "sdm630") -> Any:
    return config_from_dict(
        {
            "node": {"id": "meter-node", "data_dir": str(tmp_path / "data")},
            "store": {"flush_interval_s": 0.05},
            "sensors": [
                {
                    "name": "grid",
                    "kind": "modbus",
                    "model": model,
                    "host": "127.0.0.1",
                    "port": port,
                    "interval_s": 0.05,
                    "timeout_s": 0.3,
                }
            ],
        }
    )


async def test_in_a_node_counter_resets_and_implausible_values_are_flagged(
    sdm630, tmp_path: Path
) -> None:
    meter, server = sdm630
    node = Node(node_config(tmp_path, server.port))
    task = asyncio.create_task(node.run())
    await asyncio.wait_for(node.started.wait(), 10)

    async def quality_of(channel: str, expected: Quality, value: float | None = None) -> None:
        while (
            (r := node.latest.get(channel)) is None
            or r.quality != expected
            or (value is not None and r.value != pytest.approx(value))
        ):
            await asyncio.sleep(0.02)

    await asyncio.wait_for(quality_of("grid.import_wh", Quality.GOOD), 5)
    meter.values["import_kwh"] = 10.0  # the meter was replaced: its counter starts again
    meter.values["frequency_hz"] = 0.0  # and a glitch
    await asyncio.wait_for(quality_of("grid.import_wh", Quality.COUNTER_BACKWARDS), 5)
    await asyncio.wait_for(quality_of("grid.frequency_hz", Quality.OUT_OF_RANGE), 5)
    # A few readings at the new level agree with each other: it is the new baseline.
    await asyncio.wait_for(quality_of("grid.import_wh", Quality.GOOD, 10_000), 5)
    meter.values["import_kwh"] = 10.002
    await asyncio.wait_for(quality_of("grid.import_wh", Quality.GOOD, 10_002), 5)
    node.request_stop()
    assert await asyncio.wait_for(task, 8) == 0


def stored(tmp_path: Path, channel: str) -> list[tuple[int, float, int]]:
    """(t_ms, value, quality) of a channel in the node's database, oldest first."""
    return db_rows(
        tmp_path / "data" / "node.db",
        "SELECT r.t_ms, r.value, r.quality FROM readings r JOIN channels c "
        "ON c.id = r.channel_id WHERE c.name = ? ORDER BY r.t_ms",
        (channel,),
    )


def sdm120_values() -> dict[str, float]:
    values = sdm630_values()
    return {k: values.get(k, 1.0) for k in SDM120_INPUT} | {"voltage_v": 231.0, "power_w": -900}


async def test_one_corrupt_counter_read_is_flagged_and_the_counter_carries_on(
    tmp_path: Path,
) -> None:
    """An SDM120 answers once with 1e12 kWh on its export register, once with a jump of 5 MWh in
    a fraction of a second, and once with 3e38 W: none of them is a good reading, and the good
    readings around them carry on from the meter's real counter."""
    meter = EmulatedMeter(1, SDM120_INPUT, sdm120_values())
    server = MeterServer([meter], port=free_port())
    await server.start()
    node = Node(node_config(tmp_path, server.port, "sdm120"))
    seen: list[Reading] = []
    node.subscribe(seen.extend)
    task = asyncio.create_task(node.run())
    try:
        await asyncio.wait_for(node.started.wait(), 10)

        async def served(n: int, channel: str, *, good: bool | None = None) -> list[Reading]:
            start = len(seen)
            while True:
                mine = [r for r in seen[start:] if r.channel == channel and good in (None, r.good)]
                if len(mine) >= n:
                    return mine
                await asyncio.sleep(0.02)

        export, power = "grid.export_wh", "grid.power_w"
        await asyncio.wait_for(served(3, export, good=True), 5)
        for name, value, channel in (
            ("export_kwh", 1e12, export),
            ("export_kwh", 321.25 + 5000, export),
            ("power_w", 3e38, power),
        ):
            meter.once[name] = value
            (bad,) = await asyncio.wait_for(served(1, channel, good=False), 5)
            assert bad.value == pytest.approx(value * (1000 if name == "export_kwh" else 1))
        # The meter counts on: 2 Wh more.
        meter.values["export_kwh"] = 321.252
        await asyncio.wait_for(served(3, export, good=True), 5)
        node.request_stop()
        assert await asyncio.wait_for(task, 8) == 0
    finally:
        await server.stop()

    rows = stored(tmp_path, export)
    qualities = {q for _, _, q in rows}
    assert {Quality.OUT_OF_RANGE, Quality.IMPLAUSIBLE_STEP} <= qualities
    assert Quality.COUNTER_BACKWARDS not in qualities
    good = [v for _, v, q in rows if q == Quality.GOOD]
    assert good[0] == pytest.approx(321_250) and good[-1] == pytest.approx(321_252)
    assert all(321_250 - 1 <= v <= 321_252 + 1 for v in good)
    bad_power = [(v, q) for _, v, q in stored(tmp_path, power) if v > 25_000]
    assert bad_power == [(pytest.approx(3e38, rel=1e-6), Quality.OUT_OF_RANGE)]


def test_meter_models_bound_their_counters_by_their_maximum_power() -> None:
    def rates(**extra: Any) -> dict[str, float | None]:
        sensor = ModbusMeter(meter_config(1, **extra), SensorContext(Clock(), Path(".")))
        return {c.name: c.max_rate_per_s for c in sensor.channels if c.name.endswith("_wh")}

    assert rates(model="sdm120")["grid.export_wh"] == pytest.approx(45 * 253 / 3600)
    assert rates(model="sdm630")["grid.import_wh"] == pytest.approx(3 * 100 * 253 / 3600)
    assert rates(model="sdm120", max_power_w=3600)["grid.import_wh"] == pytest.approx(1.0)
    custom = rates(
        model="custom",
        max_power_w=7200,
        registers=[
            {"quantity": "a_wh", "address": 0, "state_class": "total_increasing", "unit": "Wh"},
            {"quantity": "b_wh", "address": 2, "state_class": "total_increasing", "unit": "kWh"},
            {
                "quantity": "c_wh",
                "address": 4,
                "state_class": "total_increasing",
                "unit": "Wh",
                "max_rate_per_s": 5,
            },
            {"quantity": "d_wh", "address": 6, "state_class": "total_increasing", "unit": "m3"},
        ],
    )
    assert custom == {
        "grid.a_wh": pytest.approx(2.0),
        "grid.b_wh": pytest.approx(0.002),
        "grid.c_wh": 5,
        "grid.d_wh": None,
    }


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


def modbus_node_file(tmp_path: Path, port: int, **sensor: Any) -> Path:
    return write_config(
        tmp_path / "node.toml",
        {
            "node": {"id": "meter-node", "data_dir": str(tmp_path / "data")},
            "store": {"flush_interval_s": 0.1},
            "sensors": [
                {
                    "name": "grid",
                    "kind": "modbus",
                    "model": "sdm630",
                    "host": "127.0.0.1",
                    "port": port,
                    "interval_s": 0.2,
                    **sensor,
                }
            ],
        },
    )


def stops_within(d: Daemon, seconds: float) -> float:
    """SIGTERM, then how long the process took to exit (failing past `seconds`)."""
    t0 = time.monotonic()
    d.signal(signal.SIGTERM)
    try:
        code, out = d.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running {seconds} s after SIGTERM:\n{d.output()}") from None
    assert code == 0, out
    return time.monotonic() - t0


def test_a_node_stops_in_time_after_its_meter_went_away(daemon, tmp_path: Path) -> None:
    meter = EmulatedMeter(1, SDM630_INPUT, sdm630_values())
    server = ThreadedMeterServer([meter], port=free_port())
    server.start()
    try:
        d = daemon(modbus_node_file(tmp_path, server.port, timeout_s=1.0, retries=1))
        wait_for(lambda: any(q == Quality.GOOD for _, _, q in stored(tmp_path, "grid.power_w")))
        server.stop()
        # The node sees the meter gone (a flagged reading), and stops in time while it polls.
        wait_for(lambda: any(q != Quality.GOOD for _, _, q in stored(tmp_path, "grid.power_w")))
        assert stops_within(d, 5.0) < 5.0
    finally:
        server.close()


def test_a_node_stops_in_time_while_its_meter_hangs(daemon, tmp_path: Path) -> None:
    """A gateway that accepts the connection and never answers: reads fail within their
    timeout, and SIGTERM in the middle of one ends the node within 5 s."""
    silent = SilentServer()
    try:
        d = daemon(modbus_node_file(tmp_path, silent.port, timeout_s=1.5, retries=1))
        wait_for(lambda: stored(tmp_path, "grid.power_w"), timeout=30)
        assert {q for _, _, q in stored(tmp_path, "grid.power_w")} <= {
            Quality.SOURCE_ERROR,
            Quality.UNAVAILABLE,
        }
        wait_for(lambda: silent.accepted)
        assert stops_within(d, 5.0) < 5.0
    finally:
        silent.close()


async def test_a_read_from_a_gateway_that_never_answers_is_bounded_and_cancellable(
    tmp_path: Path,
) -> None:
    silent = SilentServer()
    try:
        sensor = await opened(meter_config(silent.port, timeout_s=0.2, retries=1), tmp_path)
        t0 = time.monotonic()
        with pytest.raises(OSError):
            await asyncio.wait_for(sensor.read(), 10)
        assert time.monotonic() - t0 < 2.0
        # Cancelled in the middle of a request (the node stops): it ends at once.
        read = asyncio.create_task(sensor.read())
        while sensor.requests < 2:
            await asyncio.sleep(0.01)
        t0 = time.monotonic()
        read.cancel()
        with pytest.raises(asyncio.CancelledError):
            await read
        await asyncio.wait_for(sensor.close(), 0.5)
        assert time.monotonic() - t0 < 0.5
    finally:
        silent.close()
