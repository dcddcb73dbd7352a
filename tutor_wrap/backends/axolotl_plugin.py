"""The project's Axolotl plugin: one JSON line per logging step (the structured source for live progress), and
what Axolotl 0.19 has no key for, done through its plugin hooks: `use_cpu` for CPU runs, and for several CPU
processes the model's placement, the gloo process group and the check that every rank holds the same weights.

Runs inside the training process (loaded by Axolotl from `plugins:` in the YAML), so it may import torch freely.
Parsing tqdm from the log would break on every Axolotl release; a TrainerCallback sees the real numbers.
"""

from __future__ import annotations

import faulthandler
import hashlib
import json
import os
import resource
import signal
import time
from pathlib import Path

from axolotl.integrations.base import BasePlugin
from transformers import TrainerCallback

from tutor_wrap.backends.axolotl_metrics import ENV_METRICS, ENV_USE_CPU, RANK_PIDS


# The most tokens one forward pass has taken so far (micro-batch x padded length). Without packing a batch is as
# long as its longest row, so a peak belongs to the batches a run happened to draw: a measurement is kept with it.
_MAX_BATCH_TOKENS = [0]


def _count_tokens(_module, args, kwargs) -> None:
    ids = kwargs.get("input_ids", args[0] if args else None)
    if hasattr(ids, "numel"):
        _MAX_BATCH_TOKENS[0] = max(_MAX_BATCH_TOKENS[0], int(ids.numel()))


def _mem() -> dict:
    """This process's peaks so far: its RSS (what CPU training needs of the RAM; the kernel's high-water mark) and,
    on a GPU, torch's allocated and reserved peaks (what the memory model predicts), with the largest batch seen."""
    out = {"cpu_max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}   # KiB on Linux
    if _MAX_BATCH_TOKENS[0]:
        out["max_batch_tokens"] = _MAX_BATCH_TOKENS[0]
    try:
        import torch

        if torch.cuda.is_available():
            out.update(gpu_max_allocated_bytes=int(torch.cuda.max_memory_allocated()),
                       gpu_max_reserved_bytes=int(torch.cuda.max_memory_reserved()))
    except Exception:  # metrics must never break training
        pass
    return out


def _cpu_ranks() -> bool:
    """Several processes training on the CPU (the train stage sets ENV_USE_CPU for CPU runs only)."""
    return os.environ.get(ENV_USE_CPU) == "1" and int(os.environ.get("WORLD_SIZE", "1")) > 1


def _trainable_digest(model) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if p.requires_grad:
            h.update(name.encode())
            h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class MetricsCallback(TrainerCallback):
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._t0 = time.time()
        self._is_main = int(os.environ.get("RANK", "0")) == 0
        self._ranks_checked = False

    def _check_ranks(self, args, state, model) -> None:
        """Several ranks holding replicas (DDP): every rank's trainable weights, hashed and gathered, must be
        identical after an optimizer step, or the gradients were not averaged and each rank trained alone.
        Sharded states (DeepSpeed, FSDP) hold different pieces by design and are not compared."""
        if args.world_size < 2 or model is None or args.deepspeed or getattr(args, "fsdp", None):
            return
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            self._write({"event": "ranks", "step": state.global_step, "world_size": args.world_size,
                         "in_sync": False, "why": "no process group: each rank trains alone"})
            return
        digests: list = [None] * dist.get_world_size()
        dist.all_gather_object(digests, _trainable_digest(model))   # every rank calls this at the same step
        self._write({"event": "ranks", "step": state.global_step, "world_size": args.world_size,
                     "backend": str(dist.get_backend()), "digests": digests, "in_sync": len(set(digests)) == 1})

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if not self._ranks_checked:   # the first optimizer step of this launch (fresh or resumed)
            self._ranks_checked = True
            self._check_ranks(args, state, model)

    def _write(self, obj: dict) -> None:
        if not self._is_main:
            return
        obj["time"] = round(time.time(), 3)
        # Append + flush per line: a reader sees whole lines, and a crash loses at most the line being written.
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(obj) + "\n")
            fh.flush()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._t0 = time.time()
        if model is not None and not getattr(model, "_tutor_wrap_counts_tokens", False):
            model.register_forward_pre_hook(_count_tokens, with_kwargs=True)
            model._tutor_wrap_counts_tokens = True
        self._write({"event": "begin", "step": state.global_step, "max_steps": state.max_steps,
                     "resumed_from_step": state.global_step or None, "world_size": args.world_size})

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = dict(logs or {})
        row = {"event": "log", "step": state.global_step, "max_steps": state.max_steps, "epoch": state.epoch,
               "elapsed_s": round(time.time() - self._t0, 3)}
        for key in ("loss", "learning_rate", "grad_norm", "train_loss", "train_runtime", "tokens/total",
                    "tokens/trainable"):
            if key in logs:
                try:  # Axolotl logs some numbers as formatted strings ('6.938')
                    row[key] = float(logs[key])
                except (TypeError, ValueError):
                    pass
        tokens = getattr(state, "num_input_tokens_seen", 0)
        if tokens:
            row["tokens_seen"] = int(tokens)
        row.update(_mem())
        self._write(row)

    def on_save(self, args, state, control, **kwargs):
        self._write({"event": "checkpoint", "step": state.global_step})

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._check_ranks(args, state, model)
        self._write({"event": "end", "step": state.global_step, "max_steps": state.max_steps, **_mem()})


