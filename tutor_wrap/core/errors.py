"""One exception type for everything a person can fix.

The CLI prints its message alone (no traceback) and exits non-zero, so every raise site must say what is wrong,
where (file, line or key) and what to do about it.
"""


class TutorWrapError(Exception):
    """An error with a message meant for a person, not a developer."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.hint = hint

    def __str__(self) -> str:
        base = super().__str__()
        return f"{base}\n  fix: {self.hint}" if self.hint else base
