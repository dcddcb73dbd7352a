"""What the machine has: GPUs, RAM, swap, disk. Light imports only (psutil, NVML), never torch.

Data crosses module borders as the `Hardware` record; the planner and the stage checks read it, nothing else probes.
"""

from __future__ import annotations

import os
import platform
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

GIB = 1024**3


@dataclass(frozen=True)
class GPU:
    vendor: str                    # "nvidia" | "amd"
    name: str
    vram_total_bytes: int
    vram_free_bytes: int | None = None
    compute_capability: str | None = None
    bf16: bool = False


@dataclass(frozen=True)
class Hardware:
    source: str                    # "probe" or the profile it came from
    cpu_count: int
    ram_total_bytes: int
    ram_available_bytes: int
    swap_total_bytes: int
    swap_free_bytes: int
    disk_free_bytes: int
    wsl: bool = False
    gpus: list[GPU] = field(default_factory=list)

    @property
    def accelerator(self) -> str:
        return self.gpus[0].vendor if self.gpus else "cpu"

    def to_dict(self) -> dict:
        return asdict(self)


def _is_wsl() -> bool:
    try:
        return "microsoft" in Path("/proc/sys/kernel/osrelease").read_text().lower()
    except OSError:
        return False


def _nvidia_gpus() -> list[GPU]:
    try:
        import pynvml  # nvidia-ml-py: a thin ctypes binding, cheap to import
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except Exception:  # no driver / no device: NVML raises its own error types
        return []
    gpus = []
    try:
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            name = name.decode() if isinstance(name, bytes) else name
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(h)
            gpus.append(GPU("nvidia", name, int(mem.total), int(mem.free), f"{major}.{minor}", bf16=major >= 8))
    finally:
        pynvml.nvmlShutdown()
    return gpus


def probe(run_dir: Path | None = None) -> Hardware:
    vm = psutil.virtual_memory()
    sw = psutil.swap_memory()
    where = Path(run_dir) if run_dir else Path.cwd()
    while not where.exists():
        where = where.parent
    return Hardware(
        source="probe",
        cpu_count=os.cpu_count() or 1,
        ram_total_bytes=int(vm.total),
        ram_available_bytes=int(vm.available),
        swap_total_bytes=int(sw.total),
        swap_free_bytes=int(sw.free),
        disk_free_bytes=int(shutil.disk_usage(where).free),
        wsl=_is_wsl(),
        gpus=_nvidia_gpus(),
    )


def describe(hw: Hardware) -> str:
    gpu = ", ".join(f"{g.name} {g.vram_total_bytes / GIB:.0f} GiB" for g in hw.gpus) or "no GPU"
    return (
        f"{gpu}; {hw.cpu_count} CPU cores; RAM {hw.ram_available_bytes / GIB:.1f}/{hw.ram_total_bytes / GIB:.1f} GiB free; "
        f"swap {hw.swap_free_bytes / GIB:.1f} GiB free; disk {hw.disk_free_bytes / GIB:.0f} GiB free"
        + ("; WSL" if hw.wsl else "")
        + f" ({platform.system()})"
    )
