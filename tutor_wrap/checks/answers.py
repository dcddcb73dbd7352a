"""Judging one answer: did it stop by itself, run away into a new turn, and pass the recipe's format checks.

`judge` returns a `Judged` record; `summarize` turns a list of them into the rates the eval report compares.
"""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass, field

from tutor_wrap.checks import code_runs, math_answer
from tutor_wrap.recipe.schema import EvalChecks

_FENCE = re.compile(r"```[A-Za-z0-9_+-]*\n.*?```", re.S)


CONTENT_CHECKS = ("code_runs", "answer_match")   # what the answer does, beside how it looks


@dataclass(frozen=True)
class Judged:
    text: str
    eos: bool
    runaway: bool
    checks: dict[str, bool]
    words: int
    details: dict[str, str] = field(default_factory=dict)   # why a check failed (the code's error line)

    @property
    def format_pass(self) -> bool:
        """Stops by itself, no runaway turn, and every format check of the recipe."""
        return self.eos and not self.runaway and all(v for k, v in self.checks.items() if k not in CONTENT_CHECKS)

    @property
    def all_pass(self) -> bool:
        """The format and the content: what the report shows green."""
        return self.format_pass and all(self.checks.values())

    def passes(self, metric: str) -> bool:
        """This answer's share of a rate metric (for per-prompt statistics)."""
        if metric == "format_pass_rate":
            return self.format_pass
        if metric == "all_checks_rate":
            return self.all_pass
        if metric == "eos_rate":
            return self.eos
        if metric == "no_runaway_rate":
            return not self.runaway
        return bool(self.checks.get(metric.removesuffix("_rate")))


def judge(text: str, eos: bool, section_markers: tuple[str, ...], checks: EvalChecks,
          reference: str | None = None) -> Judged:
    runaway = any(m in text for m in section_markers)
    words = len(text.split())
    results: dict[str, bool] = {}
    details: dict[str, str] = {}
    if checks.code_block:
        results["code_block"] = bool(_FENCE.search(text))
    if checks.max_words is not None:
        results["max_words"] = words <= checks.max_words
    if checks.regex is not None:
        results["regex"] = re.search(checks.regex, text) is not None
    if checks.code_runs:
        ran = code_runs.check(text)
        results["code_runs"] = ran.runs
        if ran.error:
            details["code_runs"] = ran.error
    if checks.answer_match and reference:
        results["answer_match"] = math_answer.matches(text, reference)
        if not results["answer_match"]:
            details["answer_match"] = f"final answer {math_answer.final_answer(text)!r}, reference " \
                                      f"{math_answer.final_answer(reference) or reference.strip()!r}"
    return Judged(text, eos, runaway, results, words, details)


def reference_similarity(texts: list[str], references: list[str]) -> float | None:
    """Mean ROUGE-L F1 (Google's rouge-score package) of the answers against the reference answers that exist."""
    pairs = [(t, r) for t, r in zip(texts, references) if r]
    if not pairs:
        return None
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return statistics.fmean(scorer.score(r, t)["rougeL"].fmeasure for t, r in pairs)


def summarize(judged: list[Judged]) -> dict[str, float]:
    n = len(judged)
    words = [j.words for j in judged]
    out = {
        "format_pass_rate": sum(j.format_pass for j in judged) / n,
        "eos_rate": sum(j.eos for j in judged) / n,
        "no_runaway_rate": sum(not j.runaway for j in judged) / n,
    }
    for name in judged[0].checks if judged else ():
        out[f"{name}_rate"] = sum(j.checks[name] for j in judged) / n
    if any(k in CONTENT_CHECKS for k in (judged[0].checks if judged else ())):
        out["all_checks_rate"] = sum(j.all_pass for j in judged) / n
    out["mean_words"] = statistics.fmean(words)
    out["median_words"] = statistics.median(words)
    return out
