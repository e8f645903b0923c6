"""The sensor contract: a declared config schema and a fixed lifecycle (setup, read, close).

Hardware libraries are imported inside `setup`, never at module level, so the package imports on
any machine.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, Field

from daisee_node.clock import Clock
from daisee_node.errors import DaiseeError
from daisee_node.logs import get_logger
from daisee_node.models import NAME_PATTERN, StrictModel
from daisee_node.readings import Channel, Reading


class SourceUnavailable(DaiseeError):
    """A source that has stopped answering and is now polled less often."""


class SensorConfig(StrictModel):
    """Keys every sensor has. Each kind adds its own."""

    name: str = Field(pattern=NAME_PATTERN, description="source name; channels are <name>.*")
    kind: str
    interval_s: float = Field(1.0, gt=0, le=86_400, description="seconds between reads")
    enabled: bool = True


@dataclass
class SensorContext:
    """What a sensor may use from the node.

    `latest` is the newest reading of every channel (loaded from the database at start, so
    cumulative counters continue across restarts); `resources` holds hardware shared by several
    sensors (an I2C bus, an ADC chip, a serial line), keyed by what they are.
    """

    clock: Clock
    data_dir: Path
    #: the node's [simulation] section, read by simulated sensors only
    simulation: BaseModel | None = None
    latest: Mapping[str, Reading] = field(default_factory=dict)
    resources: dict[Hashable, Any] = field(default_factory=dict)
    #: whether a relay is closed (the simulation's view of the physical world)
    relay_on: Callable[[str], bool] | None = None

    def restore(self, channel: str) -> float | None:
        """The last good value of a channel, if the node has one."""
        r = self.latest.get(channel)
        return r.value if r is not None and r.good else None


class Sensor(ABC):
    """One source of readings. The daemon calls setup once, read every interval, close at the end.

    `read` may raise: the sampler marks the sensor's channels with a SOURCE_ERROR reading, counts
    the failure and keeps going.
    """

    kind: ClassVar[str]
    config_model: ClassVar[type[SensorConfig]]

    def __init__(self, config: Any, ctx: SensorContext) -> None:
        self.config = config
        self.ctx = ctx
        self.log = get_logger(f"sensor.{config.name}")

    @property
    def name(self) -> str:
        return str(self.config.name)

    @property
    @abstractmethod
    def channels(self) -> Sequence[Channel]:
        """Every channel this sensor can publish."""

    async def setup(self) -> None:  # noqa: B027 - optional hook
        """Open the hardware; import its library here."""

    @abstractmethod
    async def read(self) -> Sequence[Reading]:
        """Take one reading of every channel, stamped with the node's clock."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release the hardware."""
