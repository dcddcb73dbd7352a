"""Train stage: `accelerate launch -m axolotl.cli.train`, watched through the metrics plugin, resumable."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from tutor_wrap import atomic
from tutor_wrap.distributed import accelerate_args
from tutor_wrap.errors import TutorWrapError
from tutor_wrap.metrics import ENV_METRICS, loss_points, read_metrics, write_loss_csv, write_loss_png
from tutor_wrap.proc import die_with_parent, tail, tool_env
from tutor_wrap.progress import TrainProgress
from tutor_wrap.rundir import file_sha256
from tutor_wrap.stages import Context, StageResult

NAME = "train"
DEPENDS = ("plan",)

# Ordered: the first pattern found in the log's tail names the failure.
FAILURES = [
    (re.compile(r"OutOfMemoryError|CUDA out of memory|HIP out of memory|DefaultCPUAllocator: can't allocate|"
                r"Cannot allocate memory|std::bad_alloc|MemoryError"),
     "out of memory", "use a smaller plan: lower train.micro_batch_size or train.sequence_len, or method: qlora"),
    (re.compile(r"num_samples should be a positive integer value"),
     "the dataset is empty after Axolotl's length filtering", "raise train.sequence_len or shorten the rows"),
    (re.compile(r"(?i)loss[^\n]{0,40}\b(nan|inf)\b|non-finite loss"),
     "the loss became NaN/inf", "lower train.learning_rate (e.g. halve it) and check the data for empty outputs"),
    (re.compile(r"(?i)(OSError|FileNotFoundError|EnvironmentError).{0,200}(config\.json|safetensors|tokenizer)"),
     "the base model is missing or unreadable", "check base_model in the recipe points at a complete model folder"),
    (re.compile(r"ValidationError|ValueError: .*(config|cfg)"),
     "Axolotl rejected the config", "see the log; fix the key under 'axolotl:' in the recipe"),
]


def classify_failure(log_text: str) -> tuple[str, str]:
    for pattern, what, fix in FAILURES:
        if pattern.search(log_text):
            return what, fix
    return "training crashed", "read the log above; re-running `run` resumes from the last complete checkpoint"


def complete_checkpoints(out_dir: Path) -> list[Path]:
    """Checkpoints that were written to the end, newest first.

    The Trainer writes a checkpoint folder file by file; a kill in the middle leaves a folder that looks like a
    checkpoint. Only folders holding weights, optimizer, scheduler and a parseable trainer_state.json count.
    """
    found = []
    for d in out_dir.glob("checkpoint-*"):
        if not d.name.split("-")[-1].isdigit():
            continue
        weights = [d / "adapter_model.safetensors", d / "model.safetensors", d / "model.safetensors.index.json"]
        needed = [d / "optimizer.pt", d / "scheduler.pt", d / "trainer_state.json"]
        if not any(w.is_file() and w.stat().st_size > 0 for w in weights):
            continue
        if not all(p.is_file() and p.stat().st_size > 0 for p in needed):
            continue
        try:
            json.loads((d / "trainer_state.json").read_text("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        found.append(d)
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]), reverse=True)


def inputs(ctx: Context) -> dict:
    yml = ctx.run.path / "axolotl.yml"
    return {"axolotl_yml": file_sha256(yml) if yml.exists() else None}


def launch_args(cfg_path: Path, plan: dict, machines: dict | None = None) -> list[str]:
    # Precision comes from the Axolotl YAML (bf16/fp16 keys), so accelerate's own mixed precision stays off.
    return [sys.executable, "-m", "accelerate.commands.launch", *accelerate_args(plan, machines),
            "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "axolotl.cli.train", str(cfg_path)]


MAX_OOM_RETRIES = 3


def smaller(cfg: dict) -> tuple[dict, str] | None:
    """One notch down after an out-of-memory: halve the micro-batch (keeping the effective batch through
    gradient accumulation), then turn on gradient checkpointing; None when nothing is left to give."""
    micro = int(cfg.get("micro_batch_size") or 1)
    accum = int(cfg.get("gradient_accumulation_steps") or 1)
    if micro > 1:
        return ({**cfg, "micro_batch_size": micro // 2, "gradient_accumulation_steps": accum * 2},
                f"micro_batch_size {micro} -> {micro // 2}, gradient_accumulation_steps {accum} -> {accum * 2}")
    if not cfg.get("gradient_checkpointing"):
        return {**cfg, "gradient_checkpointing": True}, "gradient_checkpointing off -> on"
    return None


def _group_members(pgid: int, marker: str) -> list[int]:
    """Live processes of process group `pgid` whose command line mentions `marker` (our launch YAML)."""
    pids = []
    for d in Path("/proc").glob("[0-9]*"):
        try:
            if os.getpgid(int(d.name)) == pgid and marker in (d / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(d.name))
        except (OSError, ValueError):
            continue
    return pids


def reap_leftover_trainer(train_dir: Path) -> int:
    """Stop a trainer that outlived an earlier `run` (killed with -9, say) before it races this one.

    Each launch starts a new process group and records it; anything still alive in that group that runs our
    launch YAML is ours to stop. Returns how many processes were stopped.
    """
    rec = train_dir / "trainer.json"
    if not rec.exists():
        return 0
    try:
        info = json.loads(rec.read_text("utf-8"))
        pgid, marker = int(info["pgid"]), str(info["launch_yml"])
    except (OSError, ValueError, KeyError):
        return 0
    pids = _group_members(pgid, marker)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + 15
        while time.time() < deadline and (pids := _group_members(pgid, marker)):
            time.sleep(0.2)
    rec.unlink(missing_ok=True)
    return len(pids)


def _launch(ctx: Context, launch_cfg: dict, train_dir: Path, log: Path, metrics_path: Path, plan: dict) -> int:
    launch_yml = train_dir / "axolotl.launch.yml"
    atomic.write_text(launch_yml, yaml.safe_dump(launch_cfg, sort_keys=False))
    args = launch_args(launch_yml, plan, ctx.machines)
    env = tool_env({ENV_METRICS: str(metrics_path)})
    if ctx.hardware.accelerator == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    with open(log, "ab") as fh:
        fh.write(("\n$ " + " ".join(args) + "\n").encode())
        fh.flush()
        proc = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, env=env, preexec_fn=die_with_parent,
                                start_new_session=True)
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
    return proc.returncode


def _note(log: Path, ctx: Context, msg: str) -> None:
    ctx.console.print(f"[cyan]train:[/] {msg}")
    with open(log, "a", encoding="utf-8") as fh:
        fh.write(f"\n[tutor_wrap] {msg}\n")


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
    })
