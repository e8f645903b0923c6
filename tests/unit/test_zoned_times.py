"""The one reader of times an operator types (`--from`, `--at`, `--period`, `--start` …)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from daisee_node.clock import zoned_ms
from daisee_node.errors import DaiseeError


def ms(*fields: int) -> int:
    return int(datetime(*fields, tzinfo=UTC).timestamp() * 1000)


def test_a_zoned_iso_time_is_ms_since_the_epoch() -> None:
    assert zoned_ms("2026-11-01T00:00:00Z", "--from", "x", DaiseeError) == ms(2026, 11, 1)
    # 01:00 in Paris in winter is midnight UTC
    assert zoned_ms("2026-11-01T01:00:00+01:00", "--from", "x", DaiseeError) == ms(2026, 11, 1)


def test_a_date_is_its_midnight_utc_only_where_dates_are_taken() -> None:
    assert zoned_ms("2026-11-01", "--from", "x", DaiseeError, dates=True) == ms(2026, 11, 1)
    with pytest.raises(DaiseeError, match=r"^--from: give a time zone"):
        zoned_ms("2026-11-01", "--from", "x", DaiseeError)


def test_a_time_without_its_zone_is_asked_for_one_and_garbage_gets_the_callers_hint() -> None:
    with pytest.raises(ValueError) as no_zone:
        zoned_ms("2026-11-01T12:00:00", "'12:00'", "unused", ValueError)
    assert str(no_zone.value) == "'12:00': give a time zone (e.g. 'Z' or '+01:00')"
    with pytest.raises(KeyError, match="--at: say it as ISO"):
        zoned_ms("yesterday", "--at", "say it as ISO", KeyError)
