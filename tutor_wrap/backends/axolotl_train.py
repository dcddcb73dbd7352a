"""Training with Axolotl: the launch command, reading its failures, its checkpoints, one notch smaller after an
out-of-memory, and the loop that ties them (`train`). The train stage drives it; nothing here knows about the run
dir's manifest or the screen (the stage passes `watch` and `note`)."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from tutor_wrap.backends.axolotl_metrics import RANK_PIDS
from tutor_wrap.core import atomic
from tutor_wrap.core.errors import TutorWrapError
from tutor_wrap.core.hashing import file_sha256
from tutor_wrap.core.proc import start_logged, tail
from tutor_wrap.planning.distributed import accelerate_args

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


# Without --config_file, accelerate launch reads ~/.cache/huggingface/accelerate/default_config.yaml: a person's
# `accelerate config` from another project (DeepSpeed, FSDP, gpu_ids: 0, a CPU thread count) would silently change
# this launch. Our own file holds the launcher's defaults, so the plan and the flags below are the only source.
ACCELERATE_CONFIG = {"compute_environment": "LOCAL_MACHINE", "distributed_type": "NO", "mixed_precision": "no",
                     "use_cpu": False, "debug": False}


def launch_args(cfg_path: Path, plan: dict, machines: dict | None = None) -> list[str]:
    """The launch command; writes the accelerate config it names beside the Axolotl YAML (accelerate.yml)."""
    accelerate_config = cfg_path.with_name("accelerate.yml")
    atomic.write_text(accelerate_config, yaml.safe_dump(ACCELERATE_CONFIG, sort_keys=False))
    # Precision comes from the Axolotl YAML (bf16/fp16 keys), so accelerate's own mixed precision stays off.
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config),
            *accelerate_args(plan, machines), "--mixed_precision", "no", "--dynamo_backend", "no",
            "-m", "axolotl.cli.train", str(cfg_path)]


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


def _runs(pid: int, marker: str) -> bool:
    """Process `pid` is alive and its command line mentions `marker` (our launch YAML)."""
    try:
        return marker in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


def _launch(train_dir: Path) -> tuple[int, str] | None:
    """The last launch's record (trainer.json): its process group and its launch YAML."""
    try:
        info = json.loads((train_dir / "trainer.json").read_text("utf-8"))
        return int(info["pgid"]), str(info["launch_yml"])
    except (OSError, ValueError, KeyError):
        return None


def _group_members(pgid: int, marker: str) -> list[int]:
    """Live processes of process group `pgid` whose command line mentions `marker` (our launch YAML)."""
    pids = []
    for d in Path("/proc").glob("[0-9]*"):
        try:
            if os.getpgid(int(d.name)) == pgid and _runs(int(d.name), marker):
                pids.append(int(d.name))
        except (OSError, ValueError):
            continue
    return pids


def reap_leftover_trainer(train_dir: Path) -> int:
    """Stop a trainer that outlived an earlier `run` (killed with -9, say) before it races this one.

    Each launch starts a new process group and records it; anything still alive in that group that runs our
    launch YAML is ours to stop. Returns how many processes were stopped.
    """
    if (launch := _launch(train_dir)) is None:
        return 0
    pgid, marker = launch
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
    (train_dir / "trainer.json").unlink(missing_ok=True)
    return len(pids)


def dump_stacks(train_dir: Path) -> list[int]:
    """Ask every rank of the running trainer to write its threads' Python stacks into the log (the plugin's SIGUSR1
    handler); training goes on. Only ranks that said they can (RANK_PIDS) and still run the recorded launch YAML
    are signalled. Returns the pids signalled."""
    try:
        listed = {int(line) for line in (train_dir / RANK_PIDS).read_text("utf-8").split()}
    except (OSError, ValueError):
        return []
    if (launch := _launch(train_dir)) is None:
        return []
    signalled = []
    # torchrun starts each rank in a session of its own: a rank is known by its command line, not its group
    for pid in sorted(p for p in listed if _runs(p, launch[1])):
        try:
            os.kill(pid, signal.SIGUSR1)
            signalled.append(pid)
        except ProcessLookupError:
            continue
    return signalled


# A trainer is quiet when neither its log nor its metrics grow. Loading a large model or saving a checkpoint can
# be quiet for minutes, so "stalled" means quiet for STALL_FACTOR x the longest quiet spell this launch has already
# come back from, and never less than STALL_FLOOR_S.
STALL_FLOOR_S = 600.0
STALL_FACTOR = 3.0


class StallWatch:
    """Notices a trainer that has gone quiet for far longer than it ever was, once per quiet spell."""

    def __init__(self, paths: list[Path], now: float):
        self.paths = paths
        self.last_change = now
        self.longest = 0.0
        self._seen = self._stamp()
        self._told = False

    def _stamp(self) -> tuple:
        out = []
        for p in self.paths:
            try:
                st = p.stat()
                out.append((st.st_size, st.st_mtime_ns))
            except OSError:
                out.append(None)
        return tuple(out)

    def limit(self) -> float:
        return max(STALL_FLOOR_S, STALL_FACTOR * self.longest)

    def stalled(self, now: float) -> float | None:
        """Seconds of quiet when this spell has just passed the limit (once per spell), else None."""
        stamp = self._stamp()
        if stamp != self._seen:
            self._seen = stamp
            # A spell already reported ends with the stacks in the log, and counts too: the same hang is then
            # reported again after a longer silence each time, not every STALL_FLOOR_S.
            self.longest = max(self.longest, now - self.last_change)
            self.last_change, self._told = now, False
            return None
        quiet = now - self.last_change
        if quiet >= self.limit() and not self._told:
            self._told = True
            return quiet
        return None


