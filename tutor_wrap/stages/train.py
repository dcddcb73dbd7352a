"""Train stage: `accelerate launch -m axolotl.cli.train`, watched through the metrics plugin, resumable."""

from __future__ import annotations

import os
import time
from pathlib import Path

import yaml
from rich.markup import escape

from tutor_wrap.backends.axolotl_metrics import ENV_METRICS, ENV_USE_CPU, loss_points, read_metrics, write_loss_csv, write_loss_png
from tutor_wrap.backends import axolotl_train
from tutor_wrap.core.errors import TutorWrapError
from tutor_wrap.core.hashing import file_sha256
from tutor_wrap.core.proc import append_log, tool_env
from tutor_wrap.machine.vendors import hide_all_gpus
from tutor_wrap.planning.planner import Plan
from tutor_wrap.planning.preflight import Verdict, train_verdict
from tutor_wrap.runtime.progress import TrainProgress
from tutor_wrap.stages.base import Context, Pre, StageResult

NAME = "train"
DEPENDS = ("plan",)


def check(pre: Pre) -> list[Verdict]:
    return [train_verdict(pre.recipe, pre.hardware, pre.processes, pre.inputs)]


def inputs(ctx: Context) -> dict:
    yml = ctx.run.path / "axolotl.yml"
    return {"axolotl_yml": file_sha256(yml) if yml.exists() else None}


def _env(ctx: Context, plan: Plan, metrics_path: Path, log: Path) -> dict:
    env = tool_env({ENV_METRICS: str(metrics_path)})
    if ctx.hardware.accelerator == "cpu":
        env.update(hide_all_gpus())   # a CPU plan: no runtime may pick up a GPU the probe was told to ignore
        # The plan's thread count, unless the person set OMP_NUM_THREADS themselves (theirs wins, as with torch).
        if plan.cpu_threads and "OMP_NUM_THREADS" not in os.environ:
            env["OMP_NUM_THREADS"] = str(plan.cpu_threads)
        env[ENV_USE_CPU] = "1"
        append_log(log, f"[tutor_wrap] OMP_NUM_THREADS={env.get('OMP_NUM_THREADS', 'unset')}\n")
    return env


def run(ctx: Context) -> StageResult:
    plan_yml = ctx.run.path / "axolotl.yml"
    cfg = yaml.safe_load(plan_yml.read_text("utf-8"))
    train_dir = ctx.run.sub("train")
    out_dir = ctx.run.path / cfg["output_dir"]   # relative to the run dir (an older run's: absolute)
    log = train_dir / "train.log"
    metrics_path = train_dir / "metrics.jsonl"
    plan = ctx.plan()

    def note(msg: str) -> None:
        ctx.console.print(f"[cyan]train:[/] {escape(msg)}")
        append_log(log, f"\n[tutor_wrap] {msg}\n")

    def watch(proc, max_steps) -> int:
        progress = TrainProgress(ctx.console, metrics_path, max_steps=max_steps)
        try:
            while proc.poll() is None:
                progress.update()
                time.sleep(1.0)
        finally:
            progress.update()
            progress.close()
        return proc.wait()

    done = axolotl_train.train(plan_yml, train_dir, plan.to_dict(), env=_env(ctx, plan, metrics_path, log), log=log,
                               metrics_path=metrics_path, resumable=ctx.resumable, machines=ctx.machines,
                               watch=watch, note=note)
    attempts, resumed_from = done.attempts, done.resumed_from
    rows = read_metrics(metrics_path)
    write_loss_csv(rows, train_dir / "loss.csv")
    has_png = write_loss_png(rows, train_dir / "loss.png", title=f"{ctx.recipe.name}: training loss")

    adapter = out_dir / ("adapter_model.safetensors" if cfg.get("adapter") else "model.safetensors")
    if not adapter.exists() and not cfg.get("adapter") and (out_dir / "model.safetensors.index.json").exists():
        adapter = out_dir / "model.safetensors.index.json"
    if not adapter.exists():
        raise TutorWrapError(f"train: Axolotl exited 0 but wrote no {adapter.name} in {out_dir}", hint=f"see {log}")
    ranks = [r for r in rows if r.get("event") == "ranks"]
    apart = [r for r in ranks if not r.get("in_sync")]
    if apart:
        r = apart[0]
        raise TutorWrapError(
            f"train: the {r.get('world_size')} training processes hold different weights after step {r.get('step')} "
            f"({r.get('why') or 'trainable-weight hashes ' + ', '.join(map(str, r.get('digests') or []))}): each "
            "rank trained alone and the adapter is one rank's", hint="train with one process (leave --num-processes "
                                                                     f"out) and report this with {log}")
    losses = [loss for _, loss in loss_points(rows)]
    k = max(1, min(5, len(losses) // 3))  # single steps are noisy: compare the means of the first and last few
    artifacts = {"output_dir": ctx.run.rel(out_dir), "log": ctx.run.rel(log), "metrics": ctx.run.rel(metrics_path),
                 "loss_csv": ctx.run.rel(train_dir / "loss.csv")}
    if has_png:
        artifacts["loss_png"] = ctx.run.rel(train_dir / "loss.png")
    return StageResult(artifacts, info={
        "loss_start_mean": sum(losses[:k]) / k if losses else None,
        "loss_end_mean": sum(losses[-k:]) / k if losses else None, "loss_window": k,
        "steps": max((r.get("step", 0) for r in rows), default=0),
        "resumed_from": resumed_from.name if resumed_from else None, "attempts": attempts,
        "processes": plan.num_processes,
        # the steps at which every rank's trainable weights were compared and found identical
        "ranks_in_sync_at": [r["step"] for r in ranks],
    })
