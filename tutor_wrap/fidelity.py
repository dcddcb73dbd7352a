"""Does a GGUF behave like the model it came from? Greedy agreement and perplexity on held-out references.

Agreement is counted in tokens of the model's own tokenizer (tokenizer.json through `tokenizers`, no torch):
two greedy continuations agree on the first N tokens, or on how many leading tokens when they part.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tutor_wrap import atomic, llamacpp
from tutor_wrap.errors import TutorWrapError
from tutor_wrap.proc import tool_env


def reference_text(prompts_and_answers: list[tuple[str, str]], path: Path) -> Path | None:
    """The held-out prompts with their reference answers, in the training format, one after another."""
    rows = [p + a for p, a in prompts_and_answers if a]
    if not rows:
        return None
    atomic.write_text(path, "\n\n".join(rows) + "\n")
    return path


def _ids(tokenizer_json: Path):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    return lambda text: tok.encode(text, add_special_tokens=False).ids


def matching_prefix(a: list[int], b: list[int], n: int) -> int:
    k = 0
    for x, y in zip(a[:n], b[:n]):
        if x != y:
            break
        k += 1
    return k


def agreement(texts_a: list[str], texts_b: list[str], tokenizer_json: Path, n: int) -> dict:
    """Per prompt: do the two continuations agree on their first n tokens (or stop at the same place before)?"""
    ids = _ids(tokenizer_json)
    pairs = [(ids(a)[:n], ids(b)[:n]) for a, b in zip(texts_a, texts_b)]
    prefixes = [matching_prefix(a, b, n) for a, b in pairs]
    return {"prompts": len(pairs), "tokens": n, "agree": sum(a == b for a, b in pairs),
            "mean_matching_prefix": sum(prefixes) / max(1, len(prefixes)), "per_prompt": prefixes}


def gguf_continuations(ll: llamacpp.LlamaCpp, gguf: Path, prompts: list[str], n: int) -> list[str]:
    return [llamacpp.complete(ll, gguf, p, n_predict=n).text for p in prompts]


def hf_continuations(model_dir: Path, prompts: list[str], n: int, out: Path) -> list[str]:
    """Greedy continuations from the HF model, in a subprocess so this process never imports torch."""
    atomic.write_json(out.with_suffix(".in.json"), {"model": str(model_dir), "prompts": prompts, "n": n})
    proc = subprocess.run([sys.executable, "-m", "tutor_wrap.hf_generate", str(out.with_suffix(".in.json")), str(out)],
                          capture_output=True, text=True, env=tool_env(), check=False)
    if proc.returncode != 0:
        raise TutorWrapError(f"greedy generation with transformers failed:\n{proc.stderr[-1500:]}")
    return json.loads(out.read_text("utf-8"))["texts"]
