"""NVIDIA GPUs: NVML first (nvidia-ml-py, a thin ctypes binding: no torch, no CUDA context), then `nvidia-smi`.

NVIDIA documents NVML as the stable interface and nvidia-smi's output as "not guaranteed to be backwards
compatible"; the CSV query is the fallback for machines where the NVML library is not on the loader path
(some containers) but the binary is.
"""

from __future__ import annotations

import csv
import io
import re
import shutil
import subprocess

from tutor_wrap.machine.hardware import GPU
from tutor_wrap.machine.vendor import Vendor

QUERY = "index,name,memory.total,memory.free,compute_cap,uuid"
from tutor_wrap.core.units import MIB as _MIB


def bf16_for(compute_capability: str | None) -> bool:
    """bf16 tensor-core math arrived with Ampere (compute capability 8.0)."""
    try:
        return int(str(compute_capability).split(".")[0]) >= 8
    except (TypeError, ValueError):
        return False


def from_nvml() -> tuple[list[GPU], str | None]:
    """GPUs from NVML, or ([], why-not)."""
    try:
        import pynvml  # nvidia-ml-py
    except ImportError:
        return [], "nvidia-ml-py is not installed"
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # NVML raises its own error classes: no library, no driver, no device
        return [], f"NVML: {exc}"
    gpus = []
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        driver = driver.decode() if isinstance(driver, bytes) else driver
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            name = name.decode() if isinstance(name, bytes) else name
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(h)
            cc = f"{major}.{minor}"
            try:   # only for CUDA_VISIBLE_DEVICES=GPU-...: a device that cannot say must not cost the probe
                uuid = pynvml.nvmlDeviceGetUUID(h)
                uuid = uuid.decode() if isinstance(uuid, bytes) else uuid
            except Exception:
                uuid = None
            gpus.append(GPU("nvidia", name, int(mem.total), int(mem.free), cc, bf16=bf16_for(cc), driver=driver,
                            uuid=uuid or None))
    except Exception as exc:
        return gpus, f"NVML: {exc}"
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass
    return gpus, None


def _mib(value: str) -> int | None:
    """'24564 MiB' or '24564' (nounits) -> bytes; '[N/A]' (e.g. GB10's unified memory) -> None."""
    m = re.match(r"^\s*(\d+(?:\.\d+)?)\s*(MiB)?\s*$", value)
    return int(float(m.group(1)) * _MIB) if m else None


def parse_query_csv(text: str) -> list[GPU]:
    """`nvidia-smi --query-gpu=... --format=csv` with its header row, in any column order.

    The header names each column (`memory.total [MiB]`), so the parser reads by name, not by position.
    """
    rows = [r for r in csv.reader(io.StringIO(text.strip()), skipinitialspace=True) if r]
    if not rows:
        return []
    header = [re.sub(r"\s*\[.*\]$", "", h.strip()) for h in rows[0]]
    gpus = []
    for row in rows[1:]:
        if row == rows[0]:  # the same header again (one block per node when run through srun)
            continue
        rec = dict(zip(header, (c.strip() for c in row)))
        name = rec.get("name") or rec.get("gpu_name")
        if not name:
            continue
        cc = rec.get("compute_cap")
        cc = cc if cc and re.match(r"^\d+\.\d+$", cc) else None
        total = _mib(rec.get("memory.total", ""))
        gpus.append(GPU("nvidia", name, total or 0, _mib(rec.get("memory.free", "")), cc, bf16=bf16_for(cc),
                        driver=rec.get("driver_version"), uuid=rec.get("uuid") or None))
    return gpus


def from_nvidia_smi(timeout: float = 5.0) -> tuple[list[GPU], str | None]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return [], "nvidia-smi not on PATH"
    try:
        proc = subprocess.run([exe, f"--query-gpu={QUERY},driver_version", "--format=csv"],
                              capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return [], f"nvidia-smi: {exc}"
    if proc.returncode != 0:
        return [], f"nvidia-smi exit {proc.returncode}: {(proc.stdout + proc.stderr).strip()[:200]}"
    return parse_query_csv(proc.stdout), None


def probe() -> tuple[list[GPU], list[str]]:
    gpus, why = from_nvml()
    notes = [why] if why else []
    if not gpus:
        gpus, why2 = from_nvidia_smi()
        if why2:
            notes.append(why2)
        elif gpus:
            notes.append("GPUs read from nvidia-smi (NVML unavailable)")
    return gpus, notes


def has_bf16(gpu: GPU) -> bool:
    return bf16_for(gpu.compute_capability) if gpu.compute_capability else gpu.bf16


def no_bf16_finding(gpu: GPU) -> str | None:
    if has_bf16(gpu):
        return None
    return (f"(compute capability {gpu.compute_capability}) has no bf16: training uses fp16; FlashAttention 2 needs "
            "compute capability 8.0+")


VENDOR = Vendor(
    name="nvidia", label="NVIDIA", runtime="CUDA", torch_build_key="torch_cuda", torch_version_attr="cuda", torch_index_tag="cu128",
    torch_index_note="pick the cuXYZ tag your driver supports: nvidia-smi shows its CUDA version",
    bnb_lib_kind="cuda", bnb_major_digits=2, smi="nvidia-smi", probe=probe,
    has_bf16=has_bf16, bf16_detail=lambda gpu: None, no_bf16_finding=no_bf16_finding,
    flash_attn_wheels=True, no_flash_attn_reason="",
    lora_kernels=True, lora_kernels_reason="fused Triton LoRA kernels on CUDA",
    bitsandbytes=lambda hw: None,
    pci_order_env=("CUDA_DEVICE_ORDER", "PCI_BUS_ID"),   # CUDA's default numbers the fastest GPU first
)
