"""Byte units, one definition for the whole package."""

from __future__ import annotations

KIB = 1024
MIB = 1024**2
GIB = 1024**3


def gib(n: int | float | None) -> str:
    """'12.0 GiB' for a byte count; '?' when it is unknown."""
    return "?" if n is None else f"{n / GIB:.1f} GiB"
