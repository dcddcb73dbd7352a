"""Eval stage: the base (in the training format, and in its own chat template when it has one) against the tune,
same held-out prompts, same quant type, greedy through llama-server; format and content checks per answer, paired
statistics per prompt, the verdict against the better base arm."""

from __future__ import annotations

import time
from dataclasses import asdict

from rich.markup import escape

from tutor_wrap.answers import code_runs
from tutor_wrap.backends import llamacpp
from tutor_wrap.backends.gguf_export import cached_gguf
from tutor_wrap.backends.llama_server import Server, answer_all, serve_many
from tutor_wrap.checks.answers import Judged, judge, reference_similarity, summarize
from tutor_wrap.checks.fidelity import ppl_ctx, reference_text
from tutor_wrap.checks.stats import paired
from tutor_wrap.core import atomic
from tutor_wrap.core.errors import TutorWrapError
from tutor_wrap.core.units import GIB, duration
from tutor_wrap.planning import calibration
from tutor_wrap.planning.budgets import serve_need
from tutor_wrap.planning.generation import generation_layout, generation_seconds
from tutor_wrap.planning.preflight import Verdict
from tutor_wrap.data.format import Format
from tutor_wrap.recipe.schema import EvalSpec
from tutor_wrap.runtime.eval_report import overlap_line, render_html, render_markdown
from tutor_wrap.runtime.progress import progress_bar
from tutor_wrap.runtime.tables import eval_table
from tutor_wrap.stages.base import Context, Pre, StageResult

NAME = "eval"
DEPENDS = ("export",)


def generate(servers: list[Server], requests: list, references: list[str], spec: EvalSpec, fmt: Format, label: str,
             console, *, chat: bool = False) -> list[Judged]:
    """One greedy answer per prompt from running llama-servers of one model (one request at a time each, prompt
    cache off): raw training prompts to /completion, or chat messages to /v1/chat/completions (the GGUF's own
    template)."""
    with progress_bar(console, f"eval {label}", len(requests)) as advance:
        answers = answer_all(servers, requests, n_predict=spec.max_tokens, seed=spec.seed, chat=chat, done=advance)
    return [judge(text, stopped, fmt.section_markers, spec.checks, reference)
            for (text, stopped), reference in zip(answers, references)]


def _announce(ctx: Context, servers: list, ctx_tokens: int, answers: int, max_tokens: int) -> dict:
    """Before the answers: the generation's time at most, from one server's measured speed (a short warm-up)."""
    tps = servers[0].speed(ctx_tokens)[0]
    est = generation_seconds(answers, max_tokens, tps, len(servers))
    if est is not None:
        ctx.console.print(f"eval: {answers} answers of at most {max_tokens} tokens, {tps:.0f} tokens/s per server "
                          f"measured: at most {duration(est)} (the bars show the time left)")
    return {"warmup_tokens_per_second": round(tps, 2), "estimated_max_seconds": est and round(est, 3)}


def check(pre: Pre) -> list[Verdict]:
    """The eval rows and what their checks need are checked when the recipe is resolved; here, that model-written
    code can be run in a sandbox on this machine, before hours of training."""
    _sandbox_or_refuse(pre.recipe)
    return []


def _sandbox_or_refuse(r) -> None:
    if r.eval is not None and r.eval.checks.value("code_runs") is True and (problem := code_runs.sandbox_problem()):
        raise TutorWrapError(f"{r.source}: eval.checks.code_runs runs the model's code in a sandbox, and {problem}",
                             hint="install bubblewrap (Debian/Ubuntu: apt install bubblewrap), or set "
                                  "eval.checks.code_runs: unconfined to run it with limits only (the code could then "
                                  "read and write what you can)")


def inputs(ctx: Context) -> dict:
    r = ctx.recipe
    if r.eval is None:
        return {"eval": None}
    return {"export": ctx.run.stage("export").get("fingerprint"), "eval": r.eval.model_dump(mode="json"),
            "eval_prompts_sha256": ctx.resolved.eval_sha256, "base_model": r.base_model}


