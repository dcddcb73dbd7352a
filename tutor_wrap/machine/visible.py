"""Which of the probed GPUs the trainer will see: CUDA_VISIBLE_DEVICES and ROCm's ROCR_/HIP_VISIBLE_DEVICES.

NVML and rocm-smi list every GPU the driver has; torch, and so Axolotl, sees only those the environment lets
through, and the trainer inherits this environment. A plan made from the driver's list would be a GPU plan for a
person who set CUDA_VISIBLE_DEVICES="" to train on the CPU (the trainer then finds no GPU), or a 2-GPU plan for one
who picked one of two cards.

The rules are the CUDA runtime's (torch.cuda reads them the same way): a comma-separated list of indices or UUIDs
("GPU-4b2c...", a unique prefix is enough); the list ends at the first entry that names no GPU ("-1", "", an index
past the end); a GPU named twice leaves none visible. On ROCm, ROCR_VISIBLE_DEVICES picks first and
HIP_VISIBLE_DEVICES (or, unset, CUDA_VISIBLE_DEVICES) picks from what it left.
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

from tutor_wrap.machine.hardware import GPU


def _index(entry: str) -> int:
    """strtoul-style, as CUDA parses each entry: the leading digits ("1gpu" is 1); -1 when there are none."""
    m = re.match(r"\+?(\d+)", entry)
    return int(m.group(1)) if m else -1


def select(gpus: Sequence[GPU], spec: str) -> tuple[list[GPU], str | None]:
    """The GPUs `spec` lets through, in its order, and a note when it could not be read exactly."""
    entries = [e.strip() for e in spec.split(",")]
    chosen: list[int] = []
    for entry in entries:
        if entry.upper().startswith(("GPU-", "MIG-")):
            hits = [i for i, g in enumerate(gpus) if g.uuid and g.uuid.lower().startswith(entry.lower())]
            if len(hits) != 1:
                if entry.upper().startswith("MIG-") or any(g.uuid is None for g in gpus):
                    # MIG slices are not probed, and some sources report no UUIDs (rocm-smi, an old nvidia-smi):
                    # count the entries instead, and say so.
                    n = len([e for e in entries if e])
                    return list(gpus[:n]), (f"could not match the UUIDs in {spec!r} with the probed GPUs; assumed "
                                            f"the first {n} (a MIG slice has less memory than its GPU: plan with "
                                            "--hardware FILE for it)")
                break
            i = hits[0]
        else:
            i = _index(entry)
            if i < 0 or i >= len(gpus):
                break
        if i in chosen:
            return [], f"{spec!r} names a GPU twice, which leaves none visible"
        chosen.append(i)
    return [gpus[i] for i in chosen], None


def visible(gpus: Sequence[GPU], stages: Sequence[Sequence[str]], env: Mapping[str, str]) -> tuple[list[GPU], list[str]]:
    """Apply each stage's variable (the first of its names that is set) to what the stage before left.

    Returns the GPUs the trainer will see and notes for preflight on what was hidden and why.
    """
    left, notes = list(gpus), []
    for names in stages:
        name = next((n for n in names if n in env), None)
        if name is None:
            continue
        before = len(left)
        left, why = select(left, env[name])
        if why:
            notes.append(f"{name}: {why}")
        if len(left) < before:
            notes.append(f"{name}={env[name]!r} hides {before - len(left)} of {before} GPU(s)"
                         + ("" if left else ": planning for the CPU"))
    if len({g.name for g in gpus}) > 1 and env.get("CUDA_DEVICE_ORDER") != "PCI_BUS_ID" \
            and any(n in env for names in stages for n in names):
        # CUDA numbers GPUs fastest first, NVML and rocm-smi in PCI order: the same only for identical cards.
        notes.append("GPUs of different models: indices here follow the PCI order; set CUDA_DEVICE_ORDER=PCI_BUS_ID so "
                     "CUDA numbers them the same way")
    return left, notes
