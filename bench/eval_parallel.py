"""Eval generation with several prompts in flight vs one at a time, on a finished run (the demo's by default).

    .venv/bin/python bench/eval_parallel.py [--run runs/demo] [--slots 1 2 4] [--repeats 3]

For each slot count: one llama-server (slots requests decoded together), every held-out prompt of the recipe in
the training format, greedy, the recipe's max_tokens; prints the median generated tokens per second (tokens
counted with the model's own tokenizer), the ratio to one slot, and how many answers differ from one slot's
(continuous batching changes the arithmetic with the batch, so a near-tie can flip) with the first differing
token position of each. Results go to bench/results/eval_parallel.json.
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
from tutor_wrap.backends.llama_server import answer_all, serve  # noqa: E402
from tutor_wrap.planning.inputs import dataset_format, eval_rows  # noqa: E402
from tutor_wrap.recipe.load import load_recipe  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, default=REPO / "runs/demo")
    ap.add_argument("--recipe", type=Path, default=REPO / "recipes/demo.yml")
    ap.add_argument("--slots", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from tokenizers import Tokenizer

    recipe = load_recipe(args.recipe)
    fmt = dataset_format(recipe)
    prompts = [fmt.prompt(r) for r in eval_rows(recipe)]
    plan = json.loads((args.run / "plan.json").read_text())["plan"]
    gguf = args.run / "export" / f"{recipe.name}-{recipe.eval_quant_type}.gguf"
    tok = Tokenizer.from_file(str(args.run / "merge/model/tokenizer.json"))
    ll = llamacpp.locate()
    ctx = plan["sequence_len"] + recipe.eval.max_tokens
    results, reference = [], None
    for slots in args.slots:
        rates, answers = [], None
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as tmp, serve(ll, gguf, ctx=ctx, log=Path(tmp) / "server.log",
                                                             slots=slots) as server:
                t0 = time.perf_counter()
                answers = answer_all(server, prompts, n_predict=recipe.eval.max_tokens, seed=recipe.eval.seed,
                                     in_flight=slots)
                dt = time.perf_counter() - t0
            tokens = sum(len(tok.encode(text, add_special_tokens=False).ids) for text, _ in answers)
            rates.append(tokens / dt)
        texts = [t for t, _ in answers]
        reference = reference or texts
        differ = [i for i, (a, b) in enumerate(zip(texts, reference)) if a != b]
        first = [next((k for k, (x, y) in enumerate(zip(tok.encode(texts[i]).ids, tok.encode(reference[i]).ids))
                       if x != y), None) for i in differ]
        results.append({"slots": slots, "tokens_per_s": [round(r, 1) for r in rates],
                        "median_tokens_per_s": round(statistics.median(rates), 1), "answers_differing": len(differ),
                        "first_differing_token": first})
        r = results[-1]
        print(f"slots {slots}: {r['median_tokens_per_s']:6.1f} tok/s (median of {args.repeats}: {r['tokens_per_s']}), "
              f"x{r['median_tokens_per_s'] / results[0]['median_tokens_per_s']:.2f} vs 1 slot; "
              f"{len(differ)}/{len(prompts)} answers differ from 1 slot's"
              + (f" (first differing token at {first})" if differ else ""), flush=True)
    out = REPO / "bench/results/eval_parallel.json"
    out.write_text(json.dumps({"run": str(args.run), "prompts": len(prompts), "results": results}, indent=1))


if __name__ == "__main__":
    main()
