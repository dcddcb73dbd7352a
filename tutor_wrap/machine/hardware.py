"""What the machine has: GPUs, RAM, swap, disk. Light imports only (psutil, NVML, amdsmi), never torch.

Data crosses module borders as the `Hardware` record; the planner and the stage checks read it, nothing else probes.
The probing itself lives in probe.py (host.py plus one module per GPU vendor, listed in vendors.py).
A saved machine (a profile, see profiles.py) is the same record with `source` set to its name.
"""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass, field, fields

from tutor_wrap.core.units import GIB


@dataclass(frozen=True)
class GPU:
    vendor: str                    # a Vendor.name from vendors.py: "nvidia" | "amd"
    name: str
    vram_total_bytes: int          # as NVML / rocm-smi report the total (a bit under the marketing size)
    vram_free_bytes: int | None = None
    compute_capability: str | None = None   # NVIDIA "8.6"
    bf16: bool = False
    gfx_target: str | None = None  # AMD "gfx1100"
    driver: str | None = None
    uuid: str | None = None        # "GPU-4b2c...": CUDA_VISIBLE_DEVICES may name GPUs by it


@dataclass(frozen=True)
class Hardware:
    source: str                    # "probe" or the profile it came from
    cpu_count: int                 # logical CPUs (os.cpu_count)
    ram_total_bytes: int           # under WSL: what the VM was granted, not the Windows total
    ram_available_bytes: int
    swap_total_bytes: int
    swap_free_bytes: int
    disk_free_bytes: int
    wsl: bool = False
    gpus: list[GPU] = field(default_factory=list)
    cpu_physical_cores: int | None = None
    cpu_usable: int | None = None  # CPUs this process may run on (affinity: a container or taskset may allow fewer)
    cpu_busy: float | None = None  # CPUs' worth of work other processes were doing when probed
    cpu_model: str = ""
    cpu_flags: list[str] | None = None   # AVX2 / AVX-512 / AMX present (host.CPU_FLAGS); None: not known
    mps: bool = False                                     # Apple silicon (PyTorch MPS), noted only
    # Versions of the packages the planner's choices depend on (bitsandbytes, flash-attn, cut-cross-entropy), from
    # package metadata; a profile may list them, else the planner assumes the project's pins.
    packages: dict[str, str] = field(default_factory=dict)
    os: str = ""
    probe_notes: list[str] = field(default_factory=list)   # why a GPU source was skipped, for preflight

    @property
    def accelerator(self) -> str:
        return self.gpus[0].vendor if self.gpus else "cpu"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Hardware":
        """Inverse of to_dict; unknown keys are an error so a misspelt profile key is not silently ignored."""
        known = {f.name for f in fields(cls)}
        extra = set(data) - known
        if extra:
            raise KeyError(", ".join(sorted(extra)))
        gpu_known = {f.name for f in fields(GPU)}
        gpus = []
        for g in data.get("gpus") or []:
            bad = set(g) - gpu_known
            if bad:
                raise KeyError(", ".join(sorted(f"gpus.{b}" for b in bad)))
            gpus.append(GPU(**g))
        flags = data.get("cpu_flags")
        if flags is not None and not (isinstance(flags, list) and all(isinstance(f, str) for f in flags)):
            raise ValueError(f"cpu_flags is {flags!r}: a list of the CPU's flags as /proc/cpuinfo spells them, "
                             "e.g. [avx2, fma, avx512f, avx512_bf16], or leave it out when unknown")
        return cls(**{**data, "gpus": gpus, "probe_notes": list(data.get("probe_notes") or []),
                      "cpu_flags": None if flags is None else [f.lower() for f in flags],
                      "packages": dict(data.get("packages") or {})})


def describe(hw: Hardware) -> str:
    gpu = ", ".join(f"{g.name} {g.vram_total_bytes / GIB:.0f} GiB" for g in hw.gpus) or "no GPU"
    return (
        f"{gpu}; {hw.cpu_count} CPU cores; RAM {hw.ram_available_bytes / GIB:.1f}/{hw.ram_total_bytes / GIB:.1f} GiB free; "
        f"swap {hw.swap_free_bytes / GIB:.1f} GiB free; disk {hw.disk_free_bytes / GIB:.0f} GiB free"
        + ("; WSL" if hw.wsl else "")
        + (f" ({hw.os})" if hw.os else f" ({platform.system()})")
        + (f" [profile {hw.source}]" if hw.source != "probe" else "")
    )
