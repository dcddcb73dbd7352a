"""The orchestrator: the stages in order, their checks before anything runs, and the loop over them (skip what
is done and unchanged, redo the rest). Every command that touches a recipe comes through here: `run`, `plan`,
`preflight`, `deploy`, `eval`."""

from __future__ import annotations

import importlib
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from tutor_wrap.backends import tracking
from tutor_wrap.core.errors import TutorWrapError
if TYPE_CHECKING:
    from tutor_wrap.backends.merge import MergeReport
from tutor_wrap.machine.hardware import Hardware, describe
from tutor_wrap.machine.profiles import resolve_hardware
from tutor_wrap.machine import software
from tutor_wrap.planning import preflight as preflight_lib
from tutor_wrap.planning.preflight import Verdict
from tutor_wrap.recipe.resolve import Inputs, check_inputs, check_overlap, resolve
from tutor_wrap.recipe.schema import OllamaSpec, Recipe
from tutor_wrap.core.hashing import artifact_fingerprint, fingerprint
from tutor_wrap.runtime.lock import run_dir_lock
from tutor_wrap.runtime.rundir import RunDir
from tutor_wrap.stages import ORDER, plan
from tutor_wrap.stages.base import Context, Pre, StageResult
from tutor_wrap.sources import local_recipe
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
    recipe = _cached_sources(recipe, run_dir)
    inputs = check_inputs(resolve(recipe))
    verdicts = check_stages(Pre(recipe, hw, run_dir, processes, inputs))
    return plan.prepare(inputs, hw, run_dir or recipe.default_run_dir(), processes=processes), verdicts


def _cached_sources(recipe: Recipe, run_dir: Path | None) -> Recipe:
    """`plan` and `preflight`: the recipe's hub sources as far as this machine has them (never downloaded), at the
    commits the run dir recorded."""
    run = RunDir(Path(run_dir or recipe.default_run_dir()).resolve())
    return local_recipe(recipe, run.path, run.manifest().get("sources") or {}, download=False)[0]


def fetch(recipe: Recipe, run_dir: Path | None, console: Console) -> dict:
    """The `fetch` command: the recipe's hub model and dataset downloaded (only what is missing) and the dataset
    materialized, as `run` would before planning; the commits recorded in the run's manifest."""
    run = RunDir.create(run_dir or recipe.default_run_dir())
    with run_dir_lock(run.path):
        _check_owner(run, recipe)
        _, sources = local_recipe(recipe, run.path, run.manifest().get("sources") or {}, download=True, console=console)
        run.update_manifest(recipe=recipe.name, recipe_path=str(recipe.source), sources=sources)
    return sources


def preflight(recipe: Recipe | None, hw: Hardware, run_dir: Path | None = None, *,
              processes: int | None = None) -> dict:
    """The `preflight` command's report: the machine and its stack, and with a recipe its inputs checked as
    `plan` and `run` check them and each stage's verdict. `ok` is what a script reads: an error finding or a
    stage that won't fit fails it."""
    report = preflight_lib.collect(hw, software.collect())
    if recipe is not None:
        recipe = _cached_sources(recipe, run_dir)
        inputs = check_inputs(resolve(recipe))
        verdicts = check_stages(Pre(recipe, hw, run_dir, processes, inputs))
        report["stages"] = [v.to_dict() for v in verdicts]
        report["input_notes"] = inputs.notes
        report["ok"] = report["ok"] and not any(v.verdict == "won't fit" for v in verdicts)
    return report


def _changed_artifacts(run: RunDir, rec: dict) -> list[str]:
    """The recorded artifacts that are gone or no longer what the stage made (truncated, replaced, half-copied).
    A record from before fingerprints were kept is judged on presence alone."""
    kept = rec.get("fingerprints") or {}
    return [rel for rel in rec.get("artifacts", {}).values()
            if not run.abs(rel).exists() or (rel in kept and artifact_fingerprint(run.abs(rel)) != kept[rel])]


def _fingerprint(stage, ctx: Context) -> str:
    """What a stage's record must match to be skipped: its own inputs and the fingerprints of what it reads."""
    return fingerprint(stage.NAME, stage.inputs(ctx), [ctx.run.stage(d).get("fingerprint") for d in stage.DEPENDS])


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
    _check_owner(run, recipe)
    recipe, sources = local_recipe(recipe, run.path, run.manifest().get("sources") or {}, download=True,
                                   console=console)
    resolved = resolve(recipe)
    # Before anything is recorded or redone, and also when plan will be skipped: an eval file edited since (export,
    # deploy and eval redo) must not bring trained rows in unnoticed. Its notes are printed where the plan is made.
    check_overlap(resolved)
    run.update_manifest(recipe=recipe.name, recipe_path=str(recipe.source), hardware=hw.to_dict(),
                        processes=processes, sources=sources)
    if from_stage:
        if from_stage not in STAGE_NAMES:
            raise TutorWrapError(f"--from {from_stage}: no such stage", hint=f"stages: {', '.join(STAGE_NAMES)}")
        before = [n for n in STAGE_NAMES[:STAGE_NAMES.index(from_stage)] if run.stage(n).get("status") != "done"]
        if before:
            console.print(f"[yellow]note:[/] --from {from_stage}: {', '.join(before)} have not finished in this run "
                          "dir; they run first")
        run.invalidate_from(_downstream(from_stage))
    ctx = Context(resolved=resolved, run=run, hardware=hw, console=console, machines=machines, processes=processes)
    track = tracking.Session(recipe, run.path, run.manifest().get("tracking"))
    try:
        _stages_loop(ctx, track, until)
        _start_tracking(ctx, track)     # every stage was done before: a tracker turned on since still gets them
    except KeyboardInterrupt:
        track.close("KILLED")
        raise
    except BaseException:
        track.close("FAILED")
        raise
    for problem in track.close("FINISHED"):
        console.print(f"[yellow]warning:[/] tracking: {escape(problem)}")
    return run.manifest()


