"""The recipe: the few lines a person writes, as a typed record (pydantic, strict: unknown keys are errors).

Paths inside a recipe are relative to the recipe file, so a recipe and its data can move together. Loading a
file, with errors that name the line, is load.py's job.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tutor_wrap.answers.registry import ANSWER_CHECKS, metrics
from tutor_wrap.core.errors import TutorWrapError
from tutor_wrap.data.chat_templates import CHAT_TEMPLATES, TOKENIZER
from tutor_wrap.data.formats import CHAT_FORMATS, FORMATS
from tutor_wrap.models.hub_cache import snapshot
from tutor_wrap.models.quant import QUANT_TYPES

Method = Literal["full", "lora", "lora8bit", "qlora"]
# Ollama's model names (types/model/name.go, ParseName): [host/][namespace/]model[:tag], 128 characters at most in
# all, each part of letters, digits, '_', '-' and '.', no '.' in the namespace, no '..' anywhere. Stricter here: each
# part starts with a letter or digit, so a name never reads as a flag on `ollama create`'s command line.
_OLLAMA_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
OLLAMA_NAME_MAX = 128


def ollama_name_problem(name: str) -> str | None:
    """Why Ollama would refuse `name` (None: it takes it)."""
    if not 0 < len(name) <= OLLAMA_NAME_MAX:
        return f"is {len(name)} characters; Ollama takes 1 to {OLLAMA_NAME_MAX}"
    if ".." in name:
        return "contains '..'"
    path, _, tag = name.rpartition(":") if ":" in name.rsplit("/", 1)[-1] else (name, "", "")
    parts = path.split("/")
    if len(parts) > 3:
        return "has more than host/namespace/model"
    if ":" in name and not tag:
        return "has an empty tag after ':'"
    for part in parts + ([tag] if tag else []):
        if not _OLLAMA_PART.match(part):
            return f"part {part!r} is not letters, digits, '.', '_' or '-' starting with a letter or digit"
    if len(parts) >= 2 and "." in parts[-2]:
        return f"namespace {parts[-2]!r} contains '.' (Ollama allows it in the host and the model name only)"
    return None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasetSpec(_Strict):
    path: Path | None = None          # a local JSONL (relative to the recipe), or:
    hub: str | None = None            # a Hugging Face dataset id, loaded by Axolotl (must be in the HF cache: offline)
    split: str = "train"              # hub only: the split to load
    limit: int | None = Field(None, ge=1)   # hub only: the first N rows of the split
    revision: str | None = None       # hub only: a branch, tag or commit (default: main; the commit used is recorded)
    # hub only: column names for the alpaca roles, e.g. {instruction: query, output: response}; for chat rows the
    # column holding the turns, {messages: dialog}
    fields: dict[Literal["instruction", "input", "output", "messages"], str] = Field(default_factory=dict)
    format: str = "alpaca"            # a name in data/formats.py
    # chat and sharegpt rows: the template they are trained and served in. `tokenizer` is the base model's own
    # (the natural choice for an Instruct model), else a name in data/chat_templates.py.
    chat_template: str | None = None
    roles_to_train: list[Literal["assistant", "user", "system"]] = Field(default_factory=lambda: ["assistant"])
    # which end-of-turn tokens carry loss: every trained turn's, the last one's, all, none (Axolotl's train_on_eos)
    train_on_eos: Literal["turn", "last", "all", "none"] = "turn"

    @field_validator("format")
    @classmethod
    def _known_format(cls, v: str) -> str:
        if v not in FORMATS:
            near = difflib.get_close_matches(v, list(FORMATS), n=1)
            raise ValueError(f"unknown dataset format {v!r}" + (f" (did you mean {near[0]}?)" if near else "")
                             + f"; known: {', '.join(FORMATS)}")
        return v

    @field_validator("split")
    @classmethod
    def _plain_split(cls, v: str) -> str:
        if not re.fullmatch(r"[\w.-]+", v):
            raise ValueError(f"split {v!r} is a split's name (train, test, ...); for the first N rows use limit: N")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> "DatasetSpec":
        if (self.path is None) == (self.hub is None):
            raise ValueError("give exactly one of dataset.path (a local JSONL) or dataset.hub (a Hugging Face dataset id)")
        if self.path is not None and (self.fields or self.limit or self.split != "train" or self.revision):
            raise ValueError("split, limit, fields and revision apply to dataset.hub only")
        chat = self.format in CHAT_FORMATS
        known = [TOKENIZER, *CHAT_TEMPLATES]
        if not chat:
            if self.chat_template is not None or self.roles_to_train != ["assistant"] or self.train_on_eos != "turn":
                raise ValueError(f"chat_template, roles_to_train and train_on_eos apply to chat rows "
                                 f"(format: {' or '.join(CHAT_FORMATS)}); {self.format} rows have their own prompt format")
            if "messages" in self.fields:
                raise ValueError("fields.messages applies to chat rows; alpaca columns are instruction, input, output")
        else:
            if self.chat_template is None:
                raise ValueError(f"{self.format} rows need dataset.chat_template: {TOKENIZER} (the base model's own, "
                                 f"for an Instruct model) or one of {', '.join(CHAT_TEMPLATES)}")
            if self.chat_template not in known:
                near = difflib.get_close_matches(self.chat_template, known, n=1)
                raise ValueError(f"unknown chat_template {self.chat_template!r}"
                                 + (f" (did you mean {near[0]}?)" if near else "")
                                 + f"; the ones tutor_wrap can serve exactly as trained: {', '.join(known)}")
            if set(self.fields) - {"messages"}:
                raise ValueError("for chat rows, fields names only the column of turns: {messages: COLUMN}")
            if not self.roles_to_train:
                raise ValueError("roles_to_train is empty: nothing would be trained (the usual value is [assistant])")
        return self

    @property
    def hub_split(self) -> str:
        """The split as Axolotl passes it to datasets.load_dataset (slicing syntax for the limit)."""
        return f"{self.split}[:{self.limit}]" if self.limit else self.split


class LoraSpec(_Strict):
    r: int = Field(16, ge=1, le=1024)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    # "all-linear" or a list of module names such as [q_proj, v_proj]
    targets: Literal["all-linear"] | list[str] = "all-linear"

    @field_validator("targets")
    @classmethod
    def _some_targets(cls, v: Any) -> Any:
        if isinstance(v, list) and not v:
            raise ValueError("an empty list adapts nothing: name modules such as [q_proj, v_proj], or all-linear")
        if isinstance(v, list) and len(set(v)) != len(v):
            raise ValueError(f"a module is named twice: {v}")
        return v


class TrainSpec(_Strict):
    epochs: float | None = Field(None, gt=0)
    max_steps: int | None = Field(None, ge=1)
    learning_rate: float = Field(2e-4, gt=0, lt=1)
    sequence_len: int = Field(1024, ge=16, le=131072)
    batch_size: int = Field(8, ge=1, description="effective batch = micro-batch x gradient accumulation")
    micro_batch_size: int | None = Field(None, ge=1)
    seed: int = 42
    save_steps: int | None = Field(None, ge=1)
    logging_steps: int = Field(1, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _one_length(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("epochs") is None and data.get("max_steps") is None:
            return {**data, "epochs": 1.0}
        return data

    @model_validator(mode="after")
    def _micro_batch_divides(self) -> "TrainSpec":
        # micro-batch x accumulation must be the effective batch; otherwise training silently uses another one
        if self.micro_batch_size is not None and self.batch_size % self.micro_batch_size:
            raise ValueError(f"micro_batch_size {self.micro_batch_size} does not divide batch_size {self.batch_size}: "
                             "the effective batch would silently differ from batch_size")
        return self


# A wandb project or entity name: W&B refuses these characters (and more than 128 of them).
_WANDB_NAME = re.compile(r"^[^/\\#?%:]{1,128}$")


class MlflowSpec(_Strict):
    # None: a SQLite store beside the run dirs (RUNS/mlflow.db, artifacts in RUNS/mlartifacts/), so every run of
    # every recipe under that folder is one `mlflow ui --backend-store-uri sqlite:///RUNS/mlflow.db` away.
    uri: str | None = None
    experiment: str | None = Field(None, min_length=1, max_length=500)   # default: the recipe's name

    @field_validator("uri")
    @classmethod
    def _scheme(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not v.startswith(("sqlite:///", "http://", "https://")):
            raise ValueError(f"tracking URI {v!r}: use sqlite:///PATH (a local store; a relative PATH is relative to "
                             "the recipe) or http(s)://HOST:PORT (an MLflow tracking server)")
        if v.startswith("http"):
            from urllib.parse import urlsplit

            u = urlsplit(v)
            try:
                u.port
            except ValueError:
                raise ValueError("the port is not a number; fix: write http(s)://HOST:PORT") from None
            if "@" in u.netloc:
                raise ValueError("the URI holds a user name; fix: give the server's credentials in the environment "
                                 "(MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN)")
            if not u.hostname:
                raise ValueError("no host name; fix: write http(s)://HOST:PORT")
        return v

    @field_validator("experiment")
    @classmethod
    def _named(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("an experiment name of spaces only; fix: name it, or leave it out for the recipe's name")
        return v


class WandbSpec(_Strict):
    project: str | None = None      # default: the recipe's name
    entity: str | None = None       # default: the key's own user
    # offline: the run's files under RUN_DIR/wandb/ (`wandb sync RUN_DIR/wandb/offline-run-*` uploads them later);
    # online: streamed with WANDB_API_KEY from the environment.
    mode: Literal["offline", "online"] = "offline"

    @field_validator("project", "entity")
    @classmethod
    def _w_and_b_name(cls, v: str | None, info) -> str | None:
        if v is not None and not _WANDB_NAME.match(v):
            fix = (f"write entity: {v.split('/')[0]} and project: {v.split('/', 1)[1]}"
                   if info.field_name == "project" and v.count("/") == 1 and all(v.split("/")) else
                   "use 1 to 128 characters, none of / \\ # ? % :")
            raise ValueError(f"W&B does not take {info.field_name} names like this; fix: {fix}")
        return v


class TrackingSpec(_Strict):
    """Experiment trackers, through Axolotl's own integrations for the training curves; tutor_wrap adds the plan,
    every stage's headline numbers and the reports to the same run (backends/tracking)."""
    tensorboard: bool = False
    mlflow: MlflowSpec | None = None
    wandb: WandbSpec | None = None

    @field_validator("mlflow", "wandb", mode="before")
    @classmethod
    def _switch(cls, v: Any, info) -> Any:
        # `mlflow: true` means the defaults; `false` (or nothing) means off
        if v is True:
            return {}
        if isinstance(v, str):
            key = "uri" if info.field_name == "mlflow" else "project"
            raise ValueError(f"a bare value; fix: write `{info.field_name}: {{{key}: {v}}}`, or `{info.field_name}: "
                             "true` for the defaults")
        return None if v is False else v


