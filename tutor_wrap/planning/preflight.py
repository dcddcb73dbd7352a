"""Preflight: before anything runs, what this machine and this environment can and cannot do, with the fix.

`collect(hw, software)` -> a JSON-able report (hardware, software, findings); each stage's `check` asks for its
fits / tight / won't fit `Verdict` with numbers here (runtime/tables.py prints both).
Nothing here imports torch: preflight must answer in about a second on a machine where torch is broken.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from tutor_wrap.core.errors import TutorWrapError
from tutor_wrap.core.units import GIB, gib
from tutor_wrap.machine.hardware import Hardware
from tutor_wrap.machine.host import wsl_limits
from tutor_wrap.machine.software import Finding, check_stack
from tutor_wrap.machine.vendors import by_name
from tutor_wrap.models.catalog import lookup
from tutor_wrap.models.files import read_config, source_bytes_per_param, weight_files
from tutor_wrap.planning import budgets

TIGHT = 0.10          # within 10% of what is available counts as tight
LOW_DISK = 30 * GIB   # below this a 7-8B merge + GGUF export cannot fit at all


def hardware_findings(hw: Hardware, wsl: dict | None = None) -> list[Finding]:
    out: list[Finding] = []
    if not hw.gpus:
        out.append(Finding("warning", "no GPU visible: training runs on the CPU, practical only for models of a few "
                           "hundred million parameters" + (f" ({'; '.join(hw.probe_notes)})" if hw.probe_notes else "")))
        if hw.wsl and not Path("/usr/lib/wsl/lib").is_dir():
            out.append(Finding("warning", "WSL without /usr/lib/wsl/lib: the Windows GPU driver is not exposed to Linux",
                               "install the current NVIDIA driver in Windows (not inside WSL), then `wsl --update`"))
    elif hw.probe_notes:   # GPUs found, and something worth knowing about how: hidden ones, a fallback source
        out.append(Finding("info", "GPU probe: " + "; ".join(hw.probe_notes)))
    for i, g in enumerate(hw.gpus):
        no_bf16 = by_name(g.vendor).no_bf16_finding(g)
        if no_bf16:
            out.append(Finding("info", f"GPU {i} {g.name} {no_bf16}"))
        if g.vram_total_bytes and g.vram_free_bytes is not None and g.vram_free_bytes < 0.8 * g.vram_total_bytes:
            out.append(Finding("warning", f"GPU {i} {g.name}: only {gib(g.vram_free_bytes)} of {gib(g.vram_total_bytes)} "
                               "VRAM free; other processes hold the rest", f"close them ({by_name(g.vendor).smi} lists them)"))
    if hw.disk_free_bytes < LOW_DISK:
        out.append(Finding("warning", f"only {gib(hw.disk_free_bytes)} of disk free where the run dir goes; a 7-8B "
                           "model's merge plus GGUF export needs about 30 GiB (with a recipe, its own stages' disk "
                           "verdicts say what it needs)", "free disk or pass --run-dir on a bigger disk"))
    if hw.wsl:
        granted = f"WSL grants {gib(hw.ram_total_bytes)} of RAM and {gib(hw.swap_total_bytes)} of swap (/proc/meminfo)"
        src = (wsl or {}).get("wslconfig")
        vals = (wsl or {}).get("wslconfig_values") or {}
        if src and ("memory" in vals or "swap" in vals):
            granted += f", set in {src} (memory={vals.get('memory', 'default')}, swap={vals.get('swap', 'default')})"
        else:
            granted += ("; with no .wslconfig WSL takes 50% of the Windows RAM and swap of 25% of it "
                        "(Microsoft's documented defaults)")
        out.append(Finding("info", granted, "to give WSL more: " + budgets.wsl_raise(hw, wsl)))
    return out


def sandbox_findings() -> list[Finding]:
    from tutor_wrap.answers.code_runs import sandbox_problem

    problem = sandbox_problem()
    if problem is None:
        return [Finding("info", "eval's code_runs: model-written code runs in a bubblewrap sandbox here")]
    return [Finding("warning", f"eval's code_runs cannot sandbox model-written code here: {problem}",
                    "install bubblewrap (apt install bubblewrap); until then a recipe with eval.checks.code_runs: "
                    "true is refused (code_runs: unconfined runs it with limits only)")]


def collect(hw: Hardware, software: dict) -> dict:
    """The report: hardware as probed (or the profile), the installed stack, and every finding with its fix."""
    wsl = wsl_limits(hw)
    if hw.source == "probe":
        stack = check_stack(software, hw.accelerator)
    else:
        # The stack installed here says nothing about the profile's machine (a CPU torch on this laptop is no
        # error for the GPU box being planned for): it is shown, not judged.
        stack = [Finding("info", f"the software shown is this machine's, not {hw.source}'s: it is not checked "
                         "against that machine's GPUs", "run `preflight` on the training machine to check its stack")]
    findings = stack + hardware_findings(hw, wsl) + sandbox_findings()
    order = {"error": 0, "warning": 1, "info": 2}
    findings.sort(key=lambda f: order.get(f.severity, 3))
    return {"hardware": hw.to_dict(), "accelerator": hw.accelerator, "wsl": wsl, "software": software,
            "findings": [f.to_dict() for f in findings],
            "ok": not any(f.severity == "error" for f in findings)}


# ---------------------------------------------------------------------------------------------- stage verdicts
# Each stage's `check` (stages/) asks for its verdict here; pipeline.check_stages loops over the stages.


@dataclass
class Verdict:
    """One stage's need against what the machine has: fits / tight (within 10%) / won't fit, or n/a / unknown."""

    stage: str
    verdict: str
    why: str
    resource: str | None = None
    needs_bytes: int | None = None
    has_bytes: int | None = None
    remedy: str | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.needs_bytes is not None and self.has_bytes is not None:
            d.update(needs=gib(self.needs_bytes), has=gib(self.has_bytes))
        return d


def _verdict(stage: str, resource: str, need: int, have: int, remedy: str | None, why: str) -> Verdict:
    if need <= have * (1 - TIGHT):
        verdict = "fits"
    elif need <= have:
        verdict = "tight"
    else:
        verdict = "won't fit"
    return Verdict(stage, verdict, why, resource, int(need), int(have), remedy if verdict != "fits" else None)


def _ram_remedy(hw: Hardware, deficit: int) -> str:
    # "tight" gets a margin's worth of advice too
    return budgets.ram_remedy(hw, max(deficit, int(TIGHT * hw.ram_total_bytes)))


def _adapter_dir(recipe, run_dir: Path | None) -> Path:
    """The trained adapter if a run already has one (its size counts); before training it is absent (0 bytes)."""
    return (Path(run_dir or recipe.default_run_dir()) / "train" / "out").resolve()


def _targets(recipe):
    t = recipe.lora.targets
    return t if t == "all-linear" else tuple(t)


def train_verdict(recipe, hw: Hardware, processes: int | None = None, inputs=None) -> Verdict:
    """The planner's verdict: the memory model's peak for the chosen plan against the card (or CPU time).
    `inputs` (recipe/resolve.Inputs, when checked): the rows' and eval prompts' token lengths, so the plan is the one
    `plan` makes (the context shortened to the longest row), not the recipe's sequence_len."""
    # Imported here: the planner pulls in the recipe schema (pydantic), which a preflight without a recipe never needs.
    from tutor_wrap.planning.planner import SAFETY, make_plan

    try:
        plan = make_plan(recipe, hw, inputs.lengths if inputs else None, processes=processes,
                         eval_prompt=inputs.longest_eval_prompt if inputs else 0)
    except TutorWrapError as exc:
        return Verdict("train", "won't fit", str(exc).splitlines()[0], remedy=getattr(exc, "hint", None))
    if plan.memory:
        need = plan.memory.get("trusted_total_gib", plan.memory["total_gib"]) * GIB
        have = plan.budget_gib / (1 - SAFETY) * GIB
        return _verdict("train", "VRAM", int(need), int(have), None,
                        f"{plan.method}, micro-batch {plan.micro_batch_size}, grad ckpt "
                        f"{'on' if plan.gradient_checkpointing else 'off'}, sequence {plan.sequence_len} "
                        f"(the memory model's reserved + CUDA context)")
    if plan.verdict == "impractical":
        return Verdict("train", "won't fit", f"CPU training impractical: ~{plan.seconds_per_step:.0f} s per optimizer "
                       "micro-step", remedy="train on a GPU (`plan RECIPE --hardware rtx3060-12gb` shows one)")
    step = f", ~{plan.seconds_per_step:.0f} s per step" if plan.seconds_per_step else ""
    if plan.ram:
        each, n = plan.ram["per_process_bytes"], plan.ram["processes"]
        return _verdict("train", "RAM", each * n, hw.ram_available_bytes,
                        f"lower train.micro_batch_size (the plan's: {plan.micro_batch_size}) or train.sequence_len "
                        f"(the plan's: {plan.sequence_len}), or close programs that hold RAM",
                        f"CPU training: {gib(each)} peak RSS" + (f" x {n} processes" if n > 1 else "")
                        + f" ({plan.ram['basis']}){step}")
    return Verdict("train", "fits", "CPU training" + step)


