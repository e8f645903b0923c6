"""The HTTP JSON source against a real HTTP server on loopback."""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from daisee_node.clock import Clock
from daisee_node.readings import Quality
from daisee_node.sensors.base import SensorContext
from daisee_node.sensors.http_json import HttpConfig, HttpJsonSensor, PathError, pick


class Site:
    """What the monitoring app serves; the test changes it as it goes."""

    body: bytes = b"{}"
    status: int = 200
    seen_headers: dict[str, str] | None = None


@pytest.fixture
def site() -> Iterator[tuple[Site, str]]:
    state = Site()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.seen_headers = dict(self.headers)
            self.send_response(state.status)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(state.body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state, f"http://127.0.0.1:{server.server_address[1]}/api/now"
    server.shutdown()
    server.server_close()


def http_sensor(url: str, tmp_path: Path, **extra: Any) -> HttpJsonSensor:
    config = HttpConfig(
        name="citizenwatt",
        kind="http",
        url=url,
        timeout_s=1.0,
        values=[
            {"quantity": "power_w", "path": "data.power", "unit": "W"},
            {
                "quantity": "energy_wh",
                "path": "data.meters.1.kwh",
                "scale": 1000,
                "unit": "Wh",
                "state_class": "total_increasing",
            },
        ],
        **extra,
    )
    return HttpJsonSensor(config, SensorContext(Clock(), tmp_path))


async def test_values_are_picked_by_path(site, tmp_path: Path) -> None:
    state, url = site
    state.body = json.dumps(
        {"data": {"power": 412.5, "meters": [{"kwh": 1}, {"kwh": "12.25"}]}}
    ).encode()
    sensor = http_sensor(url, tmp_path, headers={"Authorization": "Bearer abc"})
    readings = {r.channel: r for r in await sensor.read()}
    assert readings["citizenwatt.power_w"].value == 412.5
    assert readings["citizenwatt.energy_wh"].value == 12_250.0
    assert all(r.good for r in readings.values())
    assert (state.seen_headers or {}).get("Authorization") == "Bearer abc"


async def test_a_missing_value_marks_only_its_channel(site, tmp_path: Path) -> None:
    state, url = site
    state.body = json.dumps({"data": {"power": 100, "meters": []}}).encode()
    readings = {r.channel: r for r in await http_sensor(url, tmp_path).read()}
    assert readings["citizenwatt.power_w"].good
    bad = readings["citizenwatt.energy_wh"]
    assert bad.quality == Quality.SOURCE_ERROR and math.isnan(bad.value)


@pytest.mark.parametrize(("status", "body"), [(200, b"<html>maintenance</html>"), (503, b"{}")])
async def test_a_broken_answer_fails_the_read(
    site, tmp_path: Path, status: int, body: bytes
) -> None:
    state, url = site
    state.status, state.body = status, body
    with pytest.raises(OSError):
        await http_sensor(url, tmp_path).read()


async def test_nobody_listening_fails_the_read(tmp_path: Path) -> None:
    from tests.conftest import free_port

    with pytest.raises(OSError):
        await http_sensor(f"http://127.0.0.1:{free_port()}/", tmp_path).read()


def test_pick_paths() -> None:
    doc = {"a": [{"b": 1.5}, {"b": "2"}], "t": True, "n": None, "s": "x"}
    assert pick(doc, "a.0.b") == 1.5
    assert pick(doc, "a.-1.b") == 2.0
    for path in ("a.2.b", "a.x", "t", "n", "s", "missing"):
        with pytest.raises(PathError):
            pick(doc, path)


def test_only_http_urls() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="http"):
        HttpConfig(
            name="x", kind="http", url="file:///etc/passwd", values=[{"quantity": "a", "path": "a"}]
        )
