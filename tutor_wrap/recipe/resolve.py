"""The recipe resolved once: what its names mean on this machine, and everything it names checked.

`resolve(recipe)` works out the facts every stage reads (the dataset format and its chat template, the held-out
eval rows, the files' content hashes, where the base model is) into one `Resolved` record; the pipeline resolves a
recipe once and carries the record on the stage context, so no stage re-reads or re-decides them.

`check_inputs(resolved)` then checks what an hour of training would otherwise find out late: the base model folder,
the dataset in its format (with token lengths from the base model's own tokenizer), the eval rows. `plan`,
`preflight` and `run` all go through it, the same way everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from tutor_wrap.answers.registry import ANSWER_CHECKS
from tutor_wrap.core.errors import TutorWrapError
from tutor_wrap.core.hashing import file_sha256
from tutor_wrap.data import formats
from tutor_wrap.data.chat_templates import CHAT_TEMPLATES, TOKENIZER, ChatTemplate, identify, reasoning_mark
from tutor_wrap.data.format import Dataset, Format
from tutor_wrap.data.jsonl import line_numbers
from tutor_wrap.data.lengths import token_lengths
from tutor_wrap.data.overlap import NEAR_JACCARD, Overlap, Pair, Text, find
from tutor_wrap.machine import tools
from tutor_wrap.models.catalog import PROJECTIONS
from tutor_wrap.models.files import TokenizerInfo, check_base_model, linear_module_names, read_tokenizer_info
from tutor_wrap.recipe.schema import Recipe


@dataclass(frozen=True)
class Resolved:
    """A recipe's facts as every stage needs them, worked out once (`resolve`)."""

    recipe: Recipe
    fmt: Format                      # the dataset's format (chat rows: in their chat template)
    model_dir: Path | None           # a local folder or a hub id's cached snapshot; None: not downloaded yet
    eval_rows: list | None           # the eval file's rows in the dataset's format; None without an eval block
    eval_sha256: str | None          # the eval file's content hash (the fingerprint of the stages that read it)
    dataset_sha256: str | None       # the local dataset's content hash; None for a hub dataset

    @property
    def chat_template(self) -> str:
        """The Jinja every consumer of the merged model and its GGUF prompts with: the training format's."""
        return self.fmt.chat_template

    @cached_property
    def dataset(self) -> Dataset | None:
        """The local dataset's rows, read once (None for a hub dataset not downloaded)."""
        path = self.recipe.resolve(self.recipe.dataset.path)
        return self.fmt.read(path) if path is not None else None

    @cached_property
    def overlap(self) -> Overlap | None:
        """The eval rows against the training rows (data/overlap.py); None without both."""
        if not self.eval_rows or self.dataset is None:
            return None
        pairs, whole = _train_texts(self.fmt, self.dataset.rows)
        return find(pairs, _eval_texts(self.fmt, self.eval_rows), whole)

    def heldout_examples(self) -> list[tuple[str, str]] | None:
        """(prompt in the training format, reference answer or "") for each eval row; None without eval rows."""
        if self.eval_rows is None:
            return None
        return [(self.fmt.prompt(r), self.fmt.answer(r)) for r in self.eval_rows]


def resolve(recipe: Recipe) -> Resolved:
    fmt = dataset_format(recipe)
    ds = recipe.resolve(recipe.dataset.path)
    eval_path = recipe.resolve(recipe.eval.prompts) if recipe.eval else None
    return Resolved(recipe, fmt, recipe.base_model_path(), _eval_rows(recipe, fmt),
                    file_sha256(eval_path) if eval_path is not None and eval_path.is_file() else None,
                    file_sha256(ds) if ds is not None and ds.is_file() else None)


@dataclass
class Inputs:
    resolved: Resolved
    data: Dataset
    lengths: list[int] | None        # tokens per training row (None without a local tokenizer or rows)
    # (line, tokens) of each eval prompt in the training format: eval and deploy serve them in the planned context
    eval_prompt_lengths: list[tuple[int, int]] | None = None
    notes: list[str] = field(default_factory=list)   # warnings for the person, already worded
    config: dict = field(default_factory=dict)       # the base model's config.json ({} when not downloaded)

    @property
    def fmt(self) -> Format:
        return self.resolved.fmt

    @property
    def model_dir(self) -> Path | None:
        return self.resolved.model_dir

    @property
    def longest_eval_prompt(self) -> int:
        """Tokens of the longest eval prompt (0 without eval prompts or a tokenizer): the planned context holds it."""
        return max((n for _, n in self.eval_prompt_lengths or []), default=0)


