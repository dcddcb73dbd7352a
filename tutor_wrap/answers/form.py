"""The form checks: a fenced code block, a word limit, a pattern."""

from __future__ import annotations

import re

from tutor_wrap.answers.check import AnswerCheck, Verdict

_FENCE = re.compile(r"```[A-Za-z0-9_+-]*\n.*?```", re.S)


def _at_least_one(v: int) -> None:
    if v < 1:
        raise ValueError(f"max_words {v}: at least 1")


def _compiles(v: str) -> None:
    if not v:
        raise ValueError("an empty pattern matches every answer: write what the answer must contain")
    try:
        re.compile(v)
    except re.error as exc:
        raise ValueError(f"regex does not compile: {exc}") from None


CODE_BLOCK = AnswerCheck("code_block", bool, content=False, needs_reference=False,
                         judge=lambda text, _, __: Verdict(bool(_FENCE.search(text))),
                         doc="the answer contains a fenced code block")
MAX_WORDS = AnswerCheck("max_words", int, content=False, needs_reference=False,
                        judge=lambda text, limit, _: Verdict(len(text.split()) <= limit),
                        doc="the answer has at most this many words", validate=_at_least_one)
REGEX = AnswerCheck("regex", str, content=False, needs_reference=False,
                    judge=lambda text, pattern, _: Verdict(re.search(pattern, text) is not None),
                    doc="the answer matches this regular expression (Python's re.search)", validate=_compiles)
