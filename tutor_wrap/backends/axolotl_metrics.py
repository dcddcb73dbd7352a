"""Training metrics: read the plugin's JSON lines, write loss.csv and loss.png."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from tutor_wrap.core import atomic

# The train stage tells the plugin (in the training process) where to write, through the environment.
ENV_METRICS = "TUTOR_WRAP_METRICS"
# ... and that this CPU run may use bf16 mixed precision (TrainingArguments.use_cpu).
ENV_USE_CPU = "TUTOR_WRAP_USE_CPU"
# Beside the metrics file: one line per training rank, its pid, once it can write its Python stacks on SIGUSR1 (a
# rank signalled before that would die of it: SIGUSR1's default action ends the process).
RANK_PIDS = "rank_pids"


def read_metrics(path: Path) -> list[dict]:
    rows = []
    try:
        text = Path(path).read_text("utf-8")
    except OSError:
        return rows
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # the line being written when the reader looked; it is whole next time
    return rows


def loss_points(rows: list[dict]) -> list[tuple[int, float]]:
    """(step, loss) per logged step; after a resume the later value for a step wins."""
    by_step: dict[int, float] = {}
    for r in rows:
        if r.get("event") == "log" and isinstance(r.get("loss"), (int, float)):
            by_step[int(r["step"])] = float(r["loss"])
    return sorted(by_step.items())


def write_loss_csv(rows: list[dict], path: Path) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["step", "loss", "learning_rate", "grad_norm", "elapsed_s"])
    seen: dict[int, dict] = {}
    for r in rows:
        if r.get("event") == "log" and "loss" in r:
            seen[int(r["step"])] = r
    for step in sorted(seen):
        r = seen[step]
        w.writerow([step, r.get("loss"), r.get("learning_rate", ""), r.get("grad_norm", ""), r.get("elapsed_s", "")])
    atomic.write_text(path, buf.getvalue())


def write_loss_png(rows: list[dict], path: Path, title: str = "training loss") -> bool:
    pts = [(s, l) for s, l in loss_points(rows) if math.isfinite(l)]
    if not pts:
        return False
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    steps, losses = [p[0] for p in pts], [p[1] for p in pts]
    ax.plot(steps, losses, marker="o", markersize=3, alpha=0.5, label="loss per step")
    # Per-step loss with small batches is noisy; the trend is what a person reads.
    window = max(1, len(pts) // 6)
    if window > 1:
        smooth = [sum(losses[max(0, i - window + 1): i + 1]) / len(losses[max(0, i - window + 1): i + 1])
                  for i in range(len(losses))]
        ax.plot(steps, smooth, linewidth=2, label=f"mean of last {window}")
        ax.legend()
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic.write_bytes(path, buf.getvalue())
    return True