def check_inputs(res: Resolved, *, trains_here: bool = False) -> Inputs:
    """`trains_here`: this machine will train (run), so a hub model must already be in the Hugging Face cache
    (tools run offline); planning for another machine only notes it."""
    recipe, model_dir, fmt = res.recipe, res.model_dir, res.fmt
    notes: list[str] = []
    config: dict = {}
    if model_dir is not None:
        config = check_base_model(model_dir, allow_pickle=recipe.allow_pickle_weights)
        _check_convertible(model_dir, config)
    else:
        at = f" at revision {recipe.revision}" if recipe.revision else ""
        _missing_from_cache(f"{recipe.source}: base_model {recipe.base_model}{at} is not in the Hugging Face cache on "
                            "this machine yet", FETCH_FIX, trains_here, notes)
    _check_lora_targets(recipe, model_dir)
    if recipe.dataset.hub:
        data = Dataset(path=None, rows=[], warnings=[])
        lengths = None
        hub = recipe.dataset.hub
        _missing_from_cache(f"{recipe.source}: dataset.hub {hub} is not downloaded yet, so its rows are not checked "
                            "or measured here", FETCH_FIX, trains_here, notes)
    else:
        data = res.dataset
        lengths = token_lengths(model_dir, [fmt.training_text(row) for row in data.rows])
    notes += data.warnings
    notes += check_overlap(res)
    tools.ollama()   # a TUTOR_WRAP_OLLAMA that names nothing would otherwise surface at deploy, after training
    eval_lengths = None
    rows = res.eval_rows
    if rows and model_dir is not None:
        counted = token_lengths(model_dir, [fmt.prompt(r) for r in rows])
        eval_lengths = list(zip([getattr(r, "line", i + 1) for i, r in enumerate(rows)], counted)) if counted else None
    return Inputs(res, data, lengths, eval_prompt_lengths=eval_lengths, notes=notes, config=config)


def _turns(fmt: Format, row) -> list[dict[str, str]]:
    """The row's conversation as its user sees it, ending with the (trained or reference) answer."""
    msgs = [m for m in fmt.plain_messages(row) if m["role"] in ("user", "assistant")]
    answer = fmt.answer(row)
    return msgs + [{"role": "assistant", "content": answer}] if answer else msgs


def _train_texts(fmt: Format, rows: list) -> tuple[list[Text], list[Text]]:
    """(one Text per user turn and the answer after it, one Text per row with all its turns)."""
    pairs, whole = [], []
    for i, r in enumerate(rows):
        line, turns = getattr(r, "line", i + 1), _turns(fmt, r)
        for k, m in enumerate(turns):
            if m["role"] == "user":
                nxt = turns[k + 1]["content"] if k + 1 < len(turns) and turns[k + 1]["role"] == "assistant" else ""
                pairs.append(Text(line, m["content"], nxt))
        whole.append(Text(line, "\n".join(m["content"] for m in turns if m["role"] == "user"),
                          "\n".join(m["content"] for m in turns if m["role"] == "assistant")))
    return pairs, whole


def _eval_texts(fmt: Format, rows: list) -> list[Text]:
    """The question each eval row asks (its last user turn), its reference answer, and the turns before it."""
    out = []
    for i, r in enumerate(rows):
        users = [m["content"] for m in fmt.plain_messages(r) if m["role"] == "user"]
        out.append(Text(getattr(r, "line", i + 1), users[-1] if users else "", fmt.answer(r), "\n".join(users[:-1])))
    return out


def _pairs(pairs: list[Pair], limit: int = 5) -> str:
    shown = ", ".join(f"line {p.line} ~ line {p.other} ({p.part}, {p.similarity:.2f})" for p in pairs[:limit])
    return shown + (f" and {len(pairs) - limit} more" if len(pairs) > limit else "")


