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


def hide_all_gpus() -> dict[str, str]:
    """The environment that shows no GPU of any known vendor to a process (a CPU plan's trainer)."""
    return dict(v.hide_all_env for v in VENDORS)


def torch_build_label(software: dict) -> str:
    """"CUDA 12.8", "ROCm 6.4.43482" or "CPU": the GPU runtime the installed torch was built for."""
    return next((f"{v.runtime} {software[v.torch_build_key]}" for v in VENDORS if software.get(v.torch_build_key)),
                "CPU")