KNOBS = ("micro_batch_size", "gradient_accumulation_steps", "gradient_checkpointing")   # what a notch down changes


@dataclass
class Trained:
    attempts: list[dict] = field(default_factory=list)   # each launch's knobs and outcome
    resumed_from: Path | None = None                      # the checkpoint the last launch resumed from


def train(plan_yml: Path, train_dir: Path, plan: dict, *, env: dict, log: Path, metrics_path: Path,
          resumable: bool, machines: dict | None, watch: Callable, note: Callable[[str], None],
          tracking: dict | None = None) -> Trained:
    """Axolotl on `plan_yml` until it finishes: resumed from the last complete checkpoint of the same work, one
    notch smaller after each out-of-memory (MAX_OOM_RETRIES), a TutorWrapError naming the failure otherwise.

    `watch(proc, max_steps) -> exit code` follows a launched trainer; `resumable`: the checkpoints in the output
    dir belong to this very plan, interrupted (otherwise they are a finished or other training's and go).
    The trainer starts in the YAML's folder (the run dir): the YAML's relative paths are the run dir's own.
    `tracking`: the trackers' Axolotl keys, added to the launch copy only, so turning a tracker on or off neither
    changes the plan's YAML nor retrains."""
    cfg = yaml.safe_load(plan_yml.read_text("utf-8"))
    home = plan_yml.parent.resolve()
    out_dir = home / cfg["output_dir"]
    notch_file = train_dir / "replan.json"
    plan_sha = file_sha256(plan_yml)
    if reap_leftover_trainer(train_dir):
        note("stopped a trainer left running by an earlier, killed run")
    if not resumable and out_dir.exists() and complete_checkpoints(out_dir):
        # Checkpoints of a finished training, or of another config: resuming would train nothing, or the old plan.
        note(f"starting fresh: the checkpoints in {out_dir} belong to a finished or different training")
        shutil.rmtree(out_dir)
        notch_file.unlink(missing_ok=True)
    launch_cfg = {**cfg, **(tracking or {})}
    done = Trained()
    # A smaller plan chosen after an OOM in an earlier run of this same plan still applies on resume.
    if notch_file.exists():
        notch = json.loads(notch_file.read_text("utf-8"))
        if notch.get("plan_sha256") == plan_sha:
            launch_cfg.update(notch["overrides"])
            done.attempts = notch.get("attempts", [])
    while True:
        ckpts = complete_checkpoints(out_dir) if out_dir.exists() else []
        launch_cfg.pop("resume_from_checkpoint", None)
        if ckpts:
            done.resumed_from = ckpts[0]
            launch_cfg["resume_from_checkpoint"] = str(ckpts[0])
            note(f"resuming from {ckpts[0].name} (the last complete checkpoint): {ckpts[0]}")
        elif not done.attempts:
            metrics_path.unlink(missing_ok=True)  # a fresh start: old curves would mislead
        launch_yml = train_dir / "axolotl.launch.yml"
        (train_dir / RANK_PIDS).unlink(missing_ok=True)   # this launch's ranks write theirs
        atomic.write_text(launch_yml, yaml.safe_dump(launch_cfg, sort_keys=False))
        proc = start_logged(launch_args(launch_yml, plan, machines), log, env=env, cwd=home, new_session=True)
        atomic.write_json(train_dir / "trainer.json", {"pgid": proc.pid, "launch_yml": str(launch_yml)})
        try:
            rc = watch(proc, launch_cfg.get("max_steps"))
        except KeyboardInterrupt:
            reap_leftover_trainer(train_dir)  # the new session shields the trainer from the terminal's Ctrl-C
            raise
        knobs = {k: launch_cfg.get(k) for k in KNOBS}
        if rc == 0:
            done.attempts.append({**knobs, "outcome": "ok"})
            return done
        what, fix = classify_failure(tail(log, 200))
        done.attempts.append({**knobs, "outcome": what, "exit": rc})
        ooms = sum(a["outcome"] == "out of memory" for a in done.attempts)
        down = smaller(launch_cfg) if what == "out of memory" else None
        if down is None or ooms > MAX_OOM_RETRIES:
            if what == "out of memory" and len(done.attempts) > 1:
                fix = f"tried {len(done.attempts)} plans ({done.attempts}); " + fix
            raise TutorWrapError(f"train: {what} (exit {rc}); log: {log}\n{tail(log, 15)}", hint=fix)
        launch_cfg, change = down
        atomic.write_json(notch_file, {"plan_sha256": plan_sha, "attempts": done.attempts,
                                       "overrides": {k: launch_cfg[k] for k in KNOBS if k in launch_cfg}})
        note(f"out of memory; re-planning one notch smaller ({change}) and retrying ({ooms}/{MAX_OOM_RETRIES})")
