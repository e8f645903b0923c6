"""One corrupt meter read at the end of a period, from a real Modbus TCP server to the chain:
the period's committed export is what the meter really counted, and so are the credits."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
from pathlib import Path

import pytest

from daisee_node.clock import ScaledClock
from daisee_node.config import config_from_dict
from daisee_node.daemon import Node
from daisee_node.ledger.keys import new_keystore
from daisee_node.readings import Quality
from tests.conftest import db_rows, free_port
from tests.support.meters import SDM120_INPUT, EmulatedMeter, MeterServer, sdm630_values

pytestmark = pytest.mark.slow

PERIOD_S = 30
SPEED = 6  # a period every 5 s of real time
EXPORT = "grid.export_wh"


def expected_export(rows: list[tuple[int, float, int]], t0: int, t1: int) -> int:
    """The period's export from the stored readings: positive whole-Wh steps between good
    readings, from the last good one before the period."""
    good = [(t, v) for t, v, q in rows if q == Quality.GOOD and math.isfinite(v) and t < t1]
    before = [v for t, v in good if t < t0][-1:]
    values = before + [v for t, v in good if t >= t0]
    return sum(max(0, math.floor(b) - math.floor(a)) for a, b in itertools.pairwise(values))


async def test_a_1e12_kwh_read_as_the_last_of_a_period_mints_nothing_extra(
    tmp_path: Path,
) -> None:
    values = sdm630_values()
    meter = EmulatedMeter(
        1, SDM120_INPUT, {k: values.get(k, 1.0) for k in SDM120_INPUT} | {"voltage_v": 231.0}
    )
    server = MeterServer([meter], port=free_port())
    await server.start()
    data = tmp_path / "data"
    new_keystore(data / "node-key.json", data / "node-key.pass")
    config = config_from_dict(
        {
            "node": {"id": "spike", "data_dir": str(data)},
            "store": {"flush_interval_s": 0.05},
            "sensors": [
                {
                    "name": "grid",
                    "kind": "modbus",
                    "model": "sdm120",
                    "host": "127.0.0.1",
                    "port": server.port,
                    "interval_s": 0.5,
                    "timeout_s": 0.5,
                }
            ],
            "chain": {
                "rpc_url": "embedded",
                "period_s": PERIOD_S,
                "seal_delay_s": 2,
                "submit_interval_s": 0.2,
                "confirmations": 1,
                "export_channel": EXPORT,
            },
        }
    )
    clock = ScaledClock(speed=SPEED)
    node = Node(config, clock=clock)
    task = asyncio.create_task(node.run())

    async def exporting() -> None:
        # 1 Wh every 0.1 s of real time: 6 kW in node time, well inside an SDM120's range
        while True:
            await asyncio.sleep(0.1)
            meter.values["export_kwh"] += 0.001

    counting = asyncio.create_task(exporting())
    try:
        await asyncio.wait_for(node.started.wait(), 10)
        period_ms = PERIOD_S * 1000
        # the corrupt read goes to the last poll of the next full period
        start = (clock.now_ms() // period_ms + 1) * period_ms
        while clock.now_ms() < start + period_ms - 700:
            await asyncio.sleep(0.01)
        meter.once["export_kwh"] = 1e12
        svc = node.ledger
        assert svc is not None

        async def spike_stored() -> int:
            while True:
                rows = await node.store.query(
                    "SELECT r.t_ms FROM readings r JOIN channels c ON c.id = r.channel_id "
                    "WHERE c.name = ? AND r.value > 1e14",
                    (EXPORT,),
                )
                if rows:
                    return int(rows[0][0])
                await asyncio.sleep(0.05)

        # Under load the poll may slip into the next period: the period is the one the spike
        # was stamped in, not the one aimed at.
        spike_t1 = (await asyncio.wait_for(spike_stored(), 30) // period_ms + 1) * period_ms

        async def committed() -> bool:
            rows = await node.store.query(
                "SELECT 1 FROM commitments WHERE own = 1 AND t0 >= ? AND state = 'confirmed'",
                (spike_t1,),
            )
            return bool(rows)

        async def wait() -> None:
            while not await committed():
                await asyncio.sleep(0.05)

        await asyncio.wait_for(wait(), 30)
        ledger = svc.ledger
        assert ledger is not None
        balance = ledger.credit().functions.balanceOf(svc.address).call()
        node.request_stop()
        assert await asyncio.wait_for(task, 8) == 0
    finally:
        counting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await counting
        await server.stop()

    db = data / "node.db"
    rows = db_rows(
        db,
        "SELECT r.t_ms, r.value, r.quality FROM readings r JOIN channels c "
        "ON c.id = r.channel_id WHERE c.name = ? ORDER BY r.t_ms",
        (EXPORT,),
    )
    spikes = [(t, q) for t, v, q in rows if v > 1e14]
    assert len(spikes) == 1 and spikes[0][1] != Quality.GOOD
    bodies = [json.loads(b) for (b,) in db_rows(db, "SELECT body FROM commitments ORDER BY seq")]
    (spiked,) = [c for c in bodies if c["t0"] <= spikes[0][0] < c["t1"]]
    # 5 s of real time at 10 Wh/s: about 50 Wh, and exactly what the good readings say
    assert 0 < spiked["export_wh"] <= 80
    for c in bodies:
        assert c["export_wh"] == expected_export(rows, c["t0"], c["t1"]), c
    committed_export = sum(c["export_wh"] for c in bodies if c["t1"] <= spike_t1 + period_ms)
    assert balance <= sum(c["export_wh"] for c in bodies) * 10**15
    assert balance >= committed_export * 10**15 > 0