def _start_tracking(ctx: Context, track: tracking.Session) -> None:
    """The trackers' runs for this plan, before the first stage after it (the trainer writes into them). A run
    started after some stages finished (a tracker turned on, another experiment named) gets their numbers and
    reports now; the training curves only a training writes."""
    if not track.on or track.started or ctx.run.stage(plan.NAME).get("status") != "done":
        return
    key = ctx.run.stage(plan.NAME).get("fingerprint") or ""
    track.start(key, plan.tracked_params(ctx))
    ctx.run.update_manifest(tracking=track.keep(key))
    ctx.tracker_env = track.env
    for line in track.where():
        ctx.console.print(f"tracking: {escape(line)}")
    if not track.fresh:
        return
    done = [s.NAME for s in STAGES if _done_as_is(ctx, s)]
    if not done:
        return
    for name in done:
        rec = ctx.run.stage(name)
        for problem in track.log(name, STAGE_NAMES.index(name), rec.get("metrics") or {},
                                 [ctx.run.abs(rel) for rel in (rec.get("artifacts") or {}).values()], fresh=True):
            ctx.console.print(f"[yellow]warning:[/] tracking: {escape(problem)}")
    if "train" in done:
        ctx.console.print(f"[yellow]note:[/] tracking: {', '.join(track.fresh)} started after training finished: "
                          f"the numbers of {', '.join(done)} are added, but not the training curves (Axolotl "
                          "writes them while it trains; train/metrics.jsonl and train/loss.png hold them)")


def _done_as_is(ctx: Context, stage) -> bool:
    """Finished with the inputs it has now (not a stage of an older plan, which a changed recipe will redo)."""
    rec = ctx.run.stage(stage.NAME)
    if rec.get("status") != "done":
        return False
    try:
        return rec.get("fingerprint") == _fingerprint(stage, ctx)
    except (TutorWrapError, OSError, KeyError):
        return False


def _stages_loop(ctx: Context, track: tracking.Session, until: str | None) -> None:
    run, console = ctx.run, ctx.console
    for stage in STAGES:
        fp = _fingerprint(stage, ctx)
        rec = run.stage(stage.NAME)
        if rec.get("status") == "done" and rec.get("fingerprint") == fp:
            changed = _changed_artifacts(run, rec)
            if not changed:
                console.print(f"[green]✓[/] {stage.NAME}: done before, inputs unchanged; skipped")
                if stage.NAME == until:
                    break
                continue
            console.print(f"[yellow]note:[/] {stage.NAME}: {escape(', '.join(changed))} changed or went missing since "
                          "it was made; redoing it and the stages after it")
            run.invalidate_from(_downstream(stage.NAME))
        if stage is plan:
            ctx.inputs = _checked(ctx, console)
        else:
            _start_tracking(ctx, track)
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
                         metrics={k: v for k, v in result.metrics.items()
                                  if isinstance(v, (int, float)) and math.isfinite(v)},
                         fingerprints={rel: artifact_fingerprint(run.abs(rel)) for rel in result.artifacts.values()},
                         seconds=round(time.time() - t0, 1), error=None)
        if stage is plan:
            track.new_plan()
        was = track.started
        _start_tracking(ctx, track)
        if track.started:     # a run begun just now was given every stage done, this one too
            for problem in track.log(stage.NAME, STAGE_NAMES.index(stage.NAME), result.metrics,
                                     [run.abs(rel) for rel in result.artifacts.values()],
                                     fresh=None if was else False):
                console.print(f"[yellow]warning:[/] tracking: {escape(problem)}")
        console.print(f"[green]✓[/] {stage.NAME} ({time.time() - t0:.0f} s)")
        if stage.NAME == until:
            break


