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

from pydantic import BaseModel, Field, model_validator

from daisee_node.clock import Clock
from daisee_node.errors import DaiseeError
from daisee_node.logs import get_logger
from daisee_node.models import NAME_PATTERN, StrictModel
from daisee_node.readings import Channel, Reading


class SourceUnavailable(DaiseeError):
    """A source that has stopped answering and is now polled less often."""


class EnergySpec(StrictModel):
    """One power channel the node integrates into Wh counters (`energy` of a sensor).

    `positive` counts the energy while the power is above zero, `negative` while it is below
    (by the source's sign: import, charge or consumption is usually positive). A counter left
    out is not kept. Written as a plain string, `energy = ["power_w"]`, both are kept, named
    after the power channel: `power_w` → `energy_in_wh` and `energy_out_wh`, `l1_power_w` →
    `l1_energy_in_wh` and `l1_energy_out_wh`.
    """

    power: str = Field(pattern=NAME_PATTERN, description="the power quantity, in W: power_w")
    positive: str | None = Field(
        None, pattern=NAME_PATTERN, description="counter of energy while power > 0 (…_wh)"
    )
    negative: str | None = Field(
        None, pattern=NAME_PATTERN, description="counter of energy while power < 0 (…_wh)"
    )

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, data: Any) -> Any:
        if isinstance(data, str):
            stem = data.removesuffix("_w")
            stem = stem.removesuffix("power") + "energy" if stem.endswith("power") else stem
            stem = stem if stem.endswith("energy") else f"{stem}_energy"
            return {"power": data, "positive": f"{stem}_in_wh", "negative": f"{stem}_out_wh"}
        return data

    @model_validator(mode="after")
    def _names_a_counter(self) -> EnergySpec:
        if self.positive is None and self.negative is None:
            raise ValueError("name the counter(s) to keep: positive, negative or both")
        if self.positive is not None and self.positive == self.negative:
            raise ValueError("positive and negative need different names")
        return self

    def counters(self) -> list[tuple[str, int]]:
        """(quantity, sign) of each counter kept: +1 counts power > 0, -1 power < 0."""
        pairs = ((self.positive, 1), (self.negative, -1))
        return [(q, sign) for q, sign in pairs if q is not None]


class SensorConfig(StrictModel):
    """Keys every sensor has. Each kind adds its own."""

    name: str = Field(pattern=NAME_PATTERN, description="source name; channels are <name>.*")
    kind: str
    interval_s: float = Field(1.0, gt=0, le=86_400, description="seconds between reads")
    enabled: bool = True
    energy: list[EnergySpec] = Field(
        default_factory=list,
        description="power channels of this sensor to integrate into Wh counters, e.g. "
        '["power_w"], or [{ power = "power_w", positive = "charge_wh", negative = '
        '"discharge_wh" }]',
    )


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