def evaluate(ctx: Context) -> dict:
    r = ctx.recipe
    spec = r.eval
    assert spec is not None
    _sandbox_or_refuse(r)      # also here: `eval` on a run dir may come on another machine than the plan did
    fmt = ctx.resolved.fmt
    rows = ctx.resolved.eval_rows
    qt = r.eval_quant_type
    if qt not in r.export.quant_types:
        raise TutorWrapError(f"{r.source}: eval.quant_type {qt} is not among export.quant_types {r.export.quant_types}",
                             hint="add it to export.quant_types or remove eval.quant_type")
    tuned = ctx.run.artifact("export", f"gguf_{qt}")
    eval_dir = ctx.run.sub("eval")
    base_dir = r.base_model_path()
    if base_dir is None:
        raise TutorWrapError("eval needs the base model on disk to build its GGUF", hint="set base_model to a local folder")
    ctx.console.print(f"eval: the base model's {qt} GGUF (built once per base model, quant type and llama.cpp "
                      "build, then taken from the cache)")
    base, base_report = cached_gguf(base_dir, qt, ctx.hardware.accelerator, eval_dir / "base-export.log")
    base_template = base_report.files[qt].metadata.get("chat_template")
    ll = llamacpp.locate()
    prompts = [fmt.prompt(row) for row in rows]
    refs = [fmt.answer(row) for row in rows]
    n_ctx = ctx.plan().sequence_len + spec.max_tokens
    arms: dict[str, list[Judged]] = {}
    layout = generation_layout(ctx.hardware, len(prompts), llamacpp.placement(ll, tuned, n_ctx))
    ctx.console.print(f"eval: {escape(layout.why)}")
    pool = {"servers": layout.servers, "threads": layout.threads, "gpu_layers": layout.gpu_layers}
    peaks = {}
    own_template = bool(base_template) and base_template != fmt.chat_template
    t0 = time.monotonic()
    with serve_many(ll, base, ctx=n_ctx, log=eval_dir / "llama-server-base.log", **pool) as servers:
        timing = _announce(ctx, servers, n_ctx, len(prompts) * (3 if own_template else 2), spec.max_tokens)
        arms["base"] = generate(servers, prompts, refs, spec, fmt, "base (training format)", ctx.console)
        if own_template:
            # A fair baseline: an Instruct base prompted the way it was tuned, through its own chat template.
            # (Chat rows trained in the base's own template: the first arm is already that.)
            chats = [fmt.plain_messages(row) for row in rows]
            arms["base_own_template"] = generate(servers, chats, refs, spec, fmt, "base (its own chat template)",
                                                 ctx.console, chat=True)
        peaks["base"] = _server_peak(ctx, servers, base, n_ctx)
    with serve_many(ll, tuned, ctx=n_ctx, log=eval_dir / "llama-server-tuned.log", **pool) as servers:
        arms["tuned"] = generate(servers, prompts, refs, spec, fmt, "tuned", ctx.console)
        peaks["tuned"] = _server_peak(ctx, servers, tuned, n_ctx)
    timing["seconds"] = round(time.monotonic() - t0, 1)
    summaries = {arm: summarize(judged) for arm, judged in arms.items()}
    for arm, judged in arms.items():
        similarity = reference_similarity([j.text for j in judged], refs)
        if similarity is not None:
            summaries[arm]["reference_rougeL_f1"] = similarity
    # Perplexity of the held-out examples (prompt + reference answer, in the training format; lower is better),
    # when the eval file has answers. llama-perplexity scores whole chunks, so the prompt's tokens count too.
    ref = reference_text([(p, fmt.answer(row)) for p, row in zip(prompts, rows)], eval_dir / "reference.txt")
    if ref is not None:
        ppl_n = ppl_ctx(ctx.run.artifact("merge", "model") / "tokenizer.json", ref.read_text("utf-8"))
        summaries["base"]["heldout_ppl"] = llamacpp.perplexity(ll, base, ref, ctx=ppl_n)[0]
        summaries["tuned"]["heldout_ppl"] = llamacpp.perplexity(ll, tuned, ref, ctx=ppl_n)[0]
    pm = spec.primary_metric
    baselines = [a for a in arms if a != "tuned"]
    best = max(baselines, key=lambda a: summaries[a][pm])
    stats = {f"tuned_vs_{a}": paired([j.passes(pm) for j in arms[a]], [j.passes(pm) for j in arms["tuned"]])
             for a in baselines}
    lines = [getattr(row, "line", i + 1) for i, row in enumerate(rows)]
    overlapping = set(ctx.resolved.overlap.eval_lines) if ctx.resolved.overlap else set()
    report = {
        "recipe": r.name, "primary_metric": pm, "n_prompts": len(prompts), "quant_type": qt,
        "seed": spec.seed, "max_tokens": spec.max_tokens, "arms": list(arms), **summaries,
        "generation": {**pool, "why": layout.why, "server_peaks": peaks, "timing": timing},
        "best_baseline": best, "stats": stats,
        "base_gguf": ctx.run.rel(base), "tuned_gguf": ctx.run.rel(tuned),
        **_without_overlap(arms, lines, overlapping, ctx.resolved.overlap, pm),
        "prompts": [{"instruction": fmt.title(row), "line": lines[i], "overlaps_training": lines[i] in overlapping,
                     **{arm: {**asdict(judged[i]), "format_pass": judged[i].format_pass,
                              "all_pass": judged[i].all_pass} for arm, judged in arms.items()}}
                    for i, row in enumerate(rows)],
    }
    atomic.write_json(eval_dir / "report.json", report)
    loss_png = ctx.run.stage("train").get("artifacts", {}).get("loss_png")
    atomic.write_text(eval_dir / "report.md", render_markdown(report, f"../{loss_png}" if loss_png else None))
    atomic.write_text(eval_dir / "report.html", render_html(report, ctx.run.abs(loss_png) if loss_png else None))
    return report


