"""The demo node's sensors can keep the intervals its conformity reports expect, at any speed."""

from __future__ import annotations

from pathlib import Path

import pytest

from daisee_node.demo import demo_config


@pytest.mark.parametrize("speed", [1.0, 60.0, 600.0, 3600.0])
def test_the_ac_clamp_has_time_for_its_window_between_readings(
    tmp_path: Path, speed: float
) -> None:
    """An AC reading samples whole mains cycles in wall time, whatever the demo's speed: with
    less wall time between readings than that, it fell behind and every period failed its
    conformity report (40 % of the expected readings)."""
    config = demo_config(tmp_path, speed=speed)
    (clamp,) = [s for s in config.sensors if s.kind == "ads1115"]
    assert clamp.mode == "ac"
    window_wall_s = clamp.window_cycles / clamp.mains_hz
    between_wall_s = clamp.interval_s / speed
    assert between_wall_s >= 2 * window_wall_s
