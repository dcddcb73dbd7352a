"""Plan stage: check the inputs, choose the knobs, write `axolotl.yml` validated by Axolotl's schema.

`prepare` is also what the `plan` command runs: the stage and the command cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.markup import escape

from tutor_wrap.backends import axolotl_config, modelfile, ollama
from tutor_wrap.core import atomic
from tutor_wrap.core.errors import TutorWrapError
from tutor_wrap.core.hashing import file_sha256
from tutor_wrap.machine.hardware import Hardware
from tutor_wrap.planning.inputs import Inputs, check_eval_prompts_fit, check_inputs, dataset_format, rows_kept
from tutor_wrap.planning.planner import Plan, make_plan
from tutor_wrap.recipe.schema import Recipe
from tutor_wrap.runtime.tables import plan_table
from tutor_wrap.stages.base import Context, StageResult

NAME = "plan"
DEPENDS: tuple[str, ...] = ()


@dataclass
class Prepared:
    inputs: Inputs
    plan: Plan
    config: dict[str, Any]           # the Axolotl YAML as a dict
    rows_kept: int
    notes: list[str] = field(default_factory=list)


def check_recipe(recipe: Recipe, *, trains_here: bool = False) -> Inputs:
    """Everything the recipe names, checked before anything runs: the inputs (planning/inputs.py) and the
    Modelfile deploy will write (a misspelt Ollama parameter or a system text Ollama cannot quote fails now, not
    after training). `plan`, `preflight` and `run` all call this."""
    inputs = check_inputs(recipe, trains_here=trains_here)
    spec = ollama.build_spec(inputs.fmt, "./model.gguf", system=recipe.ollama.system,
                             parameters=recipe.ollama.parameters, num_ctx=recipe.train.sequence_len, eos=None)
    try:
        modelfile.render(spec)
    except modelfile.ModelfileError as exc:
        what = exc.problem.replace("ModelfileSpec.parameters[", "ollama.parameters[").replace(
            "ModelfileSpec.system", "ollama.system").replace("ModelfileSpec.stops", "ollama.parameters.stop")
        raise TutorWrapError(f"{recipe.source}: {what}", hint=exc.hint) from None
    return inputs


def prepare(recipe: Recipe, hw: Hardware, run_dir: Path, *, trains_here: bool = False,
            processes: int | None = None) -> Prepared:
    """Inputs checked, the plan made and the Axolotl config rendered; nothing written."""
    inputs = check_recipe(recipe, trains_here=trains_here)
    plan = make_plan(recipe, hw, inputs.lengths, processes=processes, eval_prompt=inputs.longest_eval_prompt)
    check_eval_prompts_fit(recipe, inputs, plan.sequence_len)
    kept, notes = rows_kept(inputs, plan.sequence_len)
    cfg = axolotl_config.render(recipe, plan, inputs.fmt, base_model=str(inputs.model_dir or recipe.base_model),
                                dataset_path=inputs.data.path.resolve() if inputs.data.path else None,
                                run_dir=Path(run_dir).resolve())
    return Prepared(inputs, plan, cfg, kept, inputs.notes + notes)


def validate(recipe: Recipe, cfg: dict[str, Any]) -> None:
    """Axolotl's own schema; a key it would silently drop is an error too."""
    dropped = axolotl_config.validate(cfg, source=str(recipe.source))
    if dropped:
        raise TutorWrapError(
            f"{recipe.source}: Axolotl does not know the key(s) {', '.join(dropped)} and would silently ignore them",
            hint="fix the spelling under 'axolotl:' in the recipe (see Axolotl's config reference)",
        )


def write_config(cfg: dict[str, Any], path: Path) -> list[Path]:
    """The YAML at `path` and the files it points to that tutor_wrap generates (the DeepSpeed ZeRO JSON)."""
    sidecars = axolotl_config.write_sidecars(cfg)
    atomic.write_text(Path(path), axolotl_config.to_yaml(cfg))
    return sidecars


def inputs(ctx: Context) -> dict:
    r = ctx.recipe
    ds = r.resolve(r.dataset.path)   # None for a hub dataset (its id, split and limit are in the recipe dump)
    return {
        "recipe": r.model_dump(mode="json", include={"base_model", "dataset", "method", "lora", "train", "axolotl",
                                                     "trust_remote_code", "allow_pickle_weights", "hardware"}),
        "dataset_sha256": file_sha256(ds) if ds is not None and ds.is_file() else None,
        "chat_template": dataset_format(r).chat_template,   # a base model's own template is read from its files
        "accelerator": ctx.hardware.accelerator,
        "gpus": [g.name for g in ctx.hardware.gpus],
        # only when asked: a run planned before the option existed keeps its fingerprint (and its training)
        **({"processes": ctx.processes} if ctx.processes else {}),
    }


def run(ctx: Context) -> StageResult:
    r = ctx.recipe
    p = prepare(r, ctx.hardware, ctx.run.path, trains_here=True, processes=ctx.processes)
    for note in p.notes:
        ctx.console.print("[yellow]warning:[/] " + escape(note))
    validate(r, p.config)
    yml = ctx.run.path / "axolotl.yml"
    sidecars = write_config(p.config, yml)
    plan_json = ctx.run.path / "plan.json"
    fmt_name = p.inputs.fmt.label
    rows = len(p.inputs.data.rows)
    atomic.write_json(plan_json, {
        "plan": p.plan.to_dict(), "rows": rows, "rows_kept": p.rows_kept,
        "max_tokens": max(p.inputs.lengths) if p.inputs.lengths else None, "prompt_format": fmt_name,
    })
    ctx.console.print(plan_table(p.plan))
    return StageResult(
        artifacts={"axolotl_yml": ctx.run.rel(yml), "plan_json": ctx.run.rel(plan_json),
                   **{f"sidecar_{s.stem}": ctx.run.rel(s) for s in sidecars}},
        info={"rows": rows, "rows_kept": p.rows_kept, "prompt_format": fmt_name},
    )
