"""The one timestamp shape: RFC 3339 UTC with Z, to the millisecond (truncated) or the second."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone

import pytest

from appliance import timestamps


def test_epoch_seconds_truncate_to_the_millisecond_like_now() -> None:
    assert timestamps.rfc3339(1.9999996) == "1970-01-01T00:00:01.999Z"
    assert timestamps.rfc3339(86400 * 20000.5, seconds=True) == "2024-10-04T12:00:00Z"


def test_aware_datetimes_in_any_zone_are_written_in_utc() -> None:
    moment = datetime(2026, 1, 2, 5, 4, 5, 678901, tzinfo=timezone(timedelta(hours=2)))
    assert timestamps.rfc3339(moment) == "2026-01-02T03:04:05.678Z"
    assert timestamps.rfc3339(moment, seconds=True) == "2026-01-02T03:04:05Z"


def test_a_naive_datetime_is_refused() -> None:
    with pytest.raises(ValueError, match="time zone"):
        timestamps.rfc3339(datetime(2026, 1, 2))  # naive: the point of the test


def test_now_has_the_shape_and_sorts_with_time() -> None:
    first = timestamps.now()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", timestamps.now_seconds())
    assert timestamps.rfc3339(datetime.now(UTC)) >= first