@dataclass(frozen=True)
class _Weights:
    shards: list[int]
    adapter: int
    src_bytes: int            # bytes per parameter on disk
    sizes_from: str


def _weights(recipe, run_dir: Path | None) -> _Weights:
    base = recipe.base_model_path()
    if base is not None:
        shards = [p.stat().st_size for p in weight_files(base)]
        src_bytes = source_bytes_per_param(read_config(base))
        adapter = sum(p.stat().st_size for p in _adapter_dir(recipe, run_dir).glob("adapter_model.safetensors"))
        return _Weights(shards, adapter, src_bytes, "the real shard sizes")
    # A hub id: the catalog's parameter count in bf16, in the 5 GB shards Hugging Face checkpoints use.
    arch = lookup(recipe.base_model)
    total, shard = arch.total_params * 2, 5 * 10**9
    shards = [shard] * (total // shard) + ([total % shard] if total % shard else [])
    adapter = arch.lora_params(recipe.lora.r, _targets(recipe)) * 4
    return _Weights(shards, adapter, 2, f"the catalog: {arch.total_params / 1e9:.2f}B parameters in bf16, "
                                        f"{len(shards)} shards")


def merge_verdicts(recipe, hw: Hardware, run_dir: Path | None = None) -> list[Verdict]:
    """RAM+swap and disk for the merge: `budgets.predict_sizes` on the real shard sizes (or the catalog's)."""
    if recipe.method == "full":
        return [Verdict("merge", "n/a", "a full fine-tune has nothing to merge")]
    try:
        w = _weights(recipe, run_dir)
    except TutorWrapError as exc:
        return [Verdict("merge", "unknown", str(exc).splitlines()[0])]
    b = budgets.predict_sizes(w.shards, w.adapter, hw, "memory_efficient")
    legacy = budgets.predict_sizes(w.shards, w.adapter, hw, "legacy")
    ram = _verdict("merge", "RAM+swap", b.predicted_peak_rss_bytes, b.ram_swap_available_bytes,
                   _ram_remedy(hw, b.predicted_peak_rss_bytes - b.ram_swap_available_bytes),
                   f"axolotl merge-lora (memory_efficient) peaks at about 3x the largest shard plus the adapter and "
                   f"{gib(b.runtime_bytes)} of runtime ({b.basis}) (sizes from {w.sizes_from}); a whole-model (legacy) "
                   f"merge, as in the seed report, would need {gib(legacy.predicted_peak_rss_bytes)}; RAM "
                   f"{gib(hw.ram_available_bytes)} free + swap {gib(hw.swap_free_bytes)} free")
    disk = _verdict("merge", "disk", b.disk_needed_bytes, hw.disk_free_bytes,
                    f"free {gib(max(0, b.disk_needed_bytes - hw.disk_free_bytes * (1 - TIGHT)))} of disk where the run "
                    "dir is", "the merged model is written at the base model's size")
    return [ram, disk]


def export_verdict(recipe, hw: Hardware, run_dir: Path | None = None) -> Verdict:
    """Disk for the f16 GGUF plus each quant, on what the merged model leaves."""
    try:
        w = _weights(recipe, run_dir)
    except TutorWrapError as exc:
        return Verdict("export", "unknown", str(exc).splitlines()[0])
    merged = 0 if recipe.method == "full" else budgets.predict_sizes(w.shards, w.adapter, hw,
                                                                     "memory_efficient").disk_needed_bytes
    quants = recipe.export.quant_types
    f16, need = budgets.disk_needed(sum(w.shards), w.src_bytes, quants)
    have = max(0, hw.disk_free_bytes - merged)
    return _verdict("export", "disk", need, have,
                    f"free {gib(max(0, need - have * (1 - TIGHT)))} of disk where the run dir is, or drop quant types",
                    f"f16 GGUF {gib(f16)} + {', '.join(quants)}; disk left after the merged model: {gib(have)}")
