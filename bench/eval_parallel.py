"""Eval generation: one server vs several, one prompt at a time vs several in flight, on a finished run (the demo's).

    .venv/bin/python bench/eval_parallel.py [--run runs/demo] [--variants 1x1 2x1 1x4] [--arms base tuned] [--repeats 3]

A variant SxN is S llama-servers of the same GGUF with N slots each (N requests decoded together per server),
the machine's cores shared out over the servers (threads = cores // S, as planning/generation.py does). For each
arm (the base's and the tune's GGUF of the eval quant type, as the eval stage uses them) and variant: every
held-out prompt of the recipe in the training format, greedy, the recipe's max_tokens; prints the median
generated tokens per second (counted with the model's own tokenizer), the ratio to the first variant, and how
many answers differ from the first variant's (continuous batching changes the arithmetic with the batch, so a
near-tie can flip) with the first differing token of each. Results go to bench/results/eval_parallel.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tutor_wrap.backends import llamacpp  # noqa: E402
from tutor_wrap.backends.llama_server import answer_all, serve, serve_many  # noqa: E402
from tutor_wrap.machine.probe import probe  # noqa: E402
from tutor_wrap.recipe.resolve import resolve  # noqa: E402
from tutor_wrap.planning.planner import cpu_threads  # noqa: E402
from tutor_wrap.recipe.load import load_recipe  # noqa: E402


def run_variant(ll, gguf: Path, ctx: int, servers: int, slots: int, threads: int, prompts, recipe):
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "server.log"
        if slots > 1:
            cm = serve(ll, gguf, ctx=ctx, log=log, slots=slots, threads=threads)
        else:
            cm = serve_many(ll, gguf, ctx=ctx, log=log, servers=servers, threads=threads)
        with cm as s:
            t0 = time.perf_counter()
            answers = answer_all(s, prompts, n_predict=recipe.eval.max_tokens, seed=recipe.eval.seed, in_flight=slots)
            return answers, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, default=REPO / "runs/demo")
    ap.add_argument("--recipe", type=Path, default=REPO / "recipes/demo.yml")
    ap.add_argument("--variants", nargs="+", default=["1x1", "2x1", "1x4"])
    ap.add_argument("--arms", nargs="+", default=["base", "tuned"], choices=["base", "tuned"])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from tokenizers import Tokenizer

    recipe = load_recipe(args.recipe)
    res = resolve(recipe)
    fmt = res.fmt
    prompts = [fmt.prompt(r) for r in res.eval_rows]
    plan = json.loads((args.run / "plan.json").read_text())["plan"]
    report = json.loads((args.run / "eval/report.json").read_text())
    ggufs = {"base": args.run / report["base_gguf"], "tuned": args.run / report["tuned_gguf"]}
    tok = Tokenizer.from_file(str(args.run / "merge/model/tokenizer.json"))
    ll = llamacpp.locate()
    ctx = plan["sequence_len"] + recipe.eval.max_tokens
    cores, why = cpu_threads(probe())
    print(f"{cores} core(s): {why}", flush=True)
    results = []
    for arm in args.arms:
        first = None
        for variant in args.variants:
            servers, slots = (int(x) for x in variant.split("x"))
            threads = max(1, cores // servers)
            rates, answers = [], None
            for _ in range(args.repeats):
                answers, dt = run_variant(ll, ggufs[arm], ctx, servers, slots, threads, prompts, recipe)
                rates.append(sum(len(tok.encode(t, add_special_tokens=False).ids) for t, _ in answers) / dt)
            texts = [t for t, _ in answers]
            first = first or {"texts": texts, "rate": statistics.median(rates)}
            differ = [i for i, (a, b) in enumerate(zip(texts, first["texts"])) if a != b]
            at = [next((k for k, (x, y) in enumerate(zip(tok.encode(texts[i]).ids, tok.encode(first["texts"][i]).ids))
                        if x != y), None) for i in differ]
            r = {"arm": arm, "servers": servers, "slots": slots, "threads_each": threads,
                 "tokens_per_s": [round(x, 1) for x in rates], "median_tokens_per_s": round(statistics.median(rates), 1),
                 "ratio_to_first": round(statistics.median(rates) / first["rate"], 2),
                 "answers_differing": len(differ), "first_differing_token": at}
            results.append(r)
            print(f"{arm:5s} {servers} server(s) x {slots} slot(s), {threads} thread(s) each: "
                  f"{r['median_tokens_per_s']:6.1f} tok/s (median of {args.repeats}: {r['tokens_per_s']}), "
                  f"x{r['ratio_to_first']:.2f} vs {args.variants[0]}; {len(differ)}/{len(prompts)} answers differ"
                  + (f" (first differing token at {at})" if differ else ""), flush=True)
    out = REPO / "bench/results/eval_parallel.json"
    out.write_text(json.dumps({"run": str(args.run), "prompts": len(prompts), "cores": cores,
                               "variants": args.variants, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
