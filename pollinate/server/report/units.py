"""Numbers as a person reads them: traffic in MB, memory in kB/MB/GB, durations in s/min/h."""

from __future__ import annotations

import math

from pollinate.client.budget import format_size

__all__ = ["AXIS_UNITS", "DASH", "axis_unit", "duration", "fixed", "megabytes", "missing", "percent", "size"]

AXIS_UNITS = ((1e9, "GB"), (1e6, "MB"), (1e3, "kB"), (1.0, "B"))
"""Decimal byte units, largest first (traffic and memory are both counted in powers of 1000 here)."""

DASH = "–"
"""What a missing figure reads as (None, NaN)."""


def missing(x: float | None) -> bool:
    """None or NaN: a figure the run did not produce."""
    return x is None or (isinstance(x, float) and math.isnan(x))


def megabytes(n: float) -> str:
    """Traffic in MB, the headline's unit: 473142 -> '0.47 MB', 12345678 -> '12.3 MB'."""
    mb = n / 1e6
    if mb < 10:
        return f"{mb:.2f} MB"
    return f"{mb:.1f} MB" if mb < 1000 else f"{mb:,.0f} MB"


def size(n: float | None) -> str:
    """A byte count with three significant digits: '538 MB', '1.5 GB' (a dash when missing)."""
    return DASH if missing(n) else format_size(int(n or 0))


def fixed(x: float | None, digits: int = 3) -> str:
    """``x`` with ``digits`` decimals, a dash when missing; infinity as '∞'."""
    if missing(x):
        return DASH
    assert x is not None
    return "∞" if math.isinf(x) else f"{x:.{digits}f}"


def percent(x: float | None) -> str:
    """A fraction as a percentage with one decimal: 0.8125 -> '81.2%'."""
    return DASH if missing(x) else f"{100 * (x or 0.0):.1f}%"


def duration(seconds: float | None) -> str:
    """'0.42 s', '12.3 s', '4 min 05 s', '2 h 03 min'."""
    if missing(seconds):
        return DASH
    assert seconds is not None
    if seconds < 60:
        return f"{seconds:.2f} s" if seconds < 1 else f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def axis_unit(largest: float) -> tuple[float, str]:
    """The scale and unit an axis reaching ``largest`` bytes is labelled in (kB below 1 MB, ...)."""
    return next(((scale, unit) for scale, unit in AXIS_UNITS if largest >= scale), AXIS_UNITS[-1])
