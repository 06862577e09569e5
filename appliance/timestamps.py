"""The one timestamp shape of the appliance: RFC 3339 in UTC with a ``Z``, to the millisecond.

Owns: writing the current time and a given moment in that shape (``2026-11-25T10:00:00.123Z``), the
to-the-second variant policy documents use (``2026-11-25T10:00:00Z``), and reading one back as seconds
since the epoch (``epoch``). Strings in this shape sort as
time does, which the vault's queries rely on. Never: reads a clock other than the system's UTC time.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

_second: tuple[int, str] = (-1, "")


def now() -> str:
    """Now, to the millisecond. On the ledger's hot path: the part up to the second is cached."""
    global _second
    secs, ms = divmod(int(time.time() * 1000), 1000)
    cached = _second
    if cached[0] != secs:
        cached = (secs, _to_second(secs) + ".")
        _second = cached
    return f"{cached[1]}{ms:03d}Z"


def now_seconds() -> str:
    """Now, to the second."""
    return rfc3339(datetime.now(UTC), seconds=True)


def rfc3339(moment: datetime | float, *, seconds: bool = False) -> str:
    """``moment`` (an aware datetime, or seconds since the epoch) in UTC, to the millisecond or second."""
    if not isinstance(moment, datetime):  # milliseconds truncated, as now() does
        secs, ms = divmod(int(moment * 1000), 1000)
        return f"{_to_second(secs)}Z" if seconds else f"{_to_second(secs)}.{ms:03d}Z"
    if moment.tzinfo is None:
        raise ValueError("a timestamp needs a time zone")
    text = moment.astimezone(UTC).isoformat(timespec="seconds" if seconds else "milliseconds")
    return text.replace("+00:00", "Z")


def epoch(value: object) -> float | None:
    """An RFC 3339 (ISO 8601) moment as seconds since the epoch; None for anything else."""
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _to_second(secs: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs))
