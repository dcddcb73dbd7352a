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
from tutor_wrap.backends import tracking
from tutor_wrap.core.proc import append_log, tool_env
from tutor_wrap.machine.vendors import hide_all_gpus
from tutor_wrap.core.units import GIB
from tutor_wrap.planning import calibration
from tutor_wrap.planning.planner import Plan, cpu_train_ram
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
    # The trackers' variables (their run, their mode) override the offline defaults that turn W&B off.
    env = tool_env({ENV_METRICS: str(metrics_path), **ctx.tracker_env})
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
        stall = axolotl_train.StallWatch([log, metrics_path], time.time())
        try:
            while proc.poll() is None:
                progress.update()
                quiet = stall.stalled(time.time())
                if quiet is not None:
                    ranks = axolotl_train.dump_stacks(train_dir)
                    note(f"the trainer has written nothing for {quiet / 60:.0f} min (it never paused longer than "
                         f"{stall.longest / 60:.1f} min before); "
                         + (f"the Python stacks of its {len(ranks)} process(es) are in {log} "
                            "(after 'most recent call first'); " if ranks else "")
                         + "it is left running: Ctrl-C stops it, and `run` resumes from the last checkpoint")
                time.sleep(1.0)
        finally:
            progress.update()
            progress.close()
        return proc.wait()

    done = axolotl_train.train(plan_yml, train_dir, plan.to_dict(), env=_env(ctx, plan, metrics_path, log), log=log,
                               metrics_path=metrics_path, resumable=ctx.resumable, machines=ctx.machines,
                               watch=watch, note=note, tracking=tracking.axolotl_keys(ctx.recipe))
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
    measured = _record_gpu_peak(ctx, plan, rows, attempts) if plan.memory else _record_peak(ctx, plan, rows)
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
        **measured,
    }, metrics={"loss_start_mean": sum(losses[:k]) / k if losses else None,
                "loss_end_mean": sum(losses[-k:]) / k if losses else None,
                **{f"{key.removesuffix('_bytes')}_gib": v / GIB for key, v in measured.items()
                   if key.endswith("_bytes") and v}})


def _record_gpu_peak(ctx: Context, plan: Plan, rows: list[dict], attempts: list[dict]) -> dict:
    """On a GPU: the trainer's reserved peak (rank 0's) beside the memory model's, and an out-of-memory of the
    plan's own knobs as a lower bound (it needed more than the card had), kept for this card's next plans."""
    mem = plan.memory
    predicted = int(mem["reserved_gib"] * GIB)
    knobs = {"method": plan.method, "micro_batch_size": plan.micro_batch_size, "sequence_len": plan.sequence_len,
             "gradient_checkpointing": plan.gradient_checkpointing}
    run = str(ctx.run.path)
    first = attempts[0] if attempts else {}
    if first.get("outcome") == "out of memory" and first.get("micro_batch_size") == plan.micro_batch_size:
        usable = min(g.vram_total_bytes for g in ctx.hardware.gpus) - int((mem["total_gib"] - mem["reserved_gib"]) * GIB)
        calibration.record(ctx.hardware, "train-gpu", run, predicted, usable, outcome="oom", **knobs)
    peak = max((int(r["gpu_max_reserved_bytes"]) for r in rows if r.get("gpu_max_reserved_bytes")), default=0)
    last = attempts[-1] if attempts else {}
    if not peak or last.get("micro_batch_size", plan.micro_batch_size) != plan.micro_batch_size:
        return {"gpu_peak_reserved_bytes": peak or None}      # a smaller notch ran: not what the plan predicted
    off, far = calibration.keep(ctx.hardware, "train-gpu", run, predicted, peak, outcome="ok", **knobs)
    if far:
        ctx.console.print(f"[yellow]note:[/] train: the memory model's reserved peak ({predicted / GIB:.2f} GiB) was "
                          f"{off:+.0f}% off the measured {peak / GIB:.2f} GiB; the next plans on this card are scaled "
                          f"by it: {calibration.KEPT}")
    return {"gpu_peak_reserved_bytes": peak, "predicted_reserved_bytes": predicted, "prediction_off_pct": off}


def _record_peak(ctx: Context, plan: Plan, rows: list[dict]) -> dict:
    """The trainer's measured peak RSS beside the prediction for the largest batch it drew (the plan's is for the
    worst batch, micro-batch x sequence length, which a short run may never draw), kept for this machine's next
    plans (planning/calibration.py) and noted when far off. Rank 0's: the ranks hold the same."""
    peak = max((int(r["cpu_max_rss_bytes"]) for r in rows if r.get("cpu_max_rss_bytes")), default=0)
    tokens = max((int(r["max_batch_tokens"]) for r in rows if r.get("max_batch_tokens")), default=0)
    if not peak or not plan.ram or not tokens:
        return {"peak_rss_bytes": peak or None}
    ram = plan.ram
    seen = cpu_train_ram(ctx.recipe, ctx.hardware, ram["method"], ram["dtype"], tokens) or ram
    predicted = seen["per_process_bytes"]
    off, far = calibration.keep(ctx.hardware, "train-cpu", str(ctx.run.path), predicted, peak, method=ram["method"],
                                dtype=ram["dtype"], model_part_bytes=seen["model_part_bytes"],
                                fixed_bytes=seen["fixed_bytes"], batch_tokens=tokens,
                                micro_batch_size=plan.micro_batch_size, sequence_len=plan.sequence_len)
    if far:
        ctx.console.print(f"[yellow]note:[/] train: the predicted peak RSS for its largest batch ({tokens} tokens: "
                          f"{predicted / GIB:.2f} GiB) was {off:+.0f}% off the measured {peak / GIB:.2f} GiB (predicted "
                          f"from {escape(seen['basis'])}); {calibration.KEPT}")
    return {"peak_rss_bytes": peak, "batch_tokens": tokens, "predicted_peak_rss_bytes": predicted,
            "prediction_off_pct": off}
