"""A meter's integer counter with a decimal scale decodes to the meter's own decimal value."""

from __future__ import annotations

import random
from decimal import Decimal

import pytest

from daisee_node.sensors.modbus_meter import RegisterSpec


@pytest.mark.parametrize(("scale", "digits"), [(0.1, 1), (0.01, 2), (0.001, 3)])
def test_uint32_counters_decode_to_their_exact_decimal(scale: float, digits: int) -> None:
    spec = RegisterSpec(quantity="energy_wh", address=0, type="uint32", scale=scale)
    rng = random.Random(digits)
    for raw in [12_345_678, *(rng.randrange(2**32) for _ in range(5_000))]:
        value = spec.decode([raw >> 16, raw & 0xFFFF])
        assert value == float(Decimal(raw).scaleb(-digits)), raw


def test_a_meter_at_1_234_567_8_wh_decodes_to_that_value() -> None:
    spec = RegisterSpec(quantity="energy_wh", address=0, type="uint32", scale=0.1)
    raw = 12_345_678
    assert repr(spec.decode([raw >> 16, raw & 0xFFFF])) == "1234567.8"


def test_a_scale_that_is_no_whole_fraction_still_multiplies() -> None:
    spec = RegisterSpec(quantity="power_w", address=0, type="int16", scale=0.5, offset=-1.0)
    assert spec.decode([0xFFFF]) == -1.5  # int16 -1 × 0.5 − 1
