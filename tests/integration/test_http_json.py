"""The HTTP JSON source against a real HTTP server on loopback."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import os
import signal
import socketserver
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from daisee_node.clock import Clock
from daisee_node.config import config_from_dict
from daisee_node.daemon import Node
from daisee_node.readings import Quality, Reading
from daisee_node.sensors.base import SensorContext
from daisee_node.sensors.http_json import (
    MAX_REDIRECTS,
    HttpConfig,
    HttpError,
    HttpJsonSensor,
    PathError,
    pick,
)
from tests.conftest import ROOT, db_rows, free_port, wait_for, write_config

OpenSensor = Callable[..., Awaitable[HttpJsonSensor]]


class Site:
    """What the monitoring app serves; the test changes it as it goes."""

    body: bytes = b"{}"
    status: int = 200
    seen_headers: dict[str, str] | None = None


def _site_handler(state: Site) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.seen_headers = dict(self.headers)
            if self.path.startswith("/hop/"):  # /hop/N redirects N times before the document
                hops = int(self.path.removeprefix("/hop/"))
                if hops > 0:
                    self.send_response(302)
                    self.send_header("Location", f"/hop/{hops - 1}")
                    self.end_headers()
                    return
            self.send_response(state.status)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(state.body)

        def log_message(self, *args: Any) -> None:
            pass

    return Handler


@pytest.fixture
def site() -> Iterator[tuple[Site, str]]:
    state = Site()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _site_handler(state))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state, f"http://127.0.0.1:{server.server_address[1]}/api/now"
    server.shutdown()
    server.server_close()


def http_sensor(url: str, tmp_path: Path, **extra: Any) -> HttpJsonSensor:
    fields: dict[str, Any] = {
        "name": "citizenwatt",
        "kind": "http",
        "url": url,
        "timeout_s": 1.0,
        "values": [
            {"quantity": "power_w", "path": "data.power", "unit": "W"},
            {
                "quantity": "energy_wh",
                "path": "data.meters.1.kwh",
                "scale": 1000,
                "unit": "Wh",
                "state_class": "total_increasing",
            },
        ],
    }
    return HttpJsonSensor(HttpConfig(**(fields | extra)), SensorContext(Clock(), tmp_path))


@pytest.fixture
async def open_sensor(tmp_path: Path) -> AsyncIterator[OpenSensor]:
    """Makes sensors as the daemon does (`setup` before the first read) and closes them after."""
    opened: list[HttpJsonSensor] = []

    async def start(url: str, **extra: Any) -> HttpJsonSensor:
        sensor = http_sensor(url, tmp_path, **extra)
        await sensor.setup()
        opened.append(sensor)
        return sensor

    yield start
    for sensor in opened:
        await sensor.close()


async def test_values_are_picked_by_path(site, open_sensor: OpenSensor) -> None:
    state, url = site
    sensor = await open_sensor(url, headers={"Authorization": "Bearer abc", "accept": "text/json"})
    for power in (412.5, 413.0):  # one session, read after read
        state.body = json.dumps(
            {"data": {"power": power, "meters": [{"kwh": 1}, {"kwh": "12.25"}]}}
        ).encode()
        readings = {r.channel: r for r in await sensor.read()}
        assert readings["citizenwatt.power_w"].value == power
        assert readings["citizenwatt.energy_wh"].value == 12_250.0
        assert all(r.good for r in readings.values())
    seen = state.seen_headers or {}
    assert seen.get("Authorization") == "Bearer abc"
    assert [v for k, v in seen.items() if k.lower() == "accept"] == ["text/json"]
    assert seen.get("User-Agent") == "daisee-node"


async def test_a_missing_value_marks_only_its_channel(site, open_sensor: OpenSensor) -> None:
    state, url = site
    state.body = json.dumps({"data": {"power": 100, "meters": []}}).encode()
    readings = {r.channel: r for r in await (await open_sensor(url)).read()}
    assert readings["citizenwatt.power_w"].good
    bad = readings["citizenwatt.energy_wh"]
    assert bad.quality == Quality.SOURCE_ERROR and math.isnan(bad.value)


@pytest.mark.parametrize(("status", "body"), [(200, b"<html>maintenance</html>"), (503, b"{}")])
async def test_a_broken_answer_fails_the_read(
    site, open_sensor: OpenSensor, status: int, body: bytes
) -> None:
    state, url = site
    state.status, state.body = status, body
    with pytest.raises(HttpError, match="not JSON" if status == 200 else "HTTP 503"):
        await (await open_sensor(url)).read()


async def test_nobody_listening_fails_the_read(open_sensor: OpenSensor) -> None:
    with pytest.raises(OSError):
        await (await open_sensor(f"http://127.0.0.1:{free_port()}/")).read()


async def test_redirects_are_followed_up_to_a_limit(site, open_sensor: OpenSensor) -> None:
    state, url = site
    state.body = json.dumps({"data": {"power": 7, "meters": [{}, {"kwh": 1}]}}).encode()
    base = url.removesuffix("/api/now")
    sensor = await open_sensor(f"{base}/hop/{MAX_REDIRECTS}")
    assert [r.value for r in await sensor.read()] == [7.0, 1000.0]
    sensor = await open_sensor(f"{base}/hop/{MAX_REDIRECTS + 1}")
    with pytest.raises(HttpError, match="redirects"):
        await sensor.read()


async def test_proxy_settings_of_the_environment_are_not_used(
    site, open_sensor: OpenSensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The node reaches its sources directly: a proxy set for other programs is not taken."""
    state, url = site
    state.body = json.dumps({"data": {"power": 5, "meters": [{}, {"kwh": 1}]}}).encode()
    nowhere = f"http://127.0.0.1:{free_port()}"
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, nowhere)
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    assert [r.value for r in await (await open_sensor(url)).read()] == [5.0, 1000.0]


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


