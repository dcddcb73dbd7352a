"""Version strings as numbers, without importing the package whose version it is."""

from __future__ import annotations

import re


def version_tuple(version: str | None) -> tuple[int, int, int] | None:
    """'2.9.1+cu128' -> (2, 9, 1); '0.50' -> (0, 50, 0); None or garbage -> None."""
    m = re.match(r"^(\d+)\.(\d+)(?:\.(\d+))?", version or "")
    return (int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)) if m else None
