"""The GPU vendors tutor_wrap knows, in probe order: NVML/nvidia-smi first, then amdsmi/rocm-smi.

Adding a vendor: a module like nvidia.py that builds a `Vendor` (machine/vendor.py), and one line here.
"""

from __future__ import annotations

from tutor_wrap.core.errors import TutorWrapError
from tutor_wrap.machine import amd, nvidia
from tutor_wrap.machine.vendor import Vendor

VENDORS: tuple[Vendor, ...] = (nvidia.VENDOR, amd.VENDOR)


def by_name(name: str) -> Vendor:
    for v in VENDORS:
        if v.name == name:
            return v
    raise TutorWrapError(f"unknown GPU vendor {name!r}", hint=f"known: {', '.join(v.name for v in VENDORS)}")


def by_bnb_kind(kind: str) -> Vendor | None:
    return next((v for v in VENDORS if v.bnb_lib_kind == kind), None)