class ExportSpec(_Strict):
    quant_types: list[str] = Field(default_factory=lambda: ["Q4_K_M"])

    @field_validator("quant_types")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        out = []
        for q in v:
            up = q.upper()
            if up not in QUANT_TYPES:
                near = difflib.get_close_matches(up, QUANT_TYPES, n=1)
                raise ValueError(
                    f"unknown quant type {q!r}" + (f" (did you mean {near[0]}?)" if near else "")
                    + f"; known: {', '.join(QUANT_TYPES)}"
                )
            out.append(up)
        if not out:
            raise ValueError("list at least one quant type, e.g. [Q4_K_M]")
        return out


# Values Ollama's runner (llama.cpp's sampler and context) can use; outside them Ollama fails at load or samples
# nonsense without a word (num_ctx 0, a negative temperature).
_PARAMETER_RANGES = {
    "num_ctx": (1, 2**31 - 1, "the context in tokens"), "num_batch": (1, 2**31 - 1, "tokens per batch"),
    "num_predict": (-2, 2**31 - 1, "-1 = until the end, -2 = until the context is full"),
    "temperature": (0.0, 100.0, "0 = greedy"), "top_k": (0, 2**31 - 1, "0 = off"),
    "top_p": (0.0, 1.0, "a probability"), "min_p": (0.0, 1.0, "a probability"),
    "typical_p": (0.0, 1.0, "a probability; 1 = off"), "repeat_penalty": (0.0, 100.0, "1 = off"),
    "repeat_last_n": (-1, 2**31 - 1, "-1 = the whole context, 0 = off"),
    "num_thread": (0, 4096, "0 = Ollama's choice"), "num_keep": (-1, 2**31 - 1, "-1 = the whole prompt"),
}


