"""One answer check: its name under `eval.checks`, the value a recipe gives it, and how it judges an answer.

A check is either about the answer's form (fenced code, length, a pattern: part of `format_pass`) or about its
content (the code runs, the final answer is right: `content`, reported on its own and in `all_checks_rate`).
The recipe schema, the judging and the report all work from these records; a new check is a module that builds
one and a line in registry.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Verdict:
    passes: bool
    why_not: str | None = None     # shown in the report beside a failed answer (an error line, the wrong number)


@dataclass(frozen=True)
class AnswerCheck:
    name: str                      # the key under eval.checks; its rate is `<name>_rate`
    option: type | tuple[type, ...]   # bool: on/off; int or str: the check's parameter (None: off); a tuple: any
    content: bool                  # judges what the answer does, not how it looks
    needs_reference: bool          # compares with the eval row's reference answer
    judge: Callable[[str, Any, str | None], Verdict]    # (answer, the recipe's value, reference) -> Verdict
    doc: str                       # one line for errors and docs
    # Raises ValueError for a value the check cannot use (a regex that does not compile, a limit below 1)
    validate: Callable[[Any], None] | None = None

    def enabled(self, value: Any) -> bool:
        return value is not None and value is not False
