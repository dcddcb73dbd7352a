"""Preflight: before anything runs, what this machine and this environment can and cannot do, with the fix.

`collect(hw, software)` -> a JSON-able report (hardware, software, findings); `stage_verdicts(recipe, hw)` adds
per-stage fits / tight / won't fit with numbers; `render(report, console)` prints it as rich tables.
Nothing here imports torch: preflight must answer in about a second on a machine where torch is broken.
"""

from __future__ import annotations

import math
from pathlib import Path

from tutor_wrap.hardware import GIB, Hardware
from tutor_wrap.software import Finding, check_stack

TIGHT = 0.10          # within 10% of what is available counts as tight
LOW_DISK = 30 * GIB   # below this a 7-8B merge + GGUF export cannot fit at all


def _gib(n: int | float | None) -> str:
    return "?" if n is None else f"{n / GIB:.1f} GiB"


def wslconfig_lines(memory_gib: int, swap_gib: int) -> str:
    return (f"%UserProfile%\\.wslconfig:\n  [wsl2]\n  memory={memory_gib}GB\n  swap={swap_gib}GB\n"
            "then run `wsl --shutdown` in Windows and reopen the WSL terminal")


def wsl_raise(hw: Hardware, wsl: dict | None, extra_bytes: int = 0) -> str:
    """.wslconfig lines that grant `extra_bytes` more RAM+swap than WSL grants now. Memory goes up to the Windows
    RAM minus 4 GiB for Windows itself (when that RAM can be estimated); the rest of the need goes to swap."""
    if wsl is None:  # a profile: assume WSL's default cap (half the Windows RAM)
        from tutor_wrap.probe_host import WSL_DEFAULT_MEMORY_FRACTION

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


def hardware_findings(hw: Hardware, wsl: dict | None = None) -> list[Finding]:
    out: list[Finding] = []
    if not hw.gpus:
        out.append(Finding("warning", "no GPU found: training runs on the CPU, practical only for models of a few "
                           "hundred million parameters" + (f" ({'; '.join(hw.probe_notes)})" if hw.probe_notes else "")))
        if hw.wsl and not Path("/usr/lib/wsl/lib").is_dir():
            out.append(Finding("warning", "WSL without /usr/lib/wsl/lib: the Windows GPU driver is not exposed to Linux",
                               "install the current NVIDIA driver in Windows (not inside WSL), then `wsl --update`"))
    for i, g in enumerate(hw.gpus):
        if g.vendor == "nvidia" and not g.bf16:
            out.append(Finding("info", f"GPU {i} {g.name} (compute capability {g.compute_capability}) has no bf16: "
                               "training uses fp16; FlashAttention 2 needs compute capability 8.0+"))
        if g.vram_total_bytes and g.vram_free_bytes is not None and g.vram_free_bytes < 0.8 * g.vram_total_bytes:
            out.append(Finding("warning", f"GPU {i} {g.name}: only {_gib(g.vram_free_bytes)} of {_gib(g.vram_total_bytes)} "
                               "VRAM free; other processes hold the rest", "close them (nvidia-smi / rocm-smi lists them)"))
    if hw.disk_free_bytes < LOW_DISK:
        out.append(Finding("warning", f"only {_gib(hw.disk_free_bytes)} of disk free where the run dir goes; a 7-8B "
                           "merge plus GGUF export needs about 30 GiB", "free disk or pass --run-dir on a bigger disk"))
    if hw.wsl:
        granted = f"WSL grants {_gib(hw.ram_total_bytes)} of RAM and {_gib(hw.swap_total_bytes)} of swap (/proc/meminfo)"
        src = (wsl or {}).get("wslconfig")
        vals = (wsl or {}).get("wslconfig_values") or {}
        if src and ("memory" in vals or "swap" in vals):
            granted += f", set in {src} (memory={vals.get('memory', 'default')}, swap={vals.get('swap', 'default')})"
        else:
            granted += ("; with no .wslconfig WSL takes 50% of the Windows RAM and swap of 25% of it "
                        "(Microsoft's documented defaults)")
        out.append(Finding("info", granted, "to give WSL more: " + wsl_raise(hw, wsl)))
    return out


