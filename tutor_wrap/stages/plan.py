"""Plan stage: choose the knobs for the checked inputs, write `axolotl.yml` validated by Axolotl's schema.

`prepare` is also what the `plan` command runs: the stage and the command cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.markup import escape

from tutor_wrap.backends import axolotl_config, tracking
from tutor_wrap.core import atomic
from tutor_wrap.core.errors import TutorWrapError
from tutor_wrap.machine.hardware import Hardware
from tutor_wrap.planning.fit import beyond_positions, check_eval_prompts_fit, excess_length_strategy, rows_kept
from tutor_wrap.planning.planner import Choice, Plan, make_plan
from tutor_wrap.planning.preflight import Verdict
from tutor_wrap.recipe.resolve import Inputs, check_inputs
from tutor_wrap.recipe.schema import Recipe
from tutor_wrap.runtime import data_report
from tutor_wrap.runtime.tables import plan_table
from tutor_wrap.stages.base import Context, Pre, StageResult

NAME = "plan"
DEPENDS: tuple[str, ...] = ()


@dataclass
class Prepared:
    inputs: Inputs
    plan: Plan
    config: dict[str, Any]           # the Axolotl YAML as a dict
    rows_kept: int
    notes: list[str] = field(default_factory=list)


def prepare(inputs: Inputs, hw: Hardware, run_dir: Path, *, processes: int | None = None) -> Prepared:
    """For checked inputs (recipe/resolve.check_inputs): the plan made and the Axolotl config rendered; nothing
    written."""
    recipe = inputs.resolved.recipe
    plan = make_plan(recipe, hw, inputs.lengths, processes=processes, eval_prompt=inputs.longest_eval_prompt)
    check_eval_prompts_fit(recipe, inputs, plan.sequence_len)
    kept, notes = rows_kept(recipe, inputs, plan.sequence_len)
    if past := beyond_positions(inputs.config, plan.sequence_len):
        notes.append(past)
    own = axolotl_config.planned(recipe, plan, inputs.fmt, base_model=str(inputs.model_dir or recipe.base_model),
                                 dataset_path=inputs.data.path.resolve() if inputs.data.path else None,
                                 run_dir=Path(run_dir).resolve())
    cfg, replaced = axolotl_config.with_recipe_block(own, recipe)
    for key, (ours, theirs) in replaced.items():
        # said beside the plan's own choices, so the table never shows a value the trainer will not get
        plan.choices.append(Choice(f"axolotl.{key}", theirs, f"set by the recipe's axolotl: block, over the plan's "
                                   f"{ours!r}; the plan's memory and time figures are for its own value"))
    return Prepared(inputs, plan, cfg, kept, inputs.notes + notes)


def validate(recipe: Recipe, cfg: dict[str, Any]) -> None:
    """Axolotl's own schema, on the config as the trainer is launched with it (the trackers' keys added); a key it
    would silently drop is an error too."""
    dropped = axolotl_config.validate({**cfg, **tracking.axolotl_keys(recipe)}, source=str(recipe.source))
    if dropped:
        raise TutorWrapError(
            f"{recipe.source}: Axolotl does not know the key(s) {', '.join(dropped)} and would silently ignore them",
            hint="fix the spelling under 'axolotl:' in the recipe (see Axolotl's config reference)",
        )


def write_config(cfg: dict[str, Any], path: Path, *, in_run_dir: bool = False) -> list[Path]:
    """The YAML at `path` and the files it points to that tutor_wrap generates (the DeepSpeed ZeRO JSON).
    `in_run_dir`: the run's own YAML, its paths relative to the run dir the trainer starts in; `plan --out` writes
    absolute ones (the person runs Axolotl from wherever they are)."""
    sidecars = axolotl_config.write_sidecars(cfg)
    if in_run_dir:
        cfg = axolotl_config.relative_to(cfg, Path(path).parent)
    atomic.write_text(Path(path), axolotl_config.to_yaml(cfg))
    return sidecars


def check(pre: Pre) -> list[Verdict]:
    """What planning itself refuses (an eval prompt past the planned context, no row left at sequence_len) and the
    trackers the recipe names (installed, their store writable or reachable), so that `preflight` says it as `plan`
    and `run` do; the inputs were checked before the stages (check_inputs)."""
    tracking.check(pre.recipe, pre.run_dir or pre.recipe.default_run_dir())
    if pre.inputs is not None:
        prepare(pre.inputs, pre.hardware, pre.run_dir or pre.recipe.default_run_dir(), processes=pre.processes)
    return []


def inputs(ctx: Context) -> dict:
    r = ctx.recipe
    return {
        "recipe": r.model_dump(mode="json", include={"base_model", "dataset", "method", "lora", "train", "axolotl",
                                                     "trust_remote_code", "allow_pickle_weights", "hardware"}),
        "dataset_sha256": ctx.resolved.dataset_sha256,   # None for a hub dataset (its id and split are above)
        "chat_template": ctx.resolved.chat_template,     # a base model's own template is read from its files
        "accelerator": ctx.hardware.accelerator,
        "gpus": [g.name for g in ctx.hardware.gpus],
        # only when asked: a run planned before the option existed keeps its fingerprint (and its training)
        **({"processes": ctx.processes} if ctx.processes else {}),
    }


def _data_report(ctx: Context, p: Prepared) -> dict[str, Path]:
    """plan/data.json, lengths.png and data.html, and the terminal line: the rows as training will read them."""
    r, plan, rows = ctx.recipe, p.plan, p.inputs.data.rows
    ov = ctx.resolved.overlap
    s = data_report.summarize(
        rows=rows, lengths=p.inputs.lengths, sequence_len=plan.sequence_len, strategy=excess_length_strategy(r),
        batch=plan.micro_batch_size * plan.gradient_accumulation_steps * plan.num_processes,
        accumulation=plan.gradient_accumulation_steps, packing=plan.sample_packing, max_steps=r.train.max_steps,
        epochs=r.train.epochs, seconds_per_micro_batch=plan.seconds_per_step,   # the planner's is per micro-batch
        roles=[[role for role, _ in row.messages] for row in rows] if rows and hasattr(rows[0], "messages") else None,
        overlap=ov.to_dict() if ov else None)
    files = data_report.write(s, p.inputs.lengths, ctx.run.sub("plan"), r.name)
    ctx.console.print(escape(data_report.line(s, ctx.run.rel(files["data_html"]))))
    return files


def run(ctx: Context) -> StageResult:
    r = ctx.recipe
    p = prepare(ctx.inputs or check_inputs(ctx.resolved, trains_here=True), ctx.hardware, ctx.run.path,
                processes=ctx.processes)
    for note in p.notes:
        ctx.console.print("[yellow]warning:[/] " + escape(note))
    validate(r, p.config)
    yml = ctx.run.path / "axolotl.yml"
    sidecars = write_config(p.config, yml, in_run_dir=True)
    plan_json = ctx.run.path / "plan.json"
    fmt_name = p.inputs.fmt.label
    rows = len(p.inputs.data.rows)
    atomic.write_json(plan_json, {
        "plan": p.plan.to_dict(), "rows": rows, "rows_kept": p.rows_kept,
        "max_tokens": max(p.inputs.lengths) if p.inputs.lengths else None, "prompt_format": fmt_name,
    })
    ctx.console.print(plan_table(p.plan))
    data_files = _data_report(ctx, p)
    return StageResult(
        artifacts={"axolotl_yml": ctx.run.rel(yml), "plan_json": ctx.run.rel(plan_json),
                   **{f"sidecar_{s.stem}": ctx.run.rel(s) for s in sidecars},
                   **{k: ctx.run.rel(f) for k, f in data_files.items()}},
        info={"rows": rows, "rows_kept": p.rows_kept, "prompt_format": fmt_name},
        metrics={"rows": rows, "rows_kept": p.rows_kept, **predicted_peak(p.plan)},
    )


def predicted_peak(plan: Plan) -> dict[str, float]:
    """The memory the plan predicts for one training process, in GiB: the GPU's (as trusted on this machine) or
    the CPU trainer's peak RSS."""
    if plan.memory:
        return {"predicted_vram_gib": plan.memory.get("trusted_total_gib", plan.memory["total_gib"])}
    if plan.ram:
        return {"predicted_ram_gib": plan.ram["per_process_bytes"] / 2**30}
    return {}


