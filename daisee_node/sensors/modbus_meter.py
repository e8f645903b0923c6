"""Energy meters over Modbus (pymodbus): RTU on RS485, or TCP.

Built-in register maps for the Eastron SDM120 and SDM630; any other meter through a custom map in
the config. Contiguous registers are read in one request. Several meters on one RS485 line (or
behind one TCP gateway) share one client and are polled one at a time. A meter that fails
`unavailable_after` polls in a row is marked unavailable and then polled less and less often
(doubling up to `max_backoff_s`) until it answers again.

A poll is bounded as a whole and cancellable at any point, so a meter that hangs never holds up a
stop. Energy counters are bounded by the most power the meter measures (`max_power_w`, with a
default per built-in model): a step beyond it is flagged by the node's checks, never trusted.
"""

from __future__ import annotations

import asyncio
import math
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, model_validator

from daisee_node.readings import Channel, Reading
from daisee_node.sensors.base import (
    NAME_PATTERN,
    Sensor,
    SensorConfig,
    SensorContext,
    SourceUnavailable,
    StrictModel,
)
from daisee_node.sensors.register_maps import MAPS, MAX_POWER_W

MAX_REGISTERS_PER_REQUEST = 125
_STRUCT = {"int16": ">h", "uint16": ">H", "int32": ">i", "uint32": ">I", "float32": ">f"}
_WIDTH = {"int16": 1, "uint16": 1, "int32": 2, "uint32": 2, "float32": 2}
#: energy units a counter may be in, in Wh
_WH = {"Wh": 1.0, "kWh": 1e3, "MWh": 1e6}


class RegisterSpec(StrictModel):
    """One value in a meter's register map."""

    quantity: str = Field(pattern=NAME_PATTERN, description="channel is <sensor>.<quantity>")
    address: int = Field(ge=0, le=65535, description="0-based register address")
    function: Literal[3, 4] = Field(4, description="3 holding registers, 4 input registers")
    type: Literal["int16", "uint16", "int32", "uint32", "float32"] = "float32"
    word_order: Literal["big", "little"] = "big"
    scale: float = 1.0
    offset: float = 0.0
    unit: str = ""
    state_class: Literal["measurement", "total_increasing"] = "measurement"
    min: float | None = None
    max: float | None = None
    max_rate_per_s: float | None = Field(
        None,
        gt=0,
        description="a counter: the most it advances per second, in its unit "
        "(default: the meter's max_power_w, for Wh and kWh counters)",
    )
    resolution: float | None = Field(
        None,
        ge=0,
        description="a counter: the largest jump it shows at once (default: one raw unit "
        "of an integer register)",
    )

    @property
    def width(self) -> int:
        return _WIDTH[self.type]

    def decode(self, registers: Sequence[int]) -> float:
        words = list(registers)
        if self.word_order == "little":
            words.reverse()
        raw = struct.unpack(_STRUCT[self.type], b"".join(w.to_bytes(2, "big") for w in words))[0]
        # A counter in tenths times 0.1 carries binary noise (12345679 * 0.1 = 1234567.9000000001);
        # dividing by the whole reciprocal is correctly rounded and gives the meter's own value.
        inverse = 1 / self.scale if self.scale else 0.0
        if self.type != "float32" and inverse and abs(inverse - round(inverse)) < 1e-9 * inverse:
            return raw / round(inverse) + self.offset
        return float(raw) * self.scale + self.offset


