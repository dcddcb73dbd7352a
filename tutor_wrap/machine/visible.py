"""Which of the probed GPUs the trainer will see: CUDA_VISIBLE_DEVICES and ROCm's ROCR_/HIP_VISIBLE_DEVICES.

NVML and rocm-smi list every GPU the driver has; torch, and so Axolotl, sees only those the environment lets
through, and the trainer inherits this environment. A plan made from the driver's list would be a GPU plan for a
person who set CUDA_VISIBLE_DEVICES="" to train on the CPU (the trainer then finds no GPU), or a 2-GPU plan for one
who picked one of two cards.

The list is read as torch.cuda reads it: the first entry decides between indices and UUIDs ("GPU-4b2c...", a unique
prefix is enough, case as written); the list ends at the first entry of the other kind or that names no GPU ("-1",
"", an index past the end); a GPU named twice anywhere leaves none visible. A MIG slice ("MIG-...") gives at most one
device. On ROCm, ROCR_VISIBLE_DEVICES picks first and HIP_VISIBLE_DEVICES (or, unset, CUDA_VISIBLE_DEVICES) picks
from what it left; the HIP runtime takes an empty HIP_/CUDA_VISIBLE_DEVICES as unset.
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

from tutor_wrap.machine.hardware import GPU


def _index(entry: str) -> int:
    """strtoul-style, as CUDA parses each entry: the leading digits ("1gpu" is 1); -1 when there are none."""
    m = re.match(r"\+?(\d+)", entry)
    return int(m.group(1)) if m else -1


def _entries(spec: str) -> list[int] | list[str]:
    """The entries of a *_VISIBLE_DEVICES value up to where the runtime stops reading; [] for a repeated entry."""
    if spec.startswith(("GPU-", "MIG-")):
        prefix, ids = spec[:4], []
        for elem in spec.split(","):
            if not elem.startswith(prefix):
                break
            if elem in ids:
                return []
            ids.append(elem)
        return ids
    nums: list[int] = []
    for elem in spec.split(","):
        n = _index(elem.strip())
        if n in nums:
            return []
        if n < 0:
            break
        nums.append(n)
    return nums


def select(gpus: Sequence[GPU], spec: str) -> tuple[list[GPU], str | None]:
    """The GPUs `spec` lets through, in its order, and a note when it could not be read exactly."""
    entries = _entries(spec)
    if spec.startswith("MIG-"):
        n = min(1, len(entries), len(gpus))
        return list(gpus[:n]), (f"{spec!r} names MIG slices, which are not probed: assumed {n} device with the memory "
                                "of a whole GPU (plan a slice with --hardware FILE)")
    if spec.startswith("GPU-"):
        if any(g.uuid is None for g in gpus):
            # Some sources report no UUIDs (rocm-smi, an old nvidia-smi): count the entries instead, and say so.
            n = min(len(entries), len(gpus))
            return list(gpus[:n]), f"the GPU source reported no UUIDs to match {spec!r} with: assumed the first {n}"
        chosen: list[int] = []
        for uuid in entries:
            hits = [i for i, g in enumerate(gpus) if g.uuid.startswith(uuid)]
            if len(hits) > 1:
                return [], f"{uuid!r} matches {len(hits)} GPUs, which leaves none visible"
            if not hits:
                break
            if hits[0] in chosen:
                return [], f"{spec!r} names a GPU twice, which leaves none visible"
            chosen.append(hits[0])
        return [gpus[i] for i in chosen], None
    picked: list[GPU] = []
    for i in entries:
        if i >= len(gpus):
            break
        picked.append(gpus[i])
    return picked, None


def visible(gpus: Sequence[GPU], stages: Sequence[Sequence[str]], env: Mapping[str, str], *,
            empty_is_unset: Sequence[str] = (), pci_order: tuple[str, str] | None = None) -> tuple[list[GPU], list[str]]:
    """Apply each stage's variable (the first of its names that is set) to what the stage before left.

    `empty_is_unset`: variables whose runtime reads an empty value as unset. `pci_order`: (variable, value) that
    makes the runtime number GPUs in the probe's PCI order; without it, GPUs of different models may be numbered
    otherwise (CUDA puts the fastest first), which the notes say.
    Returns the GPUs the trainer will see and notes for preflight on what was hidden and why.
    """
    def is_set(name: str) -> bool:
        return name in env and not (env[name] == "" and name in empty_is_unset)

    left, notes, used = list(gpus), [], []
    for names in stages:
        name = next((n for n in names if is_set(n)), None)
        if name is None:
            continue
        used.append(name)
        before = len(left)
        left, why = select(left, env[name])
        if why:
            notes.append(f"{name}: {why}")
        if len(left) < before:
            notes.append(f"{name}={env[name]!r} hides {before - len(left)} of {before} GPU(s)"
                         + ("" if left else ": planning for the CPU"))
    if pci_order and used and env.get(pci_order[0]) != pci_order[1] and len({g.name for g in gpus}) > 1:
        notes.append(f"GPUs of different models: indices here follow the PCI order; set {pci_order[0]}="
                     f"{pci_order[1]} so the runtime numbers them the same way")
    return left, notes