def _server_peak(ctx: Context, servers: list[Server], gguf, n_ctx: int) -> dict | None:
    """One llama-server's measured peak RSS (the largest of the pool) beside its prediction, kept for this machine's
    next predictions (planning/calibration.py) and noted when far off."""
    peak = max((s.peak_rss_bytes() or 0 for s in servers), default=0)
    if not peak:
        return None
    need = serve_need(gguf, n_ctx, ctx.hardware)
    off, far = calibration.keep(ctx.hardware, "serve", str(ctx.run.path), need["predicted_bytes"], peak,
                                model_part_bytes=need["model_part_bytes"], gguf_bytes=gguf.stat().st_size, ctx=n_ctx)
    if far:
        ctx.console.print(f"[yellow]note:[/] eval: llama-server's predicted peak RSS ({need['predicted_bytes'] / GIB:.2f} "
                          f"GiB) was {off:+.0f}% off the measured {peak / GIB:.2f} GiB (predicted from "
                          f"{escape(need['basis'])}); {calibration.KEPT}")
    return {"peak_rss_bytes": peak, "predicted_bytes": need["predicted_bytes"], "basis": need["basis"]}


def _without_overlap(arms: dict[str, list[Judged]], lines: list[int], overlapping: set[int], overlap,
                     pm: str) -> dict:
    """Beside the verdict on every prompt: which prompts are (near-)copies of training rows, and the metrics and the
    paired test on the prompts that are not (data/overlap.py)."""
    if not overlapping:
        return {}
    keep = [i for i, line in enumerate(lines) if line not in overlapping]
    out = {"overlap": {k: v for k, v in overlap.to_dict().items() if k != "near_train"},
           "without_overlap": {"n_prompts": len(keep)}}
    if keep:
        out["without_overlap"].update({arm: summarize([judged[i] for i in keep]) for arm, judged in arms.items()})
        out["without_overlap"]["stats"] = {
            f"tuned_vs_{a}": paired([arms[a][i].passes(pm) for i in keep], [arms["tuned"][i].passes(pm) for i in keep])
            for a in arms if a != "tuned"}
    return out


def run(ctx: Context) -> StageResult:
    if ctx.recipe.eval is None:
        return StageResult({}, info={"skipped": "the recipe has no eval block"})
    report = evaluate(ctx)
    ctx.console.print(eval_table(report))
    pm, best = report["primary_metric"], report["best_baseline"]
    st = report["stats"][f"tuned_vs_{best}"]
    ctx.console.print(f"eval: tuned vs {best} on {pm}: {st['wins']} prompts better, {st['losses']} worse, "
                      f"{st['ties']} the same; exact McNemar p = {st['p_value']:.2g}"
                      + ("" if st["significant"] else " (not significant at 0.05: the difference may be chance)"))
    if line := overlap_line(report):
        ctx.console.print("eval: " + escape(line))
    arts = {"report": "eval/report.json", "report_md": "eval/report.md", "report_html": "eval/report.html"}
    info = {"primary_metric": pm, "base": report[best][pm], "tuned": report["tuned"][pm], "baseline": best,
            "p_value": st["p_value"]}
    metrics = {f"{arm}/{k}": v for arm in report["arms"] for k, v in report[arm].items()}
    metrics.update({f"{name}/{k}": s[k] for name, s in report["stats"].items() for k in ("wins", "losses", "p_value")})
    if report["tuned"][pm] < report[best][pm]:
        raise TutorWrapError(f"eval: the fine-tuned model is worse than the base ({best}) on {pm}: "
                             f"{report['tuned'][pm]:.3f} vs {report[best][pm]:.3f} (report: {ctx.run.path / arts['report_md']})",
                             hint="train longer or check the data; the report shows the outputs side by side")
    return StageResult(arts, info=info, metrics=metrics)
