"""Weights & Biases: offline by default (the run's files under RUN_DIR/wandb/, uploaded later with `wandb sync`),
or online with the user's key from the environment (WANDB_API_KEY, or `wandb login`'s netrc entry).

One W&B run id per plan, kept in the run's manifest: the trainer (Axolotl's W&B integration) resumes it through
WANDB_RUN_ID/WANDB_RESUME, and tutor_wrap opens it between stages, never while the trainer has it, to set the plan
as its config, each stage's numbers as summary values `<stage>/<metric>` (W&B's place for a run's final figures:
a history row at a step below the trainer's last would be dropped) and the reports as files at their paths in the run dir.
"""

from __future__ import annotations

import importlib.util
import netrc
import os
import secrets
import shutil
import string
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from tutor_wrap.backends.tracking.common import finite, report_files
from tutor_wrap.core.errors import TutorWrapError
from tutor_wrap.recipe.schema import Recipe, WandbSpec

NAME = "wandb"
HOST = "api.wandb.ai"
ID_CHARS = string.ascii_lowercase + string.digits   # W&B's own run ids: 8 of these


def spec(recipe: Recipe) -> WandbSpec | None:
    return recipe.tracking.wandb


def _has_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators(os.environ.get("WANDB_BASE_URL", HOST).split("://")[-1]) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def destination(spec: WandbSpec, recipe: Recipe, run_dir: Path) -> str:
    where = f"offline, files in {run_dir / 'wandb'}" if spec.mode == "offline" else "online"
    return f"project {spec.project or recipe.name!r}{f' of {spec.entity}' if spec.entity else ''}, {where}"


def check(spec: WandbSpec, recipe: Recipe, run_dir: Path) -> None:
    key = f"{recipe.source}: tracking.wandb"
    if importlib.util.find_spec("wandb") is None:
        raise TutorWrapError(f"{key}: the wandb package is not installed in this environment",
                             hint="pip install wandb, or remove tracking.wandb")
    if spec.mode == "online" and not _has_key():
        raise TutorWrapError(f"{key}.mode is online, but no W&B key is set: neither WANDB_API_KEY nor a `wandb "
                             "login` entry in ~/.netrc", hint="export WANDB_API_KEY=... (never in the recipe), or "
                                                              "mode: offline and `wandb sync` the run later")


def axolotl_keys(spec: WandbSpec, recipe: Recipe) -> dict[str, Any]:
    keys = {"use_wandb": True, "wandb_project": spec.project or recipe.name, "wandb_mode": spec.mode}
    if spec.entity:
        keys["wandb_entity"] = spec.entity
    return keys


class Run:
    def __init__(self, spec: WandbSpec, recipe: Recipe, run_dir: Path, run_id: str, name: str):
        self.spec, self.run_dir, self.run_id, self.name = spec, run_dir, run_id, name
        self.project = spec.project or recipe.name

    @property
    def state(self) -> dict:
        return {"id": self.run_id, "project": self.project, "mode": self.spec.mode, "name": self.name}

    @property
    def where(self) -> str:
        if self.spec.mode == "offline":
            return (f"run {self.run_id} of project {self.project!r}, offline in {self.run_dir / 'wandb'} (upload: "
                    f"wandb sync --id {self.run_id} -p {self.project} {self.run_dir / 'wandb'}/offline-run-*-{self.run_id})")
        return f"run {self.run_id} of project {self.project!r} on W&B"

    @property
    def env(self) -> dict[str, str]:
        env = {"WANDB_DISABLED": "false", "WANDB_MODE": self.spec.mode, "WANDB_PROJECT": self.project,
               "WANDB_RUN_ID": self.run_id, "WANDB_RESUME": "allow", "WANDB_DIR": str(self.run_dir),
               "WANDB_NAME": self.run_dir.name}
        if self.spec.entity:
            env["WANDB_ENTITY"] = self.spec.entity
        return env

    @contextmanager
    def _opened(self, exit_code: int = 0, **kw: Any) -> Iterator[Any]:
        """The run, open in this process for one batch of writes. W&B's service goes with it (teardown): a second
        opening of the same id in a service that still holds the first writes nothing, and a service left running
        would be inherited by the trainer through WANDB_SERVICE."""
        import wandb

        run = wandb.init(project=self.project, entity=self.spec.entity, mode=self.spec.mode, id=self.run_id,
                         resume="allow", name=self.name, dir=str(self.run_dir),
                         settings=wandb.Settings(silent=True, console="off", save_code=False), **kw)
        try:
            yield run
        finally:
            run.finish(exit_code=exit_code)
            wandb.teardown()

    def log(self, stage: str, step: int, metrics: dict[str, Any], files: list[Path]) -> None:
        values = finite(metrics)
        keep = report_files(files)
        if not values and not keep:
            return
        with self._opened() as run:
            run.summary.update({f"{stage}/{k}": v for k, v in values.items()})
            for f in keep:   # into the run's files folder, at its path in the run dir: uploaded with the run
                f = f.resolve()
                dest = Path(run.dir) / (f.relative_to(self.run_dir) if f.is_relative_to(self.run_dir) else f.name)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, dest)

    def close(self, status: str) -> None:
        if status != "FINISHED":
            with self._opened(exit_code=1):
                pass


def start(spec: WandbSpec, recipe: Recipe, run_dir: Path, saved: dict | None, params: dict[str, Any],
          name: str) -> Run:
    import wandb

    if saved and saved.get("id") and saved.get("project") == (spec.project or recipe.name) \
            and saved.get("mode") == spec.mode:
        return Run(spec, recipe, run_dir, saved["id"], saved.get("name") or name)
    run = Run(spec, recipe, run_dir, "".join(secrets.choice(ID_CHARS) for _ in range(8)), name)
    try:
        with run._opened(config={k: v for k, v in params.items() if v is not None}):
            pass
    except wandb.Error as exc:
        raise TutorWrapError(f"W&B: {exc}", hint="check tracking.wandb and WANDB_API_KEY") from None
    return run