class OllamaSpec(_Strict):
    model: str
    system: str | None = None
    parameters: dict[str, float | int | bool | str | list[str]] = Field(default_factory=dict)

    @field_validator("parameters")
    @classmethod
    def _lists_only_for_stop(cls, v: dict) -> dict:
        listed = [k for k, val in v.items() if isinstance(val, list) and k != "stop"]
        if listed:
            raise ValueError(f"only 'stop' takes a list of strings; {', '.join(listed)} takes one value")
        stop = v.get("stop")
        if stop is not None and not (isinstance(stop, str) and stop) and not (
                isinstance(stop, list) and stop and all(isinstance(x, str) and x for x in stop)):
            raise ValueError(f"stop must be a string or a list of non-empty strings, got {stop!r} "
                             "(quote it: stop: [\"5\"])")
        for key, (lo, hi, why) in _PARAMETER_RANGES.items():
            val = v.get(key)
            if isinstance(val, (int, float)) and not isinstance(val, bool) and not (lo <= val <= hi):
                raise ValueError(f"{key}: {val} is outside {lo}..{hi} ({why})")
        return v

    @field_validator("model")
    @classmethod
    def _name(cls, v: str) -> str:
        problem = ollama_name_problem(v)
        if problem:
            raise ValueError(
                f"{v!r} is not a valid Ollama model name: it {problem}; use [host/][namespace/]model[:tag], e.g. "
                "python-tutor:latest"
            )
        return v


