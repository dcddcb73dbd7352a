"""The interface every dataset format implements, in the places training, eval and serving must agree.

A format reads its rows (with line-numbered errors), renders the training prompt of a row exactly as Axolotl
does, gives Axolotl its `datasets:` entry, and gives Ollama the TEMPLATE, SYSTEM and stop strings that
reproduce that prompt at serving time. formats.py lists the formats a recipe may name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

Row = TypeVar("Row")


@dataclass(frozen=True)
class Dataset(Generic[Row]):
    path: Path | None
    rows: list[Row]
    warnings: list[str]


class Format(ABC, Generic[Row]):
    name: str
    system: str                           # the system text training used (Ollama's SYSTEM)
    template: str                         # Go text/template for Ollama's TEMPLATE
    section_markers: tuple[str, ...]      # text that starts a new turn: seeing it in an answer means a runaway
    stops: tuple[str, ...]                # Ollama `PARAMETER stop` strings the format needs besides the EOS token
    # Jinja for the model's own `chat_template` (tokenizer_config.json, then the GGUF's tokenizer.chat_template):
    # rendered from `messages(row)` with add_generation_prompt, as Hugging Face and llama.cpp apply it, it gives
    # `prompt(row)` byte for byte. It never writes bos_token: the tokenizer adds BOS where the model has one.
    chat_template: str

    @abstractmethod
    def read(self, path: Path, *, require_output: bool = True, key: str = "dataset.path") -> Dataset[Row]:
        """The rows of a local file; TutorWrapError naming the file, the lines and the fix."""

    @abstractmethod
    def prompt(self, row: Row) -> str:
        """The training text up to where the answer starts (what eval and serving send)."""

    @abstractmethod
    def answer(self, row: Row) -> str:
        """The reference answer ("" when the row has none)."""

    @abstractmethod
    def messages(self, row: Row) -> list[dict[str, str]]:
        """The chat messages an OpenAI-style client sends for this row (chat_template renders them as `prompt`)."""

    @abstractmethod
    def user_turn(self, row: Row) -> str:
        """What a person would type for this row in any chat UI (eval prompts a base model in its own template)."""

    @abstractmethod
    def title(self, row: Row) -> str:
        """A short label for the row in reports."""

    @abstractmethod
    def axolotl_dataset(self, spec: Any, path: Path | None) -> dict[str, Any]:
        """Axolotl's `datasets:` entry for the recipe's dataset block `spec` (a local file at `path`, or a hub id)."""

    @property
    def label(self) -> str:
        """The format in words, for plans and reports."""
        return self.name

    def plain_messages(self, row: Row) -> list[dict[str, str]]:
        """The conversation as a person would send it in any chat UI (eval prompts a base model in its own template)."""
        return [{"role": "user", "content": self.user_turn(row)}]

    def axolotl_settings(self) -> dict[str, Any]:
        """Top-level Axolotl keys the format needs besides its `datasets:` entry (a chat format's chat_template)."""
        return {}

    def training_text(self, row: Row) -> str:
        """Prompt and answer as training sees them (Axolotl appends the EOS token after it)."""
        return self.prompt(row) + self.answer(row)

    def serving_stops(self, eos: str | None) -> tuple[str, ...]:
        """The EOS text first, then the format's own stops, each once."""
        return tuple(dict.fromkeys(([eos] if eos else []) + list(self.stops)))
