"""Values polled from a JSON document over HTTP: monitoring apps (CitizenWatt-style), inverter APIs.

Each `[[sensors.values]]` entry picks one number by a dotted path (`data.meters.0.power`, list
items by index). A value that is missing or not a number becomes a SOURCE_ERROR reading for that
channel only; an unreachable URL or a document that is not JSON fails the whole read.
"""

from __future__ import annotations

import asyncio
import json
import math
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import Field, field_validator

from daisee_node.readings import Channel, Quality, Reading
from daisee_node.sensors.base import NAME_PATTERN, Sensor, SensorConfig, SensorContext, StrictModel

MAX_BYTES = 1_000_000


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


class HttpConfig(SensorConfig):
    """A JSON document polled over HTTP."""

    kind: Literal["http"]
    url: str
    timeout_s: float = Field(3.0, gt=0, le=60)
    headers: dict[str, str] = Field(default_factory=dict)
    values: list[JsonValue] = Field(min_length=1)

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


class HttpJsonSensor(Sensor):
    """Polls one URL and publishes the configured values."""

    kind = "http"
    config_model = HttpConfig

    def __init__(self, config: HttpConfig, ctx: SensorContext) -> None:
        super().__init__(config, ctx)
        self.cfg = config
        self._channels = [
            Channel(f"{config.name}.{v.quantity}", v.unit, v.state_class, v.min, v.max)
            for v in config.values
        ]

    @property
    def channels(self) -> Sequence[Channel]:
        return self._channels

    def _fetch(self) -> Any:
        request = urllib.request.Request(
            self.cfg.url, headers={"Accept": "application/json", **self.cfg.headers}
        )
        with urllib.request.urlopen(request, timeout=self.cfg.timeout_s) as response:
            body = response.read(MAX_BYTES + 1)
        if len(body) > MAX_BYTES:
            raise OSError(f"{self.cfg.url}: the document is larger than {MAX_BYTES} bytes")
        try:
            return json.loads(body)
        except ValueError as exc:
            raise OSError(f"{self.cfg.url}: not JSON ({exc})") from None

    async def read(self) -> Sequence[Reading]:
        try:
            document = await asyncio.to_thread(self._fetch)
        except urllib.error.URLError as exc:
            raise OSError(f"{self.cfg.url}: {exc.reason}") from None
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