def check_overlap(res: Resolved) -> list[str]:
    """Held-out rows that are not held out: repeated eval prompts and eval rows equal to training rows raise (the
    paired test would count a prompt twice, the A/B would measure recall of trained rows); near-copies, and
    training rows that are near-copies of each other, are returned as notes."""
    ov = res.overlap
    if ov is None:
        return []
    r = res.recipe
    eval_path, data_path = r.resolve(r.eval.prompts), r.resolve(r.dataset.path)
    if ov.repeated_eval:
        p = ov.repeated_eval[0]
        raise TutorWrapError(f"{eval_path}: line {line_numbers([q.line for q in ov.repeated_eval])} repeat"
                             f"{'s' if len(ov.repeated_eval) == 1 else ''} an earlier prompt (line {p.line} = line "
                             f"{p.other}, after normalizing case and whitespace): a repeated prompt counts twice in the "
                             "paired test and can make a chance difference look significant",
                             hint="keep each held-out prompt once")
    if ov.exact and not r.eval.allow_overlap:
        p = ov.exact[0]
        parts = " and the ".join(q.part for q in ov.exact if q.line == p.line)
        lines = sorted({q.line for q in ov.exact})
        raise TutorWrapError(f"{eval_path}: line {line_numbers(lines)}: the {parts} "
                             f"{'is' if ' and ' not in parts else 'are'} also in the training rows ({eval_path.name} "
                             f"line {p.line} = {data_path.name} line {p.other}, after normalizing case and whitespace"
                             + (f"; {len(lines)} eval rows in all" if len(lines) > 1 else "") + "): the A/B would "
                             "measure how well the model recalls trained rows, not how it answers new prompts",
                             hint="remove those rows from one of the two files, or set eval.allow_overlap: true (the "
                                  "eval report then also shows the metrics without them)")
    notes = []
    if ov.exact:
        notes.append(f"{eval_path}: {len({p.line for p in ov.exact})} eval rows are also training rows "
                     f"(eval.allow_overlap: true): {_pairs(ov.exact)}; the eval report shows the metrics without them")
    if ov.near:
        notes.append(f"{eval_path}: {len({p.line for p in ov.near})} eval rows are near-copies of training rows in "
                     f"{data_path.name} (character 5-gram Jaccard >= {NEAR_JACCARD}): {_pairs(ov.near)}; the eval "
                     "report shows the metrics without them too")
    if ov.near_train:
        notes.append(f"{data_path}: {len(ov.near_train)} rows are near-copies of an earlier row (Jaccard >= "
                     f"{NEAR_JACCARD}, prompt and answer together): {_pairs(ov.near_train)}; they weigh about twice "
                     "in training")
    return notes


FETCH_FIX = ("`python -m tutor_wrap fetch RECIPE` downloads it (`run` does too) where the hub is reachable; "
             "offline, copy a Hugging Face cache that has it (HF_HUB_CACHE), or point the recipe at local files")


def _missing_from_cache(msg: str, fix: str, trains_here: bool, notes: list[str]) -> None:
    """Something the hub would give is not downloaded: an error where this machine trains now (`run` fetched what
    it could; offline it could not), a note for `plan` and `preflight`, which never download."""
    if trains_here:
        raise TutorWrapError(msg, hint=fix)
    notes.append(f"{msg}: {fix}")


def _eval_rows(recipe: Recipe, fmt: Format) -> list | None:
    """The eval file's rows in the dataset's format, with what its checks need: a check that compares with the
    row's reference answer (answer_match) would end the eval stage, after training, with nothing to judge."""
    if recipe.eval is None:
        return None
    rows = fmt.read(recipe.resolve(recipe.eval.prompts), require_output=False, key="eval.prompts").rows
    needing = [name for name in recipe.eval.checks.enabled() if ANSWER_CHECKS[name].needs_reference]
    bare = [getattr(r, "line", i + 1) for i, r in enumerate(rows) if not fmt.answer(r).strip()]
    if needing and bare:
        name = needing[0]
        raise TutorWrapError(f"{recipe.resolve(recipe.eval.prompts)}: line {line_numbers(bare)}: no reference answer, "
                             f"and eval.checks.{name} compares each answer with its row's reference",
                             hint=f"add the reference answer to those rows, or set eval.checks.{name}: false")
    return rows


def dataset_format(recipe: Recipe) -> Format:
    """The recipe's dataset format, for chat rows in their chat template: the one place every stage gets the
    prompt format from (training config, merged model's template, GGUF check, Modelfile, serving, eval)."""
    ds = recipe.dataset
    if ds.format not in formats.CHAT_FORMATS:
        return formats.get(ds.format)
    return formats.get(ds.format, chat_template(recipe))


def _tokenizer(recipe: Recipe) -> tuple[TokenizerInfo | None, str]:
    """The base model's tokenizer facts and where they were read (a local folder, or a hub id's cached snapshot)."""
    model_dir = recipe.base_model_path()
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
        thinks = reasoning_mark(info.chat_template)
        if thinks:
            raise TutorWrapError(
                f"{recipe.source}: dataset.chat_template: {TOKENIZER}: the chat template of {where} writes reasoning "
                f"blocks ({thinks}; Qwen3 / DeepSeek-R1 style), which tutor_wrap does not train or serve: the "
                "training text, the Modelfile and the served prompt would differ",
                hint="name a plain template instead (chat_template: chatml for a Qwen model, whose tokenizer has "
                     f"its tokens); known: {known}")
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
