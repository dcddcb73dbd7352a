"""The dataset formats a recipe may name (`dataset.format`). Adding one: a module implementing data/format.py's
`Format`, and one line here.

Alpaca rows carry their own prompt format; chat rows are rendered in a chat template (data/chat_templates.py),
which the recipe chooses (`dataset.chat_template`) and its resolution settles (recipe/resolve.dataset_format).
"""

from __future__ import annotations

from typing import Callable

from tutor_wrap.core.errors import TutorWrapError
from tutor_wrap.data.alpaca import ALPACA
from tutor_wrap.data.chat import SHAPES, chat_format
from tutor_wrap.data.chat_templates import ChatTemplate
from tutor_wrap.data.format import Format

# name -> the format, given the chat template (None for formats that are not chat rows)
FORMATS: dict[str, Callable[[ChatTemplate | None], Format]] = {
    ALPACA.name: lambda _: ALPACA,
    "chat": lambda t: chat_format("chat", t),
    "sharegpt": lambda t: chat_format("sharegpt", t),
}
CHAT_FORMATS = ("chat", "sharegpt")      # the formats that need a chat template
# the keys every row of a format must have: what a hub dataset's columns are mapped onto (`dataset.fields`)
ROW_KEYS: dict[str, tuple[str, ...]] = {ALPACA.name: ("instruction", "output"),
                                        **{name: (shape.field,) for name, shape in SHAPES.items()}}


def get(name: str, chat_template: ChatTemplate | None = None) -> Format:
    try:
        make = FORMATS[name]
    except KeyError:
        raise TutorWrapError(f"unknown dataset format {name!r}", hint=f"dataset.format is one of: {', '.join(FORMATS)}") from None
    if name in CHAT_FORMATS and chat_template is None:
        raise TutorWrapError(f"dataset format {name!r} needs a chat template", hint="set dataset.chat_template")
    return make(chat_template)
