"""What every stage shares: the context it runs in and the result it returns.

Every stage module has NAME, DEPENDS (stages whose outputs it reads), `inputs(ctx)` (exactly the recipe fields and
files it reads, so that changing anything else does not redo it), `check(pre) -> list[Verdict]` (what it will need,
judged before anything runs, planning/preflight.Verdict; `plan`, `preflight` and `run` loop over these) and `run(ctx) -> StageResult`. A stage
reads the manifest, calls the library below it and records what it made; it never imports another stage.
pipeline.py lists the stages and loops over them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from tutor_wrap.machine.hardware import Hardware
from tutor_wrap.planning.planner import Plan
from tutor_wrap.recipe.resolve import Inputs, Resolved
from tutor_wrap.recipe.schema import Recipe
from tutor_wrap.runtime.rundir import RunDir


@dataclass
class Context:
    resolved: Resolved               # the recipe, resolved once by the pipeline (recipe/resolve.py)
    run: RunDir
    hardware: Hardware
    console: Console
    # Several machines: num_machines, machine_rank, main_process_ip, main_process_port (passed to accelerate).
    machines: dict | None = None
    # Training processes asked for on the command line (--num-processes); None: the planner's default.
    processes: int | None = None
    # Set by the pipeline for the stage about to run: the same inputs were interrupted before (a kill, a crash),
    # so partial work such as training checkpoints may be resumed.
    resumable: bool = False
    # The recipe's inputs as checked by the pipeline before the plan stage (None when plan was done before)
    inputs: Inputs | None = None
    # The trackers' variables for the trainer (backends/tracking: their run ids and modes); set by the pipeline
    tracker_env: dict[str, str] = field(default_factory=dict)

    @property
    def recipe(self) -> Recipe:
        return self.resolved.recipe

    def plan(self) -> Plan:
        """The plan the plan stage recorded (plan.json): what training ran with, for the stages after it."""
        return Plan.load(self.run.artifact("plan", "plan_json"))


@dataclass
class Pre:
    """What a stage's `check` judges, before anything runs: the checked inputs, the machine, the run dir."""

    recipe: Recipe
    hardware: Hardware
    run_dir: Path | None = None
    processes: int | None = None
    inputs: Inputs | None = None     # None: the recipe's files were not read (a hub model planned elsewhere)


@dataclass
class StageResult:
    artifacts: dict[str, str]                      # name -> path relative to the run dir
    info: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)   # headline numbers for trackers (backends/tracking)
