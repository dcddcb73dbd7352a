"""Probe this machine: the host (CPU, RAM, swap, disk, WSL), then each GPU vendor in order until one finds GPUs.

Light imports only (psutil, NVML, amdsmi), never torch: preflight answers in well under a second.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from tutor_wrap.machine import host
from tutor_wrap.machine.hardware import GPU, Hardware
from tutor_wrap.machine.vendor import Vendor
from tutor_wrap.machine.vendors import VENDORS


def probe(run_dir: Path | None = None) -> Hardware:
    """This machine now. `run_dir` picks the disk whose free space counts (the nearest existing ancestor)."""
    gpus, notes = probe_gpus()
    return Hardware(source="probe", gpus=gpus, probe_notes=notes, packages=planner_packages(), **host.host(run_dir))


def probe_gpus(vendors: Sequence[Vendor] = VENDORS) -> tuple[list[GPU], list[str]]:
    """The GPUs of the first vendor that finds any, and every skipped source's note (for preflight)."""
    notes: list[str] = []
    for vendor in vendors:
        gpus, why = vendor.probe()
        notes += why
        if gpus:
            return gpus, notes
    return [], notes


PLANNER_PACKAGES = ("bitsandbytes", "flash-attn", "cut-cross-entropy")


def planner_packages() -> dict[str, str]:
    """Installed versions read from metadata: importing bitsandbytes or flash_attn would load GPU libraries."""
    from importlib import metadata

    found = {}
    for dist in PLANNER_PACKAGES:
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return found
