"""Merge stage: check RAM and disk first, then `axolotl merge-lora`, then fix what it copies, then verify.

1. `choose_method` predicts the peak RSS (`predict_sizes`, from the real shard sizes) and the disk the merged
   model takes; if that does not fit RAM + swap (as WSL caps them) or the disk, TutorWrapError with the numbers
   and the remedy, before any file or folder exists.
2. `axolotl merge-lora` (memory_efficient by default) into a hidden work dir, peak RSS measured by the kernel.
3. Axolotl copies tokenizer and config files from the *base model* folder; training may have changed the
   tokenizer (added pad or special tokens), so the trained ones are copied over the merged output; a
   `quantization_config` (QLoRA base) is removed so the merged model loads as plain weights.
4. `python -m tutor_wrap.checks.merge_verify` in a subprocess: the merged model against base + adapter through PEFT
   (logits, fp32) and tensor by tensor. A mismatch fails the stage and nothing is kept; the result goes into
   merge/report.json under `verification`.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

import yaml

from tutor_wrap.backends.axolotl_merge import copy_trained_tokenizer, keep_add_flags, nf4_compute_dtype, run_nf4_merge, merge_config, run_merge_lora, strip_quantization
from tutor_wrap.backends.hf_generate import Request
from tutor_wrap.checks.fidelity import reference_request
from tutor_wrap.checks.merge_verify import check_verification, verify_merged
from tutor_wrap.core import atomic
from tutor_wrap.core.errors import TutorWrapError
from tutor_wrap.core.hashing import file_sha256
from tutor_wrap.core.proc import tail
from tutor_wrap.core.units import GIB
from tutor_wrap.machine.hardware import Hardware
from tutor_wrap.models.files import check_adapter, weight_files, write_chat_template
from tutor_wrap.planning.budgets import choose_method
from tutor_wrap.planning.preflight import Verdict, merge_verdicts
from tutor_wrap.stages.base import Context, Pre, StageResult

NAME = "merge"
DEPENDS = ("train",)


def merge(base: Path, adapter: Path, out: Path, axolotl_cfg: dict, hw: Hardware, *, method: str = "auto",
          log: Path, verify: bool = True, chat_template: str | None = None, greedy: Request | None = None) -> dict:
    """Merge `adapter` into `base`, writing a complete, verified model folder at `out` (or nothing).

    `chat_template` (the training format's, see data/format.py) replaces the base model's template that
    merge-lora copied, so every consumer of the folder and of its GGUF formats prompts as training did.

    `greedy`: continuations the verification computes while it has the merged model loaded (the export's
    reference, checks/fidelity.py), recorded under `verification.greedy`.

    The budget check comes first: when the method does not fit RAM+swap or disk, TutorWrapError is raised
    before any file or folder (output, work dir, log) exists.
    """
    check_adapter(adapter)
    budget = choose_method(base, adapter, hw, method)
    work = out.parent / f".{out.name}.work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        t0 = time.perf_counter()
        nf4 = nf4_compute_dtype(axolotl_cfg)
        if nf4:
            # QLoRA: into the NF4 model that training ran, not the full-precision base (backends/nf4_merge.py).
            budget = replace(budget, method="nf4")
            rc, peak, merged = run_nf4_merge(base, adapter, work, nf4, log)
        else:
            rc, peak, merged = run_merge_lora(merge_config(axolotl_cfg, base, adapter, work, budget.method), work,
                                              adapter, log)
        seconds = round(time.perf_counter() - t0, 1)
        if rc != 0 or not weight_files(merged):
            tool = "the NF4 merge" if nf4 else "axolotl merge-lora"
            raise TutorWrapError(f"merge: {tool} failed (exit {rc}); log: {log}\n{tail(log, 15)}",
                                 hint="read the log; if it was killed, check RAM with `python -m tutor_wrap preflight`")
        copy_trained_tokenizer(adapter, merged, base)
        if chat_template is not None:
            write_chat_template(merged, chat_template)
        stripped = strip_quantization(merged / "config.json")
        verification = None
        if verify:
            verification = verify_merged(base, adapter, merged, log, ram_budget=hw.ram_available_bytes,
                                         nf4_compute_dtype=nf4, greedy=greedy)
            check_verification(verification, log)
        if out.exists():
            shutil.rmtree(out)
        merged.rename(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {**asdict(budget), "measured_peak_rss_bytes": peak, "merge_seconds": seconds,
            "prediction_error_pct": round(100 * (budget.predicted_peak_rss_bytes - peak) / peak, 1) if peak else None,
            "stripped_quantization_config": stripped, "verification": verification}


def _verification_line(v: dict | None) -> str:
    if not v:
        return "off"
    if v.get("status") == "skipped":
        return "skipped (" + "; ".join(str((v.get(k) or {}).get("reason")) for k in ("weights", "logits")) + ")"
    d = v.get("max_abs_diff")
    return f"{v.get('status')} (max abs diff {d:.3g}, tolerance {v.get('tolerance'):.3g})" if isinstance(
        v.get("tolerance"), float) and d is not None else str(v.get("status"))


def check(pre: Pre) -> list[Verdict]:
    return merge_verdicts(pre.recipe, pre.hardware, pre.run_dir)


def inputs(ctx: Context) -> dict:
    return {"train": ctx.run.stage("train").get("fingerprint"), "chat_template": ctx.resolved.chat_template}


def run(ctx: Context) -> StageResult:
    cfg = yaml.safe_load((ctx.run.path / "axolotl.yml").read_text("utf-8"))
    out_dir = ctx.run.artifact("train", "output_dir")
    merge_dir = ctx.run.path / "merge"   # created only once the budget check passed (a refusal writes nothing)
    template = ctx.resolved.chat_template
    if not cfg.get("adapter"):
        # A full fine-tune has nothing to merge: the trained folder is the model.
        write_chat_template(out_dir, template)
        if Path(cfg["base_model"]).is_dir():
            keep_add_flags(out_dir, Path(cfg["base_model"]))
        return StageResult({"model": ctx.run.rel(out_dir)}, info={"method": "none (full fine-tune)"})
    base = Path(cfg["base_model"])
    if not base.is_dir():
        raise TutorWrapError(f"merge: base model {base} is not a local folder", hint="merge needs the base weights on disk")
    # Not an input of this stage: the export re-computes its reference when the prompts have changed since.
    greedy = reference_request(ctx.resolved.heldout_examples())
    report = merge(base, out_dir, merge_dir / "model", cfg, ctx.hardware, log=merge_dir / "merge.log",
                   chat_template=template, greedy=greedy)
    report["chat_template"] = template
    report["weights_sha256"] = {p.name: file_sha256(p) for p in weight_files(merge_dir / "model")}
    atomic.write_json(merge_dir / "report.json", report)
    ctx.console.print(f"merge: {report['method']}, predicted peak RSS {report['predicted_peak_rss_bytes'] / GIB:.2f} GiB, "
                      f"measured {report['measured_peak_rss_bytes'] / GIB:.2f} GiB; verification "
                      + _verification_line(report.get("verification")))
    return StageResult({"model": ctx.run.rel(merge_dir / "model"), "report": ctx.run.rel(merge_dir / "report.json")},
                       info={"method": report["method"]})


def merge_folder(base: Path, adapter: Path, out: Path, hw: Hardware, *, method: str = "auto",
                 verify: bool = True) -> dict:
    """The `merge` command: an adapter folder (with the axolotl.yml Axolotl saves beside it, if any) into `base`."""
    cfg_path = adapter / "axolotl.yml"
    cfg = yaml.safe_load(cfg_path.read_text("utf-8")) if cfg_path.exists() else {}
    cfg.setdefault("base_model", str(base))
    cfg.setdefault("adapter", "lora")
    return merge(base, adapter, out, cfg, hw, method=method, log=out.parent / f"{out.name}.merge.log", verify=verify)
