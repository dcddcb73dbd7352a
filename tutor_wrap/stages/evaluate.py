"""Eval stage: base vs fine-tuned GGUF (same quant type), same prompts in the training format, temperature 0."""

from __future__ import annotations

import re
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.table import Table

from tutor_wrap import atomic, llamacpp
from tutor_wrap.dataset import load_alpaca
from tutor_wrap.errors import TutorWrapError
from tutor_wrap.prompt_format import PromptFormat, for_dataset
from tutor_wrap.recipe import EvalChecks, EvalSpec
from tutor_wrap.rundir import file_sha256
from tutor_wrap.stages import Context, StageResult
from tutor_wrap.stages.export import export_model

NAME = "eval"
DEPENDS = ("export",)
_FENCE = re.compile(r"```[A-Za-z0-9_+-]*\n.*?```", re.S)


@dataclass(frozen=True)
class Judged:
    text: str
    eos: bool
    runaway: bool
    checks: dict[str, bool]
    words: int

    @property
    def format_pass(self) -> bool:
        return self.eos and not self.runaway and all(self.checks.values())


def judge(text: str, eos: bool, fmt: PromptFormat, checks: EvalChecks) -> Judged:
    runaway = any(m in text for m in fmt.section_markers)
    words = len(text.split())
    results: dict[str, bool] = {}
    if checks.code_block:
        results["code_block"] = bool(_FENCE.search(text))
    if checks.max_words is not None:
        results["max_words"] = words <= checks.max_words
    if checks.regex is not None:
        results["regex"] = re.search(checks.regex, text) is not None
    return Judged(text, eos, runaway, results, words)


def summarize(judged: list[Judged]) -> dict[str, float]:
    n = len(judged)
    words = [j.words for j in judged]
    out = {
        "format_pass_rate": sum(j.format_pass for j in judged) / n,
        "eos_rate": sum(j.eos for j in judged) / n,
        "no_runaway_rate": sum(not j.runaway for j in judged) / n,
        "mean_words": statistics.fmean(words),
        "median_words": statistics.median(words),
    }
    for name in judged[0].checks if judged else ():
        out[f"{name}_rate"] = sum(j.checks[name] for j in judged) / n
    return out


def run_prompts(ll: llamacpp.LlamaCpp, gguf: Path, prompts: list[str], spec: EvalSpec,
                fmt: PromptFormat) -> list[Judged]:
    out = []
    for p in prompts:
        c = llamacpp.complete(ll, gguf, p, n_predict=spec.max_tokens)
        out.append(judge(c.text, c.stopped_by_eos, fmt, spec.checks))
    return out


def render_markdown(report: dict, loss_png: str | None) -> str:
    lines = [f"# Eval: {report['recipe']}", "",
             f"{report['n_prompts']} held-out prompts, temperature 0, seed {report['seed']}, "
             f"{report['quant_type']} GGUFs through llama.cpp, max {report['max_tokens']} tokens.", "",
             f"Primary metric: **{report['primary_metric']}** (higher is better; `heldout_ppl`, the perplexity "
             "of the held-out prompts with their reference answers, is lower-is-better).", "",
             "| metric | base | tuned | delta |", "|---|---|---|---|"]
    for k in report["base"]:
        b, t = report["base"][k], report["tuned"][k]
        lines.append(f"| {k} | {b:.3f} | {t:.3f} | {t - b:+.3f} |")
    if loss_png:
        lines += ["", f"![training loss]({loss_png})"]
    lines += ["", "## Outputs", ""]
    for i, row in enumerate(report["prompts"], 1):
        lines += [f"### {i}. {row['instruction']}", "", "**base**" + (" (pass)" if row["base"]["format_pass"] else ""), "",
                  "```text", row["base"]["text"].replace("```", "'''"), "```", "",
                  "**tuned**" + (" (pass)" if row["tuned"]["format_pass"] else ""), "",
                  "```text", row["tuned"]["text"].replace("```", "'''"), "```", ""]
    return "\n".join(lines)


