"""TensorBoard: tutor_wrap's own numbers (training's peak and losses, the merge's, the export's fidelity, the eval's
metrics per arm) as scalars in the run dir's `tensorboard/tutor_wrap/`, beside the trainer's own event files
(`train/out/runs/`, written by Axolotl with `use_tensorboard`): `tensorboard --logdir RUN_DIR` shows both.

Written through tensorboard's own event writer and protos (no torch): one event file per stage, each value a
scalar named `<stage>/<metric>` at the stage's position in the pipeline.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import Any

from tutor_wrap.backends.tracking.common import finite
from tutor_wrap.core.errors import TutorWrapError
from tutor_wrap.recipe.schema import Recipe

NAME = "tensorboard"
SUBDIR = Path("tensorboard") / "tutor_wrap"


def spec(recipe: Recipe) -> bool | None:
    return True if recipe.tracking.tensorboard else None


def check(spec: bool, recipe: Recipe, run_dir: Path) -> None:
    if importlib.util.find_spec("tensorboard") is None:
        raise TutorWrapError(f"{recipe.source}: tracking.tensorboard: true, but the tensorboard package is not "
                             "installed in this environment",
                             hint="pip install tensorboard, or set tracking.tensorboard: false")


def destination(spec: bool, recipe: Recipe, run_dir: Path) -> str:
    return f"event files in {run_dir / SUBDIR} and {run_dir / 'train/out/runs'} (tensorboard --logdir {run_dir})"


def axolotl_keys(spec: bool, recipe: Recipe) -> dict[str, Any]:
    return {"use_tensorboard": True}


def log_scalars(logdir: Path, scalars: dict[str, float], step: int) -> Path | None:
    """Write `scalars` (finite numbers only) as one event file in `logdir`; its path, or None when none was left."""
    values = finite(scalars)
    if not values:
        return None
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    logdir.mkdir(parents=True, exist_ok=True)
    writer = EventFileWriter(str(logdir), filename_suffix=f".step{step}")
    summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in values.items()])
    writer.add_event(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))
    writer.close()
    return Path(writer.get_logdir())


class Run:
    env: dict[str, str] = {}
    state: dict = {"logdir": str(SUBDIR)}

    def __init__(self, run_dir: Path):
        self.logdir = run_dir / SUBDIR
        self.where = f"{self.logdir} and the trainer's in {run_dir / 'train/out/runs'}: tensorboard --logdir {run_dir}"

    def log(self, stage: str, step: int, metrics: dict[str, Any], files: list[Path]) -> None:
        # TensorBoard has no artifacts: the reports stay in the run dir it is pointed at
        log_scalars(self.logdir, {f"{stage}/{k}": v for k, v in metrics.items()}, step)

    def close(self, status: str) -> None:
        pass


def start(spec: bool, recipe: Recipe, run_dir: Path, saved: dict | None, params: dict[str, Any], name: str) -> Run:
    return Run(run_dir)
