"""Byte units, one definition for the whole package."""

from __future__ import annotations

KIB = 1024
MIB = 1024**2
GIB = 1024**3


def gib(n: int | float | None) -> str:
    """'12.0 GiB' for a byte count; '?' when it is unknown."""
    return "?" if n is None else f"{n / GIB:.1f} GiB"


def duration(seconds: float) -> str:
    """A duration as people say it: 40 s, 3 min, 1 h 20 min."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60)} min"
