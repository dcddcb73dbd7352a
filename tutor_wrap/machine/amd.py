"""AMD GPUs: the amdsmi Python library when ROCm ships it, else `rocm-smi --json` (only if the binary exists).

Both are optional: a machine without ROCm costs one failed import and one PATH lookup, nothing more.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

from tutor_wrap.core.versions import version_tuple
from tutor_wrap.machine.hardware import GPU, Hardware
from tutor_wrap.machine.vendor import Bitsandbytes, Vendor

ROCM_SMI_ARGS = ["--showproductname", "--showmeminfo", "vram", "--json"]


# bf16 matrix ops by gfx target prefix: CDNA (MFMA) from MI100, RDNA3 and later (WMMA). RDNA2 (gfx103x) and Vega
# (gfx906) have none and emulate bf16 slowly, so they get fp16 like pre-Ampere NVIDIA cards.
BF16_FAMILIES = (("gfx908", "MI100, CDNA1"), ("gfx90a", "MI200, CDNA2"), ("gfx94", "MI300, CDNA3"),
                 ("gfx95", "MI350, CDNA4"), ("gfx110", "RX 7000, RDNA3"), ("gfx115", "RDNA3.5"),
                 ("gfx120", "RX 9000, RDNA4"))


def bf16_family(gfx: str | None) -> str | None:
    g = (gfx or "").lower()
    return next((name for prefix, name in BF16_FAMILIES if g.startswith(prefix)), None)


def bf16_for(gfx: str | None) -> bool:
    return bf16_family(gfx) is not None


def _get(rec: dict, *names: str) -> str | None:
    """rocm-smi changed key capitalisation across releases ("Card series" -> "Card Series"): match loosely."""
    low = {k.lower(): v for k, v in rec.items()}
    for n in names:
        v = low.get(n.lower())
        if v not in (None, "", "N/A"):
            return str(v)
    return None


def parse_rocm_smi_json(text: str) -> list[GPU]:
    """`rocm-smi --showproductname --showmeminfo vram --json`: {"card0": {...}, ...} (plus a "system" key)."""
    start = text.find("{")  # rocm-smi may print warnings before the JSON
    if start < 0:
        return []
    data = json.loads(text[start:])
    gpus = []
    for card, rec in sorted(data.items(), key=lambda kv: kv[0]):
        if not card.startswith("card") or not isinstance(rec, dict):
            continue
        total = _get(rec, "VRAM Total Memory (B)")
        used = _get(rec, "VRAM Total Used Memory (B)")
        gfx = _get(rec, "GFX Version")
        name = _get(rec, "Card Series", "Device Name", "Card Model") or card
        total_b = int(total) if total and total.isdigit() else 0
        free_b = total_b - int(used) if total_b and used and used.isdigit() else None
        gpus.append(GPU("amd", name, total_b, free_b, None, bf16=bf16_for(gfx), gfx_target=gfx))
    return gpus


def from_amdsmi() -> tuple[list[GPU], str | None]:
    try:
        import amdsmi  # ships with ROCm 6+ (python3 -m pip install /opt/rocm/share/amd_smi)
    except Exception as exc:  # ImportError, or the library failing to load libamd_smi.so
        return [], f"amdsmi: {type(exc).__name__}"
    try:
        amdsmi.amdsmi_init()
    except Exception as exc:
        return [], f"amdsmi init: {exc}"
    gpus = []
    try:
        for h in amdsmi.amdsmi_get_processor_handles():
            asic = amdsmi.amdsmi_get_gpu_asic_info(h)
            vram = amdsmi.amdsmi_get_gpu_vram_usage(h)  # documented in MB (amdsmi_vram_usage_t)
            total = int(vram["vram_total"]) * 1024**2
            free = total - int(vram["vram_used"]) * 1024**2
            gfx = str(asic.get("target_graphics_version") or "") or None
            gpus.append(GPU("amd", str(asic.get("market_name") or "AMD GPU"), total, free, None,
                            bf16=bf16_for(gfx), gfx_target=gfx))
    except Exception as exc:
        return gpus, f"amdsmi: {exc}"
    finally:
        try:
            amdsmi.amdsmi_shut_down()
        except Exception:
            pass
    return gpus, None


def from_rocm_smi(timeout: float = 10.0) -> tuple[list[GPU], str | None]:
    exe = shutil.which("rocm-smi")
    if exe is None:
        return [], "rocm-smi not on PATH"
    try:
        proc = subprocess.run([exe, *ROCM_SMI_ARGS], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return [], f"rocm-smi: {exc}"
    if proc.returncode != 0:
        return [], f"rocm-smi exit {proc.returncode}: {(proc.stdout + proc.stderr).strip()[:200]}"
    try:
        return parse_rocm_smi_json(proc.stdout), None
    except ValueError as exc:
        return [], f"rocm-smi JSON: {exc}"


def has_amd_device() -> bool:
    """/dev/kfd exists only with the amdgpu kernel driver: skip the ROCm probes entirely without it."""
    return os.path.exists("/dev/kfd")


def probe() -> tuple[list[GPU], list[str]]:
    if not has_amd_device() and shutil.which("rocm-smi") is None:
        return [], []
    gpus, why = from_amdsmi()
    notes = [why] if why else []
    if not gpus:
        gpus, why2 = from_rocm_smi()
        if why2:
            notes.append(why2)
    return gpus, [n for n in notes if n and not re.match(r"^amdsmi: (ModuleNotFoundError|ImportError)$", n)]


def has_bf16(gpu: GPU) -> bool:
    return bf16_for(gpu.gfx_target) if gpu.gfx_target else gpu.bf16


def bf16_detail(gpu: GPU) -> str | None:
    if not gpu.gfx_target:
        return None
    gfx = gpu.gfx_target.lower()
    family = bf16_family(gfx)
    return f"{gfx} ({family}) has bf16 matrix ops" if family else f"{gfx} has no bf16 matrix ops"


def no_bf16_finding(gpu: GPU) -> str | None:
    return None if has_bf16(gpu) else f"({gpu.gfx_target or 'unknown gfx target'}) has no bf16 matrix ops: training uses fp16"


# bitsandbytes: ROCm binaries on PyPI since 0.49.0 (8-bit optimizers work); the complete ROCm 4-bit path (CDNA
# warp-64 GEMV fix, RDNA3/4 kernels) since 0.50.0 -- older 4-bit gives NaNs on AMD.
BNB_ROCM_MIN = (0, 49, 0)
BNB_ROCM_4BIT_MIN = (0, 50, 0)
BNB_PINNED = "0.50.2"       # pyproject.toml's pin: what a profile's machine is assumed to run


def bitsandbytes(hw: Hardware) -> Bitsandbytes:
    """8-bit optimizers and 4-bit NF4 on ROCm by the installed (or, for a profile, the pinned) bitsandbytes."""
    if hw.source == "probe" or "bitsandbytes" in hw.packages:
        v = hw.packages.get("bitsandbytes")
        where = f"bitsandbytes {v} installed" if v else "bitsandbytes is not installed"
    else:
        v = BNB_PINNED
        where = f"profile: assuming the pinned bitsandbytes {v}"
    t = version_tuple(v)
    eight = t is not None and t >= BNB_ROCM_MIN
    four = t is not None and t >= BNB_ROCM_4BIT_MIN
    if four:
        why = f"{where}: ROCm 4-bit NF4 and 8-bit optimizers work from 0.50.0 (ROCm wheels on PyPI since 0.49.0)"
    elif eight:
        why = f"{where}: ROCm 8-bit optimizers work (wheels since 0.49.0) but 4-bit needs 0.50.0 (NaNs before)"
    else:
        why = f"{where}: ROCm builds of bitsandbytes are on PyPI only from 0.49.0: no 4-bit, no 8-bit optimizer"
    return Bitsandbytes(eight, four, why)


VENDOR = Vendor(
    name="amd", label="AMD", runtime="ROCm", torch_build_key="torch_hip", torch_version_attr="hip", torch_index_tag="rocm6.4",
    torch_index_note="pick the rocmX.Y tag matching your ROCm install",
    bnb_lib_kind="rocm", bnb_major_digits=1, smi="rocm-smi", probe=probe,
    has_bf16=has_bf16, bf16_detail=bf16_detail, no_bf16_finding=no_bf16_finding,
    flash_attn_wheels=False,
    no_flash_attn_reason="flash-attn is usually absent on ROCm (no ROCm wheels on PyPI; source builds only): PyTorch "
                         "SDPA, which has its own flash/memory-efficient kernels on ROCm",
    lora_kernels=False,
    lora_kernels_reason="Axolotl's fused LoRA kernels (Triton, plus direct calls into bitsandbytes' CUDA dequantize) "
                        "are built and tested for CUDA: off on ROCm",
    bitsandbytes=bitsandbytes, qlora_hint=" (on ROCm qlora needs bitsandbytes >= 0.50)",
    # ROCr picks first; HIP (which also honours CUDA_VISIBLE_DEVICES) picks from what ROCr left
    visible_env=(("ROCR_VISIBLE_DEVICES",), ("HIP_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES")),
    visible_empty_is_unset=("HIP_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES"),
    # the HIP runtime reads "" as unset: an invalid index hides them
    hide_all_env=("HIP_VISIBLE_DEVICES", "-1"),
)
