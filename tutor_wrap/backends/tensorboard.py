"""TensorBoard: tutor_wrap's own numbers (training's peak and losses, the merge's, the export's fidelity, the eval's
metrics per arm) as scalars in the run dir's `tensorboard/tutor_wrap/`, beside the trainer's own event files
(`train/out/runs/`, written by Axolotl with `train.tensorboard: true`): `tensorboard --logdir RUN_DIR` shows both.

Written through tensorboard's own event writer and protos (no torch): one event file per stage, each value a
scalar named `<stage>/<metric>` at the stage's position in the pipeline.
"""

from __future__ import annotations

import math
import time
from pathlib import Path


def log_scalars(logdir: Path, scalars: dict[str, float], step: int) -> Path | None:
    """Write `scalars` (finite numbers only) as one event file in `logdir`; its path, or None when none was left."""
    values = {k: float(v) for k, v in scalars.items()
              if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
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