class MetricsPlugin(BasePlugin):
    def register(self, cfg):
        # Inside the trainer (the grandchild of tutor_wrap) accelerate does not pass a SIGTERM on, so the trainer
        # asks the kernel itself to be stopped when its parent goes. Only there: `plan` registers plugins too.
        if os.environ.get(ENV_METRICS):
            from tutor_wrap.core.proc import die_with_parent

            die_with_parent()
            # A trainer that stops making progress (a rank waiting forever on another) can be asked where it is:
            # SIGUSR1 writes every thread's stack into the log (axolotl_train.dump_stacks), and training goes on.
            faulthandler.register(signal.SIGUSR1, all_threads=True, chain=False)
            with open(Path(os.environ[ENV_METRICS]).with_name(RANK_PIDS), "a", encoding="utf-8") as fh:
                fh.write(f"{os.getpid()}\n")
        if _cpu_ranks():
            # Without this every rank trains alone on all the rows (no gradient all-reduce, each one logging and
            # saving): Axolotl creates the shared PartialState without cpu=True, which on a machine without an
            # accelerator sets up no process group. Created here first (register() runs before Axolotl touches
            # the distributed state) it is the gloo group, for Axolotl's barriers around data preparation; the
            # Trainer resets it before building its Accelerator, which then reads ACCELERATE_USE_CPU.
            # ACCELERATE_TORCH_DEVICE: accelerate would name the device "cpu:<rank>", and a resume then fails in
            # torch.load(optimizer.pt, map_location="cpu:0") ("don't know how to restore data location").
            os.environ["ACCELERATE_USE_CPU"] = "true"
            os.environ["ACCELERATE_TORCH_DEVICE"] = "cpu"
            from accelerate import PartialState

            PartialState(cpu=True)

    def load_datasets(self, cfg, preprocess=False):
        # Not a dataset loader (returns None: Axolotl loads them): the first hook after Axolotl's normalize_config,
        # which places the model on "the local rank's device" (an int transformers reads as an accelerator index)
        # whenever there are several ranks, and before the model loader copies that placement.
        if _cpu_ranks():
            cfg.device_map = {"": "cpu"}
        return None

    def get_training_args(self, cfg):
        # bf16 mixed precision on a CPU: the Trainer refuses `bf16` without a GPU unless `use_cpu` is set, and
        # Axolotl 0.19 has no key for it. The train stage asks for it (ENV_USE_CPU) only for a CPU run.
        if os.environ.get(ENV_USE_CPU) == "1":
            return {"use_cpu": True}
        return {}

    def add_callbacks_pre_trainer(self, cfg, model):
        path = os.environ.get(ENV_METRICS) or str(Path(cfg.output_dir) / "metrics.jsonl")
        return [MetricsCallback(Path(path))]
