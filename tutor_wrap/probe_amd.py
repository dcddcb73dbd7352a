"""AMD GPUs: the amdsmi Python library when ROCm ships it, else `rocm-smi --json` (only if the binary exists).

Both are optional: a machine without ROCm costs one failed import and one PATH lookup, nothing more.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

from tutor_wrap.hardware import GPU

ROCM_SMI_ARGS = ["--showproductname", "--showmeminfo", "vram", "--json"]


def bf16_for(gfx: str | None) -> bool:
    """Matrix-core bf16: CDNA1+ (gfx908, gfx90a, gfx94x, gfx95x) and RDNA3+ (gfx11xx, gfx12xx).

    RDNA2 (gfx103x) and older emulate it slowly, so they get fp16 like pre-Ampere NVIDIA cards.
    """
    g = (gfx or "").lower()
    return g in ("gfx908", "gfx90a") or g.startswith(("gfx94", "gfx95", "gfx11", "gfx12"))


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