# -- hostile servers ---------------------------------------------------------------------------

HOSTILE = {
    # headers at once, then the promised body a byte at a time, each sooner than the timeout
    "slow_body": (b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n", b"1", 0.2),
    # the status line and headers a byte at a time, never finished
    "slow_headers": (b"", b"HTTP/1.1 200 OK\r\nX-Pad: " + b"a" * 1000, 0.2),
    # no length, and a body that never ends, as fast as it goes
    "endless_body": (b"HTTP/1.1 200 OK\r\n\r\n", b"[1," * 20_000, 0.0),
    # a body announced larger than any document the node reads
    "huge_body": (b"HTTP/1.1 200 OK\r\nContent-Length: 50000000\r\n\r\n", b"0" * 65536, 0.0),
    # the same in chunks
    "huge_chunked": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"10000\r\n" + b" " * 0x10000 + b"\r\n",
        0.0,
    ),
    "garbage_json": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 23\r\n\r\n" + b'{"data": {"power": 41}',
        b"",
        None,
    ),
    "deep_json": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 200000\r\n\r\n" + b"[" * 200_000,
        b"",
        None,
    ),
    # a header line longer than any a source needs, at once; the connection stays open
    "long_header": (b"HTTP/1.1 200 OK\r\nX-Pad: " + b"a" * 100_000 + b"\r\n\r\n", b" ", 1.0),
    "long_status_line": (b"HTTP/1.1 200 " + b"O" * 100_000 + b"\r\n\r\n", b" ", 1.0),
}


#: a hostile answer gives up after this long (so that a client that never does cannot hang a test)
HOSTILE_FOR_S = 10.0


