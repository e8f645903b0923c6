"""The DAISEE scenario end to end: simulated battery, rules, relays on mock pins."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

from daisee_node.actuators.mockpins import pin_history
from daisee_node.config import load_config
from daisee_node.daemon import Node
from tests.conftest import ROOT

OWN, NEIGHBOUR = 17, 27


async def test_consumer_switches_to_the_neighbour_when_low_and_back_when_recovered(
    tmp_path: Path,
) -> None:
    config = load_config(ROOT / "examples" / "daisee-consumer.toml")
    node_section = config.node.model_copy(
        update={"data_dir": tmp_path / "data", "time_speed": 3600.0}
    )
    # At 3600x the example's 300 s of staleness is 83 ms of wall time: one stall of a loaded
    # machine's loop, and the rule falls back to its safe state in the middle of the scenario.
    # Staleness has tests of its own; here it is given a second of wall time.
    rules = [r.model_copy(update={"stale_after_s": 3600.0}) for r in config.rules]
    config = config.model_copy(update={"node": node_section, "rules": rules})
    node = Node(config)
    task = asyncio.create_task(node.run())
    await asyncio.wait_for(node.started.wait(), 10)
    pins = tmp_path / "data" / "mock-gpio"

    async def switched_back() -> None:
        while len(pin_history(pins, NEIGHBOUR)) < 2:
            await asyncio.sleep(0.05)

    await asyncio.wait_for(switched_back(), 60)
    node.request_stop()
    assert await asyncio.wait_for(task, 10) == 0

    own, neighbour = pin_history(pins, OWN), pin_history(pins, NEIGHBOUR)
    # Own supply closed at start; then own opens, neighbour closes (after the dead time);
    # then neighbour opens and own closes again.
    assert [v for _, v in own][:3] == [True, False, True]
    assert [v for _, v in neighbour][:2] == [True, False]
    assert neighbour[0][0] - own[1][0] >= 0.5 - 1e-3  # break-before-make with dead time
    assert own[2][0] - neighbour[1][0] >= 0.5 - 1e-3
    assert not any(
        t0 <= t <= t1 and level
        for t, level in own[1:2]
        for t0, t1 in [(neighbour[0][0], neighbour[1][0])]
    )

    db = sqlite3.connect(tmp_path / "data" / "node.db")
    rows = db.execute(
        "SELECT t_ms, target, state, data FROM events WHERE kind = 'rule' ORDER BY id"
    ).fetchall()
    soc_series = db.execute(
        "SELECT r.t_ms, r.value FROM readings r JOIN channels c ON c.id = r.channel_id "
        "WHERE c.name = 'battery.soc_pct' ORDER BY r.t_ms"
    ).fetchall()
    switches = dict(db.execute("SELECT name, value FROM counters WHERE name LIKE 'relay.%'"))
    db.close()
    to_neighbour = next(r for r in rows if r[1] == "supply_neighbour" and r[2] == "on")
    back = next(r for r in rows if r[1] == "supply_own" and r[2] == "on" and r[0] > to_neighbour[0])
    assert json.loads(to_neighbour[3])["battery.soc_pct"] < 20
    assert json.loads(back[3])["battery.soc_pct"] > 30
    # Held: the battery was below 20 % for the whole 300 s before the switch.
    below = [t for t, v in soc_series if v < 20 and t <= to_neighbour[0]]
    assert below and to_neighbour[0] - below[0] >= 300_000
    # The battery only recovered because the house was on the neighbour's line.
    assert switches["relay.supply_neighbour.switches"] >= 2
    # And the node stopped with relays in their safe state.
    assert own[-1][1] is True and neighbour[-1][1] is False