def collect(hw: Hardware, software: dict) -> dict:
    """The report: hardware as probed (or the profile), the installed stack, and every finding with its fix."""
    wsl = None
    if hw.wsl and hw.source == "probe":
        from tutor_wrap.probe_host import wsl_info

        wsl = wsl_info(hw.ram_total_bytes, hw.swap_total_bytes)
    findings = check_stack(software, hw.accelerator) + hardware_findings(hw, wsl)
    order = {"error": 0, "warning": 1, "info": 2}
    findings.sort(key=lambda f: order.get(f.severity, 3))
    return {"hardware": hw.to_dict(), "accelerator": hw.accelerator, "wsl": wsl, "software": software,
            "findings": [f.to_dict() for f in findings],
            "ok": not any(f.severity == "error" for f in findings)}


# ---------------------------------------------------------------------------------------------- stage verdicts


def _verdict(stage: str, resource: str, need: int, have: int, remedy: str | None, why: str) -> dict:
    if need <= have * (1 - TIGHT):
        verdict = "fits"
    elif need <= have:
        verdict = "tight"
    else:
        verdict = "won't fit"
    return {"stage": stage, "resource": resource, "verdict": verdict, "needs_bytes": int(need), "has_bytes": int(have),
            "needs": _gib(need), "has": _gib(have), "why": why, "remedy": remedy if verdict != "fits" else None}


def _ram_remedy(hw: Hardware, deficit: int, wsl: dict | None) -> str:
    deficit = max(deficit, int(TIGHT * hw.ram_total_bytes))  # "tight" gets a margin's worth of advice
    if hw.wsl:
        return "raise WSL's memory/swap: " + wsl_raise(hw, wsl, deficit)
    return f"add swap: sudo bash tools/make_swapfile.sh {math.ceil(deficit / GIB) + 2}G"


def _adapter_dir(recipe, run_dir: Path | None) -> Path:
    """The trained adapter if a run already has one (its size counts); before training it is absent (0 bytes)."""
    if run_dir is None:
        from tutor_wrap.pipeline import default_run_dir

        run_dir = default_run_dir(recipe)
    return (Path(run_dir) / "train" / "out").resolve()


def _targets(recipe):
    t = recipe.lora.targets
    return t if t == "all-linear" else tuple(t)


def train_verdict(recipe, hw: Hardware) -> dict:
    """The planner's verdict: the memory model's peak for the chosen plan against the card (or CPU time)."""
    from tutor_wrap.errors import TutorWrapError
    from tutor_wrap.planner import SAFETY, make_plan

    try:
        plan = make_plan(recipe, hw)
    except TutorWrapError as exc:
        return {"stage": "train", "verdict": "won't fit", "why": str(exc).splitlines()[0],
                "remedy": getattr(exc, "hint", None)}
    if plan.memory:
        need = plan.memory["total_gib"] * GIB
        have = plan.budget_gib / (1 - SAFETY) * GIB
        return _verdict("train", "VRAM", int(need), int(have), None,
                        f"{plan.method}, micro-batch {plan.micro_batch_size}, grad ckpt "
                        f"{'on' if plan.gradient_checkpointing else 'off'}, sequence {plan.sequence_len} "
                        f"(the memory model's reserved + CUDA context)")
    if plan.verdict == "impractical":
        return {"stage": "train", "verdict": "won't fit",
                "why": f"CPU training impractical: ~{plan.seconds_per_step:.0f} s per optimizer micro-step",
                "remedy": "train on a GPU (`plan RECIPE --hardware rtx3060-12gb` shows one)"}
    why = "CPU training" + (f": ~{plan.seconds_per_step:.0f} s per step" if plan.seconds_per_step else "")
    return {"stage": "train", "verdict": "fits", "why": why}


