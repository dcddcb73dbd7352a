"""What the trackers share: which numbers a tracker can hold, which files go to it as artifacts."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

# Reports, plots and configs go to a tracker as artifacts; model weights and GGUFs do not (gigabytes for a real
# model, and the run dir already holds them), nor anything past the size cap.
ARTIFACT_MAX_BYTES = 20 * 1024 * 1024
WEIGHTS = {".gguf", ".safetensors", ".bin", ".pt", ".pth", ".ckpt"}


def finite(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def report_files(files: list[Path]) -> list[Path]:
    return [f for f in files
            if f.is_file() and f.suffix not in WEIGHTS and f.stat().st_size <= ARTIFACT_MAX_BYTES]


def param_value(v: Any) -> str:
    return v if isinstance(v, str) else str(v)
