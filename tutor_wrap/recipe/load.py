"""Loading a recipe file: YAML in, a `Recipe` out, or one error that names the file, the line and the fix."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from tutor_wrap.core.errors import TutorWrapError
from tutor_wrap.core.proc import redact
from tutor_wrap.recipe.schema import Recipe
from tutor_wrap.recipe.secrets import find_secret


# Axolotl keys the recipe sets itself: under `axolotl:` they would override the recipe past every check.
OWNED_BY_RECIPE = {
    "base_model": "base_model", "base_model_config": "base_model", "trust_remote_code": "trust_remote_code",
    "datasets": "dataset", "adapter": "method", "load_in_4bit": "method", "load_in_8bit": "method",
    "learning_rate": "train.learning_rate", "sequence_len": "train.sequence_len", "num_epochs": "train.epochs",
    "max_steps": "train.max_steps", "micro_batch_size": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.batch_size", "seed": "train.seed", "save_steps": "train.save_steps",
    "logging_steps": "train.logging_steps", "lora_r": "lora.r",
    "lora_alpha": "lora.alpha", "lora_dropout": "lora.dropout", "lora_target_modules": "lora.targets",
    "lora_target_linear": "lora.targets", "output_dir": "--run-dir", "dataset_prepared_path": "--run-dir",
    "chat_template": "dataset.chat_template", "chat_template_jinja": "dataset.chat_template",
    "eot_tokens": "dataset.chat_template",
}

# Axolotl's tracker keys: tutor_wrap drives the trackers from `tracking:` (and adds its own numbers to the same run),
# so under `axolotl:` they would bypass its checks. Each with what to write instead.
_NAMED_BY_RUN = "tutor_wrap names the tracker run after the run dir and the plan; remove it"
TRACKER_KEYS = {
    "use_tensorboard": "write `tracking: {tensorboard: true}`",
    "use_mlflow": "write `tracking: {mlflow: true}`",
    "mlflow_tracking_uri": "write `tracking: {mlflow: {uri: ...}}`",
    "mlflow_experiment_name": "write `tracking: {mlflow: {experiment: ...}}`",
    "mlflow_run_name": _NAMED_BY_RUN, "wandb_name": _NAMED_BY_RUN, "wandb_run_id": _NAMED_BY_RUN,
    "use_wandb": "write `tracking: {wandb: true}`",
    "wandb_project": "write `tracking: {wandb: {project: ...}}`",
    "wandb_entity": "write `tracking: {wandb: {entity: ...}}`",
    "wandb_mode": "write `tracking: {wandb: {mode: offline}}` (or online)",
    **{k: "tutor_wrap does not pass model checkpoints or gradients to trackers; remove it"
       for k in ("hf_mlflow_log_artifacts", "wandb_log_model", "wandb_watch")},
    # Trackers tutor_wrap does not drive: their package and credentials would go unchecked until training.
    **{k: "tutor_wrap tracks with TensorBoard, MLflow or W&B (`tracking:`); remove it"
       for k in ("use_comet", "comet_project_name", "comet_workspace", "comet_mode", "comet_experiment_key",
                 "comet_experiment_config", "use_trackio", "trackio_project_name", "trackio_run_name",
                 "trackio_space_id", "use_swanlab", "swanlab_project", "swanlab_experiment_name")},
}


def _key_lines(text: str, path: Path) -> dict[tuple[str | int, ...], int]:
    """Map each key path in the YAML to its 1-based line, so errors can point at the line. A key given twice in
    one mapping is an error: YAML loaders keep the last one without a word, which silently changes the recipe."""
    lines: dict[tuple[str | int, ...], int] = {}

    def walk(node: yaml.Node, path_: tuple[str | int, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = (*path_, k.value)
                if key in lines:
                    dotted = ".".join(str(x) for x in key)
                    raise TutorWrapError(f"{path}:{k.start_mark.line + 1}: '{dotted}' is set twice (lines {lines[key]} "
                                         f"and {k.start_mark.line + 1}); YAML would silently keep the last one",
                                         hint="delete one of the two lines")
                lines[key] = k.start_mark.line + 1
                walk(v, key)
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                lines[(*path_, i)] = v.start_mark.line + 1
                walk(v, (*path_, i))

    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, ())
    return lines


def _model_for(loc: tuple) -> type[BaseModel] | None:
    model: Any = Recipe
    for part in loc:
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
        field = model.model_fields.get(part)
        if field is None:
            return None
        ann = field.annotation
        model = next((a for a in getattr(ann, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)), ann)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _check_owned(data: dict, lines: dict, path: Path) -> None:
    block = data.get("axolotl")
    if not isinstance(block, dict):
        return
    for key in block:
        if key in TRACKER_KEYS:
            raise TutorWrapError(f"{path}:{lines.get(('axolotl', key))}: axolotl.{key}: the experiment trackers are "
                                 "set in the recipe's `tracking:` block, where they are checked at plan time",
                                 hint=TRACKER_KEYS[key])
        if key in OWNED_BY_RECIPE:
            own = OWNED_BY_RECIPE[key]
            raise TutorWrapError(
                f"{path}:{lines.get(('axolotl', key))}: axolotl.{key} would override what the recipe sets ({own})",
                hint=(f"set it with {own} on the command line" if own.startswith("--") else f"set it as `{own}` in the "
                      "recipe, where it is checked and planned for") + ", and remove it from the axolotl: block")


def _check_secrets(data: dict, lines: dict, path: Path) -> None:
    found = find_secret(data)
    if found is None:
        return
    where, what, env = found
    dotted = ".".join(str(p) for p in where)
    keys = tuple(p for p in where if isinstance(p, str))
    line = next((lines[keys[:i]] for i in range(len(keys), 0, -1) if keys[:i] in lines), None)
    raise TutorWrapError(f"{path}:{line}: {dotted} holds {what}; a recipe's values are written into the run dir "
                         "(the Axolotl YAML, the adapter's model card) and printed, so it takes no secrets",
                         hint=f"remove it from the recipe and set {env} in the environment you run tutor_wrap "
                              "from (the trainer gets that environment)")


def load_recipe(path: Path | str) -> Recipe:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise TutorWrapError(f"recipe {path} does not exist", hint="pass the path of a recipe YAML, e.g. recipes/demo.yml") from None
    except IsADirectoryError:
        raise TutorWrapError(f"recipe {path} is a directory, not a YAML file") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TutorWrapError(f"{path}: not UTF-8 text (byte {exc.start})", hint="save the recipe as UTF-8") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise TutorWrapError(f"{where}: malformed YAML: {problem}", hint="fix the YAML syntax at that line (indentation, a missing ':' or an unclosed quote)") from None
    if data is None:
        raise TutorWrapError(f"{path}: the recipe is empty", hint="see recipes/demo.yml for a complete example")
    if not isinstance(data, dict):
        raise TutorWrapError(
            f"{path}: the recipe must be a mapping of keys (name: ..., base_model: ...), not a {type(data).__name__}",
            hint="see recipes/demo.yml for a complete example",
        )
    lines = _key_lines(text, path)
    _check_secrets(data, lines, path)
    _check_owned(data, lines, path)
    train = data.get("train") if isinstance(data.get("train"), dict) else {}
    if train.get("epochs") is not None and train.get("max_steps") is not None:
        line = lines.get(("train", "max_steps"))
        raise TutorWrapError(f"{path}:{line}: train.epochs and train.max_steps are both set; training stops at "
                             "max_steps and epochs would mean nothing", hint="keep one of them")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        # A misspelt key also shows up as a missing one; the spelling is the error to report.
        err = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
        loc = tuple(err["loc"])
        dotted = ".".join(str(p) for p in loc)
        line = next((lines[loc[:i]] for i in range(len(loc), 0, -1) if loc[:i] in lines), None)
        where = f"{path}:{line}" if line else str(path)
        if err["type"] == "extra_forbidden":
            parent = _model_for(loc[:-1])
            valid = sorted(parent.model_fields) if parent else []
            valid = [v for v in valid if v != "source"]
            near = difflib.get_close_matches(str(loc[-1]), valid, n=1)
            if not near and loc[:-1] == ():
                # A top-level key that belongs in a block: `sequence_length:` -> `train.sequence_len`.
                nested = {f"{name}.{sub}": sub for name in valid if (m := _model_for((name,))) is not None
                          for sub in m.model_fields if sub != "source"}
                hit = difflib.get_close_matches(str(loc[-1]), list(nested.values()), n=1)
                near = [next(k for k, v in nested.items() if v == hit[0])] if hit else []
            hint = (f"did you mean '{near[0]}'? " if near else "") + f"valid keys here: {', '.join(valid)}"
            if loc[:-1] == ():
                hint += "; Axolotl settings go under 'axolotl:'"
            raise TutorWrapError(f"{where}: unknown key '{dotted}'", hint=hint) from None
        if err["type"] == "missing":
            raise TutorWrapError(f"{where}: missing required key '{dotted}'", hint="see recipes/demo.yml for an example of it") from None
        msg = err["msg"].removeprefix("Value error, ")
        if not loc:
            # A check across blocks (the Recipe's own validators): its message starts with the key it is about.
            # "PROBLEM; fix: HINT" carries the remedy.
            key = tuple(msg.split(" ", 1)[0].split("."))
            line = lines.get(key)
            msg, _, hint = msg.partition("; fix: ")
            raise TutorWrapError(f"{path}:{line}: {msg}" if line else f"{path}: {msg}", hint=hint or None) from None
        if err["type"] in ("model_type", "model_attributes_type", "dict_type"):
            raise TutorWrapError(f"{where}: {dotted} must be a block of keys, not {redact(repr(err.get('input')))}",
                                 hint=f"write its keys indented under `{loc[-1]}:` (see the README's recipe section"
                                      " for them)") from None
        msg, _, hint = msg.partition("; fix: ")
        raise TutorWrapError(f"{where}: {dotted}: {msg} (got {redact(repr(err.get('input')))})",
                             hint=hint or None) from None
    return recipe.model_copy(update={"source": path.resolve()})
