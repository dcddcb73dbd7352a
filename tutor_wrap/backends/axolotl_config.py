"""Plan + Recipe -> the complete Axolotl YAML, and its validation by Axolotl's own schema.

Rendering is plain dict work (fast, no torch). Validation imports Axolotl's pydantic schema, which costs several
seconds, so it lives in its own function and is only called where a YAML is about to be used.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile

from pathlib import Path
from typing import Any

import yaml

from tutor_wrap.planning.distributed import DEEPSPEED_STAGE, deepspeed_filename, write_deepspeed_config
from tutor_wrap.core.errors import TutorWrapError
from tutor_wrap.data.format import Format
from tutor_wrap.planning.planner import Plan
from tutor_wrap.recipe.schema import Recipe

PLUGIN = "tutor_wrap.backends.axolotl_plugin.MetricsPlugin"
CCE_PLUGIN = "axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin"
_ATTN = {"sdpa": "sdpa", "flash": "flash_attention_2", "eager": "eager"}


def render(recipe: Recipe, plan: Plan, fmt: Format, *, base_model: str, dataset_path: Path | None, run_dir: Path) -> dict[str, Any]:
    """The complete config: the plan's, then the recipe's `axolotl:` block over it."""
    own = planned(recipe, plan, fmt, base_model=base_model, dataset_path=dataset_path, run_dir=run_dir)
    return with_recipe_block(own, recipe)[0]


def with_recipe_block(own: dict[str, Any], recipe: Recipe) -> tuple[dict[str, Any], dict[str, tuple[Any, Any]]]:
    """`own` (the plan's config) with the recipe's `axolotl:` block over it, and what the block replaced:
    {key: (the plan's value, the recipe's)}, for the plan to say (its figures assume its own values)."""
    block = dict(recipe.axolotl or {})
    replaced = {k: (own[k], v) for k, v in block.items() if k in own and own[k] != v}
    return {**own, **block}, replaced


def planned(recipe: Recipe, plan: Plan, fmt: Format, *, base_model: str, dataset_path: Path | None,
            run_dir: Path) -> dict[str, Any]:
    """The config the recipe and the plan make, before the recipe's `axolotl:` block."""
    t = recipe.train
    cfg: dict[str, Any] = {
        "base_model": base_model,
        "trust_remote_code": recipe.trust_remote_code,
        "datasets": [fmt.axolotl_dataset(recipe.dataset, dataset_path)],
        **fmt.axolotl_settings(),
        "dataset_prepared_path": str(run_dir / "train" / "prepared"),
        "val_set_size": 0,
        "output_dir": str(run_dir / "train" / "out"),
        "sequence_len": plan.sequence_len,
        "sample_packing": plan.sample_packing,
        "pad_to_sequence_len": plan.sample_packing,
        "micro_batch_size": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.gradient_accumulation_steps,
        "optimizer": plan.optimizer,
        "learning_rate": t.learning_rate,
        "lr_scheduler": "cosine",
        "warmup_ratio": 0.1,
        "weight_decay": 0.0,
        "bf16": plan.dtype == "bf16",
        "fp16": plan.dtype == "fp16",
        "tf32": False,
        "gradient_checkpointing": plan.gradient_checkpointing,
        "attn_implementation": _ATTN[plan.attention],
        "logging_steps": t.logging_steps,
        "seed": t.seed,
        "save_safetensors": True,
        "save_total_limit": 2,
        "plugins": [PLUGIN],
    }
    if plan.dataloader_workers is not None:
        # Axolotl sets all three loader defaults only when none is given: with workers 0, no pinning, no prefetch.
        cfg["dataloader_num_workers"] = plan.dataloader_workers
        cfg["dataloader_pin_memory"] = False
    if plan.loss == "cce":
        # Cut cross-entropy never materialises the full logits tensor (GBs at a 128k vocabulary).
        cfg["plugins"] = [*cfg["plugins"], CCE_PLUGIN]
        cfg["cut_cross_entropy"] = True
    if t.max_steps is not None:
        cfg["max_steps"] = t.max_steps
        cfg["num_epochs"] = 1
    else:
        cfg["num_epochs"] = t.epochs
    if t.save_steps:
        cfg["save_steps"] = t.save_steps
    else:
        cfg["saves_per_epoch"] = 1
    if plan.method != "full":
        cfg["adapter"] = "qlora" if plan.method == "qlora" else "lora"
        cfg["load_in_4bit"] = plan.method == "qlora"
        cfg["load_in_8bit"] = plan.method == "lora8bit"
        cfg.update(lora_r=recipe.lora.r, lora_alpha=recipe.lora.alpha, lora_dropout=recipe.lora.dropout)
        if recipe.lora.targets == "all-linear":
            cfg["lora_target_linear"] = True
        else:
            cfg["lora_target_modules"] = list(recipe.lora.targets)
        # Axolotl turns its Triton LoRA kernels on by itself; they assert CUDA, so say it either way.
        for k in ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel"):
            cfg[k] = plan.lora_kernels
    if plan.sharding in DEEPSPEED_STAGE:
        # Generated next to the YAML by write_sidecars(); Axolotl reads it and sets up DeepSpeed itself.
        cfg["deepspeed"] = str(run_dir / deepspeed_filename(plan.sharding))
    elif plan.sharding == "ddp" and plan.method != "full":
        # Every adapter weight takes part in every forward: DDP need not search the graph for unused ones.
        cfg["ddp_find_unused_parameters"] = False
    return cfg


def write_sidecars(cfg: dict[str, Any]) -> list[Path]:
    """Write the files the rendered config points to that tutor_wrap generates (the DeepSpeed ZeRO JSON).

    A `deepspeed:` path the recipe set itself (under `axolotl:`) is the user's file and is left alone.
    """
    written = []
    ds = cfg.get("deepspeed")
    if isinstance(ds, str):
        p = Path(ds)
        sharding = p.name.removeprefix("deepspeed_").removesuffix(".json")
        if p.name == deepspeed_filename(sharding) and sharding in DEEPSPEED_STAGE:
            written.append(write_deepspeed_config(p, sharding))
    return written


RUN_DIR_KEYS = ("output_dir", "dataset_prepared_path", "deepspeed")   # the paths render() puts in the run dir


def relative_to(cfg: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """The config with the paths inside `run_dir` written relative to it. The trainer starts in the run dir, so a
    run dir that was moved or copied trains into its own folders, never into the original's."""
    out = dict(cfg)
    run_dir = Path(run_dir).resolve()
    for key in RUN_DIR_KEYS:
        value = out.get(key)
        if isinstance(value, str) and Path(value).is_absolute() and Path(value).is_relative_to(run_dir):
            out[key] = Path(value).relative_to(run_dir).as_posix()
    return out


def to_yaml(cfg: dict[str, Any]) -> str:
    header = "# Written by tutor_wrap from the recipe and the plan; `python -m tutor_wrap plan` explains each choice.\n"
    return header + yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True)


@contextlib.contextmanager
def _quiet_stderr():
    """File descriptor 2 into a scratch file for the block (C extensions and loggers write there directly)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def validate(cfg: dict[str, Any], *, source: str = "axolotl config") -> list[str]:
    """Validate with Axolotl's schema (plugins' arguments included); return the keys it would silently drop.

    Raises TutorWrapError when Axolotl rejects the config.
    """
    raw = dict(cfg)
    try:
        # Importing Axolotl loads torch, torchao and bitsandbytes, which print their optional-kernel misses ("Set
        # trust_remote_code=True to allow loading kernels", which reads like advice to the person): kept off screen.
        with _quiet_stderr():
            from axolotl.utils.config import prepare_plugins, validate_config
            from axolotl.utils.dict import DictDefault

            raw = DictDefault(raw)
            prepare_plugins(raw)
            validated = validate_config(raw)
    except Exception as exc:  # Axolotl raises ValueError / pydantic errors; both mean "rejected"
        raise TutorWrapError(
            f"{source}: Axolotl rejected the config: {exc}",
            hint="check the keys under 'axolotl:' in the recipe against Axolotl's config reference",
        ) from None
    # Axolotl's schema ignores unknown keys; what is missing after validation would never have been used.
    return sorted(k for k, v in cfg.items() if v is not None and k not in validated)