class EvalChecks(BaseModel):
    """`eval.checks`: each key an answer check of answers/registry.py, with its value (true/false for a switch, the
    limit or pattern for the others). Any check the registry lists is accepted; nothing else is."""

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _known_checks(cls, data: Any) -> dict:
        if data is None:
            return {}
        if not isinstance(data, dict):
            raise ValueError("eval.checks is a mapping of check names to values, e.g. {code_block: true}")
        out = {}
        for key, value in data.items():
            check = ANSWER_CHECKS.get(key)
            if check is None:
                near = difflib.get_close_matches(str(key), list(ANSWER_CHECKS), n=1)
                raise ValueError(f"unknown check {key!r}" + (f" (did you mean {near[0]}?)" if near else "")
                                 + f"; the checks are: {', '.join(ANSWER_CHECKS)}")
            out[key] = _check_value(check, value)
        return out

    def value(self, name: str) -> Any:
        return (self.model_extra or {}).get(name)

    def on(self, name: str) -> bool:
        check = ANSWER_CHECKS.get(name)
        return check is not None and check.enabled(self.value(name))

    def enabled(self) -> dict[str, Any]:
        """{check name: the recipe's value} of the checks that are on, in the registry's order."""
        return {name: self.value(name) for name in ANSWER_CHECKS if self.on(name)}


def _check_value(check, value: Any) -> Any:
    """A check's value as its option type takes it: strict, so `code_runs: "no"` is not read as on."""
    if value is None:
        return None if check.option is not bool else False
    want = check.option
    if isinstance(want, tuple):
        if not isinstance(value, want):
            raise ValueError(f"checks.{check.name}: one of {', '.join(t.__name__ for t in want)}, got {value!r}")
    elif want is bool and not isinstance(value, bool):
        raise ValueError(f"checks.{check.name}: true or false, got {value!r}")
    if want is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"checks.{check.name}: a whole number, got {value!r}")
    if want is str and not isinstance(value, str):
        raise ValueError(f"checks.{check.name}: a string, got {value!r}")
    if check.validate is not None:
        try:
            check.validate(value)
        except ValueError as exc:
            raise ValueError(f"checks.{check.name}: {exc}") from None
    return value


class EvalSpec(_Strict):
    prompts: Path
    max_tokens: int = Field(192, ge=1, le=8192)
    # passed to llama-server with every request (greedy decoding: a tie-break only); llama.cpp's seeds are 32-bit and
    # 0xFFFFFFFF (and any negative) means "random", which would make two evals differ
    seed: int = Field(0, ge=0, le=2**32 - 2)
    quant_type: str | None = None     # default: the first of export.quant_types
    checks: EvalChecks = Field(default_factory=EvalChecks)
    primary_metric: str = "format_pass_rate"     # a rate of answers/registry.metrics()
    # eval prompts (or reference answers) that are also training rows are an error; true: kept, and the report
    # shows the metrics without them beside the verdict
    allow_overlap: bool = False

    @model_validator(mode="after")
    def _metric_is_measured(self) -> "EvalSpec":
        pm = self.primary_metric
        if pm not in metrics():
            near = difflib.get_close_matches(pm, metrics(), n=1)
            raise ValueError(f"primary_metric {pm!r} is not a rate eval measures"
                             + (f" (did you mean {near[0]}?)" if near else "") + f"; one of: {', '.join(metrics())}")
        check = pm.removesuffix("_rate")
        if check in ANSWER_CHECKS and not self.checks.on(check):
            raise ValueError(f"primary_metric {pm} needs checks.{check} turned on")
        content = [name for name, c in ANSWER_CHECKS.items() if c.content]
        if pm == "all_checks_rate" and not any(self.checks.on(n) for n in content):
            raise ValueError("primary_metric all_checks_rate needs a content check ("
                             + " or ".join(f"checks.{n}" for n in content) + "); use format_pass_rate")
        return self


