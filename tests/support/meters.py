"""Eastron SDM120/SDM630 meters emulated on a real pymodbus server (TCP or serial).

The register table here is written from Eastron's datasheet, separately from the node's own
register maps, so that a wrong address or scale in the node shows up as a failing test.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from typing import Any

from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

# Input registers (function 4), float32, high word first. Energies in kWh.
SDM630_INPUT = {
    "l1_voltage_v": 0,
    "l2_voltage_v": 2,
    "l3_voltage_v": 4,
    "l1_current_a": 6,
    "l2_current_a": 8,
    "l3_current_a": 10,
    "l1_power_w": 12,
    "l2_power_w": 14,
    "l3_power_w": 16,
    "power_w": 52,
    "power_factor": 62,
    "frequency_hz": 70,
    "import_kwh": 72,
    "export_kwh": 74,
}
SDM120_INPUT = {
    "voltage_v": 0,
    "current_a": 6,
    "power_w": 12,
    "apparent_power_va": 18,
    "reactive_power_var": 24,
    "power_factor": 30,
    "frequency_hz": 70,
    "import_kwh": 72,
    "export_kwh": 74,
}


def sdm630_values() -> dict[str, float]:
    return {
        "l1_voltage_v": 231.5,
        "l2_voltage_v": 229.0,
        "l3_voltage_v": 232.25,
        "l1_current_a": 4.5,
        "l2_current_a": 1.25,
        "l3_current_a": 0.5,
        "l1_power_w": 1020.0,
        "l2_power_w": 280.0,
        "l3_power_w": -110.0,
        "power_w": 1190.0,
        "power_factor": 0.97,
        "frequency_hz": 50.02,
        "import_kwh": 1234.5,
        "export_kwh": 321.25,
    }


class EmulatedMeter:
    """One meter: a register table, values the test sets, and a log of the requests served."""

    def __init__(self, unit: int, table: dict[str, int], values: dict[str, float]) -> None:
        self.unit = unit
        self.table = table
        self.values = dict(values)
        #: values served once, by the next request that covers the register, then forgotten
        self.once: dict[str, float] = {}
        self.holding: dict[int, int] = {}  # raw holding registers for custom maps
        self.input_raw: dict[int, int] = {}  # raw input registers for custom maps
        self.requests: list[tuple[int, int, int]] = []  # (function, address, count)
        self.in_flight = 0
        self.max_in_flight = 0
        self.delay_s = 0.0

    async def action(
        self,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        current_registers: list[int],
        set_values: Any,
    ) -> None:
        self.requests.append((function_code, address, count))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            if function_code == 4:
                for name, reg in self.table.items():
                    value = self.values[name]
                    if name in self.once and address <= reg < address + count:
                        value = self.once.pop(name)
                    hi, lo = struct.unpack(">HH", struct.pack(">f", value))
                    current_registers[reg - start_address] = hi
                    current_registers[reg + 1 - start_address] = lo
                raw = self.input_raw
            else:
                raw = self.holding
            for reg, word in raw.items():
                current_registers[reg - start_address] = word
        finally:
            self.in_flight -= 1

    def device(self) -> SimDevice:
        bits = [SimData(0, count=1, values=False, datatype=DataType.BITS)]
        registers = [SimData(0, count=400, values=0, datatype=DataType.REGISTERS)]
        return SimDevice(
            id=self.unit, simdata=(bits, list(bits), registers, list(registers)), action=self.action
        )


class MeterServer:
    """A Modbus TCP server on loopback (or a serial one on a tty) with one or more meters."""

    def __init__(
        self, meters: list[EmulatedMeter], *, port: int = 0, serial_port: str | None = None
    ) -> None:
        self.meters = meters
        self.port = port
        self.serial_port = serial_port
        self.server: Any = None

    async def start(self) -> None:
        devices = [m.device() for m in self.meters]
        if self.serial_port:
            self.server = ModbusSerialServer(devices, port=self.serial_port, baudrate=19200)
        else:
            self.server = ModbusTcpServer(devices, address=("127.0.0.1", self.port))
        await self.server.serve_forever(background=True)

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.shutdown()
            self.server = None


class ThreadedMeterServer:
    """A `MeterServer` on its own event loop in a thread, for tests that block on a process."""

    def __init__(self, meters: list[EmulatedMeter], port: int) -> None:
        self.server = MeterServer(meters, port=port)
        self.port = port
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def _call(self, coro: Any) -> None:
        asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=10)

    def start(self) -> None:
        self._call(self.server.start())

    def stop(self) -> None:
        self._call(self.server.stop())

    def close(self) -> None:
        self.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


class SilentServer:
    """Accepts TCP connections on loopback and never answers: a gateway that hangs."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.sock.settimeout(0.1)
        self.accepted: list[socket.socket] = []
        self._closed = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted.append(conn)

    def close(self) -> None:
        self._closed.set()
        self.thread.join(timeout=5)
        self.sock.close()
        for conn in self.accepted:
            conn.close()
