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
from tutor_wrap.data.chat_templates import CHAT_TEMPLATES, TOKENIZER, ChatTemplate, identify
from tutor_wrap.data.format import Dataset, Format
from tutor_wrap.data.jsonl import line_numbers
from tutor_wrap.data.lengths import token_lengths
from tutor_wrap.machine import tools
from tutor_wrap.models.catalog import PROJECTIONS
from tutor_wrap.models.files import TokenizerInfo, check_base_model, linear_module_names, read_tokenizer_info
from tutor_wrap.recipe.schema import Recipe


@dataclass
class Inputs:
    model_dir: Path | None           # None: a hub id, loaded by Axolotl from the HF cache
    fmt: Format                      # the dataset's format (chat rows: in their chat template)
    data: Dataset
    lengths: list[int] | None        # tokens per training row (None without a local tokenizer or rows)
    # (line, tokens) of each eval prompt in the training format: eval and deploy serve them in the planned context
    eval_prompt_lengths: list[tuple[int, int]] | None = None

    @property
    def longest_eval_prompt(self) -> int:
        """Tokens of the longest eval prompt (0 without eval prompts or a tokenizer): the planned context holds it."""
        return max((n for _, n in self.eval_prompt_lengths or []), default=0)
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
    fmt = dataset_format(recipe)
    if recipe.dataset.hub:
        data = Dataset(path=None, rows=[], warnings=[])
        lengths = None
        notes.append(f"dataset {recipe.dataset.hub} ({recipe.dataset.hub_split}) is loaded by Axolotl at train time "
                     "from the Hugging Face cache: its rows are not checked or measured here")
    else:
        data = fmt.read(recipe.resolve(recipe.dataset.path))
        lengths = token_lengths(model_dir, [fmt.training_text(row) for row in data.rows])
    notes += data.warnings
    rows = _check_eval_rows(recipe, fmt)
    tools.ollama()   # a TUTOR_WRAP_OLLAMA that names nothing would otherwise surface at deploy, after training
    eval_lengths = None
    if rows and model_dir is not None:
        counted = token_lengths(model_dir, [fmt.prompt(r) for r in rows])
        eval_lengths = list(zip([getattr(r, "line", i + 1) for i, r in enumerate(rows)], counted)) if counted else None
    return Inputs(model_dir, fmt, data, lengths, eval_prompt_lengths=eval_lengths, notes=notes)


def _check_eval_rows(recipe: Recipe, fmt: Format) -> None:
    """The eval file reads in the dataset's format, and has what its checks need: answer_match compares with each
    row's reference answer, so a row without one would end the eval stage, after training, with nothing to judge."""
    rows = eval_rows(recipe)
    if rows is None or not recipe.eval.checks.answer_match:
        return rows
    bare = [getattr(r, "line", i + 1) for i, r in enumerate(rows) if not fmt.answer(r).strip()]
    if bare:
        raise TutorWrapError(f"{recipe.resolve(recipe.eval.prompts)}: line {line_numbers(bare)}: no reference answer, "
                             "and eval.checks.answer_match compares each answer with its row's reference",
                             hint="add the reference answer to those rows, or set eval.checks.answer_match: false")
    return rows


def check_eval_prompts_fit(recipe: Recipe, inputs: Inputs, sequence_len: int) -> None:
    """Eval and deploy's serving check give each held-out prompt the planned context (plus the answer's tokens):
    a longer prompt would end them with an HTTP 400 from llama-server, after training."""
    too_long = [(line, n) for line, n in inputs.eval_prompt_lengths or [] if n > sequence_len]
    if too_long:
        longest = max(n for _, n in too_long)
        raise TutorWrapError(f"{recipe.resolve(recipe.eval.prompts)}: line {line_numbers([ln for ln, _ in too_long])}: "
                             f"the prompt is longer than the context the model is trained and served with "
                             f"({sequence_len} tokens; longest {longest})",
                             hint=f"shorten those prompts, or raise train.sequence_len to at least {longest}")


def eval_rows(recipe: Recipe) -> list | None:
    """The held-out rows of the recipe's eval file in the dataset's format (reference answers optional); None
    without an eval block. Export's fidelity, deploy's serving check and eval all read them through here."""
    if recipe.eval is None:
        return None
    return dataset_format(recipe).read(recipe.resolve(recipe.eval.prompts), require_output=False,
                                       key="eval.prompts").rows


def heldout_examples(recipe: Recipe) -> list[tuple[str, str]] | None:
    """(prompt in the training format, reference answer or "") for each row of the recipe's eval file."""
    rows = eval_rows(recipe)
    if rows is None:
        return None
    fmt = dataset_format(recipe)
    return [(fmt.prompt(r), fmt.answer(r)) for r in rows]


def dataset_format(recipe: Recipe) -> Format:
    """The recipe's dataset format, for chat rows in their chat template: the one place every stage gets the
    prompt format from (training config, merged model's template, GGUF check, Modelfile, serving, eval)."""
    ds = recipe.dataset
    if ds.format not in formats.CHAT_FORMATS:
        return formats.get(ds.format)
    return formats.get(ds.format, chat_template(recipe))


def _tokenizer(recipe: Recipe) -> tuple[TokenizerInfo | None, str]:
    """The base model's tokenizer facts and where they were read (a local folder, or the HF cache for a hub id)."""
    model_dir = recipe.base_model_path()
    if model_dir is None:
        from huggingface_hub import try_to_load_from_cache

        try:
            found = try_to_load_from_cache(recipe.base_model, "tokenizer_config.json")
        except Exception:
            found = None
        model_dir = Path(found).parent if isinstance(found, str) else None
    if model_dir is None:
        return None, recipe.base_model
    return read_tokenizer_info(model_dir), str(model_dir)


def chat_template(recipe: Recipe) -> ChatTemplate:
    """The chat template chat rows train and serve in; the base model's own only when it is proven to be one
    tutor_wrap can serve byte for byte (data/chat_templates.identify). The tokenizer must hold the template's
    special tokens as single tokens: otherwise training learns them as pieces and the model never stops."""
    name = recipe.dataset.chat_template
    info, where = _tokenizer(recipe)
    known = ", ".join(CHAT_TEMPLATES)
    if name == TOKENIZER:
        if info is None:
            raise TutorWrapError(f"{recipe.source}: dataset.chat_template: {TOKENIZER} needs the base model's tokenizer "
                                 f"files, and {where} has none here",
                                 hint=f"download the model first, or name the template: one of {known}")
        if not info.chat_template:
            raise TutorWrapError(f"{recipe.source}: dataset.chat_template: {TOKENIZER}: {where} has no chat template "
                                 "(a base model, not an Instruct one)",
                                 hint=f"name the template to train it in: one of {known}")
        found = identify(info.chat_template)
        if found is None:
            raise TutorWrapError(
                f"{recipe.source}: dataset.chat_template: {TOKENIZER}: the chat template of {where} is not one "
                "tutor_wrap can serve exactly as trained (no Ollama TEMPLATE is proven to render it byte for byte)",
                hint=f"name one of the proven templates instead: {known}")
        chat = found
    else:
        chat = CHAT_TEMPLATES[name]
    if info is not None:
        missing = [t for t in chat.tokens if t not in info.tokens]
        if missing:
            raise TutorWrapError(
                f"{recipe.source}: dataset.chat_template: {name} writes {', '.join(missing)}, which the tokenizer of "
                f"{where} does not have as tokens: the model would learn them as pieces of text and never stop",
                hint=f"use a base model made for {chat.name} (or chat_template: {TOKENIZER} for an Instruct model)")
    return chat


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