class HostileServer(socketserver.ThreadingTCPServer):
    """Reads a request, sends `head`, then `piece` byte by byte every `every` seconds (0: the
    whole piece as fast as it goes; None: close)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, mode: str, every: float | None = None) -> None:
        self.head, self.piece, self.every = HOSTILE[mode]
        if every is not None:
            self.every = every
        self.closing = threading.Event()
        self.open_connections = 0
        self.connections = 0
        super().__init__(("127.0.0.1", 0), _Hostile)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/api/now"


class _Hostile(socketserver.BaseRequestHandler):
    server: HostileServer

    def handle(self) -> None:
        srv = self.server
        srv.connections += 1
        srv.open_connections += 1
        try:
            request = b""
            while b"\r\n\r\n" not in request:
                data = self.request.recv(4096)
                if not data:
                    return
                request += data
            self.request.sendall(srv.head)
            if srv.every is None:
                return
            pieces = [srv.piece[i : i + 1] for i in range(len(srv.piece))] if srv.every else []
            give_up = time.monotonic() + HOSTILE_FOR_S
            while not srv.closing.is_set() and time.monotonic() < give_up:
                if pieces:  # one byte at a time, then the next round
                    for byte in pieces:
                        self.request.sendall(byte)
                        if srv.closing.wait(srv.every):
                            return
                else:
                    self.request.sendall(srv.piece)
        except OSError:
            return  # the client gave up: what it should do
        finally:
            srv.open_connections -= 1


@pytest.fixture
def hostile() -> Iterator[Any]:
    servers: list[HostileServer] = []

    def start(mode: str, every: float | None = None) -> HostileServer:
        server = HostileServer(mode, every)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.closing.set()
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("mode", sorted(HOSTILE))
async def test_a_hostile_server_fails_the_read_within_the_timeout(
    hostile, open_sensor: OpenSensor, mode: str
) -> None:
    server = hostile(mode)
    sensor = await open_sensor(server.url, timeout_s=0.5)
    t0 = time.monotonic()
    with pytest.raises(OSError):
        await asyncio.wait_for(sensor.read(), 3 * HOSTILE_FOR_S)
    assert time.monotonic() - t0 < 1.5


@pytest.mark.parametrize(
    ("mode", "why"),
    [
        ("huge_body", "larger than"),  # refused on its Content-Length
        ("huge_chunked", "larger than"),  # refused by counting
        ("endless_body", "larger than"),
        ("long_header", None),
        ("long_status_line", None),
    ],
)
async def test_an_oversized_answer_is_refused_before_the_timeout(
    hostile, open_sensor: OpenSensor, mode: str, why: str | None
) -> None:
    sensor = await open_sensor(hostile(mode).url, timeout_s=10)
    t0 = time.monotonic()
    with pytest.raises(HttpError, match=why) as failed:
        await sensor.read()
    assert not isinstance(failed.value, TimeoutError)
    assert time.monotonic() - t0 < 3


async def test_the_document_size_limit_is_configurable(site, open_sensor: OpenSensor) -> None:
    state, url = site
    state.body = json.dumps({"data": {"power": 1, "meters": [{}, {"kwh": 2}]}, "pad": "x" * 400})
    state.body = state.body.encode()
    with pytest.raises(OSError, match="larger than 100 bytes"):
        await (await open_sensor(url, max_bytes=100)).read()
    readings = await (await open_sensor(url, max_bytes=1000)).read()
    assert [r.value for r in readings] == [1.0, 2000.0]


# -- https -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A certificate authority and a server certificate for 127.0.0.1 signed by it (openssl)."""
    d = tmp_path_factory.mktemp("tls")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=30)

    openssl("req", "-x509", *ec, "-subj", "/CN=test CA", "-keyout", "ca.key", "-out", "ca.pem")
    (d / "leaf.ext").write_text("subjectAltName = IP:127.0.0.1\n")
    openssl("req", *ec, "-subj", "/CN=127.0.0.1", "-keyout", "leaf.key", "-out", "leaf.csr")
    openssl(
        "x509", "-req", "-in", "leaf.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "2", "-extfile", "leaf.ext", "-out", "leaf.pem",
    )  # fmt: skip
    return {"ca": d / "ca.pem", "cert": d / "leaf.pem", "key": d / "leaf.key"}


@pytest.fixture
def tls_site(tls: dict[str, Path]) -> Iterator[tuple[Site, str]]:
    """The monitoring app again, over https."""
    state = Site()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls["cert"], tls["key"])
    handler = _site_handler(state)
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield state, f"https://127.0.0.1:{server.server_address[1]}/api/now"
    server.shutdown()
    server.server_close()


READ_ONCE = """
import asyncio, json, sys
from pathlib import Path
from daisee_node.clock import Clock
from daisee_node.sensors.base import SensorContext
from daisee_node.sensors.http_json import HttpConfig, HttpJsonSensor

async def main() -> None:
    config = HttpConfig(
        name="inverter", kind="http", url=sys.argv[1], timeout_s=10,
        values=[{"quantity": "power_w", "path": "data.power"}],
    )
    sensor = HttpJsonSensor(config, SensorContext(Clock(), Path(".")))
    await sensor.setup()
    try:
        print(json.dumps([r.value for r in await sensor.read()]))
    finally:
        await sensor.close()

asyncio.run(main())
"""