def render_html(report: dict, loss_png: Path | None) -> str:
    """A self-contained page: the summary table with deltas, the loss curve inline, outputs side by side."""
    import base64
    import html

    esc = html.escape
    rows = "".join(
        f"<tr><td>{esc(k)}{' *' if k == report['primary_metric'] else ''}</td><td>{report['base'][k]:.3f}</td>"
        f"<td>{report['tuned'][k]:.3f}</td><td>{report['tuned'][k] - report['base'][k]:+.3f}</td></tr>"
        for k in report["base"])
    img = ""
    if loss_png is not None and loss_png.is_file():
        img = ('<h2>Training loss</h2><img alt="training loss" src="data:image/png;base64,'
               + base64.b64encode(loss_png.read_bytes()).decode() + '">')
    pairs = "".join(
        f"<tr><td class=q>{i}. {esc(p['instruction'])}</td>"
        f"<td class={'pass' if p['base']['format_pass'] else 'fail'}><pre>{esc(p['base']['text'])}</pre></td>"
        f"<td class={'pass' if p['tuned']['format_pass'] else 'fail'}><pre>{esc(p['tuned']['text'])}</pre></td></tr>"
        for i, p in enumerate(report["prompts"], 1))
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>Eval: {esc(report['recipe'])}</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;vertical-align:top}}pre{{white-space:pre-wrap;margin:0;max-width:520px}}
.pass{{background:#eaffea}}.fail{{background:#fff0f0}}.q{{max-width:200px}}</style></head><body>
<h1>Eval: {esc(report['recipe'])}</h1>
<p>{report['n_prompts']} held-out prompts, temperature 0, seed {report['seed']}, {esc(report['quant_type'])} GGUFs through
llama.cpp, at most {report['max_tokens']} tokens. Primary metric: <b>{esc(report['primary_metric'])}</b> (higher is better;
green = passes every format check).</p>
<table><tr><th>metric</th><th>base</th><th>tuned</th><th>delta</th></tr>{rows}</table>{img}
<h2>Outputs</h2><table><tr><th>prompt</th><th>base</th><th>tuned</th></tr>{pairs}</table></body></html>
"""


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
    fmt = for_dataset(r.dataset.format)
    data = load_alpaca(r.resolve(spec.prompts), require_output=False)
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
    prompts = [fmt.render(row.instruction, row.input) for row in data.rows]
    ctx.console.print(f"eval: {len(prompts)} prompts x 2 models, temperature 0")
    jb = run_prompts(ll, base, prompts, spec, fmt)
    jt = run_prompts(ll, tuned, prompts, spec, fmt)
    sb, st = summarize(jb), summarize(jt)
    # Perplexity of the held-out examples (prompt + reference answer, in the training format; lower is better),
    # when the eval file has answers. llama-perplexity scores whole chunks, so the prompt's tokens count too.
    from tutor_wrap.fidelity import reference_text
    from tutor_wrap.stages.export import ppl_ctx

    ref = reference_text([(p, row.output) for p, row in zip(prompts, data.rows)], eval_dir / "reference.txt")
    if ref is not None:
        n_ctx = ppl_ctx(ctx.run.artifact("merge", "model") / "tokenizer.json", ref.read_text("utf-8"))
        sb["heldout_ppl"] = llamacpp.perplexity(ll, base, ref, ctx=n_ctx)[0]
        st["heldout_ppl"] = llamacpp.perplexity(ll, tuned, ref, ctx=n_ctx)[0]
    report = {
        "recipe": r.name, "primary_metric": spec.primary_metric, "n_prompts": len(prompts), "quant_type": qt,
        "seed": spec.seed, "max_tokens": spec.max_tokens, "base": sb, "tuned": st,
        "base_gguf": ctx.run.rel(base), "tuned_gguf": ctx.run.rel(tuned),
        "prompts": [{"instruction": row.instruction, "input": row.input,
                     "base": {**asdict(b), "format_pass": b.format_pass},
                     "tuned": {**asdict(t), "format_pass": t.format_pass}}
                    for row, b, t in zip(data.rows, jb, jt)],
    }
    atomic.write_json(eval_dir / "report.json", report)
    loss_png = ctx.run.stage("train").get("artifacts", {}).get("loss_png")
    atomic.write_text(eval_dir / "report.md", render_markdown(report, f"../{loss_png}" if loss_png else None))
    atomic.write_text(eval_dir / "report.html", render_html(report, ctx.run.abs(loss_png) if loss_png else None))
    return report


def print_summary(report: dict, console) -> None:
    table = Table(title=f"base vs tuned ({report['n_prompts']} prompts, {report['quant_type']}, temperature 0)")
    for col in ("metric", "base", "tuned", "delta"):
        table.add_column(col)
    for k in report["base"]:
        b, t = report["base"][k], report["tuned"][k]
        mark = " *" if k == report["primary_metric"] else ""
        table.add_row(k + mark, f"{b:.3f}", f"{t:.3f}", f"{t - b:+.3f}")
    console.print(table)


def run(ctx: Context) -> StageResult:
    if ctx.recipe.eval is None:
        return StageResult({}, info={"skipped": "the recipe has no eval block"})
    report = evaluate(ctx)
    print_summary(report, ctx.console)
    pm = report["primary_metric"]
    arts = {"report": "eval/report.json", "report_md": "eval/report.md", "report_html": "eval/report.html"}
    info = {"primary_metric": pm, "base": report["base"][pm], "tuned": report["tuned"][pm]}
    if report["tuned"][pm] < report["base"][pm]:
        raise TutorWrapError(f"eval: the fine-tuned model is worse than the base on {pm}: "
                             f"{report['tuned'][pm]:.3f} vs {report['base'][pm]:.3f} (report: {ctx.run.path / arts['report_md']})",
                             hint="train longer or check the data; the report shows the outputs side by side")
    return StageResult(arts, info=info)