def _weights(recipe, run_dir: Path | None) -> tuple[list[int], int, int, str]:
    """(shard sizes, adapter bytes, bytes per parameter on disk, where the sizes came from)."""
    import json

    from tutor_wrap.stages import export as export_stage
    from tutor_wrap.stages import merge as merge_stage

    base = recipe.base_model_path()
    if base is not None:
        shards = [p.stat().st_size for p in merge_stage.weight_files(base)]
        try:
            cfg = json.loads((base / "config.json").read_text("utf-8"))
        except (OSError, ValueError):
            cfg = {}
        src_bytes = export_stage.source_bytes_per_param(cfg)
        adapter = sum(p.stat().st_size for p in _adapter_dir(recipe, run_dir).glob("adapter_model.safetensors"))
        return shards, adapter, src_bytes, "the real shard sizes"
    # A hub id: the catalog's parameter count in bf16, in the 5 GB shards Hugging Face checkpoints use.
    from tutor_wrap.catalog import lookup

    arch = lookup(recipe.base_model)
    total, shard = arch.total_params * 2, 5 * 10**9
    shards = [shard] * (total // shard) + ([total % shard] if total % shard else [])
    adapter = arch.lora_params(recipe.lora.r, _targets(recipe)) * 4
    return shards, adapter, 2, f"the catalog: {arch.total_params / 1e9:.2f}B parameters in bf16, {len(shards)} shards"


def stage_verdicts(recipe, hw: Hardware, run_dir: Path | None = None) -> list[dict]:
    """Per stage: fits / tight (within 10%) / won't fit, with "needs X GiB / has Y GiB" and the remedy.

    train: the planner's memory model. merge: `stages.merge.predict_sizes` on the real shard sizes (or the
    catalog's for a hub id). export: disk for the f16 GGUF plus each quant, after the merged model.
    """
    from tutor_wrap.errors import TutorWrapError
    from tutor_wrap.stages import export as export_stage
    from tutor_wrap.stages import merge as merge_stage

    out: list[dict] = [train_verdict(recipe, hw)]
    try:
        shards, adapter, src_bytes, sizes_from = _weights(recipe, run_dir)
    except TutorWrapError as exc:
        return out + [{"stage": s, "verdict": "unknown", "why": str(exc).splitlines()[0]} for s in ("merge", "export")]
    wsl = None
    if hw.wsl and hw.source == "probe":
        from tutor_wrap.probe_host import wsl_info

        wsl = wsl_info(hw.ram_total_bytes, hw.swap_total_bytes)
    merged_bytes = 0
    if recipe.method == "full":
        out.append({"stage": "merge", "verdict": "n/a", "why": "a full fine-tune has nothing to merge"})
    else:
        b = merge_stage.predict_sizes(shards, adapter, hw, "memory_efficient")
        legacy = merge_stage.predict_sizes(shards, adapter, hw, "legacy")
        merged_bytes = b.disk_needed_bytes
        ram = _verdict("merge", "RAM+swap", b.predicted_peak_rss_bytes, b.ram_swap_available_bytes,
                       _ram_remedy(hw, b.predicted_peak_rss_bytes - b.ram_swap_available_bytes, wsl),
                       f"axolotl merge-lora (memory_efficient) peaks at about 3x the largest shard plus the adapter and "
                       f"~0.75 GiB of runtime (bench/merge_bench.py) (sizes from {sizes_from}); a whole-model (legacy) merge, as in the "
                       f"seed report, would need {_gib(legacy.predicted_peak_rss_bytes)}; RAM "
                       f"{_gib(hw.ram_available_bytes)} free + swap {_gib(hw.swap_free_bytes)} free")
        disk = _verdict("merge", "disk", b.disk_needed_bytes, hw.disk_free_bytes,
                        f"free {_gib(max(0, b.disk_needed_bytes - hw.disk_free_bytes * (1 - TIGHT)))} of disk where the run dir is",
                        "the merged model is written at the base model's size")
        out += [ram, disk]
    quants = recipe.export.quant_types
    f16, need = export_stage.disk_needed(sum(shards), src_bytes, quants)
    have = max(0, hw.disk_free_bytes - merged_bytes)
    out.append(_verdict("export", "disk", need, have,
                        f"free {_gib(max(0, need - have * (1 - TIGHT)))} of disk where the run dir is, or drop quant types",
                        f"f16 GGUF {_gib(f16)} + {', '.join(quants)}; disk left after the merged model: {_gib(have)}"))
    return out


# ------------------------------------------------------------------------------------------------------ render

_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan", "fits": "green", "tight": "yellow",
          "won't fit": "bold red", "unknown": "dim", "n/a": "dim"}


