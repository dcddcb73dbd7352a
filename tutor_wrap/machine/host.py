"""The host side of the probe: CPU, RAM, swap, disk, and whether this is WSL (and what WSL grants).

Inside WSL 2, /proc/meminfo (which psutil reads) already shows what the VM was granted, not the Windows total,
so RAM and swap need no special case; what WSL adds is the `.wslconfig` that sets those limits.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
from pathlib import Path

import psutil

# Microsoft's documented defaults for WSL 2 (learn.microsoft.com/en-us/windows/wsl/wsl-config, [wsl2] table):
# memory "50% of total memory on Windows"; swap "25% of memory size on Windows rounded up to the nearest GB".
WSL_DEFAULT_MEMORY_FRACTION = 0.5
WSL_DEFAULT_SWAP_FRACTION = 0.25


def is_wsl(osrelease: str) -> bool:
    """WSL kernels carry "microsoft" in their release string (e.g. 5.15.153.1-microsoft-standard-WSL2)."""
    return "microsoft" in osrelease.lower()


def kernel_release() -> str:
    try:
        return Path("/proc/sys/kernel/osrelease").read_text().strip()
    except OSError:
        return platform.release()


def cpu_model(cpuinfo: str | None = None) -> str:
    """The CPU's marketing name from /proc/cpuinfo ("model name" on x86, absent on many ARM boards)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return platform.processor() or ""
    m = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    return m.group(1).strip() if m else (platform.processor() or "")


# The instruction sets that decide CPU speed for training and llama.cpp: AVX2/FMA for any useful fp32 GEMM,
# AVX-512 (and its BF16/VNNI parts) and AMX for the fast bf16/int8 paths on recent Xeons.
CPU_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")


def cpu_feature_words(cpuinfo: str | None = None) -> set[str]:
    """Every feature word the kernel lists for the CPU (x86 `flags`, ARM `Features`)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return set()
    m = re.search(r"^(?:flags|Features)\s*:\s*(.+)$", cpuinfo, re.M)
    return set(m.group(1).split()) if m else set()


def cpu_flags(cpuinfo: str | None = None) -> list[str]:
    have = cpu_feature_words(cpuinfo)
    return [f for f in CPU_FLAGS if f in have]


# Named levels, best first: what preflight prints and what the CPU dtype choice reads (a level needs all its flags).
ISA_LEVELS = (("AMX", ("amx_tile", "amx_bf16")), ("AVX512-BF16", ("avx512f", "avx512_bf16")), ("AVX-512", ("avx512f",)),
              ("AVX2", ("avx2", "fma")))


def isa_level(flags) -> str:
    """The best named instruction-set level among `flags` (cpu_flags' output); "baseline" below AVX2, "unknown"
    when the flags are not known (None: a profile without cpu_flags)."""
    if flags is None:
        return "unknown"
    have = set(flags)
    return next((name for name, need in ISA_LEVELS if set(need) <= have), "baseline")


def apple_mps() -> bool:
    """Apple silicon: PyTorch's MPS backend exists there (noted only: Axolotl does not train on it here)."""
    return platform.system() == "Darwin" and platform.machine() == "arm64"


def existing_dir(path: Path | None) -> Path:
    """The nearest existing ancestor: the run dir may not exist yet, its disk does."""
    where = Path(path) if path else Path.cwd()
    while not where.exists():
        where = where.parent
    return where


def cpu_busy(window_s: float = 0.3) -> float:
    """How many CPUs' worth of work other processes are doing right now (sampled over `window_s`). The load
    average would still count a build that ended a minute ago."""
    return round(sum(psutil.cpu_percent(interval=window_s, percpu=True)) / 100.0, 2)


def usable_cpus() -> int | None:
    """The CPUs this process may run on: a container or taskset may allow 2 of a host's 64, which os.cpu_count()
    does not see. None where the OS cannot say (macOS)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None


def host(run_dir: Path | None = None) -> dict:
    vm = psutil.virtual_memory()
    sw = psutil.swap_memory()
    release = kernel_release()
    return {
        "cpu_count": os.cpu_count() or 1,
        "cpu_physical_cores": psutil.cpu_count(logical=False),
        "cpu_usable": usable_cpus(),
        "cpu_busy": cpu_busy(),
        "cpu_model": cpu_model(),
        "cpu_flags": cpu_flags(),
        "mps": apple_mps(),
        "ram_total_bytes": int(vm.total),
        "ram_available_bytes": int(vm.available),
        "swap_total_bytes": int(sw.total),
        "swap_free_bytes": int(sw.free),
        "disk_free_bytes": int(shutil.disk_usage(existing_dir(run_dir)).free),
        "wsl": is_wsl(release),
        "os": f"{platform.system()} {release}",
    }


def parse_meminfo(text: str) -> dict[str, int]:
    """/proc/meminfo as bytes per key (values are in kB, i.e. KiB)."""
    out = {}
    for line in text.splitlines():
        m = re.match(r"^(\w+):\s+(\d+)(?:\s+kB)?$", line.strip())
        if m:
            out[m.group(1)] = int(m.group(2)) * (1024 if line.rstrip().endswith("kB") else 1)
    return out


_SIZE = re.compile(r"^\s*([\d.]+)\s*([KMGT]?B?)\s*$", re.I)
_UNITS = {"": 1, "B": 1, "K": 1024, "KB": 1024, "M": 1024**2, "MB": 1024**2, "G": 1024**3, "GB": 1024**3,
          "T": 1024**4, "TB": 1024**4}


def parse_wslconfig(text: str) -> dict:
    """The [wsl2] memory and swap of a .wslconfig, in bytes (WSL reads GB/MB as binary units; plain = bytes)."""
    section, out = None, {}
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1].strip().lower()
            continue
        if section != "wsl2" or "=" not in line:
            continue
        key, value = (s.strip() for s in line.split("=", 1))
        key = key.lower()
        if key in ("memory", "swap"):
            m = _SIZE.match(value)
            if m:
                out[f"{key}_bytes"] = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
            out[key] = value
    return out


def find_wslconfig() -> Path | None:
    """%UserProfile%\\.wslconfig seen from inside WSL. Globbing /mnt/c/Users avoids spawning cmd.exe (slow)."""
    users = Path("/mnt/c/Users")
    try:
        found = sorted(users.glob("*/.wslconfig"))
    except OSError:
        return None
    return found[0] if found else None


def wsl_info(ram_total_bytes: int, swap_total_bytes: int) -> dict:
    """What WSL grants now, where the limits come from, and an estimate of the Windows RAM behind them."""
    cfg_path = find_wslconfig()
    cfg = {}
    if cfg_path is not None:
        try:
            cfg = parse_wslconfig(cfg_path.read_text(errors="replace"))
        except OSError:
            cfg = {}
    # Without an explicit memory= line WSL grants half the Windows RAM, so twice MemTotal estimates it.
    host_estimate = None if "memory_bytes" in cfg else int(ram_total_bytes / WSL_DEFAULT_MEMORY_FRACTION)
    return {"granted_ram_bytes": ram_total_bytes, "granted_swap_bytes": swap_total_bytes,
            "wslconfig": str(cfg_path) if cfg_path else None, "wslconfig_values": cfg,
            "windows_ram_estimate_bytes": host_estimate}


def wsl_limits(hw) -> dict | None:
    """What WSL grants and where that comes from (see wsl_info), for a probed WSL machine; None for a profile
    (its .wslconfig is not on this disk) or a machine that is not WSL."""
    if hw.wsl and hw.source == "probe":
        return wsl_info(hw.ram_total_bytes, hw.swap_total_bytes)
    return None