def test_https_with_a_trusted_certificate(tls_site, tls: dict[str, Path]) -> None:
    """A node whose system trust store holds the source's authority reads it over https."""
    state, url = tls_site
    state.body = json.dumps({"data": {"power": 99.5}}).encode()
    env = os.environ | {"SSL_CERT_FILE": str(tls["ca"])}
    done = subprocess.run(
        [sys.executable, "-c", READ_ONCE, url],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [99.5]


async def test_https_with_an_untrusted_certificate_fails_the_read(
    tls_site, open_sensor: OpenSensor
) -> None:
    state, url = tls_site
    state.body = json.dumps({"data": {"power": 1, "meters": [{}, {"kwh": 1}]}}).encode()
    with pytest.raises(HttpError, match="certificate"):
        await (await open_sensor(url)).read()
    assert state.seen_headers is None  # nothing was sent to a server that could not be verified


def test_the_http_library_is_imported_only_when_a_source_starts() -> None:
    """`daisee-node --version` and `check-config` stay fast: aiohttp is loaded by `setup`."""
    code = (
        "import sys, daisee_node.cli, daisee_node.daemon, daisee_node.sensors.http_json\n"
        "print('aiohttp' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


async def test_a_slow_source_gives_flagged_readings_at_the_interval_and_the_node_stops(
    hostile, tmp_path: Path
) -> None:
    server = hostile("slow_body")
    config = config_from_dict(
        {
            "node": {"id": "http-node", "data_dir": str(tmp_path / "data")},
            "sensors": [
                {
                    "name": "citizenwatt",
                    "kind": "http",
                    "url": server.url,
                    "interval_s": 0.5,
                    "timeout_s": 0.4,
                    "values": [{"quantity": "power_w", "path": "power", "unit": "W"}],
                }
            ],
        }
    )
    node = Node(config)
    flagged: list[tuple[float, Reading]] = []
    node.subscribe(lambda rs: flagged.extend((time.monotonic(), r) for r in rs if not r.good))
    task = asyncio.create_task(node.run())
    await asyncio.wait_for(node.started.wait(), 10)
    t0 = time.monotonic()
    while len(flagged) < 5:
        assert time.monotonic() - t0 < 5, f"only {len(flagged)} flagged readings in 5 s"
        await asyncio.sleep(0.05)
    assert {r.quality for _, r in flagged} <= {Quality.SOURCE_ERROR, Quality.UNAVAILABLE}
    gaps = [b - a for (a, _), (b, _) in itertools.pairwise(flagged)]
    assert max(gaps) < 1.0, gaps
    while server.open_connections == 0:  # stop in the middle of a slow read
        await asyncio.sleep(0.01)
    t_stop = time.monotonic()
    node.request_stop()
    assert await asyncio.wait_for(task, 5) == 0
    assert time.monotonic() - t_stop < 5


def test_a_node_process_stops_within_5_s_during_a_slow_read(
    daemon, hostile, tmp_path: Path
) -> None:
    """The field case: one byte a second, timeout_s = 2. Reads fail (flagged readings are
    stored), and SIGTERM during a read ends the process within 5 s."""
    server = hostile("slow_body", every=1.0)
    config = write_config(
        tmp_path / "node.toml",
        {
            "node": {"id": "http-node", "data_dir": str(tmp_path / "data")},
            "store": {"flush_interval_s": 0.1},
            "sensors": [
                {
                    "name": "citizenwatt",
                    "kind": "http",
                    "url": server.url,
                    "interval_s": 1.0,
                    "timeout_s": 2.0,
                    "values": [{"quantity": "power_w", "path": "power", "unit": "W"}],
                }
            ],
        },
    )
    d = daemon(config)
    db = tmp_path / "data" / "node.db"
    flagged = "SELECT t_ms FROM readings WHERE quality = ?"
    wait_for(lambda: len(db_rows(db, flagged, (int(Quality.SOURCE_ERROR),))) >= 2)
    wait_for(lambda: server.open_connections > 0)
    t0 = time.monotonic()
    d.signal(signal.SIGTERM)
    try:
        code, out = d.wait(timeout=5)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running 5 s after SIGTERM:\n{d.output()}") from None
    assert code == 0, out
    assert time.monotonic() - t0 < 5


def test_headers_cannot_smuggle_lines() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="line breaks"):
        HttpConfig(
            name="x",
            kind="http",
            url="http://127.0.0.1/",
            headers={"Authorization": "Bearer a\r\nHost: elsewhere"},
            values=[{"quantity": "a", "path": "a"}],
        )
