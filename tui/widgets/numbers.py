"""How the console writes numbers, durations and money: the same text on every screen and in ``top``.

Owns: the formatting functions. Never: reads the clock (ages and countdowns come from the gateway's own
numbers, so a screen shows what the gateway said and snapshot tests stay stable).
"""

from __future__ import annotations

DASH = "—"


def rate(value: float | None, unit: str = "/s") -> str:
    if value is None:
        return DASH
    return f"{value:,.1f}{unit}" if value < 100 else f"{value:,.0f}{unit}"


def percent(value: float | None) -> str:
    return DASH if value is None else f"{value * 100:.1f} %"


def millis(value: float | None) -> str:
    return DASH if value is None else f"{value:,.0f} ms"


def usd(value: float | None) -> str:
    return DASH if value is None else f"${value:,.2f}"


def count(value: int | float | None) -> str:
    return DASH if value is None else f"{value:,.0f}"


def tokens(value: int | float | None) -> str:
    """1234 -> 1,234; 1234567 -> 1.23M."""
    if value is None:
        return DASH
    if value >= 1_000_000:
        return f"{value / 1_000_000:.2f}M"
    return f"{value:,.0f}"


def duration(seconds: float | None) -> str:
    """A span at a glance: 42s, 7m 05s, 3h 12m, 29d 23h; negative spans are written "-…"."""
    if seconds is None:
        return DASH
    sign = "-" if seconds < 0 else ""
    s = int(abs(seconds))
    if s < 60:
        return f"{sign}{s}s"
    if s < 3600:
        return f"{sign}{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{sign}{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{sign}{s // 86400}d {s % 86400 // 3600:02d}h"


def age(seconds: float | None) -> str:
    return DASH if seconds is None else f"{duration(seconds)} ago"


def expiry(seconds: float | None) -> str:
    if seconds is None:
        return DASH
    return f"in {duration(seconds)}" if seconds >= 0 else f"EXPIRED {duration(-seconds)} ago"


def clip(text: str, width: int) -> str:
    """``text`` in at most ``width`` cells, an ellipsis marking a cut."""
    return text if len(text) <= width else text[: max(0, width - 1)] + "…"
