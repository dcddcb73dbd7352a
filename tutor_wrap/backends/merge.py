"""A LoRA adapter merged into its base model: a complete model folder at the output path, or nothing.

1. `choose_method` predicts the peak RSS (`predict_sizes`, from the real shard sizes) and the disk the merged
   model takes; if that does not fit RAM + swap (as WSL caps them) or the disk, TutorWrapError with the numbers
   and the remedy, before any file or folder exists.
2. `axolotl merge-lora` (memory_efficient by default), or for a QLoRA adapter the merge into the NF4 model it
   trained on (nf4_merge.py), into a hidden work dir, peak RSS measured by the kernel.
3. Axolotl copies tokenizer and config files from the *base model* folder; training may have changed the
   tokenizer (added pad or special tokens), so the trained ones are copied over the merged output; a
   `quantization_config` (QLoRA base) is removed so the merged model loads as plain weights.
4. `verify` (the caller's: checks/merge_verify.py) judges the merged folder before it takes the output's name; a
   mismatch raises and nothing is kept.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable

from tutor_wrap.backends.axolotl_merge import (copy_trained_tokenizer, merge_config, nf4_compute_dtype, run_merge_lora,
                                               run_nf4_merge, strip_quantization)
from tutor_wrap.core import atomic
from tutor_wrap.core.errors import TutorWrapError
from tutor_wrap.core.proc import tail
from tutor_wrap.machine.hardware import Hardware
from tutor_wrap.models.files import adapter_mismatch, check_adapter, weight_files, write_chat_template
from tutor_wrap.planning import calibration
from tutor_wrap.planning.budgets import MergeBudget, choose_method

# (merged folder, the NF4 compute dtype of a QLoRA merge or None) -> the verification report; raises on a mismatch
Verify = Callable[[Path, "str | None"], dict]


@dataclass
class MergeReport:
    """What a merge did and measured; merge/report.json is this record (the budget's fields at the top level, so the
    file reads flat), and export reads it back with `load`."""
    budget: MergeBudget
    measured_peak_rss_bytes: int | None
    merge_seconds: float
    stripped_quantization_config: bool
    verification: dict | None            # checks/merge_verify.py's report; None when verification was off
    chat_template: str | None = None     # the training format's, written into the merged folder
    weights_sha256: dict[str, str] = field(default_factory=dict)

    @property
    def method(self) -> str:
        return self.budget.method

    @property
    def verification_peak_rss_bytes(self) -> int | None:
        return (self.verification or {}).get("peak_rss_bytes")

    @property
    def stage_peak_rss_bytes(self) -> int | None:
        """What the stage needed of the RAM: the merge's peak or its verification's, whichever is larger (the
        verification's fp32 logits check often is)."""
        return max((p for p in (self.measured_peak_rss_bytes, self.verification_peak_rss_bytes) if p), default=None)

    @property
    def prediction_error_pct(self) -> float | None:
        peak = self.measured_peak_rss_bytes
        return round(100 * (self.budget.predicted_peak_rss_bytes - peak) / peak, 1) if peak else None

    def to_dict(self) -> dict:
        d = asdict(self)
        return {**d.pop("budget"), **d, "prediction_error_pct": self.prediction_error_pct,
                "stage_peak_rss_bytes": self.stage_peak_rss_bytes}

    def save(self, path: Path) -> None:
        atomic.write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: Path) -> "MergeReport":
        d = json.loads(path.read_text("utf-8"))
        budget = MergeBudget(**{f.name: d[f.name] for f in fields(MergeBudget) if f.name in d})
        return cls(budget, **{f.name: d[f.name] for f in fields(cls) if f.name != "budget" and f.name in d})


def merge(base: Path, adapter: Path, out: Path, axolotl_cfg: dict, hw: Hardware, *, method: str = "auto",
          log: Path, verify: Verify | None = None, chat_template: str | None = None, run: str = "") -> MergeReport:
    """Merge `adapter` into `base`, writing a complete, verified model folder at `out` (or nothing).

    `chat_template` (the training format's, see data/format.py) replaces the base model's template that
    merge-lora copied, so every consumer of the folder and of its GGUF formats prompts as training did.

    The budget check comes first: when the method does not fit RAM+swap or disk, TutorWrapError is raised
    before any file or folder (output, work dir, log) exists.
    """
    check_adapter(adapter)
    if mismatch := adapter_mismatch(base, adapter):
        raise TutorWrapError(f"merge: {adapter} was not trained on {base}: {mismatch}",
                             hint="merge it into the base model it was trained from (adapter_config.json names it "
                                  "under base_model_name_or_path)")
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
        verification = verify(merged, nf4) if verify is not None else None
        if out.exists():
            shutil.rmtree(out)
        merged.rename(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = MergeReport(budget, peak, seconds, stripped, verification, chat_template)
    if peak and rc == 0:
        # What this machine measured beside what the published constants predict: its next predictions are fitted
        # to it (planning/calibration.py).
        calibration.record(hw, "merge", run, budget.predicted_peak_rss_bytes, peak, method=budget.method,
                           model_part_bytes=budget.model_part_bytes, model_bytes=budget.disk_needed_bytes)
    v = verification or {}
    if v.get("peak_rss_bytes") and v.get("logits_need_bytes") and (v.get("logits") or {}).get("status") != "skipped":
        # The verification predicts its own need and skips its logits check where that does not fit; what it
        # measured is kept beside that prediction.
        calibration.record(hw, "merge-verify", run, v["logits_need_bytes"], v["peak_rss_bytes"], nf4=bool(nf4))
    return report
