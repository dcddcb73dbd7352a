"""Held-out overlap search at the issue's size: 100k training rows against 1k held-out rows (data/overlap.find).

Prints the wall time (median of --repeat runs) and the process's peak RSS; the target is 60 s and 2 GB on 2 cores.
The rows are synthetic, made of a 5000-word vocabulary so that unrelated rows share few 3-grams, with planted
exact and near copies so that the search has something to find (their count is printed and checked).

    .venv/bin/python bench/overlap.py [--train 100000] [--eval 1000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import random
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tutor_wrap.data.overlap import Text, find  # noqa: E402


def rows(n: int, rng: random.Random, vocab: list[str], start: int = 1) -> list[Text]:
    out = []
    for i in range(n):
        prompt = " ".join(rng.choice(vocab) for _ in range(rng.randint(12, 40)))
        answer = " ".join(rng.choice(vocab) for _ in range(rng.randint(20, 120)))
        out.append(Text(start + i, prompt, answer))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--train", type=int, default=100_000)
    ap.add_argument("--eval", type=int, default=1_000)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(5000)]
    train = rows(a.train, rng, vocab)
    heldout = rows(a.eval, rng, vocab)
    planted_exact, planted_near = 10, 10
    for k in range(planted_exact):         # an eval prompt copied from a training row, case and spaces changed
        t = train[k * 997]
        heldout[k] = Text(heldout[k].line, "  " + t.prompt.upper() + " ", heldout[k].answer)
    for k in range(planted_near):          # a training prompt with one word changed
        t = train[k * 991 + 5]
        words = t.prompt.split()
        words[len(words) // 2] = "edited"
        heldout[planted_exact + k] = Text(heldout[planted_exact + k].line, " ".join(words), heldout[k].answer)
    planted_train = 10
    for k in range(planted_train):         # a training row copied further down with one word of its answer changed
        t = train[k * 1013 + 7]
        words = t.answer.split()
        words[len(words) // 2] = "edited"
        at = len(train) - 1 - k * 37
        train[at] = Text(train[at].line, t.prompt, " ".join(words))
    times = []
    for _ in range(a.repeat):
        t0 = time.perf_counter()
        ov = find(train, heldout)
        times.append(time.perf_counter() - t0)
    exact = sum(1 for p in ov.exact if p.part == "prompt")
    near = sum(1 for p in ov.near if p.part == "prompt")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"overlap: {a.train} training rows x {a.eval} held-out rows: median {statistics.median(times):.1f} s "
          f"(runs: {', '.join(f'{t:.1f}' for t in times)}), peak RSS {peak:.0f} MiB; "
          f"found {exact}/{planted_exact} planted exact, {near}/{planted_near} planted near, "
          f"{len(ov.near_train)}/{planted_train} planted near-copy training pairs")
    if exact < planted_exact or near < planted_near or len(ov.near_train) < planted_train:
        sys.exit("missed a planted overlap")


if __name__ == "__main__":
    main()
