"""Train stage: `accelerate launch -m axolotl.cli.train`, watched through the metrics plugin, resumable."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import yaml
from rich.markup import escape

from tutor_wrap.backends.axolotl_metrics import ENV_METRICS, ENV_USE_CPU, loss_points, read_metrics, write_loss_csv, write_loss_png
from tutor_wrap.backends.axolotl_train import (MAX_OOM_RETRIES, classify_failure, complete_checkpoints, launch_args,
                                               reap_leftover_trainer, smaller)
from tutor_wrap.core import atomic
from tutor_wrap.core.errors import TutorWrapError
from tutor_wrap.core.hashing import file_sha256
from tutor_wrap.core.proc import append_log, start_logged, tail, tool_env
from tutor_wrap.runtime.progress import TrainProgress
from tutor_wrap.stages.base import Context, StageResult

NAME = "train"
DEPENDS = ("plan",)


def inputs(ctx: Context) -> dict:
    yml = ctx.run.path / "axolotl.yml"
    return {"axolotl_yml": file_sha256(yml) if yml.exists() else None}


def _launch(ctx: Context, launch_cfg: dict, train_dir: Path, log: Path, metrics_path: Path, plan: dict) -> int:
    launch_yml = train_dir / "axolotl.launch.yml"
    atomic.write_text(launch_yml, yaml.safe_dump(launch_cfg, sort_keys=False))
    args = launch_args(launch_yml, plan, ctx.machines)
    env = tool_env({ENV_METRICS: str(metrics_path)})
    if ctx.hardware.accelerator == "cpu":
        # No GPU for a CPU plan: "" hides CUDA's; the HIP runtime reads "" as unset, so ROCm's get an invalid index
        env["CUDA_VISIBLE_DEVICES"] = ""
        env["HIP_VISIBLE_DEVICES"] = "-1"
        # The plan's thread count, unless the person set OMP_NUM_THREADS themselves (theirs wins, as with torch).
        if plan.get("cpu_threads") and "OMP_NUM_THREADS" not in os.environ:
            env["OMP_NUM_THREADS"] = str(plan["cpu_threads"])
        env[ENV_USE_CPU] = "1"
        append_log(log, f"[tutor_wrap] OMP_NUM_THREADS={env.get('OMP_NUM_THREADS', 'unset')}\n")
    proc = start_logged(args, log, env=env, new_session=True)
    atomic.write_json(train_dir / "trainer.json", {"pgid": proc.pid, "launch_yml": str(launch_yml)})
    progress = TrainProgress(ctx.console, metrics_path, max_steps=launch_cfg.get("max_steps"))
    try:
        while proc.poll() is None:
            progress.update()
            time.sleep(1.0)
    except KeyboardInterrupt:
        reap_leftover_trainer(train_dir)  # the new session shields the trainer from the terminal's Ctrl-C
        raise
    finally:
        progress.update()
        progress.close()
    return proc.wait()


def _note(log: Path, ctx: Context, msg: str) -> None:
    ctx.console.print(f"[cyan]train:[/] {escape(msg)}")
    append_log(log, f"\n[tutor_wrap] {msg}\n")


def run(ctx: Context) -> StageResult:
    plan_yml = ctx.run.path / "axolotl.yml"
    cfg = yaml.safe_load(plan_yml.read_text("utf-8"))
    train_dir = ctx.run.sub("train")
    out_dir = Path(cfg["output_dir"])
    log = train_dir / "train.log"
    metrics_path = train_dir / "metrics.jsonl"
    plan = json.loads((ctx.run.path / "plan.json").read_text("utf-8"))["plan"]
    notch_file = train_dir / "replan.json"
    plan_sha = file_sha256(plan_yml)

    if reap_leftover_trainer(train_dir):
        _note(log, ctx, "stopped a trainer left running by an earlier, killed run")
    if not ctx.resumable and out_dir.exists() and complete_checkpoints(out_dir):
        # Checkpoints of a finished training, or of another config: resuming would train nothing, or the old plan.
        _note(log, ctx, f"starting fresh: the checkpoints in {out_dir} belong to a finished or different training")
        shutil.rmtree(out_dir)
        (train_dir / "replan.json").unlink(missing_ok=True)
    launch_cfg = dict(cfg)
    attempts: list[dict] = []
    # A smaller plan chosen after an OOM in an earlier run of this same plan still applies on resume.
    if notch_file.exists():
        notch = json.loads(notch_file.read_text("utf-8"))
        if notch.get("plan_sha256") == plan_sha:
            launch_cfg.update(notch["overrides"])
            attempts = notch.get("attempts", [])
    resumed_from = None
    while True:
        ckpts = complete_checkpoints(out_dir) if out_dir.exists() else []
        launch_cfg.pop("resume_from_checkpoint", None)
        if ckpts:
            resumed_from = ckpts[0]
            launch_cfg["resume_from_checkpoint"] = str(resumed_from)
            _note(log, ctx, f"resuming from {resumed_from.name} (the last complete checkpoint): {resumed_from}")
        elif not attempts:
            metrics_path.unlink(missing_ok=True)  # a fresh start: old curves would mislead
        rc = _launch(ctx, launch_cfg, train_dir, log, metrics_path, plan)
        knobs = {k: launch_cfg.get(k) for k in ("micro_batch_size", "gradient_accumulation_steps", "gradient_checkpointing")}
        if rc == 0:
            attempts.append({**knobs, "outcome": "ok"})
            break
        what, fix = classify_failure(tail(log, 200))
        attempts.append({**knobs, "outcome": what, "exit": rc})
        down = smaller(launch_cfg) if what == "out of memory" else None
        if down is None or sum(a["outcome"] == "out of memory" for a in attempts) > MAX_OOM_RETRIES:
            if what == "out of memory" and len(attempts) > 1:
                fix = f"tried {len(attempts)} plans ({attempts}); " + fix
            raise TutorWrapError(f"train: {what} (exit {rc}); log: {log}\n{tail(log, 15)}", hint=fix)
        launch_cfg, change = down
        overrides = {k: launch_cfg[k] for k in ("micro_batch_size", "gradient_accumulation_steps", "gradient_checkpointing")
                     if k in launch_cfg}
        atomic.write_json(notch_file, {"plan_sha256": plan_sha, "overrides": overrides, "attempts": attempts})
        _note(log, ctx, f"out of memory; re-planning one notch smaller ({change}) and retrying "
                        f"({sum(a['outcome'] == 'out of memory' for a in attempts)}/{MAX_OOM_RETRIES})")

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
        "processes": int(plan.get("num_processes") or 1),
        # the steps at which every rank's trainable weights were compared and found identical
        "ranks_in_sync_at": [r["step"] for r in ranks],
    })
