"""What tutor_wrap knows about one GPU vendor, in one record.

Each vendor module (nvidia.py, amd.py) builds one `Vendor`; vendors.py lists them. The probe, the stack checks,
preflight and the planner ask the record instead of switching on "nvidia"/"amd", so a new vendor is one module
plus one line in vendors.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from tutor_wrap.machine.hardware import GPU, Hardware


@dataclass(frozen=True)
class Bitsandbytes:
    """Whether bitsandbytes' 8-bit optimizers and 4-bit NF4 weights work on this vendor's GPUs, and why."""

    eight_bit: bool
    four_bit: bool
    reason: str


@dataclass(frozen=True)
class Vendor:
    name: str                      # GPU.vendor and Hardware.accelerator: "nvidia" | "amd"
    label: str                     # "NVIDIA"
    runtime: str                   # the GPU runtime torch is built for: "CUDA" | "ROCm"
    torch_build_key: str           # software.collect()'s key for that build's version: "torch_cuda" | "torch_hip"
    torch_version_attr: str        # the torch/version.py variable holding it: "cuda" | "hip"
    torch_index_tag: str           # the PyTorch wheel index for the fix command: "cu128" | "rocm6.4"
    torch_index_note: str          # how to pick the right tag
    bnb_lib_kind: str              # bitsandbytes' backend library name: libbitsandbytes_<kind><digits>.so
    bnb_major_digits: int          # how many of those digits are the runtime's major version (cuda121: 2, rocm64: 1)
    smi: str                       # the tool that lists what holds the GPU
    probe: Callable[[], tuple[list["GPU"], list[str]]]   # (GPUs, notes on sources that were skipped)
    has_bf16: Callable[["GPU"], bool]
    bf16_detail: Callable[["GPU"], str | None]            # the fact behind has_bf16, for the plan's reason
    no_bf16_finding: Callable[["GPU"], str | None]        # what preflight says about a GPU without bf16
    flash_attn_wheels: bool        # prebuilt flash-attn wheels exist for this runtime
    no_flash_attn_reason: str      # the attention reason when they do not
    lora_kernels: bool             # Axolotl's fused Triton LoRA kernels run here
    lora_kernels_reason: str
    # None: no constraint beyond the installed bitsandbytes having a backend (the stack check says so)
    bitsandbytes: Callable[["Hardware"], Bitsandbytes | None]
    # The variables that choose which GPUs the runtime shows, in the order they apply; each stage is the first of
    # its names that is set (machine/visible.py)
    visible_env: tuple[tuple[str, ...], ...] = (("CUDA_VISIBLE_DEVICES",),)
    visible_empty_is_unset: tuple[str, ...] = ()        # of those, the ones whose runtime reads "" as unset
    pci_order_env: tuple[str, str] | None = None       # (variable, value) that numbers GPUs in PCI order
    # (variable, value) that hides every GPU from this runtime, for a process that must run on the CPU
    hide_all_env: tuple[str, str] = ("CUDA_VISIBLE_DEVICES", "")
    qlora_hint: str = ""           # added to "no plan fits" when 4-bit is unavailable on this vendor
