"""What the merge and the export need before they start: RAM (with swap, under WSL's caps) and disk, and the
remedy when it is not there. preflight shows these verdicts before training; the merge and export stages check
the same numbers again on the real files, before they write anything."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from tutor_wrap.core.errors import TutorWrapError
from tutor_wrap.core.units import GIB
from tutor_wrap.machine.hardware import Hardware
from tutor_wrap.machine.host import WSL_DEFAULT_MEMORY_FRACTION, wsl_limits
from tutor_wrap.models.files import param_stats, weight_files
from tutor_wrap.models.quant import quant_type
from tutor_wrap.planning import calibration


def wslconfig_lines(memory_gib: int, swap_gib: int) -> str:
    return (f"%UserProfile%\\.wslconfig:\n  [wsl2]\n  memory={memory_gib}GB\n  swap={swap_gib}GB\n"
            "then run `wsl --shutdown` in Windows and reopen the WSL terminal")


def wsl_raise(hw: Hardware, wsl: dict | None, extra_bytes: int = 0) -> str:
    """.wslconfig lines that grant `extra_bytes` more RAM+swap than WSL grants now. Memory goes up to the Windows
    RAM minus 4 GiB for Windows itself (when that RAM can be estimated); the rest of the need goes to swap."""
    if wsl is None:  # a profile: assume WSL's default cap (half the Windows RAM)
        wsl = {"windows_ram_estimate_bytes": int(hw.ram_total_bytes / WSL_DEFAULT_MEMORY_FRACTION)}
    host = wsl.get("windows_ram_estimate_bytes")
    mem = math.ceil(hw.ram_total_bytes / GIB)
    if host:
        # MemTotal sits a little under the VM's size, so the estimate rounds up to whole GiB
        mem = max(mem, math.ceil(host / GIB) - 4)
    gained = max(0, mem * GIB - hw.ram_total_bytes)
    swap = math.ceil((hw.swap_total_bytes + max(0, extra_bytes - gained)) / GIB) + 2
    swap = max(swap, math.ceil((host or hw.ram_total_bytes * 2) / GIB))  # the seed's fix: swap = Windows RAM
    return wslconfig_lines(mem, swap)


def ram_remedy(hw: Hardware, deficit: int) -> str:
    """Swap for Linux; the .wslconfig lines under WSL (its memory and swap caps are set from Windows)."""
    if hw.wsl:
        return "raise WSL's memory/swap in " + wsl_raise(hw, wsl_limits(hw), deficit)
    gib = math.ceil(deficit / GIB) + 2
    return f"add {gib} GiB of swap: sudo bash tools/make_swapfile.sh {gib}G"


# ---------------------------------------------------------------------------------------------------- merge


@dataclass(frozen=True)
class MergeBudget:
    method: str
    predicted_peak_rss_bytes: int
    disk_needed_bytes: int
    ram_swap_available_bytes: int
    disk_free_bytes: int
    runtime_bytes: int = 0           # the runtime floor in the prediction: published, or measured on this machine
    model_part_bytes: int = 0        # the part that scales with the model, by the published factors
    factor: float = 1.0              # on that part: 1, or what this machine's merges measured
    basis: str = "the published constants (bench/merge_bench.py)"

    @property
    def fits(self) -> bool:
        return self.predicted_peak_rss_bytes <= self.ram_swap_available_bytes and self.disk_needed_bytes <= self.disk_free_bytes


# Calibrated with bench/merge_bench.py (bench/README.md "Merge benchmark"); see predict_sizes.
RUNTIME_BYTES = int(0.75 * GIB)    # `axolotl merge-lora` of the 7 MB test model: 0.75-0.76 GiB peak RSS, either method
EFFICIENT_TOTAL_FACTOR = 0.0       # memory_efficient: nothing scales with the whole model ...
EFFICIENT_SHARD_FACTOR = 3.0       # ... the shard being merged, 2-3.4x (see predict_sizes)
LEGACY_TOTAL_FACTOR = 1.08         # legacy: the whole model in its own dtype, +8%
LEGACY_SHARD_FACTOR = 1.0          # ... plus save_pretrained's staging of one shard
ADAPTER_FACTOR = 1.0               # the adapter state dict, loaded whole


def predict(model_dir: Path, adapter_dir: Path, hw: Hardware, method: str) -> MergeBudget:
    """Peak host RAM of a merge method, from the real shard sizes on disk."""
    shards = [p.stat().st_size for p in weight_files(model_dir)]
    adapter = sum(p.stat().st_size for p in adapter_dir.glob("adapter_model.safetensors"))
    return predict_sizes(shards, adapter, hw, method)


def predict_sizes(shards: list[int], adapter: int, hw: Hardware, method: str) -> MergeBudget:
    """Peak host RAM (RSS) of each merge method from shard sizes; disk = the merged model (the base's size).

    Both methods: runtime + a x all shards + b x largest shard + adapter, fitted to the peak RSS that
    bench/merge_bench.py measured on synthetic bf16 Llamas (1.6 GB in 6 x 300 MB and in 3 x 600 MB shards,
    0.98 GB in 4 x 290 MB; two runs each, bench/README.md "Merge benchmark"):
    memory_efficient: a = 0, b = 3.0. Axolotl reads one shard through a memory map, copies its tensors and
    builds the merged copies before writing; the measured peak was 2.1-3.4 x the largest shard above the
    runtime, varying between identical runs by up to 23% (the mapped file pages count in RSS only while the
    kernel keeps them; other jobs ran on the machine). b = 3.0 sits at the top of that range: a refusal should
    not be wrong the other way. So the peak follows the *largest shard*, not the model: 16 GB in 5 GB shards
    needs ~14.8 GiB, in 2 GB shards ~6.4 GiB.
    legacy: a = 1.08, b = 1.0 (repeatable to 1%): the whole model (merge() pins the load dtype to the base's
    own, so bytes in memory = bytes on disk) plus one shard of save_pretrained staging.
    runtime = 0.75 GiB: the peak of merging the 7 MB test model (the imports, either method).
    """
    total, part = sum(shards), scaled_bytes(shards, adapter, method)
    runtime, factor, basis = RUNTIME_BYTES, 1.0, MergeBudget.basis
    if fit := calibration.fit(hw, "merge", RUNTIME_BYTES, method=method):
        runtime, factor, basis = fit.runtime_bytes, fit.factor, fit.basis
    peak = int(runtime + factor * part)
    usable = hw.ram_available_bytes + hw.swap_free_bytes
    return MergeBudget(method, peak, total, usable, hw.disk_free_bytes, runtime, part, factor, basis)


def scaled_bytes(shards: list[int], adapter: int, method: str) -> int:
    """The part of the merge's peak that scales with the model: all of it but the runtime floor."""
    total, largest = sum(shards), (max(shards) if shards else 0)
    if method == "legacy":
        part = LEGACY_TOTAL_FACTOR * total + LEGACY_SHARD_FACTOR * largest
    else:
        part = EFFICIENT_TOTAL_FACTOR * total + EFFICIENT_SHARD_FACTOR * largest
    return int(part + ADAPTER_FACTOR * adapter)


def refusal(b: MergeBudget, hw: Hardware, other: MergeBudget | None = None) -> TutorWrapError:
    need_ram = max(0, b.predicted_peak_rss_bytes - b.ram_swap_available_bytes)
    need_disk = max(0, b.disk_needed_bytes - b.disk_free_bytes)
    remedy = []
    if need_ram:
        if other is not None and other.fits:
            remedy.append(f"use --method {other.method} (predicted peak {other.predicted_peak_rss_bytes / GIB:.1f} GiB)")
        remedy.append(ram_remedy(hw, need_ram) + " (then run the merge again)")
    if need_disk:
        remedy.append(f"free {math.ceil(need_disk / GIB * 10) / 10:.1f} GiB of disk where the output goes "
                      f"(or write it to a bigger disk)")
    short = []
    if need_ram:
        short.append(f"RAM+swap short by {need_ram / GIB:.1f} GiB")
    if need_disk:
        short.append(f"disk short by {need_disk / GIB:.1f} GiB")
    return TutorWrapError(
        f"merge ({b.method}) needs {b.predicted_peak_rss_bytes / GIB:.1f} GiB of RAM+swap (predicted peak RSS) and "
        f"{b.disk_needed_bytes / GIB:.1f} GiB of disk; this machine{'' if hw.source == 'probe' else f' (profile {hw.source})'} "
        f"has {hw.ram_available_bytes / GIB:.1f} GiB RAM + {hw.swap_free_bytes / GIB:.1f} GiB swap free"
        f"{' (WSL caps)' if hw.wsl else ''} and {b.disk_free_bytes / GIB:.1f} GiB of disk: {', '.join(short)}. "
        f"Nothing was written.",
        hint="; ".join(remedy),
    )


def choose_method(model_dir: Path, adapter_dir: Path, hw: Hardware, requested: str = "auto") -> MergeBudget:
    """The method to run and its budget, or a TutorWrapError (with numbers and the remedy) if it cannot fit."""
    if not weight_files(model_dir):
        raise TutorWrapError(f"merge: no *.safetensors weights in {model_dir}",
                             hint="the merge reads safetensors only; convert the base model first")
    # auto = memory_efficient: it needs far less RAM and is Axolotl's default; legacy never fits where it doesn't.
    method = "memory_efficient" if requested == "auto" else requested
    b = predict(model_dir, adapter_dir, hw, method)
    if not b.fits:
        other = predict(model_dir, adapter_dir, hw, "memory_efficient") if method == "legacy" else None
        raise refusal(b, hw, other)
    return b


# --------------------------------------------------------------------------------------------------- export


def disk_needed(weights_bytes: int, src_bytes: int, quant_types: list[str]) -> tuple[int, int]:
    """(f16 GGUF bytes, bytes for the f16 plus every quant): the estimate both export and preflight check."""
    f16 = int(weights_bytes * 2 / src_bytes)
    return f16, int(f16 * (1 + sum(quant_type(q).size_ratio for q in quant_types)))


# The HF greedy reference export compares the f16 GGUF with: the merged model in fp32 (torch + transformers
# imported, about 0.8 GiB measured for the merge verification's process) and its largest shard while loading.
HF_REFERENCE_RUNTIME_BYTES = 1 * GIB


def hf_reference_need(params: int, largest_shard: int) -> int:
    return HF_REFERENCE_RUNTIME_BYTES + 4 * params + largest_shard


def hf_reference_need_of(model_dir: Path) -> tuple[int, int]:
    """(RAM the fp32 HF reference of a model folder needs, bytes of its weights on disk)."""
    sizes = [p.stat().st_size for p in weight_files(model_dir)]
    return hf_reference_need(param_stats(model_dir)["params"], max(sizes, default=0)), sum(sizes)


def hf_reference_mode(need: int, source_bytes: int, available: int) -> tuple[str, str]:
    """("beside", why): run it beside the conversion (which holds at most the source weights); ("after", why):
    only after it; ("skip", why): not at all, it would not fit the RAM available."""
    if need > available:
        return "skip", (f"skipped: the fp32 HF model needs about {need / GIB:.1f} GiB of RAM, {available / GIB:.1f} GiB "
                        "available")
    if need + source_bytes > available:
        return "after", (f"after the conversion: {need / GIB:.1f} GiB for the fp32 model and up to "
                         f"{source_bytes / GIB:.1f} GiB for the converter do not fit {available / GIB:.1f} GiB together")
    return "beside", "beside the conversion"


# llama-server's peak RSS beside the GGUF it maps (every weight is read for the first token, so the whole file ends
# up resident) and its KV cache: the binary, the tokenizer and the compute buffers it touches. Measured here on the
# demo's GGUFs at a 384-token context (2026-12-04): file + 50-57 MiB (Q4_K_M 101 MiB -> 158, F16 258 -> 308).
SERVE_RUNTIME_BYTES = 64 * 2**20


def gguf_kv(gguf: Path, tokens: int) -> tuple[int, int]:
    """(the model's layers, the bytes of an f16 KV cache for `tokens` tokens), from the GGUF's header."""
    from tutor_wrap.models.gguf_file import read_gguf_header

    f = read_gguf_header(gguf).fields
    arch = f.get("general.architecture", "llama")
    layers = int(f.get(f"{arch}.block_count") or 0)
    heads = int(f.get(f"{arch}.attention.head_count") or 1)
    kv_heads = int(f.get(f"{arch}.attention.head_count_kv") or heads)
    head_dim = int(f.get(f"{arch}.attention.key_length") or int(f.get(f"{arch}.embedding_length") or 0) // heads)
    return layers, tokens * layers * 2 * kv_heads * head_dim * 2


def serve_need(gguf: Path, ctx: int, hw: Hardware, slots: int = 1) -> dict:
    """The predicted peak RSS of one llama-server for `gguf` with `slots` x `ctx` tokens of f16 KV cache: a runtime
    floor (this machine's measurement when it has one, planning/calibration.py) + the file + the cache."""
    kv = gguf_kv(gguf, ctx * slots)[1]
    part = gguf.stat().st_size + kv
    runtime, factor, basis = SERVE_RUNTIME_BYTES, 1.0, "the GGUF, its KV cache and a published 64 MiB runtime"
    if fit := calibration.fit(hw, "serve", SERVE_RUNTIME_BYTES):
        runtime, factor, basis = fit.runtime_bytes, fit.factor, fit.basis
    return {"predicted_bytes": int(runtime + factor * part), "model_part_bytes": part, "kv_cache_bytes": kv,
            "basis": basis}


# The export's two tools, measured here on the tiny model and the demo's (fp32 SmolLM2-135M, f16 GGUF 258 MiB;
# 2026-12-04): convert_hf_to_gguf.py peaked at 594 and 832 MiB (a Python runtime of about 0.58 GiB + about the f16
# file it writes), llama-quantize at 14 and 213 MiB (it maps its input and reads it tensor by tensor: about 0.8 x the
# f16 file). Two points per tool: this machine's measurements replace them (planning/calibration.py).
EXPORT_PUBLISHED = {"convert": (int(0.6 * GIB), 1.0), "quantize": (16 * 2**20, 0.8)}


def export_need(step: str, unquantized_bytes: int, hw: Hardware) -> dict:
    """The predicted peak RSS of the export's `step` ("convert" or "quantize") for an unquantized GGUF of
    `unquantized_bytes`: a runtime floor + a factor x that file."""
    runtime, factor = EXPORT_PUBLISHED[step]
    basis = f"a published {runtime / 2**20:.0f} MiB runtime + {factor:g} x the unquantized GGUF"
    if fit := calibration.fit(hw, f"export-{step}", runtime, factor):
        runtime, factor, basis = fit.runtime_bytes, fit.factor, fit.basis
    return {"predicted_bytes": int(runtime + factor * unquantized_bytes), "model_part_bytes": unquantized_bytes,
            "basis": basis}
