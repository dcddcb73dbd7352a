"""Merge stage: the trained adapter into its base (backends/merge.py: RAM and disk checked first, then the merge,
then what it copies fixed), verified against base + adapter (checks/merge_verify.py); the report goes into
merge/report.json, the verification under `verification`.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from rich.markup import escape

from tutor_wrap.backends.axolotl_merge import keep_add_flags
from tutor_wrap.backends.merge import merge
from tutor_wrap.checks.fidelity import reference_request
from tutor_wrap.checks.merge_verify import verifier
from tutor_wrap.core.errors import TutorWrapError
from tutor_wrap.core.hashing import file_sha256
from tutor_wrap.core.units import GIB
from tutor_wrap.models.files import weight_files, write_chat_template
from tutor_wrap.planning.calibration import FLAG_PCT, KEPT
from tutor_wrap.planning.preflight import Verdict, merge_verdicts
from tutor_wrap.stages.base import Context, Pre, StageResult

NAME = "merge"
DEPENDS = ("train",)


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
    log = merge_dir / "merge.log"
    report = merge(base, out_dir, merge_dir / "model", cfg, ctx.hardware, log=log, chat_template=template,
                   verify=verifier(base, out_dir, log, ram_budget=ctx.hardware.ram_available_bytes, greedy=greedy),
                   run=str(ctx.run.path))
    report.weights_sha256 = {p.name: file_sha256(p) for p in weight_files(merge_dir / "model")}
    report.save(merge_dir / "report.json")
    vpeak = report.verification_peak_rss_bytes
    ctx.console.print(f"merge: {report.method}, predicted peak RSS {report.budget.predicted_peak_rss_bytes / GIB:.2f} "
                      f"GiB, measured {report.measured_peak_rss_bytes / GIB:.2f} GiB; verification "
                      + _verification_line(report.verification)
                      + (f", its peak RSS {vpeak / GIB:.2f} GiB (predicted "
                         f"{report.verification['logits_need_bytes'] / GIB:.2f})" if vpeak and
                         report.verification.get("logits_need_bytes") else ""))
    off = report.prediction_error_pct
    if off is not None and abs(off) > FLAG_PCT:
        ctx.console.print(f"[yellow]note:[/] merge: the predicted peak was {off:+.0f}% off the measured one (predicted "
                          f"from {escape(report.budget.basis)}); {KEPT}")
    v = report.verification or {}
    return StageResult({"model": ctx.run.rel(merge_dir / "model"), "report": ctx.run.rel(merge_dir / "report.json")},
                       info={"method": report.method},
                       metrics={"peak_rss_gib": (report.measured_peak_rss_bytes or 0) / GIB,
                                "predicted_peak_rss_gib": report.budget.predicted_peak_rss_bytes / GIB,
                                "verification_peak_rss_gib": (report.verification_peak_rss_bytes or 0) / GIB,
                                "verification_max_abs_diff": v.get("max_abs_diff")})
