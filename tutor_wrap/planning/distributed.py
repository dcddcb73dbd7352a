"""Several GPUs and several machines: the sharding choice's DeepSpeed config, and the accelerate launch arguments.

Pure functions (no torch, no I/O except `write_deepspeed_config`), so the planner and the tests call them anywhere.

Sharding ladder the planner walks (first that fits wins; each step costs more communication than the last):
  ddp    every GPU holds the whole model state; gradients are all-reduced (accelerate launch --multi_gpu).
  zero2  DeepSpeed ZeRO-2: optimizer states and gradients partitioned over the GPUs, weights replicated.
  zero3  DeepSpeed ZeRO-3: weights partitioned too, gathered one layer at a time.
FSDP ("fsdp" in the memory model) shards like ZeRO-3; the planner uses DeepSpeed, whose configs Axolotl ships and
whose ZeRO-3 path Axolotl's model loader special-cases (axolotl/loaders/model.py, ACCELERATE_DEEPSPEED_ZERO_STAGE).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from tutor_wrap.core.errors import TutorWrapError

DEEPSPEED_STAGE = {"zero2": 2, "zero3": 3}
LADDER = ("ddp", "zero2", "zero3")


def deepspeed_config(sharding: str) -> dict[str, Any]:
    """A DeepSpeed config for Axolotl 0.19 (HF Trainer integration) at the ZeRO stage `sharding` names.

    Follows Axolotl's own deepspeed_configs/zero2.json and zero3_bf16.json, with every batch/precision/clipping value
    "auto": transformers' HfTrainerDeepSpeedConfig fills them from the training arguments Axolotl builds
    (micro_batch_size, gradient_accumulation_steps, bf16/fp16, max_grad_norm), so they can never disagree with the
    YAML. The ZeRO-3 bucket sizes use the `stage3_*` names that transformers fills from hidden_size
    (integrations/deepspeed.py). No CPU offload: the plan sized the GPUs to hold their shard.
    """
    if sharding not in DEEPSPEED_STAGE:
        raise TutorWrapError(f"no DeepSpeed config for sharding {sharding!r}", hint="use zero2 or zero3")
    stage = DEEPSPEED_STAGE[sharding]
    zero: dict[str, Any] = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True,
                            "reduce_bucket_size": "auto"}
    if stage == 2:
        zero.update(allgather_partitions=True, allgather_bucket_size=200_000_000, reduce_scatter=True)
    else:
        zero.update(sub_group_size=0, stage3_prefetch_bucket_size="auto", stage3_param_persistence_threshold="auto",
                    stage3_max_live_parameters=0, stage3_max_reuse_distance=0,
                    # the saved checkpoint holds whole 16-bit weights, so merge/export read it like any other
                    stage3_gather_16bit_weights_on_model_save=True)
    return {
        "zero_optimization": zero,
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto", "auto_cast": False, "loss_scale": 0, "initial_scale_power": 32,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "wall_clock_breakdown": False,
    }


def deepspeed_filename(sharding: str) -> str:
    return f"deepspeed_{sharding}.json"


def write_deepspeed_config(path: Path, sharding: str) -> Path:
    from tutor_wrap.core import atomic

    atomic.write_text(Path(path), json.dumps(deepspeed_config(sharding), indent=2) + "\n")
    return Path(path)


def accelerate_args(plan: Any, machines: Mapping[str, Any] | None = None) -> list[str]:
    """The distributed part of `accelerate launch` for a plan: `plan.num_processes` processes on each machine (one
    per GPU, or CPU processes).

    `--multi_gpu` is accelerate's name for its torchrun launcher; on a machine without a GPU the ranks find no
    accelerator and train on the CPU over gloo (Axolotl's side of that is in backends/axolotl_plugin.py). Alone on
    one machine the rendezvous port is `0`: accelerate picks a free one, so two runs side by side do not collide
    on 29500.

    `machines` (absent or empty: this machine alone) has `num_machines`, `machine_rank`, `main_process_ip`,
    `main_process_port` (default 29500); run the same command on every machine with its own machine_rank.
    accelerate's --num_processes is the total over all machines. `plan` may be a Plan or its dict.
    """
    per_machine = int(plan["num_processes"] if isinstance(plan, Mapping) else plan.num_processes)
    m = dict(machines or {})
    n_machines = int(m.get("num_machines") or 1)
    if per_machine < 1 or n_machines < 1:
        raise TutorWrapError(f"num_processes {per_machine} and num_machines {n_machines} must be at least 1")
    args = ["--num_processes", str(per_machine * n_machines), "--num_machines", str(n_machines)]
    if per_machine * n_machines > 1:
        args.append("--multi_gpu")
        if n_machines == 1:
            args += ["--main_process_port", "0"]
    if n_machines > 1:
        rank, ip = m.get("machine_rank"), m.get("main_process_ip")
        if rank is None or not ip:
            raise TutorWrapError("several machines need machine_rank and main_process_ip",
                                 hint="e.g. --num-machines 2 --machine-rank 0 --main-process-ip 10.0.0.1 on the first "
                                      "machine and --machine-rank 1 on the second")
        rank = int(rank)
        if not 0 <= rank < n_machines:
            raise TutorWrapError(f"machine_rank {rank} is not in 0..{n_machines - 1}")
        args += ["--machine_rank", str(rank), "--main_process_ip", str(ip),
                 "--main_process_port", str(int(m.get("main_process_port") or 29500))]
    return args