class Recipe(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    base_model: str
    revision: str | None = None       # a hub base_model's branch, tag or commit (default: main; the commit is recorded)
    dataset: DatasetSpec
    method: Method = "lora"
    lora: LoraSpec = Field(default_factory=LoraSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    export: ExportSpec = Field(default_factory=ExportSpec)
    ollama: OllamaSpec
    eval: EvalSpec | None = None
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    hardware: str = "auto"            # "auto" probes this machine; or a profile name / file
    trust_remote_code: bool = False
    allow_pickle_weights: bool = False
    # Anything Axolotl-specific, merged last over the planned config.
    axolotl: dict[str, Any] = Field(default_factory=dict)

    # Not part of the file: where it came from, for resolving relative paths and for error messages.
    source: Path | None = Field(None, exclude=True)

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("train"), dict) and "tensorboard" in data["train"]:
            raise ValueError("train.tensorboard moved to tracking.tensorboard; fix: write `tracking: {tensorboard: "
                             f"{str(data['train']['tensorboard']).lower()}}}` instead")
        return data

    @model_validator(mode="after")
    def _lora_block_means_something(self) -> "Recipe":
        if self.method == "full" and "lora" in self.model_fields_set:
            raise ValueError("lora is set, but method full trains every weight and has no adapter; fix: remove the "
                             "lora: block, or choose method lora or qlora")
        return self

    @model_validator(mode="after")
    def _eval_quant_is_exported(self) -> "Recipe":
        # eval serves the GGUF export made: a type export does not make would end the run after training.
        if self.eval and self.eval.quant_type and self.eval.quant_type.upper() not in self.export.quant_types:
            raise ValueError(f"eval.quant_type {self.eval.quant_type} is not among export.quant_types "
                             f"({', '.join(self.export.quant_types)}); fix: add it there, or drop eval.quant_type to "
                             f"evaluate {self.export.quant_types[0]}")
        return self

    def resolve(self, p: Path | str | None) -> Path | None:
        if p is None:               # e.g. dataset.path of a hub dataset
            return None
        p = Path(p).expanduser()
        if p.is_absolute() or self.source is None:
            return p
        return (self.source.parent / p).resolve()

    def base_model_path(self) -> Path | None:
        """The base model as a local directory: a folder, or a hub id's snapshot in the Hugging Face cache at
        `revision`; None when it is a hub id not downloaded yet."""
        for candidate in (self.resolve(self.base_model), Path(self.base_model).expanduser()):
            if candidate.is_dir():
                if self.revision:
                    raise TutorWrapError(f"{self.source}: revision {self.revision!r} applies to a hub base_model, and "
                                         f"{self.base_model!r} is a local folder",
                                         hint="remove `revision:`, or name the model by its hub id")
                return candidate.resolve()
        if not self.is_hub_model:
            raise TutorWrapError(
                f"{self.source}: base_model {self.base_model!r} is not a directory",
                hint="point base_model at a local Hugging Face model folder (config.json + *.safetensors), "
                "or use a hub id such as meta-llama/Meta-Llama-3-8B",
            )
        snap = snapshot(self.base_model, "model", self.revision)
        return snap.path if snap is not None and (snap.path / "config.json").is_file() else None

    @property
    def is_hub_model(self) -> bool:
        if self.base_model.startswith((".", "/", "~")) or self.base_model.count("/") != 1:
            return False
        return not any(c.is_dir() for c in (self.resolve(self.base_model), Path(self.base_model).expanduser()))

    def default_run_dir(self) -> Path:
        return Path("runs") / self.name

    @property
    def eval_quant_type(self) -> str:
        if self.eval and self.eval.quant_type:
            return self.eval.quant_type.upper()
        return self.export.quant_types[0]
