"""Export stage: merged HF model -> f16 GGUF -> each quant type, each one checked, then the GGUFs' fidelity to the
merged model on the held-out prompts."""

from __future__ import annotations

from rich.markup import escape

from tutor_wrap.backends import hf_generate, llamacpp
from tutor_wrap.backends.gguf_export import export_model, vocab_problem
from tutor_wrap.backends.merge import MergeReport
from tutor_wrap.checks.fidelity import export_fidelity, reference_request
from tutor_wrap.checks.gguf import verify
from tutor_wrap.core.errors import TutorWrapError
from tutor_wrap.core.units import GIB
from tutor_wrap.planning import calibration
from tutor_wrap.planning.budgets import export_need, hf_reference_mode, hf_reference_need_of
from tutor_wrap.planning.preflight import Verdict, export_verdict
from tutor_wrap.stages.base import Context, Pre, StageResult

NAME = "export"
DEPENDS = ("merge",)


def merge_greedy(ctx: Context) -> dict | None:
    """The continuations the merge verification recorded (None: no merge report, or it has none)."""
    path = ctx.run.stage("merge").get("artifacts", {}).get("report")
    if not path or not ctx.run.abs(path).is_file():
        return None
    return (MergeReport.load(ctx.run.abs(path)).verification or {}).get("greedy")


def check(pre: Pre) -> list[Verdict]:
    """Disk for the GGUFs, and that llama.cpp's converter takes the base model's tokenizer (the trained model
    keeps it): found in seconds now, not after training and merging."""
    model_dir = pre.inputs.model_dir if pre.inputs else None
    if model_dir is not None:
        try:
            ll = llamacpp.locate()
        except TutorWrapError:
            ll = None               # not built yet: preflight says so, and export would build nothing without it
        problem = vocab_problem(ll, model_dir) if ll is not None else None
        if problem:
            raise TutorWrapError(f"{model_dir}: llama.cpp's converter ({ll.version}) refuses this model's tokenizer: "
                                 f"{problem}; the model could be trained but not exported to GGUF",
                                 hint="pick a base model whose tokenizer llama.cpp supports (the model's own tokenizer "
                                      "files: tokenizer.json, and tokenizer.model for SentencePiece models), or a "
                                      "newer llama.cpp via LLAMA_CPP_DIR")
    return [export_verdict(pre.recipe, pre.hardware, pre.run_dir)]


def inputs(ctx: Context) -> dict:
    # Fidelity reads the eval prompts file and nothing else of `eval:`; editing max_tokens or checks redoes eval only.
    r = ctx.recipe
    return {"merge": ctx.run.stage("merge").get("fingerprint"), "quant_types": r.export.quant_types,
            "accelerator": ctx.hardware.accelerator, "eval_prompts_sha256": ctx.resolved.eval_sha256}


