"""The sensor contract: a declared config schema and a fixed lifecycle (setup, read, close).

Hardware libraries are imported inside `setup`, never at module level, so the package imports on
any machine.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from daisee_node.clock import Clock
from daisee_node.errors import DaiseeError
from daisee_node.logs import get_logger
from daisee_node.readings import Channel, Reading

if TYPE_CHECKING:
    from daisee_node.sensors.simulated import SimulatedSite, SimulationConfig

NAME_PATTERN = r"^[a-z][a-z0-9_]*$"


class StrictModel(BaseModel):
    """A config section: unknown keys are errors, so a typo is never silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


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
    simulation: SimulationConfig | None = None
    latest: Mapping[str, Reading] = field(default_factory=dict)
    resources: dict[Hashable, Any] = field(default_factory=dict)
    #: whether a relay is closed (the simulation's view of the physical world)
    relay_on: Callable[[str], bool] | None = None
    _site: SimulatedSite | None = field(default=None, repr=False)

    def restore(self, channel: str) -> float | None:
        """The last good value of a channel, if the node has one."""
        r = self.latest.get(channel)
        return r.value if r is not None and r.good else None

    def site(self) -> SimulatedSite:
        """The one simulated site all simulated sensors of this node share."""
        if self._site is None:
            from daisee_node.sensors.simulated import SimulatedSite, SimulationConfig

            config = self.simulation or SimulationConfig()
            relay, relay_on = config.external_supply_relay, self.relay_on
            external = None
            if relay is not None and relay_on is not None:

                def external() -> bool:
                    return relay_on(relay)

            self._site = SimulatedSite(config, start=self.clock.now(), external_supply=external)
        return self._site


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
