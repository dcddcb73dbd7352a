"""The orchestrator: the stages in order, their checks before anything runs, and the loop over them (skip what
is done and unchanged, redo the rest). Every command that touches a recipe comes through here: `run`, `plan`,
`preflight`, `deploy`, `eval`."""

from __future__ import annotations

import importlib
import time
from pathlib import Path

from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from tutor_wrap.core.errors import TutorWrapError
from tutor_wrap.machine.hardware import Hardware, describe
from tutor_wrap.machine.profiles import resolve_hardware
from tutor_wrap.machine import software
from tutor_wrap.planning import preflight as preflight_lib
from tutor_wrap.planning.preflight import Verdict
from tutor_wrap.recipe.resolve import Inputs, check_inputs, resolve
from tutor_wrap.recipe.schema import OllamaSpec, Recipe
from tutor_wrap.core.hashing import fingerprint
from tutor_wrap.runtime.lock import run_dir_lock
from tutor_wrap.runtime.rundir import RunDir
from tutor_wrap.stages import ORDER, plan
from tutor_wrap.stages.base import Context, Pre, StageResult
from tutor_wrap.stages.plan import Prepared

# The stage modules in stages.ORDER. Each has NAME, DEPENDS, inputs(), check() and run() (stages/base.py).
STAGES = tuple(importlib.import_module(f"tutor_wrap.stages.{module}") for _, module in ORDER)
STAGE_NAMES = tuple(s.NAME for s in STAGES)


def check_stages(pre: Pre) -> list[Verdict]:
    """Every stage's check, in order: a recipe problem raises TutorWrapError, a resource gets its Verdict."""
    return [v for stage in STAGES for v in stage.check(pre)]


def plan_for(recipe: Recipe, hw: Hardware, run_dir: Path | None = None, *,
             processes: int | None = None) -> tuple[Prepared, list[Verdict]]:
    """The `plan` command: the recipe resolved and checked, every stage's check, the plan and its Axolotl config
    (nothing written)."""
    inputs = check_inputs(resolve(recipe))
    verdicts = check_stages(Pre(recipe, hw, run_dir, processes, inputs))
    return plan.prepare(inputs, hw, run_dir or recipe.default_run_dir(), processes=processes), verdicts


def preflight(recipe: Recipe | None, hw: Hardware, run_dir: Path | None = None, *,
              processes: int | None = None) -> dict:
    """The `preflight` command's report: the machine and its stack, and with a recipe its inputs checked as
    `plan` and `run` check them and each stage's verdict. `ok` is what a script reads: an error finding or a
    stage that won't fit fails it."""
    report = preflight_lib.collect(hw, software.collect())
    if recipe is not None:
        inputs = check_inputs(resolve(recipe))
        verdicts = check_stages(Pre(recipe, hw, run_dir, processes, inputs))
        report["stages"] = [v.to_dict() for v in verdicts]
        report["input_notes"] = inputs.notes
        report["ok"] = report["ok"] and not any(v.verdict == "won't fit" for v in verdicts)
    return report


def _artifacts_present(run: RunDir, rec: dict) -> bool:
    return all(run.abs(rel).exists() for rel in rec.get("artifacts", {}).values())


def _downstream(name: str) -> list[str]:
    """`name` and every stage that reads it, directly or not."""
    out = [name]
    for s in STAGES:
        if any(d in out for d in s.DEPENDS) and s.NAME not in out:
            out.append(s.NAME)
    return out


def run_pipeline(recipe: Recipe, run_dir: Path | None = None, *, from_stage: str | None = None,
                 until: str | None = None, machines: dict | None = None, hardware: Hardware | None = None,
                 console: Console | None = None, processes: int | None = None) -> dict:
    console = console or Console()
    run = RunDir.create(run_dir or recipe.default_run_dir())
    with run_dir_lock(run.path, note=lambda msg: console.print(f"[yellow]note:[/] {escape(msg)}")):
        return _run_stages(recipe, run, from_stage=from_stage, until=until, machines=machines, hardware=hardware,
                           console=console, processes=processes)


