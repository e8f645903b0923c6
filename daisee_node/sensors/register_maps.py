"""Built-in Modbus register maps of common energy meters.

Eastron meters publish IEEE-754 float32 values in input registers (function 4), high word first.
Energies are in kWh on the wire; the node's channels are in Wh, hence the scale of 1000.

Every value has the physical range the meter can report, so that a corrupt register (3e38, NaN
patterns) is OUT_OF_RANGE rather than a reading. The energy counters' steps are bounded by the
most power the meter measures (`MAX_POWER_W`): its maximum current at the highest mains voltage
allowed (230 V + 10 %), on each phase.
"""

from __future__ import annotations

from typing import Any


def _f(
    quantity: str,
    address: int,
    unit: str,
    *,
    scale: float = 1.0,
    total: bool = False,
    lo: float | None = None,
    hi: float | None = None,
    resolution: float | None = None,
) -> dict[str, Any]:
    return {
        "quantity": quantity,
        "address": address,
        "function": 4,
        "type": "float32",
        "word_order": "big",
        "scale": scale,
        "unit": unit,
        "state_class": "total_increasing" if total else "measurement",
        "min": lo,
        "max": hi,
        "resolution": resolution,
    }


#: the highest mains voltage a meter sees in service (EN 50160: 230 V + 10 %)
U_MAX_V = 253.0
#: the most power each built-in model measures: phases × maximum current × U_MAX_V
MAX_POWER_W: dict[str, float] = {
    "sdm120": 1 * 45 * U_MAX_V,  # single phase, Imax 45 A: ~11.4 kW
    "sdm630": 3 * 100 * U_MAX_V,  # three phases, Imax 100 A: ~75.9 kW
}
#: more than either meter's energy counter can hold (7 digits of kWh and a decimal), in Wh
_MAX_WH = 1e10


_ENERGY = (
    _f("frequency_hz", 0x46, "Hz", lo=40, hi=70),
    # The display counts in 0.01 kWh: one such step may show up at once.
    _f("import_wh", 0x48, "Wh", scale=1000, total=True, lo=0, hi=_MAX_WH, resolution=10),
    _f("export_wh", 0x4A, "Wh", scale=1000, total=True, lo=0, hi=_MAX_WH, resolution=10),
)

SDM120 = (
    _f("voltage_v", 0x00, "V", lo=0, hi=500),
    _f("current_a", 0x06, "A", lo=-100, hi=100),
    _f("power_w", 0x0C, "W", lo=-25_000, hi=25_000),
    _f("apparent_power_va", 0x12, "VA", lo=0, hi=25_000),
    _f("reactive_power_var", 0x18, "var", lo=-25_000, hi=25_000),
    _f("power_factor", 0x1E, "", lo=-1, hi=1),
    *_ENERGY,
)

SDM630 = (
    *(_f(f"l{i + 1}_voltage_v", 0x00 + 2 * i, "V", lo=0, hi=500) for i in range(3)),
    *(_f(f"l{i + 1}_current_a", 0x06 + 2 * i, "A", lo=-150, hi=150) for i in range(3)),
    *(_f(f"l{i + 1}_power_w", 0x0C + 2 * i, "W", lo=-40_000, hi=40_000) for i in range(3)),
    _f("power_w", 0x34, "W", lo=-120_000, hi=120_000),
    _f("power_factor", 0x3E, "", lo=-1, hi=1),
    *_ENERGY,
)

MAPS: dict[str, tuple[dict[str, Any], ...]] = {"sdm120": SDM120, "sdm630": SDM630}
