"""Values polled from a JSON document over HTTP: monitoring apps (CitizenWatt-style), inverter APIs.

Each `[[sensors.values]]` entry picks one number by a dotted path (`data.meters.0.power`, list
items by index). A value that is missing or not a number becomes a SOURCE_ERROR reading for that
channel only; an unreachable URL or a document that is not JSON fails the whole read.

The request is made with aiohttp, one session per sensor, so the whole of it — name lookup,
connect, headers, body, redirects — is bounded by `timeout_s` and a read is cancelled at once when
the node stops, whatever the server is doing: a server that trickles one byte a second, never
finishes its headers, sends over-long header lines or an endless body fails the read, as does a
document larger than `max_bytes`. aiohttp is imported in `setup`, like the hardware libraries.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator

from daisee_node import safejson
from daisee_node.models import NAME_PATTERN, StrictModel
from daisee_node.readings import Channel, Quality, Reading
from daisee_node.sensors.base import Sensor, SensorConfig, SensorContext

if TYPE_CHECKING:
    import aiohttp

MAX_BYTES = 1_000_000
#: the longest status line, and the longest header, of an answer
MAX_LINE_BYTES = 8190
MAX_REDIRECTS = 3
CHUNK_BYTES = 64 * 1024


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


class HttpJsonSensor(Sensor):
    """Polls one URL and publishes the configured values."""

    kind = "http"
    config_model = HttpConfig

    def __init__(self, config: HttpConfig, ctx: SensorContext) -> None:
        super().__init__(config, ctx)
        self.cfg = config
        self._session: aiohttp.ClientSession | None = None
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

    async def setup(self) -> None:
        import aiohttp

        self._session = aiohttp.ClientSession(
            # A new connection each poll, as a small device's web server expects; no state (cookies,
            # proxies from the environment, compressed bodies) carried between polls.
            connector=aiohttp.TCPConnector(force_close=True),
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=self.cfg.timeout_s),
            headers={
                "User-Agent": "daisee-node",
                "Accept": "application/json",
                "Accept-Encoding": "identity",
            },
            max_line_size=MAX_LINE_BYTES,
            max_field_size=MAX_LINE_BYTES,
        )

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def fetch(self) -> Any:
        """The parsed document; OSError (TimeoutError included) when there is none."""
        body = await self._get()
        try:
            return safejson.loads(body)
        except (ValueError, RecursionError) as exc:
            raise HttpError(f"{self.cfg.url}: not JSON ({exc})") from None

    async def _get(self) -> bytes:
        """The body of a GET of the URL (after at most MAX_REDIRECTS redirects), within
        `timeout_s` seconds and at most `max_bytes` long."""
        import aiohttp

        if self._session is None:
            raise RuntimeError("read before setup")
        cfg = self.cfg
        url, limit = cfg.url, cfg.max_bytes
        too_big = HttpError(f"{url}: the document is larger than {limit} bytes")
        try:
            # The one bound on the whole request; aiohttp's total timeout is the same figure.
            # aiohttp counts the answer that would be followed last, hence the + 1.
            async with (
                asyncio.timeout(cfg.timeout_s),
                self._session.get(
                    url, headers=cfg.headers, max_redirects=MAX_REDIRECTS + 1
                ) as answer,
            ):
                if not 200 <= answer.status < 300:
                    raise HttpError(f"{url}: HTTP {answer.status}")
                if (answer.content_length or 0) > limit:
                    raise too_big
                body = bytearray()
                async for chunk in answer.content.iter_chunked(CHUNK_BYTES):
                    body += chunk
                    if len(body) > limit:
                        raise too_big
                return bytes(body)
        except TimeoutError:
            raise TimeoutError(f"{url}: no complete answer within {cfg.timeout_s:g} s") from None
        except aiohttp.TooManyRedirects:
            raise HttpError(f"{url}: more than {MAX_REDIRECTS} redirects") from None
        except (aiohttp.ClientError, ValueError, UnicodeError) as exc:
            raise HttpError(f"{url}: {exc or type(exc).__name__}") from None

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
