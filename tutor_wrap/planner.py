"""Recipe + Hardware -> Plan: the training knobs, each with the reason it was chosen.

This first planner decides from the accelerator and the recipe; it does not yet search over a memory model
(see the issue on the planner). Every choice carries a reason so `plan` can explain itself.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from importlib.util import find_spec

from tutor_wrap.hardware import Hardware
from tutor_wrap.recipe import Recipe


@dataclass(frozen=True)
class Choice:
    knob: str
    value: object
    reason: str


@dataclass
class Plan:
    accelerator: str
    method: str
    dtype: str                      # "fp32" | "fp16" | "bf16"
    micro_batch_size: int
    gradient_accumulation_steps: int
    gradient_checkpointing: bool
    optimizer: str
    attention: str                  # "sdpa" | "flash" | "eager"
    sample_packing: bool
    sequence_len: int
    lora_kernels: bool
    num_processes: int = 1
    choices: list[Choice] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _has(module: str) -> bool:
    # find_spec reads metadata on disk; importing flash_attn would pull in torch and take seconds.
    try:
        return find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def make_plan(recipe: Recipe, hw: Hardware) -> Plan:
    t = recipe.train
    choices: list[Choice] = []

    def choose(knob: str, value, reason: str):
        choices.append(Choice(knob, value, reason))
        return value

    on_gpu = bool(hw.gpus)
    accel = hw.accelerator
    choose("accelerator", accel, f"probe found {len(hw.gpus)} GPU(s)" if on_gpu else "no GPU found: training runs on the CPU")

    method = recipe.method
    if not on_gpu and method in ("qlora", "lora8bit"):
        method = choose("method", "lora", f"{recipe.method} needs bitsandbytes on a GPU; on the CPU plain LoRA is used")
    else:
        choose("method", method, "as the recipe asks")

    if not on_gpu:
        dtype = choose("dtype", "fp32", "CPU: fp16 matmuls fall to a naive kernel (about 20x slower), bf16 is emulated")
    elif all(g.bf16 for g in hw.gpus):
        dtype = choose("dtype", "bf16", "every GPU supports bf16 (compute capability >= 8.0 or a CDNA/RDNA3 part)")
    else:
        dtype = choose("dtype", "fp16", "GPU lacks bf16; fp16 with loss scaling")

    micro = t.micro_batch_size or (min(t.batch_size, 4) if not on_gpu else min(t.batch_size, 2))
    micro = choose("micro_batch_size", micro, "as the recipe asks" if t.micro_batch_size else
                   "default for this accelerator until the memory model sizes it")
    accum = max(1, t.batch_size // micro)
    choose("gradient_accumulation_steps", accum, f"keeps the effective batch at {micro * accum} (recipe batch_size {t.batch_size})")

    ckpt = choose("gradient_checkpointing", on_gpu,
                  "trades compute for activation memory on the GPU" if on_gpu else "CPU RAM is plentiful for this model; recomputation would only slow it")
    if not on_gpu:
        opt = choose("optimizer", "adamw_torch", "8-bit optimizers need bitsandbytes on a GPU")
    elif method in ("lora", "qlora", "lora8bit"):
        opt = choose("optimizer", "adamw_bnb_8bit", "8-bit Adam states: a quarter of the optimizer memory, same quality for adapters")
    else:
        opt = choose("optimizer", "adamw_torch", "full fine-tune with the standard optimizer")

    if on_gpu and accel == "nvidia" and _has("flash_attn"):
        attn = choose("attention", "flash", "flash-attn is installed for this GPU")
    else:
        attn = choose("attention", "sdpa", "PyTorch's SDPA: no extra package" + ("" if on_gpu else "; the CPU has no flash attention"))
    packing = choose("sample_packing", on_gpu,
                     "packs short rows into full sequences; Axolotl keeps rows apart with varlen attention or a "
                     "block-diagonal mask" if on_gpu else
                     "off on the CPU: the packed-row attention paths (flash/varlen kernels) are built for GPUs")
    kernels = choose("lora_kernels", on_gpu and accel == "nvidia",
                     "Axolotl's Triton LoRA kernels need CUDA" if not (on_gpu and accel == "nvidia") else "fused LoRA kernels on CUDA")
    choose("sequence_len", t.sequence_len, "as the recipe asks; rows longer than this are dropped (checked before launch)")
    return Plan(
        accelerator=accel, method=method, dtype=dtype, micro_batch_size=micro, gradient_accumulation_steps=accum,
        gradient_checkpointing=ckpt, optimizer=opt, attention=attn, sample_packing=packing,
        sequence_len=t.sequence_len, lora_kernels=kernels, num_processes=max(1, len(hw.gpus)), choices=choices,
    )
