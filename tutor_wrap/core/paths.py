"""Where tutor_wrap keeps things that are built once and reused (llama.cpp, de-quantized demo model)."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]   # tutor_wrap/
REPO_DIR = PACKAGE_DIR.parent


def cache_dir() -> Path:
    """`TUTOR_WRAP_CACHE`, else `<checkout>/.cache` for a source checkout, else the user cache.

    The checkout is preferred so that a fresh clone is self-contained and `rm -rf .cache` resets it.
    """
    env = os.environ.get("TUTOR_WRAP_CACHE")
    if env:
        return Path(env).expanduser().resolve()
    if (REPO_DIR / "pyproject.toml").is_file():
        return REPO_DIR / ".cache"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tutor_wrap"