def run(ctx: Context) -> StageResult:
    model_dir = ctx.run.artifact("merge", "model")
    out_dir = ctx.run.sub("export")
    examples = ctx.resolved.heldout_examples()
    # The merged model's own greedy continuations: recorded by the merge verification when it had the model
    # loaded; otherwise (a full fine-tune, a check skipped for RAM, other prompts) computed here, beside the
    # conversion when both fit the RAM, after it when only one at a time does, not at all when the model does not.
    req = reference_request(examples)
    hf_texts = req.matches(merge_greedy(ctx)) if req else None
    hf_from, mode = "the merge verification", None
    if req and hf_texts is None:
        need, weights_bytes = hf_reference_need_of(model_dir)
        mode, hf_from = hf_reference_mode(need, weights_bytes, ctx.hardware.ram_available_bytes)
    hf_out = out_dir / ".hf_greedy.json"
    hf_proc = hf_generate.start(model_dir, req, hf_out) if mode == "beside" else None
    try:
        report = export_model(model_dir, out_dir, ctx.recipe.name, ctx.recipe.export.quant_types,
                              ctx.hardware.accelerator, out_dir / "export.log")
        if hf_proc is not None:
            hf_texts = hf_generate.finish(hf_proc, hf_out)
    finally:
        if hf_proc is not None and hf_proc.poll() is None:
            hf_proc.kill()
            hf_proc.wait()
    if mode == "after":
        hf_texts = hf_generate.continuations(model_dir, req, hf_out)
    ll = llamacpp.locate()
    template = ctx.resolved.chat_template
    for kind, info in report.files.items():
        checked = verify(ll, out_dir / info.path, kind, meta=info.metadata, chat_template=template)
        info.sample, info.chat_template_matches_training = checked["sample"], checked["chat_template_matches_training"]
        info.metadata.pop("chat_template", None)   # the same text for every file: kept once, below
    report.chat_template = template
    report.fidelity = (export_fidelity(model_dir, out_dir, report, examples, hf_texts, hf_skipped=hf_from,
                                       note=lambda msg: ctx.console.print(f"export: {escape(msg)}"))
                       if examples is not None else {"skipped": "the recipe has no eval prompts"})
    if examples is not None:
        report.fidelity["hf_reference_from"] = hf_from
    _record_peaks(ctx, report)
    report.save(out_dir / "report.json")
    arts = {"report": ctx.run.rel(out_dir / "report.json")}
    unq = report.unquantized_kind
    for kind, info in report.files.items():
        arts[f"gguf_{kind}"] = ctx.run.rel(out_dir / info.path)
        agree = info.agreement_with_unquantized
        ctx.console.print(f"export: {escape(info.path)}  {info.size_bytes / 1e6:.1f} MB  file_type {info.file_type}"
                          + (f"  fallback tensors {info.fallback_tensors}" if info.fallback_tensors is not None else "")
                          + (f"  PPL {info.perplexity:.3f}" if info.perplexity is not None else "")
                          + (f" ({info.perplexity_change_pct:+.2f}%)" if info.perplexity_change_pct is not None else "")
                          + (f"  greedy agreement with {unq} {agree['agree']}/{agree['prompts']} on "
                             f"{agree['tokens']} tokens" if agree else ""))
    hf = report.fidelity.get("hf_vs_" + unq)
    if hf and "skipped" in hf:
        ctx.console.print(f"export: merged HF model vs {unq} GGUF: {escape(hf['skipped'])}")
    elif hf:
        ctx.console.print(f"export: merged HF model vs {unq} GGUF: {hf['agree']}/"
                          f"{hf['prompts']} prompts agree on the first {hf['tokens']} greedy tokens "
                          f"(mean matching prefix {hf['mean_matching_prefix']:.1f})")
    metrics: dict[str, float] = {}
    for kind, info in report.files.items():
        agree = info.agreement_with_unquantized
        metrics.update({f"{kind}/size_gib": info.size_bytes / GIB, f"{kind}/perplexity": info.perplexity,
                        f"{kind}/perplexity_change_pct": info.perplexity_change_pct,
                        f"{kind}/agreement_with_{unq}": agree["agree"] / agree["prompts"] if agree else None})
    return StageResult(arts, info={"llama_cpp": report.llama_cpp}, metrics=metrics)


def _record_peaks(ctx: Context, report) -> None:
    """The converter's and each llama-quantize's measured peak RSS beside the prediction, kept for this machine's
    next predictions (planning/calibration.py) and noted when far off."""
    unq = report.files.get(report.unquantized_kind)
    if unq is None:
        return
    for kind, info in report.files.items():
        if not info.made_peak_rss_bytes:
            continue
        step = "convert" if kind == report.unquantized_kind else "quantize"
        need = export_need(step, unq.size_bytes, ctx.hardware)
        off, far = calibration.keep(ctx.hardware, f"export-{step}", str(ctx.run.path), need["predicted_bytes"],
                                    info.made_peak_rss_bytes, model_part_bytes=need["model_part_bytes"], quant=kind)
        if far:
            ctx.console.print(f"[yellow]note:[/] export: the {step} of {escape(info.path)} was predicted at "
                              f"{need['predicted_bytes'] / GIB:.2f} GiB peak RSS, {off:+.0f}% off the measured "
                              f"{info.made_peak_rss_bytes / GIB:.2f} GiB (from {escape(need['basis'])}); "
                              f"{calibration.KEPT}")