class ModbusConfig(SensorConfig):
    """A Modbus energy meter."""

    kind: Literal["modbus"]
    model: Literal["sdm120", "sdm630", "custom"]
    transport: Literal["tcp", "rtu"] = "tcp"
    host: str = "127.0.0.1"
    port: int = Field(502, ge=1, le=65535)
    device: str = Field("/dev/ttyUSB0", description="RS485 adapter, for transport = 'rtu'")
    baudrate: int = Field(9600, gt=0)
    parity: Literal["N", "E", "O"] = "N"
    stopbits: Literal[1, 2] = 1
    bytesize: Literal[7, 8] = 8
    unit: int = Field(1, ge=0, le=247, description="the meter's Modbus address")
    timeout_s: float = Field(1.0, gt=0, le=30)
    retries: int = Field(1, ge=0, le=10, description="retries of one request before a poll fails")
    unavailable_after: int = Field(3, ge=1, description="failed polls before 'unavailable'")
    max_power_w: float | None = Field(
        None,
        gt=0,
        description="the most power the meter measures; its energy counters cannot advance "
        "faster (default per model: sdm120 ~11.4 kW, sdm630 ~75.9 kW; none for 'custom')",
    )
    max_backoff_s: float = Field(60.0, gt=0)
    registers: list[RegisterSpec] = Field(
        default_factory=list, description="the map of a 'custom' meter, or extra registers"
    )

    @model_validator(mode="after")
    def _needs_a_map(self) -> ModbusConfig:
        if self.model == "custom" and not self.registers:
            raise ValueError("a 'custom' meter needs at least one [[sensors.registers]] entry")
        names = [r.quantity for r in self.register_map()]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"quantities defined twice: {', '.join(duplicates)}")
        return self

    def register_map(self) -> list[RegisterSpec]:
        builtin = [RegisterSpec(**spec) for spec in MAPS.get(self.model, ())]
        return builtin + list(self.registers)

    def channel(self, spec: RegisterSpec) -> Channel:
        """The channel of one register, with the bounds its checks need."""
        rate, resolution = None, 0.0
        if spec.state_class == "total_increasing":
            rate = spec.max_rate_per_s
            max_power = self.max_power_w or MAX_POWER_W.get(self.model)
            if rate is None and max_power is not None and spec.unit in _WH:
                rate = max_power / 3600.0 / _WH[spec.unit]
            if spec.resolution is not None:
                resolution = spec.resolution
            else:
                resolution = abs(spec.scale) if spec.type != "float32" else 0.0
        return Channel(
            f"{self.name}.{spec.quantity}",
            spec.unit,
            spec.state_class,
            spec.min,
            spec.max,
            max_rate_per_s=rate,
            resolution=resolution,
        )

    def line_key(self) -> tuple[Any, ...]:
        """Meters with the same key share one client (one RS485 line, one TCP endpoint)."""
        if self.transport == "rtu":
            return ("modbus-rtu", self.device)
        return ("modbus-tcp", self.host, self.port)


@dataclass(frozen=True, slots=True)
class Block:
    """One read request: a run of registers of one function code."""

    function: int
    address: int
    count: int
    specs: tuple[RegisterSpec, ...]


def plan_blocks(specs: Sequence[RegisterSpec]) -> list[Block]:
    """Group registers into as few requests as possible, without reading undefined addresses."""
    blocks: list[Block] = []
    for function in (3, 4):
        mine = sorted((s for s in specs if s.function == function), key=lambda s: s.address)
        run: list[RegisterSpec] = []
        for spec in mine:
            if run:
                start = run[0].address
                end = max(s.address + s.width for s in run)
                contiguous = spec.address <= end
                fits = spec.address + spec.width - start <= MAX_REGISTERS_PER_REQUEST
                if not (contiguous and fits):
                    blocks.append(Block(function, start, end - start, tuple(run)))
                    run = []
            run.append(spec)
        if run:
            start = run[0].address
            end = max(s.address + s.width for s in run)
            blocks.append(Block(function, start, end - start, tuple(run)))
    return blocks


