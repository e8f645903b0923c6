"""Values polled from a JSON document over HTTP: monitoring apps (CitizenWatt-style), inverter APIs.

Each `[[sensors.values]]` entry picks one number by a dotted path (`data.meters.0.power`, list
items by index). A value that is missing or not a number becomes a SOURCE_ERROR reading for that
channel only; an unreachable URL or a document that is not JSON fails the whole read.

The request is made on the event loop (a small HTTP/1.1 client on asyncio streams), so the whole
of it — name lookup, connect, headers, body, redirects — is bounded by `timeout_s` and a read is
cancelled at once when the node stops, whatever the server is doing: a server that trickles one
byte a second, never finishes its headers or sends an endless body fails the read, as does a
document larger than `max_bytes`.
"""

from __future__ import annotations

import asyncio
import json
import math
import ssl
from collections.abc import Mapping, Sequence
from typing import Any, Literal
from urllib.parse import urljoin, urlsplit

from pydantic import Field, field_validator

from daisee_node.readings import Channel, Quality, Reading
from daisee_node.sensors.base import NAME_PATTERN, Sensor, SensorConfig, SensorContext, StrictModel

MAX_BYTES = 1_000_000
#: the status line and headers of an answer, together
MAX_HEADER_BYTES = 64 * 1024
MAX_REDIRECTS = 3
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


class JsonValue(StrictModel):
    """One number in the document."""

    quantity: str = Field(pattern=NAME_PATTERN)
    path: str = Field(min_length=1, description="dotted path; list items by index")
    unit: str = ""
    scale: float = 1.0
    offset: float = 0.0
    state_class: Literal["measurement", "total_increasing"] = "measurement"
    min: float | None = None
    max: float | None = None
    max_rate_per_s: float | None = Field(
        None, gt=0, description="a counter: the most it advances per second, in its unit"
    )
    resolution: float = Field(0.0, ge=0, description="a counter: the largest jump it shows at once")