def tracked_params(ctx: Context) -> dict[str, Any]:
    """What a tracker's run records as its params (MLflow) or config (W&B): the recipe's knobs and the plan's
    choices from plan.json, flat, so runs can be filtered and compared on them."""
    r = ctx.recipe
    plan = ctx.plan()
    knobs = {"base_model": r.base_model, "method": r.method,
             "dataset": r.dataset.hub or (r.dataset.path and Path(r.dataset.path).name),
             "learning_rate": r.train.learning_rate, "epochs": r.train.epochs, "max_steps": r.train.max_steps,
             "batch_size": r.train.batch_size, "seed": r.train.seed, "quant_types": ",".join(r.export.quant_types)}
    if r.method != "full":
        knobs.update(lora_r=r.lora.r, lora_alpha=r.lora.alpha, lora_dropout=r.lora.dropout,
                     lora_targets=r.lora.targets if isinstance(r.lora.targets, str) else ",".join(r.lora.targets))
    chosen = {f"plan.{k}": getattr(plan, k) for k in (
        "accelerator", "dtype", "micro_batch_size", "gradient_accumulation_steps", "gradient_checkpointing",
        "optimizer", "attention", "sample_packing", "sequence_len", "loss", "num_processes", "sharding")}
    return {**knobs, **chosen, **{f"plan.{k}": round(v, 3) for k, v in predicted_peak(plan).items()}}