class ModbusLine:
    """A client shared by the meters of one bus; the lock polls them one at a time."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.lock = asyncio.Lock()
        self.users = 0


class ModbusError(OSError):
    """A request the meter refused or did not answer."""


class ModbusMeter(Sensor):
    """One meter on a Modbus line."""

    kind = "modbus"
    config_model = ModbusConfig

    def __init__(self, config: ModbusConfig, ctx: SensorContext) -> None:
        super().__init__(config, ctx)
        self.cfg = config
        specs = config.register_map()
        self.blocks = plan_blocks(specs)
        self._channels = [config.channel(s) for s in specs]
        self._line: ModbusLine | None = None
        self.failures_in_row = 0
        self.unavailable = False
        self._backoff_s = 0.0
        self._next_try = 0.0
        self.polls = 0
        self.requests = 0

    @property
    def channels(self) -> Sequence[Channel]:
        return self._channels

    async def setup(self) -> None:
        key = self.cfg.line_key()
        line = self.ctx.resources.get(key)
        if line is None:
            line = ModbusLine(self._make_client())
            self.ctx.resources[key] = line
        line.users += 1
        self._line = line

    def _make_client(self) -> Any:
        c = self.cfg
        if c.transport == "rtu":
            from pymodbus.client import AsyncModbusSerialClient

            return AsyncModbusSerialClient(
                port=c.device,
                baudrate=c.baudrate,
                parity=c.parity,
                stopbits=c.stopbits,
                bytesize=c.bytesize,
                timeout=c.timeout_s,
                retries=c.retries,
            )
        from pymodbus.client import AsyncModbusTcpClient

        return AsyncModbusTcpClient(c.host, port=c.port, timeout=c.timeout_s, retries=c.retries)

    async def close(self) -> None:
        line = self._line
        self._line = None
        if line is None:
            return
        line.users -= 1
        if line.users <= 0:
            self.ctx.resources.pop(self.cfg.line_key(), None)
            # Synchronous in pymodbus: it drops the transport and its reconnect task at once,
            # whatever the meter is doing, so a stop never waits on it.
            line.client.close()

    async def read(self) -> Sequence[Reading]:
        now = time.monotonic()
        if self.unavailable and now < self._next_try:
            return []  # polled less often while it does not answer
        try:
            values = await self.poll()
        except (OSError, TimeoutError) as exc:
            self._failed(now)
            if self.unavailable:
                raise SourceUnavailable(f"meter {self.name} does not answer: {exc}") from exc
            raise
        except Exception as exc:  # pymodbus raises its own ModbusException family
            from pymodbus.exceptions import ModbusException

            if not isinstance(exc, ModbusException):
                raise
            self._failed(now)
            if self.unavailable:
                raise SourceUnavailable(f"meter {self.name} does not answer: {exc}") from exc
            raise ModbusError(str(exc)) from exc
        if self.unavailable:
            self.log.info("meter answers again", meter=self.name)
        self.unavailable = False
        self.failures_in_row = 0
        self._backoff_s = 0.0
        t_ms = self.ctx.clock.now_ms()
        return [Reading(f"{self.name}.{q}", t_ms, v) for q, v in values]

    def _failed(self, now: float) -> None:
        self.failures_in_row += 1
        if self.failures_in_row < self.cfg.unavailable_after:
            return
        if not self.unavailable:
            self.log.warning(
                "meter unavailable; polling less often",
                meter=self.name,
                failed_polls=self.failures_in_row,
            )
        self.unavailable = True
        interval = float(self.cfg.interval_s)
        self._backoff_s = min(self.cfg.max_backoff_s, max(2 * interval, 2 * self._backoff_s))
        self._next_try = now + self._backoff_s

    async def poll(self) -> list[tuple[str, float]]:
        """Read every block of the map once; (quantity, value) pairs.

        Bounded as a whole, whatever the line does (a gateway that accepts and never answers,
        a connection that stalls): the connect and each request with its retries get
        `timeout_s` each. A poll that overruns or is cancelled closes the client, so that no
        answer to an abandoned request is taken for the next one; the next poll reconnects.
        """
        line = self._line
        assert line is not None
        c = self.cfg
        budget = c.timeout_s * (1 + (c.retries + 1) * len(self.blocks)) + 0.5
        async with line.lock:
            try:
                async with asyncio.timeout(budget):
                    return await self._poll_blocks(line.client)
            except TimeoutError:
                line.client.close()
                raise ModbusError(f"{self._where()} did not answer within {budget:g} s") from None
            except asyncio.CancelledError:
                line.client.close()
                raise

    async def _poll_blocks(self, client: Any) -> list[tuple[str, float]]:
        unit = self.cfg.unit
        out: list[tuple[str, float]] = []
        if not client.connected and not await client.connect():
            raise ModbusError(f"cannot connect to {self._where()}")
        self.polls += 1
        for block in self.blocks:
            reader = (
                client.read_input_registers
                if block.function == 4
                else client.read_holding_registers
            )
            self.requests += 1
            response = await reader(block.address, count=block.count, device_id=unit)
            if response.isError():
                raise ModbusError(
                    f"{self._where()} unit {unit} refused a read of "
                    f"{block.count} registers at {block.address}: {response}"
                )
            registers = response.registers
            for spec in block.specs:
                i = spec.address - block.address
                value = spec.decode(registers[i : i + spec.width])
                out.append((spec.quantity, value if math.isfinite(value) else math.nan))
        return out

    def _where(self) -> str:
        c = self.cfg
        return c.device if c.transport == "rtu" else f"{c.host}:{c.port}"
