"""Plan stage: check the inputs, choose the knobs, write `axolotl.yml` validated by Axolotl's schema."""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from tutor_wrap import atomic, axolotl_config
from tutor_wrap.lengths import dataset_lengths
from tutor_wrap.errors import TutorWrapError
from tutor_wrap.planner import make_plan
from tutor_wrap.prompt_format import for_dataset
from tutor_wrap.rundir import file_sha256
from tutor_wrap.stages import Context, StageResult

NAME = "plan"
DEPENDS: tuple[str, ...] = ()


def check_base_model(path: Path, *, allow_pickle: bool) -> dict:
    """A local base model must be a real HF model folder with safetensors weights (pickle only if opted in)."""
    cfg = path / "config.json"
    if not cfg.is_file():
        raise TutorWrapError(f"base model {path} has no config.json: it is not a Hugging Face model folder",
                             hint="point base_model at the folder that holds config.json and *.safetensors")
    try:
        config = json.loads(cfg.read_text("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TutorWrapError(f"{cfg}: unreadable ({exc})", hint="re-download or re-save the model") from None
    if not any(path.glob("*.safetensors")):
        if any(path.glob("*.bin")) or any(path.glob("*.pt")):
            if not allow_pickle:
                raise TutorWrapError(
                    f"base model {path} has only pickled weights (*.bin/*.pt), which can run code when loaded",
                    hint="convert it to safetensors, or set `allow_pickle_weights: true` in the recipe if you trust it",
                )
        else:
            raise TutorWrapError(f"base model {path} has no weights (*.safetensors)", hint="copy the model's weight files into that folder")
    return config


def inputs(ctx: Context) -> dict:
    r = ctx.recipe
    ds = r.resolve(r.dataset.path)   # None for a hub dataset (its id, split and limit are in the recipe dump)
    return {
        "recipe": r.model_dump(mode="json", include={"base_model", "dataset", "method", "lora", "train", "axolotl",
                                                     "trust_remote_code", "allow_pickle_weights", "hardware"}),
        "dataset_sha256": file_sha256(ds) if ds is not None and ds.is_file() else None,
        "accelerator": ctx.hardware.accelerator,
        "gpus": [g.name for g in ctx.hardware.gpus],
    }


def run(ctx: Context) -> StageResult:
    r = ctx.recipe
    model_dir = r.base_model_path()
    if model_dir is not None:
        check_base_model(model_dir, allow_pickle=r.allow_pickle_weights)
    data, lengths = dataset_lengths(r)
    for w in data.warnings:
        ctx.console.print(f"[yellow]warning:[/] {w}")
    fmt = for_dataset(r.dataset.format)
    plan = make_plan(r, ctx.hardware, lengths)
    kept = len(data.rows)
    if r.dataset.hub:
        ctx.console.print(f"[yellow]note:[/] dataset {r.dataset.hub} ({r.dataset.hub_split}) is loaded by Axolotl at "
                          "train time from the Hugging Face cache: its rows are not checked or measured here")
    if lengths is not None:
        too_long = [row.line for row, n in zip(data.rows, lengths) if n > plan.sequence_len]
        kept = len(data.rows) - len(too_long)
        if kept == 0:
            raise TutorWrapError(
                f"{data.path}: every row is longer than sequence_len {plan.sequence_len} tokens "
                f"(shortest {min(lengths)}); Axolotl would drop them all and fail",
                hint=f"raise train.sequence_len in the recipe to at least {min(lengths)} (longest row: {max(lengths)})",
            )
        if too_long:
            ctx.console.print(f"[yellow]warning:[/] {len(too_long)} of {len(data.rows)} rows exceed sequence_len "
                              f"{plan.sequence_len} tokens and will be dropped (lines {too_long[:5]}...)")
    cfg = axolotl_config.render(r, plan, base_model=str(model_dir or r.base_model),
                                dataset_path=data.path.resolve() if data.path else None, run_dir=ctx.run.path)
    dropped = axolotl_config.validate(cfg, source=str(r.source))
    if dropped:
        raise TutorWrapError(
            f"{r.source}: Axolotl does not know the key(s) {', '.join(dropped)} and would silently ignore them",
            hint="fix the spelling under 'axolotl:' in the recipe (see Axolotl's config reference)",
        )
    yml = ctx.run.path / "axolotl.yml"
    sidecars = axolotl_config.write_sidecars(cfg)   # e.g. the DeepSpeed ZeRO JSON the YAML points to
    atomic.write_text(yml, axolotl_config.to_yaml(cfg))
    plan_json = ctx.run.path / "plan.json"
    atomic.write_json(plan_json, {
        "plan": plan.to_dict(), "rows": len(data.rows), "rows_kept": kept,
        "max_tokens": max(lengths) if lengths else None, "prompt_format": fmt.name,
    })
    table = Table(title="plan", show_lines=False)
    table.add_column("knob")
    table.add_column("value")
    table.add_column("why")
    for c in plan.choices:
        table.add_row(c.knob, str(c.value), c.reason)
    ctx.console.print(table)
    return StageResult(
        artifacts={"axolotl_yml": ctx.run.rel(yml), "plan_json": ctx.run.rel(plan_json),
                   **{f"sidecar_{p.stem}": ctx.run.rel(p) for p in sidecars}},
        info={"rows": len(data.rows), "rows_kept": kept, "prompt_format": fmt.name},
    )
