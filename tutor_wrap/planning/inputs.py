"""Everything a recipe names, checked before anything is planned or written: the base model folder, the dataset
in its format (with token lengths from the base model's own tokenizer) and the eval prompts file.

`plan`, `preflight` and `run` all go through `check_inputs`, so a problem that would surface hours into a run is
reported in the first second, the same way everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tutor_wrap.core.errors import TutorWrapError
from tutor_wrap.data import formats
from tutor_wrap.data.format import Dataset
from tutor_wrap.data.lengths import token_lengths
from tutor_wrap.models.files import check_base_model
from tutor_wrap.recipe.schema import Recipe


@dataclass
class Inputs:
    model_dir: Path | None           # None: a hub id, loaded by Axolotl from the HF cache
    data: Dataset
    lengths: list[int] | None        # tokens per training row (None without a local tokenizer or rows)
    notes: list[str] = field(default_factory=list)   # warnings for the person, already worded


def check_inputs(recipe: Recipe) -> Inputs:
    model_dir = recipe.base_model_path()
    if model_dir is not None:
        check_base_model(model_dir, allow_pickle=recipe.allow_pickle_weights)
    fmt = formats.get(recipe.dataset.format)
    notes: list[str] = []
    if recipe.dataset.hub:
        data = Dataset(path=None, rows=[], warnings=[])
        lengths = None
        notes.append(f"dataset {recipe.dataset.hub} ({recipe.dataset.hub_split}) is loaded by Axolotl at train time "
                     "from the Hugging Face cache: its rows are not checked or measured here")
    else:
        data = fmt.read(recipe.resolve(recipe.dataset.path))
        lengths = token_lengths(model_dir, [fmt.training_text(row) for row in data.rows])
    notes += data.warnings
    if recipe.eval is not None:
        fmt.read(recipe.resolve(recipe.eval.prompts), require_output=False, key="eval.prompts")
    return Inputs(model_dir, data, lengths, notes)


def rows_kept(inputs: Inputs, sequence_len: int) -> tuple[int, list[str]]:
    """How many rows fit `sequence_len` (Axolotl drops the rest silently), with a warning for the dropped ones;
    TutorWrapError when none would be left, since training would then die after loading the model."""
    rows, lengths = inputs.data.rows, inputs.lengths
    if lengths is None:
        return len(rows), []
    too_long = [row.line for row, n in zip(rows, lengths) if n > sequence_len]
    kept = len(rows) - len(too_long)
    if kept == 0:
        raise TutorWrapError(
            f"{inputs.data.path}: every row is longer than sequence_len {sequence_len} tokens "
            f"(shortest {min(lengths)}); Axolotl would drop them all and fail",
            hint=f"raise train.sequence_len in the recipe to at least {min(lengths)} (longest row: {max(lengths)})",
        )
    if too_long:
        return kept, [f"{len(too_long)} of {len(rows)} rows exceed sequence_len {sequence_len} tokens and will be "
                      f"dropped (lines {too_long[:5]}...)"]
    return kept, []
