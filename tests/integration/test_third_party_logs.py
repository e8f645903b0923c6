"""The log of a node whose meter goes away and comes back, as `daisee-node run` writes it: JSON
lines only (pymodbus's own lines and tracebacks included), "sensor recovered" once the meter
really answers again, never while it is away."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

from tests.conftest import Daemon, db_rows, free_port, wait_for, write_config
from tests.support.meters import SDM630_INPUT, EmulatedMeter, ThreadedMeterServer, sdm630_values


def meter_node(tmp_path: Path, port: int, level: str) -> Path:
    return write_config(
        tmp_path / f"node-{level}.toml",
        {
            "node": {"id": "logs1", "data_dir": str(tmp_path / f"data-{level}")},
            "log": {"level": level, "format": "json"},
            "sensors": [
                {
                    "name": "grid",
                    "kind": "modbus",
                    "model": "sdm630",
                    "host": "127.0.0.1",
                    "port": port,
                    "interval_s": 0.2,
                    "timeout_s": 0.3,
                    "retries": 0,
                    "unavailable_after": 2,
                    "max_backoff_s": 0.8,  # several polls and skipped turns while it is away
                }
            ],
        },
    )


def events(d: Daemon) -> list[dict[str, Any]]:
    """Every line the node printed, parsed: a line that is not JSON fails the test here."""
    out = []
    for line in d.output().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"not a JSON line: {line!r}") from None
    return out


def named(d: Daemon, event: str) -> list[dict[str, Any]]:
    return [e for e in events(d) if e.get("event") == event]


def test_a_meter_away_and_back_logs_json_only_and_recovers_once(tmp_path: Path, daemon) -> None:
    meter = EmulatedMeter(1, SDM630_INPUT, sdm630_values())
    server = ThreadedMeterServer([meter], port=free_port())
    server.start()
    try:
        d = daemon(meter_node(tmp_path, server.port, "info"))
        wait_for(lambda: named(d, "node started"), 20)
        server.stop()
        wait_for(lambda: named(d, "meter unavailable; polling less often"), 15)
        # Away for a while: polled again and again (each a failed connect in pymodbus), turns
        # skipped in between, and not once taken for a recovery.
        wait_for(lambda: read_errors(tmp_path) >= 5, 15)
        assert named(d, "sensor recovered") == []
        assert len(named(d, "sensor read failed")) == 1
        server.start()
        recovered = wait_for(lambda: named(d, "sensor recovered"), 15)
        assert len(recovered) == 1 and recovered[0]["failed_reads"] >= 4
        d.signal(signal.SIGTERM)
        code, output = d.wait(10)
        assert code == 0
        lines = events(d)  # all of them JSON
        assert "Failed to connect" not in output and "Repeating" not in output
        assert not [e for e in lines if e.get("logger", "").startswith("pymodbus")]
        assert len(named(d, "sensor recovered")) == 1
    finally:
        server.close()


def read_errors(tmp_path: Path) -> int:
    """Failed reads of the meter so far, as the node counts them."""
    rows = db_rows(
        tmp_path / "data-info" / "node.db",
        "SELECT value FROM counters WHERE name = 'sensor.grid.errors'",
    )
    return int(rows[0][0]) if rows else 0


def test_at_debug_level_pymodbus_lines_are_json_debug_lines(tmp_path: Path, daemon) -> None:
    port = free_port()  # nothing listens: every poll is a failed connect
    d = daemon(meter_node(tmp_path, port, "debug"))
    wait_for(lambda: named(d, "meter unavailable; polling less often"), 20)
    wait_for(lambda: [e for e in events(d) if e.get("logger", "").startswith("pymodbus")], 10)
    d.signal(signal.SIGTERM)
    code, _ = d.wait(10)
    assert code == 0
    pymodbus = [e for e in events(d) if e.get("logger", "").startswith("pymodbus")]
    assert pymodbus and {e["level"] for e in pymodbus} == {"debug"}
    assert any("Failed to connect" in e["event"] for e in pymodbus)
    assert all(e["node_id"] == "logs1" for e in pymodbus)