def _run_stages(recipe: Recipe, run: RunDir, *, from_stage: str | None, until: str | None, machines: dict | None,
                hardware: Hardware | None, console: Console, processes: int | None) -> dict:
    hw = hardware or resolve_hardware(recipe.hardware, run.path)
    console.print(f"[bold]tutor_wrap[/] {escape(recipe.name)} -> {escape(str(run.path))}\nmachine: {escape(describe(hw))}")
    run.update_manifest(recipe=recipe.name, recipe_path=str(recipe.source), hardware=hw.to_dict())
    if from_stage:
        if from_stage not in STAGE_NAMES:
            raise TutorWrapError(f"--from {from_stage}: no such stage", hint=f"stages: {', '.join(STAGE_NAMES)}")
        run.invalidate_from(_downstream(from_stage))
    ctx = Context(resolved=resolve(recipe), run=run, hardware=hw, console=console, machines=machines,
                  processes=processes)
    for stage in STAGES:
        fp = fingerprint(stage.NAME, stage.inputs(ctx), [run.stage(d).get("fingerprint") for d in stage.DEPENDS])
        rec = run.stage(stage.NAME)
        if rec.get("status") == "done" and rec.get("fingerprint") == fp and _artifacts_present(run, rec):
            console.print(f"[green]✓[/] {stage.NAME}: done before, inputs unchanged; skipped")
            if stage.NAME == until:
                break
            continue
        if stage is plan:
            ctx.inputs = _checked(ctx, console)
        console.rule(stage.NAME)
        t0 = time.time()
        # What it left behind may be picked up (train's checkpoints) only by the same work interrupted: a stage
        # that was running or failed with these very inputs. A finished, stale or changed one starts clean.
        ctx.resumable = rec.get("status") in ("running", "failed") and rec.get("pending") == fp
        run.record_stage(stage.NAME, status="running", fingerprint=None, pending=fp)
        try:
            result: StageResult = stage.run(ctx)
        except BaseException as exc:
            run.record_stage(stage.NAME, status="failed", error=str(exc)[:2000], seconds=round(time.time() - t0, 1))
            raise
        run.record_stage(stage.NAME, status="done", fingerprint=fp, artifacts=result.artifacts, info=result.info,
                         seconds=round(time.time() - t0, 1), error=None)
        console.print(f"[green]✓[/] {stage.NAME} ({time.time() - t0:.0f} s)")
        if stage.NAME == until:
            break
    return run.manifest()


def _checked(ctx: Context, console: Console) -> Inputs:
    """Before anything is planned or trained: the inputs and every stage's check, as `plan` and `preflight` do them.
    A stage that won't fit stops the run now, not after the hours before it."""
    inputs = check_inputs(ctx.resolved, trains_here=True)
    verdicts = check_stages(Pre(ctx.recipe, ctx.hardware, ctx.run.path, ctx.processes, inputs))
    wont = [v for v in verdicts if v.verdict == "won't fit"]
    for v in verdicts:
        if v.verdict == "tight":
            console.print(f"[yellow]warning:[/] {escape(v.stage)}: {escape(v.resource or '')} is tight "
                          f"({escape(v.why)})" + (f"; {escape(v.remedy)}" if v.remedy else ""))
    if wont:
        v = wont[0]
        need = (f": needs {v.to_dict()['needs']} of {v.resource}, has {v.to_dict()['has']}"
                if v.needs_bytes is not None else "")
        raise TutorWrapError(f"{v.stage} won't fit on this machine{need} ({v.why})",
                             hint=(v.remedy or "") + " (`python -m tutor_wrap preflight RECIPE` shows every stage)")
    return inputs


def run_stage_of(run_dir: Path, name: str, console: Console, *, ollama_name: str | None = None) -> StageResult:
    """One stage on a finished run (the `deploy` and `eval` commands), with the recipe the run recorded."""
    from tutor_wrap.recipe.load import load_recipe

    run = RunDir(Path(run_dir).resolve())
    path = run.manifest().get("recipe_path")
    if not path:
        raise TutorWrapError(f"{run.path}: no manifest.json with a recipe", hint="pass a run directory made by `run`")
    recipe = load_recipe(path)
    if ollama_name:
        try:
            spec = OllamaSpec.model_validate({**recipe.ollama.model_dump(), "model": ollama_name})
        except ValidationError as exc:
            raise TutorWrapError(f"--name {ollama_name!r}: " + exc.errors()[0]["msg"].removeprefix("Value error, "),
                                 hint="e.g. --name python-tutor:latest") from None
        recipe = recipe.model_copy(update={"ollama": spec})
    stage = next(s for s in STAGES if s.NAME == name)
    with run_dir_lock(run.path):
        return stage.run(Context(resolve(recipe), run, resolve_hardware(recipe.hardware, run.path), console))