def render(report: dict, console) -> None:
    from rich.table import Table

    hw = report["hardware"]
    t = Table(title="machine", show_header=False)
    t.add_column("what")
    t.add_column("value")
    t.add_row("source", hw["source"])
    for i, g in enumerate(hw["gpus"]):
        arch = g.get("compute_capability") and f"cc {g['compute_capability']}" or g.get("gfx_target") or ""
        t.add_row(f"GPU {i}", f"{g['name']}  {_gib(g['vram_total_bytes'])} ({_gib(g.get('vram_free_bytes'))} free)  "
                  f"{arch}  bf16={'yes' if g['bf16'] else 'no'}")
    if not hw["gpus"]:
        t.add_row("GPU", "none")
    t.add_row("CPU", f"{hw.get('cpu_model') or '?'}  {hw['cpu_count']} threads  "
              f"{' '.join(hw.get('cpu_flags') or []) or 'no AVX2'}" + ("  Apple MPS" if hw.get("mps") else ""))
    t.add_row("RAM", f"{_gib(hw['ram_available_bytes'])} free of {_gib(hw['ram_total_bytes'])}")
    t.add_row("swap", f"{_gib(hw['swap_free_bytes'])} free of {_gib(hw['swap_total_bytes'])}")
    t.add_row("disk", f"{_gib(hw['disk_free_bytes'])} free")
    t.add_row("OS", (hw.get("os") or "?") + ("  (WSL)" if hw["wsl"] else ""))
    console.print(t)

    sw = report["software"]
    t = Table(title="software")
    for col in ("package", "version", "build"):
        t.add_column(col)
    t.add_row("python", sw.get("python") or "-", "")
    for name in ("torch", "torchvision", "torchaudio", "axolotl", "transformers", "peft", "accelerate",
                 "bitsandbytes", "flash-attn"):
        build = ""
        if name == "torch" and sw.get("torch"):
            build = (f"CUDA {sw['torch_cuda']}" if sw.get("torch_cuda") else f"ROCm {sw['torch_hip']}" if sw.get("torch_hip")
                     else "CPU")
        t.add_row(name, sw.get(name) or "[dim]not installed[/dim]", build)
    t.add_row("llama.cpp", sw.get("llama_cpp") or "[dim]not found[/dim]", "")
    t.add_row("ollama", sw.get("ollama") or "[dim]not on PATH[/dim]", "")
    console.print(t)

    if report.get("findings"):
        t = Table(title="findings")
        for col in ("", "what", "fix"):
            t.add_column(col)
        for f in report["findings"]:
            t.add_row(f"[{_STYLE.get(f['severity'], '')}]{f['severity']}[/]", f["what"], f.get("fix") or "")
        console.print(t)
    if report.get("stages"):
        t = Table(title="stages")
        for col in ("stage", "verdict", "needs", "has", "why / remedy"):
            t.add_column(col)
        for s in report["stages"]:
            v = s["verdict"]
            t.add_row(s["stage"] + (f" ({s['resource']})" if s.get("resource") else ""), f"[{_STYLE.get(v, '')}]{v}[/]",
                      s.get("needs", ""), s.get("has", ""), s.get("why", "") + (f"\nfix: {s['remedy']}" if s.get("remedy") else ""))
        console.print(t)
    if not report.get("ok", True):
        console.print("[bold red]preflight found errors: fix them before `run`[/]")
