"""The final answer of a math solution, compared with the reference: what counts on MetaMathQA or GSM8K, where a
well-written solution with the wrong number is wrong.

Extraction, in order: MetaMathQA's "The answer is: X", GSM8K's "#### X", LaTeX's \\boxed{X}, the last number in
the text, else its last line (a short text answer). Numbers are compared as numbers (commas, a leading $, a
trailing period and "%" removed; 7.0 == 7; fractions a/b evaluated); anything else is compared as trimmed text.
"""

from __future__ import annotations

import re
from fractions import Fraction

from tutor_wrap.answers.check import AnswerCheck, Verdict

_MARKERS = (re.compile(r"The answer is:?\s*(.+)", re.I), re.compile(r"####\s*(.+)"), re.compile(r"\\boxed\{([^{}]+)\}"))
_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?(?:/\d+)?")


def final_answer(text: str) -> str | None:
    for marker in _MARKERS:
        hits = marker.findall(text)
        if hits:
            return hits[-1].strip().splitlines()[0].strip()
    numbers = _NUMBER.findall(text)
    if numbers:
        return numbers[-1]
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else None


def as_number(answer: str) -> Fraction | None:
    m = _NUMBER.search(answer.replace(" ", ""))
    if m is None:
        return None
    raw = m.group(0).replace(",", "").replace("$", "")
    try:
        return Fraction(raw)
    except (ValueError, ZeroDivisionError):
        return None


def matches(text: str, reference: str) -> bool:
    """Does `text`'s final answer equal `reference`'s (a full reference solution or the bare answer)?"""
    got, want = final_answer(text), final_answer(reference) or reference.strip()
    if got is None or not want:
        return False
    a, b = as_number(got), as_number(want)
    if a is not None and b is not None:
        return a == b
    return got.strip().rstrip(".").lower() == want.strip().rstrip(".").lower()


def _judge(text: str, _on: bool, reference: str | None) -> Verdict:
    if matches(text, reference or ""):
        return Verdict(True)
    return Verdict(False, f"final answer {final_answer(text)!r}, reference "
                          f"{final_answer(reference or '') or (reference or '').strip()!r}")


CHECK = AnswerCheck("answer_match", bool, content=True, needs_reference=True, judge=_judge,
                    doc="the final answer equals the reference's (numbers compared as numbers)")
