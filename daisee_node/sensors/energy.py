"""Import and export energy counters integrated from power readings."""

from __future__ import annotations


class EnergyCounter:
    """Integrates signed power (W, > 0 import) into two Wh counters that only ever grow.

    Start it from the last stored values so the counters continue across restarts. A gap longer
    than `max_gap_s` (the source was down) is not integrated: energy that was not measured is not
    invented.
    """

    def __init__(
        self, import_wh: float = 0.0, export_wh: float = 0.0, max_gap_s: float = 60.0
    ) -> None:
        self.import_wh = import_wh
        self.export_wh = export_wh
        self.max_gap_s = max_gap_s
        self._last_t: float | None = None
        self._last_w = 0.0

    def add(self, power_w: float, t: float) -> None:
        """Account for power `power_w` measured at time `t` (seconds)."""
        if self._last_t is not None:
            dt = t - self._last_t
            if 0 < dt <= self.max_gap_s:
                # Trapezoid between the two readings.
                wh = (self._last_w + power_w) / 2 * dt / 3600.0
                if wh >= 0:
                    self.import_wh += wh
                else:
                    self.export_wh -= wh
        self._last_t = t
        self._last_w = power_w

    def interrupt(self) -> None:
        """The next reading starts a new stretch (after a failed read)."""
        self._last_t = None
