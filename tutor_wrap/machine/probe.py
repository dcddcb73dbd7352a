"""Probe this machine: the host (CPU, RAM, swap, disk, WSL), then each GPU vendor in order until one finds GPUs.

Light imports only (psutil, NVML, amdsmi), never torch: preflight answers in well under a second.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

from tutor_wrap.machine import host
from tutor_wrap.machine.hardware import GPU, Hardware
from tutor_wrap.machine.vendor import Vendor
from tutor_wrap.machine import vendors as registry
from tutor_wrap.machine.visible import visible


def probe(run_dir: Path | None = None) -> Hardware:
    """This machine now. `run_dir` picks the disk whose free space counts (the nearest existing ancestor)."""
    gpus, notes = probe_gpus()
    return Hardware(source="probe", gpus=gpus, probe_notes=notes, packages=planner_packages(), **host.host(run_dir))


def probe_gpus(vendors: Sequence[Vendor] | None = None,
               env: Mapping[str, str] | None = None) -> tuple[list[GPU], list[str]]:
    """The GPUs of the first vendor (vendors.VENDORS by default, read when called) that finds any the trainer will
    see (the *_VISIBLE_DEVICES variables of `env`, this process's environment by default), and every skipped
    source's or hidden GPU's note (for preflight)."""
    env = os.environ if env is None else env
    vendors = registry.VENDORS if vendors is None else vendors
    notes: list[str] = []
    for vendor in vendors:
        gpus, why = vendor.probe()
        notes += why
        if gpus:
            gpus, hidden = visible(gpus, vendor.visible_env, env, empty_is_unset=vendor.visible_empty_is_unset,
                                   pci_order=vendor.pci_order_env)
            notes += hidden
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
