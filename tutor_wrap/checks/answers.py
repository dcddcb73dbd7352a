"""Judging one answer: did it stop by itself, run away into a new turn, and pass the recipe's format checks.

`judge` returns a `Judged` record; `summarize` turns a list of them into the rates the eval report compares.
"""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass

from tutor_wrap.recipe.schema import EvalChecks

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


def judge(text: str, eos: bool, section_markers: tuple[str, ...], checks: EvalChecks) -> Judged:
    runaway = any(m in text for m in section_markers)
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