class HttpConfig(SensorConfig):
    """A JSON document polled over HTTP."""

    kind: Literal["http"]
    url: str
    timeout_s: float = Field(3.0, gt=0, le=60, description="bounds the whole request")
    max_bytes: int = Field(MAX_BYTES, ge=1, le=100_000_000, description="largest document read")
    headers: dict[str, str] = Field(default_factory=dict)
    values: list[JsonValue] = Field(min_length=1)

    @field_validator("headers")
    @classmethod
    def _one_line_each(cls, value: dict[str, str]) -> dict[str, str]:
        for name, text in value.items():
            if not name or any(ch in name + text for ch in "\r\n") or ":" in name:
                raise ValueError(f"header {name!r}: no line breaks, and no ':' in the name")
        return value

    @field_validator("url")
    @classmethod
    def _http_only(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value


class PathError(LookupError):
    """The path does not lead to a number in this document."""


def pick(document: Any, path: str) -> float:
    """The number at `path` in a parsed JSON document."""
    node = document
    for part in path.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif (
            isinstance(node, list)
            and part.lstrip("-").isdigit()
            and -len(node) <= int(part) < len(node)
        ):
            node = node[int(part)]
        else:
            raise PathError(f"{path!r}: no {part!r} here")
    if isinstance(node, bool) or not isinstance(node, int | float | str):
        raise PathError(f"{path!r} is not a number")
    try:
        return float(node)
    except ValueError:
        raise PathError(f"{path!r} is not a number: {node!r}") from None


class HttpError(OSError):
    """The server did not give a usable answer."""


async def http_get(
    url: str, headers: Mapping[str, str], *, timeout_s: float, max_bytes: int
) -> bytes:
    """The body of a GET of `url` (following a few redirects), all within `timeout_s` seconds."""
    try:
        async with asyncio.timeout(timeout_s):
            for _ in range(MAX_REDIRECTS + 1):
                status, answer_headers, body = await _get_once(url, headers, max_bytes)
                location = answer_headers.get("location")
                if status in _REDIRECTS and location:
                    url = urljoin(url, location)
                    if not url.startswith(("http://", "https://")):
                        raise HttpError(f"redirected to {url!r}, which is not HTTP")
                    continue
                if not 200 <= status < 300:
                    raise HttpError(f"{url}: HTTP {status}")
                return body
            raise HttpError(f"{url}: more than {MAX_REDIRECTS} redirects")
    except TimeoutError:
        raise TimeoutError(f"{url}: no complete answer within {timeout_s:g} s") from None
    except asyncio.IncompleteReadError:
        raise HttpError(f"{url}: the connection closed in the middle of the answer") from None
    except asyncio.LimitOverrunError:
        raise HttpError(f"{url}: a line of the answer is over {MAX_HEADER_BYTES} bytes") from None
    except (ValueError, UnicodeError) as exc:  # a malformed answer, or a line over the limit
        raise HttpError(f"{url}: malformed answer ({exc})") from None


async def _get_once(
    url: str, headers: Mapping[str, str], max_bytes: int
) -> tuple[int, dict[str, str], bytes]:
    parts = urlsplit(url)
    https = parts.scheme == "https"
    host = parts.hostname
    if not host:
        raise HttpError(f"{url}: no host")
    port = parts.port or (443 if https else 80)
    context = ssl.create_default_context() if https else None
    reader, writer = await asyncio.open_connection(host, port, ssl=context, limit=MAX_HEADER_BYTES)
    try:
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        host_header = host if parts.port is None else f"{host}:{parts.port}"
        if ":" in host and not host.startswith("["):
            host_header = f"[{host}]" + ("" if parts.port is None else f":{parts.port}")
        fields = {
            "Host": host_header,
            "User-Agent": "daisee-node",
            "Accept": "application/json",
            "Accept-Encoding": "identity",
            **headers,
            "Connection": "close",
        }
        request = f"GET {target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items())
        writer.write(request.encode("latin-1") + b"\r\n")
        await writer.drain()
        status, answer = await _read_head(reader)
        while 100 <= status < 200:  # interim answers come before the real one
            status, answer = await _read_head(reader)
        return status, answer, await _read_body(reader, answer, max_bytes, url)
    finally:
        writer.close()


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    """The status and the headers (names in lower case) of an answer."""
    size = 0
    line = await reader.readuntil(b"\n")
    version, _, rest = line.decode("latin-1").partition(" ")
    code = rest[:3]
    if not version.startswith("HTTP/1.") or not code.isdigit():
        raise ValueError(f"not an HTTP status line: {line[:80]!r}")
    answer: dict[str, str] = {}
    while True:
        line = await reader.readuntil(b"\n")
        size += len(line)
        if size > MAX_HEADER_BYTES:
            raise ValueError(f"headers longer than {MAX_HEADER_BYTES} bytes")
        if line in (b"\r\n", b"\n"):
            return int(code), answer
        name, colon, value = line.decode("latin-1").partition(":")
        if not colon:
            raise ValueError(f"not a header: {line[:80]!r}")
        answer[name.strip().lower()] = value.strip()


async def _read_body(
    reader: asyncio.StreamReader, answer: Mapping[str, str], max_bytes: int, url: str
) -> bytes:
    too_big = HttpError(f"{url}: the document is larger than {max_bytes} bytes")
    if "chunked" in answer.get("transfer-encoding", "").lower():
        chunks: list[bytes] = []
        total = 0
        while True:
            size_line = await reader.readuntil(b"\n")
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                while (await reader.readuntil(b"\n")).strip():  # trailers
                    pass
                return b"".join(chunks)
            total += size
            if total > max_bytes:
                raise too_big
            chunks.append(await reader.readexactly(size))
            await reader.readuntil(b"\n")
    length = answer.get("content-length")
    if length is not None:
        n = int(length)
        if n < 0:
            raise ValueError(f"Content-Length {n}")
        if n > max_bytes:
            raise too_big
        return await reader.readexactly(n)
    body = await reader.read(max_bytes + 1)
    while len(body) <= max_bytes:
        more = await reader.read(max_bytes + 1 - len(body))
        if not more:
            return body
        body += more
    raise too_big


class HttpJsonSensor(Sensor):
    """Polls one URL and publishes the configured values."""

    kind = "http"
    config_model = HttpConfig

    def __init__(self, config: HttpConfig, ctx: SensorContext) -> None:
        super().__init__(config, ctx)
        self.cfg = config
        self._channels = [
            Channel(
                f"{config.name}.{v.quantity}",
                v.unit,
                v.state_class,
                v.min,
                v.max,
                max_rate_per_s=v.max_rate_per_s,
                resolution=v.resolution,
            )
            for v in config.values
        ]

    @property
    def channels(self) -> Sequence[Channel]:
        return self._channels

    async def fetch(self) -> Any:
        """The parsed document; OSError (TimeoutError included) when there is none."""
        cfg = self.cfg
        body = await http_get(
            cfg.url, cfg.headers, timeout_s=cfg.timeout_s, max_bytes=cfg.max_bytes
        )
        try:
            return json.loads(body)
        except (ValueError, RecursionError) as exc:
            raise HttpError(f"{cfg.url}: not JSON ({exc})") from None

    async def read(self) -> Sequence[Reading]:
        document = await self.fetch()
        t_ms = self.ctx.clock.now_ms()
        out = []
        for spec, channel in zip(self.cfg.values, self._channels, strict=True):
            try:
                value = pick(document, spec.path) * spec.scale + spec.offset
                quality = Quality.GOOD if math.isfinite(value) else Quality.OUT_OF_RANGE
            except PathError as exc:
                self.log.debug("value missing", path=spec.path, error=str(exc))
                value, quality = math.nan, Quality.SOURCE_ERROR
            out.append(Reading(channel.name, t_ms, value, quality))
        return out
