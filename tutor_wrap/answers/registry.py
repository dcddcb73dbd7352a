"""The answer checks a recipe's `eval.checks` may name, in report order. Adding one: a module that builds an
`AnswerCheck` (check.py), and one line here."""

from __future__ import annotations

from tutor_wrap.answers import code_runs, form, math_answer
from tutor_wrap.answers.check import AnswerCheck

ANSWER_CHECKS: dict[str, AnswerCheck] = {c.name: c for c in (
    form.CODE_BLOCK,
    form.MAX_WORDS,
    form.REGEX,
    code_runs.CHECK,
    math_answer.CHECK,
)}
# The rates every eval reports, whatever the checks: stopped by itself, no runaway turn, all format checks passed.
BUILTIN_METRICS = ("format_pass_rate", "eos_rate", "no_runaway_rate")


def metrics() -> tuple[str, ...]:
    """Every name eval.primary_metric may take."""
    return (*BUILTIN_METRICS, *(f"{name}_rate" for name in ANSWER_CHECKS), "all_checks_rate")
