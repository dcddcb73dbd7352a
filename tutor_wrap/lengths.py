"""Token lengths of the training rows as Axolotl will see them, with the base model's own tokenizer.

Uses the `tokenizers` library on tokenizer.json (no torch). Axolotl silently drops rows longer than
`sequence_len`, so these numbers decide both the planned sequence length and the warnings.
"""

from __future__ import annotations

from pathlib import Path

from tutor_wrap.dataset import Dataset, load_alpaca
from tutor_wrap.prompt_format import for_dataset
from tutor_wrap.recipe import Recipe


def token_lengths(model_dir: Path | None, texts: list[str]) -> list[int] | None:
    if model_dir is None or not (model_dir / "tokenizer.json").is_file():
        return None
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    # +1: Axolotl appends the EOS token to every alpaca row.
    return [len(e.ids) + 1 for e in tok.encode_batch(texts, add_special_tokens=True)]


def dataset_lengths(recipe: Recipe) -> tuple[Dataset, list[int] | None]:
    if recipe.dataset.hub:
        # A hub dataset is read by Axolotl at train time; there are no local rows to check or measure here.
        return Dataset(path=None, rows=[], warnings=[]), None
    data = load_alpaca(recipe.resolve(recipe.dataset.path))
    fmt = for_dataset(recipe.dataset.format)
    texts = [fmt.render(row.instruction, row.input) + row.output for row in data.rows]
    return data, token_lengths(recipe.base_model_path(), texts)
