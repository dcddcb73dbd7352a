"""Judging one answer: did it stop by itself, run away into a new turn, and pass the recipe's format checks.

`judge` returns a `Judged` record; `summarize` turns a list of them into the rates the eval report compares.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from tutor_wrap.answers.registry import ANSWER_CHECKS
from tutor_wrap.recipe.schema import EvalChecks


def content_checks() -> tuple[str, ...]:
    """What the answer does, beside how it looks (answers/check.py: `content`)."""
    return tuple(name for name, c in ANSWER_CHECKS.items() if c.content)


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
        content = content_checks()
        return self.eos and not self.runaway and all(v for k, v in self.checks.items() if k not in content)

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
    """Every check the recipe turned on (a check that compares with the reference is skipped without one)."""
    results: dict[str, bool] = {}
    details: dict[str, str] = {}
    for name, value in checks.enabled().items():
        check = ANSWER_CHECKS[name]
        if check.needs_reference and not reference:
            continue
        verdict = check.judge(text, value, reference)
        results[name] = verdict.passes
        if not verdict.passes and verdict.why_not:
            details[name] = verdict.why_not
    return Judged(text, eos, any(m in text for m in section_markers), results, len(text.split()), details)


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
    if any(k in content_checks() for k in (judged[0].checks if judged else ())):
        out["all_checks_rate"] = sum(j.all_pass for j in judged) / n
    out["mean_words"] = statistics.fmean(words)
    out["median_words"] = statistics.median(words)
    return out
