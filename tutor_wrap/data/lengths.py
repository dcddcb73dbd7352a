"""Token lengths of training texts as Axolotl will see them, with the base model's own tokenizer.

Uses the `tokenizers` library on tokenizer.json (no torch). Axolotl silently drops rows longer than
`sequence_len`, so these numbers decide both the planned sequence length and the warnings.
"""

from __future__ import annotations

from pathlib import Path


def token_lengths(model_dir: Path | None, texts: list[str]) -> list[int] | None:
    if model_dir is None or not (model_dir / "tokenizer.json").is_file():
        return None
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    # +1: Axolotl appends the EOS token to every row.
    return [len(e.ids) + 1 for e in tok.encode_batch(texts, add_special_tokens=True)]
