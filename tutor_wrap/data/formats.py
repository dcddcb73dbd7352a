"""The dataset formats a recipe may name (`dataset.format`). Adding one: a module implementing data/format.py's
`Format`, and one line here."""

from __future__ import annotations

from tutor_wrap.core.errors import TutorWrapError
from tutor_wrap.data.alpaca import ALPACA
from tutor_wrap.data.format import Format

FORMATS: dict[str, Format] = {
    ALPACA.name: ALPACA,
}


def get(name: str) -> Format:
    try:
        return FORMATS[name]
    except KeyError:
        raise TutorWrapError(f"unknown dataset format {name!r}", hint=f"dataset.format is one of: {', '.join(FORMATS)}") from None
