"""Everything a recipe names, checked before anything is planned or written: the base model folder, the dataset
in its format (with token lengths from the base model's own tokenizer) and the eval prompts file.

`plan`, `preflight` and `run` all go through `check_inputs`, so a problem that would surface hours into a run is
reported in the first second, the same way everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tutor_wrap.core.errors import TutorWrapError
from tutor_wrap.core.hashing import file_sha256
from tutor_wrap.data import formats
from tutor_wrap.data.format import Dataset
from tutor_wrap.data.lengths import token_lengths
from tutor_wrap.machine import tools
from tutor_wrap.models.catalog import PROJECTIONS
from tutor_wrap.models.files import check_base_model, linear_module_names
from tutor_wrap.recipe.schema import Recipe


@dataclass
class Inputs:
    model_dir: Path | None           # None: a hub id, loaded by Axolotl from the HF cache
    data: Dataset
    lengths: list[int] | None        # tokens per training row (None without a local tokenizer or rows)
    notes: list[str] = field(default_factory=list)   # warnings for the person, already worded


def check_inputs(recipe: Recipe, *, trains_here: bool = False) -> Inputs:
    """`trains_here`: this machine will train (run), so a hub model must already be in the Hugging Face cache
    (tools run offline); planning for another machine only notes it."""
    model_dir = recipe.base_model_path()
    notes: list[str] = []
    if model_dir is not None:
        config = check_base_model(model_dir, allow_pickle=recipe.allow_pickle_weights)
        _check_convertible(model_dir, config)
    elif not hub_cached(recipe.base_model):
        msg = (f"{recipe.source}: base_model {recipe.base_model} is not in the Hugging Face cache on this machine, "
               "and tutor_wrap runs the tools offline")
        fix = (f"download it first (`huggingface-cli download {recipe.base_model}` where the hub is reachable, "
               "then copy the cache), or point base_model at a local model folder")
        if trains_here:
            raise TutorWrapError(msg, hint=fix)
        notes.append(f"{msg}: `run` here would fail; {fix}")
    _check_lora_targets(recipe, model_dir)
    fmt = formats.get(recipe.dataset.format)
    if recipe.dataset.hub:
        data = Dataset(path=None, rows=[], warnings=[])
        lengths = None
        notes.append(f"dataset {recipe.dataset.hub} ({recipe.dataset.hub_split}) is loaded by Axolotl at train time "
                     "from the Hugging Face cache: its rows are not checked or measured here")
    else:
        data = fmt.read(recipe.resolve(recipe.dataset.path))
        lengths = token_lengths(model_dir, [fmt.training_text(row) for row in data.rows])
    notes += data.warnings
    eval_rows(recipe)
    return Inputs(model_dir, data, lengths, notes)


def eval_rows(recipe: Recipe) -> list | None:
    """The held-out rows of the recipe's eval file in the dataset's format (reference answers optional); None
    without an eval block. Export's fidelity, deploy's serving check and eval all read them through here."""
    if recipe.eval is None:
        return None
    return formats.get(recipe.dataset.format).read(recipe.resolve(recipe.eval.prompts), require_output=False,
                                                   key="eval.prompts").rows


def eval_prompts_sha256(recipe: Recipe) -> str | None:
    """The eval file's content hash, for the fingerprints of the stages that read it."""
    path = recipe.resolve(recipe.eval.prompts) if recipe.eval else None
    return file_sha256(path) if path is not None and path.is_file() else None


def hub_cached(model_id: str) -> bool:
    """Is the hub model's config.json in the local Hugging Face cache (no network)?"""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(model_id, "config.json")
    except Exception:  # an id the hub library refuses (bad characters) is not in any cache either
        return False
    return isinstance(found, str)


def _check_convertible(model_dir: Path, config: dict) -> None:
    """The GGUF export comes hours after training starts: an architecture llama.cpp's converter does not know is
    refused now. Skipped where llama.cpp is not installed yet (preflight reports that)."""
    try:
        ll = tools.locate()
    except TutorWrapError:
        return
    archs = [a for a in config.get("architectures") or [] if isinstance(a, str)]
    known = tools.converter_architectures(ll)
    if archs and known and not any(a in known for a in archs):
        raise TutorWrapError(f"{model_dir / 'config.json'}: architecture {', '.join(archs)} is not supported by the "
                             f"llama.cpp converter ({ll.version}): the model could be trained but not exported to GGUF",
                             hint="pick a base model llama.cpp supports (Llama, Mistral, Qwen2, Gemma, Phi...), or a "
                                  "newer llama.cpp via LLAMA_CPP_DIR")


def _check_lora_targets(recipe: Recipe, model_dir: Path | None) -> None:
    """Named LoRA targets must exist in the model: PEFT would fail only after the model is loaded for training."""
    targets = recipe.lora.targets
    if recipe.method == "full" or targets == "all-linear":
        return
    have = linear_module_names(model_dir) if model_dir is not None else set(PROJECTIONS)
    unknown = [t for t in targets if t not in have]
    if unknown:
        where = model_dir if model_dir is not None else recipe.base_model
        raise TutorWrapError(f"{recipe.source}: lora.targets: {', '.join(unknown)} is not a linear module of {where}",
                             hint=f"use `all-linear` or some of: {', '.join(sorted(have))}")


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
