"""Export stage: merged HF model -> f16 GGUF -> each quant type, each one checked, then the GGUFs' fidelity to the
merged model on the held-out prompts."""

from __future__ import annotations

from rich.markup import escape

from tutor_wrap.backends import llamacpp
from tutor_wrap.backends.gguf_export import export_model
from tutor_wrap.checks.fidelity import export_fidelity
from tutor_wrap.checks.gguf import verify
from tutor_wrap.core import atomic
from tutor_wrap.planning.inputs import dataset_format, eval_prompts_sha256, eval_rows
from tutor_wrap.recipe.schema import Recipe
from tutor_wrap.stages.base import Context, StageResult

NAME = "export"
DEPENDS = ("merge",)


def heldout_examples(recipe: Recipe) -> list[tuple[str, str]] | None:
    """(prompt in the training format, reference answer or "") for each row of the recipe's eval file."""
    rows = eval_rows(recipe)
    if rows is None:
        return None
    fmt = dataset_format(recipe)
    return [(fmt.prompt(r), fmt.answer(r)) for r in rows]


def inputs(ctx: Context) -> dict:
    # Fidelity reads the eval prompts file and nothing else of `eval:`; editing max_tokens or checks redoes eval only.
    r = ctx.recipe
    return {"merge": ctx.run.stage("merge").get("fingerprint"), "quant_types": r.export.quant_types,
            "accelerator": ctx.hardware.accelerator, "eval_prompts_sha256": eval_prompts_sha256(r)}


def run(ctx: Context) -> StageResult:
    model_dir = ctx.run.artifact("merge", "model")
    out_dir = ctx.run.sub("export")
    report = export_model(model_dir, out_dir, ctx.recipe.name, ctx.recipe.export.quant_types, ctx.hardware.accelerator,
                          out_dir / "export.log")
    ll = llamacpp.locate()
    template = dataset_format(ctx.recipe).chat_template
    for kind, info in report["files"].items():
        info.update(verify(ll, out_dir / info["path"], kind, meta=info, chat_template=template))
        info.pop("chat_template", None)   # the same text for every file: kept once, below
    report["chat_template"] = template
    examples = heldout_examples(ctx.recipe)
    report["fidelity"] = (export_fidelity(model_dir, out_dir, report, examples) if examples is not None
                          else {"skipped": "the recipe has no eval prompts"})
    atomic.write_json(out_dir / "report.json", report)
    arts = {"report": ctx.run.rel(out_dir / "report.json")}
    for kind, info in report["files"].items():
        arts[f"gguf_{kind}"] = ctx.run.rel(out_dir / info["path"])
        agree = next((v for k, v in info.items() if k.startswith("agreement_with_")), None)
        ctx.console.print(f"export: {escape(info['path'])}  {info['size_bytes'] / 1e6:.1f} MB  file_type {info['file_type']}"
                          + (f"  fallback tensors {info['fallback_tensors']}" if "fallback_tensors" in info else "")
                          + (f"  PPL {info['perplexity']:.3f}" if "perplexity" in info else "")
                          + (f" ({info['perplexity_change_pct']:+.2f}%)" if "perplexity_change_pct" in info else "")
                          + (f"  greedy agreement with f16 {agree['agree']}/{agree['prompts']} on "
                             f"{agree['tokens']} tokens" if agree else ""))
    hf = next((v for k, v in report["fidelity"].items() if k.startswith("hf_vs_")), None)
    if hf:
        ctx.console.print(f"export: merged HF model vs {report['outtype'].upper()} GGUF: {hf['agree']}/"
                          f"{hf['prompts']} prompts agree on the first {hf['tokens']} greedy tokens "
                          f"(mean matching prefix {hf['mean_matching_prefix']:.1f})")
    return StageResult(arts, info={"llama_cpp": report["llama_cpp"]})
