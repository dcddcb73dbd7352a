"""What the wrapper costs next to the tools it drives: the demo's merge, export and eval stages against the bare
tools on the same inputs, median of N.

    .venv/bin/python bench/stage_overhead.py [--run runs/demo] [--recipe recipes/demo.yml] [--repeats 3]

Works on a copy of a finished run (the demo's by default; `make demo` makes it), so the run itself is untouched.
Each repeat runs the stages through the pipeline (`run --from merge`: merge, export, deploy, eval, the seconds the
manifest records) and then, by hand, what a person would run without tutor_wrap:
  merge   `axolotl merge-lora` with the same config and method;
  export  convert_hf_to_gguf.py to the same outtype, then llama-quantize to each quant type of the recipe;
  eval    one llama-server per model answering the same prompts (greedy, the recipe's max_tokens, one at a time,
          the base model also through its own chat template when the stage asked it so), and llama-perplexity of
          both models on the same reference text.
Deploy runs because the chain needs it (its tool, `ollama create`, is not on this machine); it is printed without a
tool column. Prints per stage: stage seconds, tool seconds, ratio (medians); results in
bench/results/stage_overhead.json.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rich.console import Console  # noqa: E402

from tutor_wrap.backends import llamacpp  # noqa: E402
from tutor_wrap.backends.axolotl_merge import merge_config, run_merge_lora  # noqa: E402
from tutor_wrap.backends.llama_server import answer_all, serve  # noqa: E402
from tutor_wrap.pipeline import run_pipeline  # noqa: E402
from tutor_wrap.recipe.resolve import resolve  # noqa: E402
from tutor_wrap.recipe.load import load_recipe  # noqa: E402

STAGES = ("merge", "export", "deploy", "eval")


def bare_merge(run: Path, tmp: Path) -> float:
    import yaml

    cfg = yaml.safe_load((run / "axolotl.yml").read_text())
    method = json.loads((run / "merge/report.json").read_text())["method"]
    work = tmp / "merge"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    mcfg = merge_config(cfg, Path(cfg["base_model"]), run / "train/out", work, method)
    t0 = time.perf_counter()
    rc, _, _ = run_merge_lora(mcfg, work, run / "train/out", tmp / "merge.log")
    dt = time.perf_counter() - t0
    assert rc == 0, (tmp / "merge.log").read_text()[-2000:]
    return dt


def bare_export(run: Path, tmp: Path, quant_types: list[str], ll) -> float:
    outtype = json.loads((run / "export/report.json").read_text())["outtype"]
    f16 = tmp / f"model-{outtype}.gguf"
    t0 = time.perf_counter()
    assert llamacpp.convert(ll, run / "merge/model", f16, outtype, tmp / "convert.log").returncode == 0
    for q in quant_types:
        rc, _ = llamacpp.quantize(ll, f16, tmp / f"model-{q}.gguf", q, tmp / "quantize.log")
        assert rc == 0
    return time.perf_counter() - t0


def bare_eval(run: Path, tmp: Path, recipe, ll) -> float:
    res = resolve(recipe)
    fmt, rows = res.fmt, res.eval_rows
    spec, qt = recipe.eval, recipe.eval_quant_type
    report = json.loads((run / "eval/report.json").read_text())
    base = run / report["base_gguf"]     # the base GGUF the eval stage used (the cache entry for this run's build)
    tuned = run / "export" / f"{recipe.name}-{qt}.gguf"
    n_ctx = json.loads((run / "plan.json").read_text())["plan"]["sequence_len"] + spec.max_tokens
    prompts = [fmt.prompt(r) for r in rows]
    t0 = time.perf_counter()
    with serve(ll, base, ctx=n_ctx, log=tmp / "server-base.log") as server:
        answer_all(server, prompts, n_predict=spec.max_tokens, seed=spec.seed)
        if "base_own_template" in report:
            answer_all(server, [fmt.plain_messages(r) for r in rows], n_predict=spec.max_tokens, seed=spec.seed,
                       chat=True)
    with serve(ll, tuned, ctx=n_ctx, log=tmp / "server-tuned.log") as server:
        answer_all(server, prompts, n_predict=spec.max_tokens, seed=spec.seed)
    ref = run / "eval/reference.txt"
    if ref.exists():
        from tutor_wrap.checks.fidelity import ppl_ctx

        n = ppl_ctx(run / "merge/model/tokenizer.json", ref.read_text("utf-8"))
        llamacpp.perplexity(ll, base, ref, ctx=n)
        llamacpp.perplexity(ll, tuned, ref, ctx=n)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, default=REPO / "runs/demo")
    ap.add_argument("--recipe", type=Path, default=REPO / "recipes/demo.yml")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    recipe = load_recipe(args.recipe)
    ll = llamacpp.locate()
    stage_s: dict[str, list[float]] = {s: [] for s in STAGES}
    tool_s: dict[str, list[float]] = {s: [] for s in ("merge", "export", "eval")}
    with tempfile.TemporaryDirectory(prefix="stage-overhead-") as tmpdir:
        tmp = Path(tmpdir)
        work = tmp / "run"
        shutil.copytree(args.run, work, ignore=shutil.ignore_patterns("checkpoint-*"))
        for i in range(args.repeats):
            quiet = Console(file=io.StringIO(), width=120)
            manifest = run_pipeline(recipe, work, from_stage="merge", console=quiet)
            for s in STAGES:
                stage_s[s].append(manifest["stages"][s]["seconds"])
            scratch = tmp / f"bare-{i}"
            scratch.mkdir()
            tool_s["merge"].append(bare_merge(work, scratch))
            tool_s["export"].append(bare_export(work, scratch, recipe.export.quant_types, ll))
            tool_s["eval"].append(bare_eval(work, scratch, recipe, ll))
            shutil.rmtree(scratch)
            print(f"repeat {i + 1}/{args.repeats}: " + ", ".join(
                f"{s} {stage_s[s][-1]:.1f} s" + (f" (tools {tool_s[s][-1]:.1f} s)" if s in tool_s else "")
                for s in STAGES), flush=True)
    rows = []
    print(f"\n{'stage':<8} {'stage s':>8} {'tools s':>8} {'ratio':>6}   (medians of {args.repeats})")
    for s in STAGES:
        st = statistics.median(stage_s[s])
        tl = statistics.median(tool_s[s]) if s in tool_s else None
        rows.append({"stage": s, "stage_s": stage_s[s], "tool_s": tool_s.get(s), "median_stage_s": round(st, 1),
                     "median_tool_s": round(tl, 1) if tl else None, "ratio": round(st / tl, 2) if tl else None})
        print(f"{s:<8} {st:8.1f} " + (f"{tl:8.1f} {st / tl:6.2f}" if tl else f"{'-':>8} {'-':>6}"))
    out = REPO / "bench/results/stage_overhead.json"
    out.write_text(json.dumps({"run": str(args.run), "repeats": args.repeats, "stages": rows}, indent=1) + "\n")
    print(f"\nwrote {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
