"""Eval stage: base vs fine-tuned GGUF (same quant type), same prompts in the training format, temperature 0."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from tutor_wrap.backends import llamacpp
from tutor_wrap.backends.gguf_export import export_model
from tutor_wrap.checks.answers import Judged, judge, summarize
from tutor_wrap.checks.fidelity import ppl_ctx, reference_text
from tutor_wrap.core import atomic
from tutor_wrap.core.errors import TutorWrapError
from tutor_wrap.core.hashing import file_sha256
from tutor_wrap.data import formats
from tutor_wrap.data.format import Format
from tutor_wrap.recipe.schema import EvalSpec
from tutor_wrap.runtime.eval_report import render_html, render_markdown
from tutor_wrap.runtime.tables import eval_table
from tutor_wrap.stages.base import Context, StageResult

NAME = "eval"
DEPENDS = ("export",)


def run_prompts(ll: llamacpp.LlamaCpp, gguf: Path, prompts: list[str], spec: EvalSpec,
                fmt: Format) -> list[Judged]:
    out = []
    for p in prompts:
        c = llamacpp.complete(ll, gguf, p, n_predict=spec.max_tokens)
        out.append(judge(c.text, c.stopped_by_eos, fmt.section_markers, spec.checks))
    return out


def inputs(ctx: Context) -> dict:
    r = ctx.recipe
    if r.eval is None:
        return {"eval": None}
    prompts = r.resolve(r.eval.prompts)
    return {"export": ctx.run.stage("export").get("fingerprint"), "eval": r.eval.model_dump(mode="json"),
            "prompts_sha256": file_sha256(prompts) if prompts.is_file() else None, "base_model": r.base_model}


def evaluate(ctx: Context) -> dict:
    r = ctx.recipe
    spec = r.eval
    assert spec is not None
    fmt = formats.get(r.dataset.format)
    data = fmt.read(r.resolve(spec.prompts), require_output=False, key="eval.prompts")
    qt = r.eval_quant_type
    if qt not in r.export.quant_types:
        raise TutorWrapError(f"{r.source}: eval.quant_type {qt} is not among export.quant_types {r.export.quant_types}",
                             hint="add it to export.quant_types or remove eval.quant_type")
    tuned = ctx.run.artifact("export", f"gguf_{qt}")
    eval_dir = ctx.run.sub("eval")
    base_dir = r.base_model_path()
    if base_dir is None:
        raise TutorWrapError("eval needs the base model on disk to build its GGUF", hint="set base_model to a local folder")
    ctx.console.print(f"eval: building the base model's {qt} GGUF for the comparison")
    base_report = export_model(base_dir, eval_dir, "base", [qt], ctx.hardware.accelerator,
                               eval_dir / "base-export.log")
    base = eval_dir / base_report["files"][qt]["path"]
    ll = llamacpp.locate()
    prompts = [fmt.prompt(row) for row in data.rows]
    ctx.console.print(f"eval: {len(prompts)} prompts x 2 models, temperature 0")
    jb = run_prompts(ll, base, prompts, spec, fmt)
    jt = run_prompts(ll, tuned, prompts, spec, fmt)
    sb, st = summarize(jb), summarize(jt)
    # Perplexity of the held-out examples (prompt + reference answer, in the training format; lower is better),
    # when the eval file has answers. llama-perplexity scores whole chunks, so the prompt's tokens count too.
    ref = reference_text([(p, fmt.answer(row)) for p, row in zip(prompts, data.rows)], eval_dir / "reference.txt")
    if ref is not None:
        n_ctx = ppl_ctx(ctx.run.artifact("merge", "model") / "tokenizer.json", ref.read_text("utf-8"))
        sb["heldout_ppl"] = llamacpp.perplexity(ll, base, ref, ctx=n_ctx)[0]
        st["heldout_ppl"] = llamacpp.perplexity(ll, tuned, ref, ctx=n_ctx)[0]
    report = {
        "recipe": r.name, "primary_metric": spec.primary_metric, "n_prompts": len(prompts), "quant_type": qt,
        "seed": spec.seed, "max_tokens": spec.max_tokens, "base": sb, "tuned": st,
        "base_gguf": ctx.run.rel(base), "tuned_gguf": ctx.run.rel(tuned),
        "prompts": [{"instruction": fmt.title(row),
                     "base": {**asdict(b), "format_pass": b.format_pass},
                     "tuned": {**asdict(t), "format_pass": t.format_pass}}
                    for row, b, t in zip(data.rows, jb, jt)],
    }
    atomic.write_json(eval_dir / "report.json", report)
    loss_png = ctx.run.stage("train").get("artifacts", {}).get("loss_png")
    atomic.write_text(eval_dir / "report.md", render_markdown(report, f"../{loss_png}" if loss_png else None))
    atomic.write_text(eval_dir / "report.html", render_html(report, ctx.run.abs(loss_png) if loss_png else None))
    return report


def run(ctx: Context) -> StageResult:
    if ctx.recipe.eval is None:
        return StageResult({}, info={"skipped": "the recipe has no eval block"})
    report = evaluate(ctx)
    ctx.console.print(eval_table(report))
    pm = report["primary_metric"]
    arts = {"report": "eval/report.json", "report_md": "eval/report.md", "report_html": "eval/report.html"}
    info = {"primary_metric": pm, "base": report["base"][pm], "tuned": report["tuned"][pm]}
    if report["tuned"][pm] < report["base"][pm]:
        raise TutorWrapError(f"eval: the fine-tuned model is worse than the base on {pm}: "
                             f"{report['tuned'][pm]:.3f} vs {report['base'][pm]:.3f} (report: {ctx.run.path / arts['report_md']})",
                             hint="train longer or check the data; the report shows the outputs side by side")
    return StageResult(arts, info=info)
