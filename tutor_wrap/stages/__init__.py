"""The stages: each reads the manifest, writes its artifacts under the run dir, and returns what it made.

Every stage module has NAME, DEPENDS (stages whose outputs it reads), `inputs(ctx)` (the recipe fields and files
whose change must redo it) and `run(ctx) -> StageResult`. The orchestrator in pipeline.py is a loop over them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rich.console import Console

from tutor_wrap.hardware import Hardware
from tutor_wrap.recipe import Recipe
from tutor_wrap.rundir import RunDir


@dataclass
class Context:
    recipe: Recipe
    run: RunDir
    hardware: Hardware
    console: Console
    # Several machines: num_machines, machine_rank, main_process_ip, main_process_port (passed to accelerate).
    machines: dict | None = None


@dataclass
class StageResult:
    artifacts: dict[str, str]                      # name -> path relative to the run dir
    info: dict[str, Any] = field(default_factory=dict)