def _check_owner(run: RunDir, recipe: Recipe) -> None:
    """A run dir holds one recipe's work: another recipe pointed at it (the same name in two files, a --run-dir
    typo) would otherwise redo or mix its stages. A recipe file that moved, its old path gone, keeps its run."""
    m = run.manifest()
    old = m.get("recipe_path")
    if not (m.get("stages") or m.get("sources")) or not old or recipe.source is None:
        return
    old_path, new_path = Path(old), Path(recipe.source).resolve()
    if old_path.resolve() == new_path or (m.get("recipe") == recipe.name and not old_path.exists()):
        return
    raise TutorWrapError(f"run directory {run.path} holds the run of recipe {m.get('recipe')!r} ({old}), not of "
                         f"{new_path}", hint="give this recipe its own directory with --run-dir (or another `name:`), "
                                             f"or delete {run.path} to start it over")


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
        d = v.to_dict()
        need = f": needs {d['needs']} of {v.resource}, has {d['has']}" if "needs" in d else ""
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
    if not Path(path).is_file():
        raise TutorWrapError(f"{run.path} was made from the recipe {path}, which is no longer there",
                             hint=f"put it back, or tell the run where it went: python -m tutor_wrap run NEW_PATH "
                                  f"--run-dir {run.path} (finished stages whose inputs are unchanged are kept)")
    recipe = load_recipe(path)
    if ollama_name:
        try:
            spec = OllamaSpec.model_validate({**recipe.ollama.model_dump(), "model": ollama_name})
        except ValidationError as exc:
            raise TutorWrapError(f"--name {ollama_name!r}: " + exc.errors()[0]["msg"].removeprefix("Value error, "),
                                 hint="e.g. --name python-tutor:latest") from None
        recipe = recipe.model_copy(update={"ollama": spec})
    recipe = local_recipe(recipe, run.path, run.manifest().get("sources") or {}, download=False)[0]
    stage = next(s for s in STAGES if s.NAME == name)
    with run_dir_lock(run.path):
        ctx = Context(resolve(recipe), run, resolve_hardware(recipe.hardware, run.path), console)
        _check_up_to_date(ctx, name, path)
        return stage.run(ctx)


def _check_up_to_date(ctx: Context, name: str, recipe_path: str) -> None:
    """`deploy` and `eval` serve and judge the model the run made: when the recipe was edited since in a way that
    changes a stage before them (the dataset, the training settings, the eval prompts file that export reads),
    they would pair that model with settings it was not made with. Judged with the machine the run recorded, so
    a run dir copied to another machine (to deploy where Ollama is) is not refused for that."""
    m = ctx.run.manifest()
    ctx = replace(ctx, processes=m.get("processes"))
    if m.get("hardware"):
        try:
            ctx = replace(ctx, hardware=Hardware.from_dict(m["hardware"]))
        except (KeyError, TypeError):
            pass
    before = STAGE_NAMES[:STAGE_NAMES.index(name)]
    update = (f"bring the run up to date first: python -m tutor_wrap run {recipe_path} --run-dir {ctx.run.path} "
              "(it redoes what changed and the stages after it)")
    for stage in STAGES:
        if stage.NAME not in before:
            continue
        rec = ctx.run.stage(stage.NAME)
        if rec.get("status") != "done":
            raise TutorWrapError(f"{ctx.run.path}: stage {stage.NAME} is {rec.get('status') or 'not run'}: `{name}` "
                                 "needs every stage before it finished", hint=update)
        fp = _fingerprint(stage, ctx)
        if rec.get("fingerprint") != fp:
            raise TutorWrapError(f"{recipe_path} or a file it names (the dataset, the eval prompts) changed since this "
                                 f"run's {stage.NAME} stage: `{name}` would pair the edit with a model made before it",
                                 hint=update + ", or undo the edit")
        changed = _changed_artifacts(ctx.run, rec)
        if changed:
            raise TutorWrapError(f"{ctx.run.path}: {', '.join(changed)} changed or went missing since stage "
                                 f"{stage.NAME} made it: `{name}` would use a file the run did not make", hint=update)


def merge_folder(base: Path, adapter: Path, out: Path, hw: Hardware, *, method: str = "auto",
                 verify: bool = True) -> "MergeReport":
    """The `merge` command: an adapter folder (with the axolotl.yml Axolotl saves beside it, if any) into `base`,
    verified as the merge stage verifies."""
    import yaml

    from tutor_wrap.backends.merge import merge
    from tutor_wrap.checks.merge_verify import verifier

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise TutorWrapError(f"--out {out} already exists" + (" and is not empty" if out.is_dir() else " as a file"),
                             hint="name a new folder for the merged model (the merge never overwrites one)")
    cfg_path = adapter / "axolotl.yml"
    cfg = yaml.safe_load(cfg_path.read_text("utf-8")) if cfg_path.exists() else {}
    cfg.setdefault("base_model", str(base))
    cfg.setdefault("adapter", "lora")
    log = out.parent / f"{out.name}.merge.log"
    return merge(base, adapter, out, cfg, hw, method=method, log=log,
                 verify=verifier(base, adapter, log, ram_budget=hw.ram_available_bytes) if verify else None,
                 run=str(out))
