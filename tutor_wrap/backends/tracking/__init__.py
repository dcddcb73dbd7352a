"""Experiment trackers (the recipe's `tracking:` block): TensorBoard, MLflow, Weights & Biases.

Training curves reach a tracker through Axolotl's own integration (the keys `axolotl_keys` adds to the trainer's
launch config and the variables `Session.env` hands it); tutor_wrap then adds the plan's knobs, each stage's
headline numbers and the reports to that same run. One tracker is one module here with the same five names
(NAME, spec, check, axolotl_keys, start; start's Run has state, env, where, log, close) plus one line in
TRACKERS.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tutor_wrap.backends.tracking import mlflow_runs, tensorboard_events, wandb_runs
from tutor_wrap.recipe.schema import Recipe

TRACKERS = (tensorboard_events, mlflow_runs, wandb_runs)


def _on(recipe: Recipe) -> list[tuple[Any, Any]]:
    return [(t, s) for t in TRACKERS if (s := t.spec(recipe)) is not None]


def check(recipe: Recipe, run_dir: Path) -> None:
    """At plan time, as plan, preflight and run do it: each tracker the recipe names is installed and its store
    writable or reachable (TutorWrapError naming the key and the fix otherwise)."""
    for tracker, spec in _on(recipe):
        tracker.check(spec, recipe, Path(run_dir).resolve())


def describe(recipe: Recipe, run_dir: Path) -> dict[str, str]:
    """Where each tracker the recipe names will write, before anything is opened (the `plan` command)."""
    return {t.NAME: t.destination(spec, recipe, Path(run_dir).resolve()) for t, spec in _on(recipe)}


def axolotl_keys(recipe: Recipe) -> dict[str, Any]:
    """The Axolotl config keys that turn on its own integrations for the trackers the recipe names."""
    keys: dict[str, Any] = {}
    for tracker, spec in _on(recipe):
        keys.update(tracker.axolotl_keys(spec, recipe))
    return keys


class Session:
    """The trackers' runs for one run dir: started (or taken up again) once per plan, so a resumed `run` writes
    into the runs it started before and a changed plan, which is another experiment, gets new ones.

    `saved` is what `state` held after the last call (the pipeline keeps it in the run's manifest)."""

    def __init__(self, recipe: Recipe, run_dir: Path, saved: dict | None):
        self.recipe, self.run_dir, self.saved = recipe, Path(run_dir).resolve(), dict(saved or {})
        self.runs: dict[str, Any] = {}
        self.fresh: list[str] = []
        self.started = False

    @property
    def on(self) -> bool:
        return bool(_on(self.recipe))

    def start(self, plan_key: str, params: dict[str, Any]) -> None:
        """Open every tracker's run: the saved one when it belongs to this plan (`plan_key`), else a new one that
        gets `params` (the plan's knobs), named after the run dir and the plan; `fresh` lists the new ones."""
        if self.started:
            return
        same = self.saved.get("plan") == plan_key
        name = f"{self.run_dir.name}-{plan_key[:6]}" if plan_key else self.run_dir.name
        self.fresh = []
        for tracker, spec in _on(self.recipe):
            old = self.saved.get(tracker.NAME) if same else None
            run = tracker.start(spec, self.recipe, self.run_dir, old, params, name)
            if run.state != (old or {}) or not old:
                self.fresh.append(tracker.NAME)
            self.runs[tracker.NAME] = run
        self.started = True

    def where(self) -> list[str]:
        """One line per tracker: where its run is, and how to look at it."""
        return [f"{n}: {r.where}" for n, r in self.runs.items()]

    @property
    def state(self) -> dict:
        return {"plan": self.saved.get("plan"), **{n: r.state for n, r in self.runs.items()}}

    def keep(self, plan_key: str) -> dict:
        self.saved = {**self.state, "plan": plan_key}
        return self.saved

    @property
    def env(self) -> dict[str, str]:
        """Variables for the trainer: where its integrations write, and into which run."""
        out: dict[str, str] = {}
        for r in self.runs.values():
            out.update(r.env)
        return out

    def log(self, stage: str, step: int, metrics: dict[str, Any], files: list[Path], *,
            fresh: bool | None = None) -> list[str]:
        """A stage's numbers and reports into every run (`fresh` True: only into the runs `start` began, False:
        only into those it took up again); what a tracker refused, as lines to warn with (a tracker server that
        went away does not end hours of work)."""
        problems = []
        for name, r in self.runs.items():
            if fresh is not None and (name in self.fresh) != fresh:
                continue
            try:
                r.log(stage, step, metrics, files)
            except Exception as exc:   # noqa: BLE001 - any tracker failure is reported, not fatal
                problems.append(f"{name}: {type(exc).__name__}: {exc}")
        return problems

    def close(self, status: str) -> list[str]:
        """`status`: FINISHED, FAILED or KILLED (MLflow's words); what a tracker refused, as lines to warn with
        (after a failure the pipeline drops them: the stage's error is the one to see)."""
        problems = []
        for name, r in self.runs.items():
            try:
                r.close(status)
            except Exception as exc:   # noqa: BLE001 - a tracker that went away does not fail finished work
                problems.append(f"{name}: {type(exc).__name__}: {exc}")
        self.runs.clear()
        self.started = False
        return problems

    def new_plan(self) -> None:
        """A new plan is a new experiment: its trackers' runs start afresh."""
        self.close("FINISHED")
        self.saved = {}
