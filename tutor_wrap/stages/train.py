"""Train stage: `accelerate launch -m axolotl.cli.train`, watched through the metrics plugin, resumable."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

from tutor_wrap import atomic
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


def launch_args(cfg_path: Path, num_processes: int) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "-m", "axolotl.cli.train", str(cfg_path)]


def run(ctx: Context) -> StageResult:
    cfg = yaml.safe_load((ctx.run.path / "axolotl.yml").read_text("utf-8"))
    train_dir = ctx.run.sub("train")
    out_dir = Path(cfg["output_dir"])
    log = train_dir / "train.log"
    metrics_path = train_dir / "metrics.jsonl"
    plan = json.loads((ctx.run.path / "plan.json").read_text("utf-8"))["plan"]

    ckpts = complete_checkpoints(out_dir) if out_dir.exists() else []
    launch_cfg = dict(cfg)
    resumed_from = None
    if ckpts:
        resumed_from = ckpts[0]
        launch_cfg["resume_from_checkpoint"] = str(resumed_from)
        msg = f"resuming from {resumed_from.name} (last complete checkpoint)"
        ctx.console.print(f"[cyan]train:[/] {msg}")
        with open(log, "a", encoding="utf-8") as fh:
            fh.write(f"\n[tutor_wrap] {msg}: {resumed_from}\n")
    else:
        metrics_path.unlink(missing_ok=True)  # a fresh start: old curves would mislead
    launch_yml = train_dir / "axolotl.launch.yml"
    atomic.write_text(launch_yml, yaml.safe_dump(launch_cfg, sort_keys=False))

    args = launch_args(launch_yml, int(plan.get("num_processes", 1)))
    env = tool_env({ENV_METRICS: str(metrics_path)})
    if ctx.hardware.accelerator == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    with open(log, "ab") as fh:
        fh.write(("\n$ " + " ".join(args) + "\n").encode())
        fh.flush()
        proc = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, env=env, preexec_fn=die_with_parent)
        progress = TrainProgress(ctx.console, metrics_path, max_steps=cfg.get("max_steps"))
        try:
            while proc.poll() is None:
                progress.update()
                time.sleep(1.0)
        except KeyboardInterrupt:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
        finally:
            progress.update()
            progress.close()
    rows = read_metrics(metrics_path)
    write_loss_csv(rows, train_dir / "loss.csv")
    has_png = write_loss_png(rows, train_dir / "loss.png", title=f"{ctx.recipe.name}: training loss")
    if proc.returncode != 0:
        text = tail(log, 200)
        what, fix = classify_failure(text)
        raise TutorWrapError(f"train: {what} (exit {proc.returncode}); log: {log}\n{tail(log, 15)}", hint=fix)

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
        "resumed_from": resumed_from.name if resumed_from else None,
    })
