"""`status` shows readings with every digit they have, energy in kWh or MWh, never an exponent."""

from __future__ import annotations

import random
from decimal import Decimal

import pytest

from daisee_node.status import value_text

SCALE = {"Wh": 1, "kWh": 1_000, "MWh": 1_000_000}


def test_a_meter_at_1_234_567_8_wh_reads_as_mwh_with_every_digit() -> None:
    assert value_text(1_234_567.8, "Wh") == ("1.2345678", "MWh")


@pytest.mark.parametrize("unit", ["Wh", "W", "A", "%"])
def test_every_value_reads_back_exactly_and_without_an_exponent(unit: str) -> None:
    rng = random.Random(7)
    for _ in range(2_000):
        value = round(rng.uniform(-1e8, 1e8), rng.randrange(0, 4)) * rng.choice([1, 1e-6])
        text, shown_unit = value_text(value, unit)
        assert "e" not in text.lower(), text
        factor = SCALE[shown_unit] if unit == "Wh" else 1
        assert float(Decimal(text) * factor) == value, (value, text, shown_unit)


@pytest.mark.parametrize(
    ("wh", "unit"), [(999.9, "Wh"), (1_000.0, "kWh"), (999_999.9, "kWh"), (1e6, "MWh")]
)
def test_energy_changes_unit_at_1_kwh_and_1_mwh(wh: float, unit: str) -> None:
    assert value_text(wh, "Wh")[1] == unit
