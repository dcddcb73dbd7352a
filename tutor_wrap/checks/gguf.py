"""Checks on each GGUF the export wrote: metadata that every consumer needs, and that it loads and generates.

Each check is a function of one `Written` GGUF returning a problem (a sentence) or None; `CHECKS` lists them.
Adding a check: a function here and one line in CHECKS.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tutor_wrap.backends import llamacpp
from tutor_wrap.core.errors import TutorWrapError
from tutor_wrap.models.quant import quant_type


@dataclass(frozen=True)
class Written:
    path: Path
    kind: str                     # the type it was written as: "F16", "Q4_K_M", ...
    meta: dict                    # llamacpp.metadata(path)
    sample: llamacpp.Completion   # a few greedy tokens from a fixed prompt
    chat_template: str | None     # the template training used (None: not checked)


def file_type(g: Written) -> str | None:
    want = quant_type(g.kind).file_type
    if g.meta["file_type"] != want:
        return f"general.file_type is {g.meta['file_type']}, expected {want} ({g.kind})"
    return None


def architecture(g: Written) -> str | None:
    return None if g.meta["architecture"] else "no general.architecture"


def tokenizer(g: Written) -> str | None:
    return None if g.meta["tokenizer_model"] else "no tokenizer.ggml.model"


def eos(g: Written) -> str | None:
    return None if g.meta["eos_token_id"] is not None else "no tokenizer.ggml.eos_token_id"


def generates(g: Written) -> str | None:
    # Whitespace or an immediate EOS is still a model that loads and runs; no tokens at all is not.
    s = g.sample
    return None if (s.text or s.stopped_by_eos or s.n_tokens) else "generated nothing"


def chat_template(g: Written) -> str | None:
    """The GGUF's template is what consumers (llama-server, LM Studio, Ollama without our TEMPLATE) format with."""
    if g.chat_template is None:
        return None
    have = g.meta.get("chat_template")
    if have == g.chat_template:
        return None
    return ("tokenizer.chat_template is " + ("missing" if not have else f"not the training format's ({have[:80]!r}...)")
            + ": consumers would format prompts differently from training")


CHECKS: list[Callable[[Written], str | None]] = [file_type, architecture, tokenizer, eos, generates, chat_template]
SAMPLE_PROMPT = "def hello():"


def verify(ll: llamacpp.LlamaCpp, gguf: Path, kind: str, meta: dict | None = None, *,
           chat_template: str | None = None) -> dict:
    """Run every check on `gguf`; TutorWrapError listing what failed. Returns what the report keeps (the sample)."""
    g = Written(gguf, kind, meta or llamacpp.metadata(gguf), llamacpp.complete(ll, gguf, SAMPLE_PROMPT, n_predict=8),
                chat_template)
    problems = [p for check in CHECKS if (p := check(g))]
    if problems:
        raise TutorWrapError(f"export: {gguf.name} failed verification: " + "; ".join(problems))
    return {"sample": g.sample.text[:200], "chat_template_matches_training": g.chat_template is not None}
