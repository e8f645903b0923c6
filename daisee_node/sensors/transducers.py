"""Current transducers: what voltage each sensor model puts out for a given current.

Every model is linear: `v_out = zero_v + sensitivity_v_per_a × current_a`. Hall-effect sensors
(ACS712, ACS758) are ratiometric: their zero sits at a fraction of their supply voltage. CT clamps
with voltage output (SCT-013-xxx, 1 V RMS at rated current) only see alternating current and need
a bias (or a differential input) to swing around.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TransducerModel:
    """A current sensor's datasheet transfer function."""

    name: str
    sensitivity_v_per_a: float
    #: zero-current output as a fraction of the supply (Hall sensors) …
    zero_fraction: float
    rated_a: float
    ac_only: bool = False
    description: str = ""


def _acs712(amps: int, mv_per_a: float) -> TransducerModel:
    return TransducerModel(
        f"acs712-{amps}a",
        mv_per_a / 1000,
        0.5,
        amps,
        description=f"Allegro ACS712 ±{amps} A Hall sensor",
    )


def _acs758(amps: int, mv_per_a: float, bidirectional: bool) -> TransducerModel:
    suffix = "b" if bidirectional else "u"
    return TransducerModel(
        f"acs758-{amps}{suffix}",
        mv_per_a / 1000,
        0.5 if bidirectional else 0.12,
        amps,
        description=f"Allegro ACS758 {amps} A Hall sensor, "
        + ("bidirectional" if bidirectional else "unidirectional"),
    )


def _sct013(amps: int) -> TransducerModel:
    return TransducerModel(
        f"sct013-{amps:03d}",
        1.0 / amps,
        0.5,
        amps,
        ac_only=True,
        description=f"YHDC SCT-013-{amps:03d} CT clamp, 1 V RMS at {amps} A",
    )


MODELS: dict[str, TransducerModel] = {
    m.name: m
    for m in (
        _acs712(5, 185.0),
        _acs712(20, 100.0),
        _acs712(30, 66.0),
        _acs758(50, 40.0, True),
        _acs758(100, 20.0, True),
        _acs758(150, 13.3, True),
        _acs758(200, 10.0, True),
        _acs758(50, 60.0, False),
        _acs758(100, 40.0, False),
        *(_sct013(a) for a in (5, 10, 15, 20, 25, 30, 50, 60)),
    )
}

#: Models whose numbers come from the config, not a datasheet.
CUSTOM = ("shunt", "linear")


@dataclass(frozen=True, slots=True)
class Transfer:
    """A transducer as wired on one input: volts at the ADC pin ↔ amps in the conductor."""

    sensitivity_v_per_a: float  # at the ADC pin (divider included)
    zero_v: float  # at the ADC pin
    rated_a: float
    ac_only: bool

    def amps(self, pin_v: float) -> float:
        return (pin_v - self.zero_v) / self.sensitivity_v_per_a

    def volts(self, amps: float) -> float:
        return self.zero_v + self.sensitivity_v_per_a * amps
