"""`axolotl merge-lora`: its config, the run (peak RSS measured by the kernel), and what it gets wrong.

Axolotl copies tokenizer and config files from the *base model* folder; training may have changed the tokenizer
(added pad or special tokens), so the trained ones are copied over the merged output; a `quantization_config`
(QLoRA base) is removed so the merged model loads as plain weights.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import yaml

from tutor_wrap.core import atomic
from tutor_wrap.core.proc import venv_bin
from tutor_wrap.core.rss import run_measured
from tutor_wrap.models.files import param_stats

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "chat_template.json", "added_tokens.json")


def strip_quantization(config_path: Path) -> bool:
    cfg = json.loads(config_path.read_text("utf-8"))
    if "quantization_config" not in cfg:
        return False
    del cfg["quantization_config"]
    atomic.write_json(config_path, cfg)
    return True


# Keys Axolotl's schema requires even for merge-lora (the CLI merge has no training config to take them from).
_SCHEMA_PLACEHOLDERS = {"datasets": [{"path": "unused-by-merge.jsonl", "type": "alpaca"}], "micro_batch_size": 1,
                        "learning_rate": 1.0e-4, "sequence_len": 512}


def merge_config(axolotl_cfg: dict, base: Path, adapter: Path, work: Path, method: str) -> dict:
    """The YAML for `axolotl merge-lora`: the run's config, pointed at base/adapter/work, dtype = the base's.

    legacy loads the model in the dtype of the config's bf16/fp16 flags and saves it so; left unset on a CPU
    Axolotl picks fp16, so a bf16 or fp32 base would come back as fp16. Pinning the flags to the base's stored
    dtype keeps the merged model in that dtype (as memory_efficient does) and its RAM at the shard sizes.
    """
    cfg = dict(axolotl_cfg)
    for k, v in _SCHEMA_PLACEHOLDERS.items():
        if not cfg.get(k) and not (k == "datasets" and cfg.get("pretraining_dataset")):
            cfg[k] = v
    cfg.setdefault("adapter", "lora")
    cfg.update(base_model=str(base), lora_model_dir=str(adapter), output_dir=str(work), merge_method=method)
    dtype = param_stats(base)["dtype"]
    if dtype == "BF16":
        cfg.update(bf16=True, fp16=False)
    elif dtype == "F16":
        cfg.update(bf16=False, fp16=True)
    elif dtype == "F32":
        cfg.update(bf16=False, fp16=False)
    for k in ("resume_from_checkpoint", "tf32"):
        cfg.pop(k, None)
    return cfg


def nf4_compute_dtype(axolotl_cfg: dict) -> str | None:
    """For a QLoRA run: the dtype bitsandbytes computed in during training (Axolotl: the training dtype)."""
    if axolotl_cfg.get("adapter") != "qlora" and not axolotl_cfg.get("load_in_4bit"):
        return None
    return "bfloat16" if axolotl_cfg.get("bf16") else "float16" if axolotl_cfg.get("fp16") else "float32"


def run_nf4_merge(base: Path, adapter: Path, work: Path, compute_dtype: str, log: Path) -> tuple[int, int, Path]:
    """`python -m tutor_wrap.backends.nf4_merge` into work/merged: (exit code, peak RSS bytes, merged dir)."""
    out = work / "merged"
    rc, peak = run_measured([sys.executable, "-m", "tutor_wrap.backends.nf4_merge", str(base), str(adapter), str(out),
                             "--compute-dtype", compute_dtype], log)
    return rc, peak, out


def run_merge_lora(cfg: dict, work: Path, adapter: Path, log: Path) -> tuple[int, int, Path]:
    """Write `cfg` as work/merge.yml and run `axolotl merge-lora` on it: (exit code, peak RSS bytes, merged dir)."""
    cfg_path = work / "merge.yml"
    atomic.write_text(cfg_path, yaml.safe_dump(cfg, sort_keys=False))
    rc, peak = run_measured([venv_bin("axolotl"), "merge-lora", str(cfg_path), "--lora-model-dir", str(adapter)], log)
    return rc, peak, work / "merged"


# Whether the tokenizer adds BOS/EOS: transformers 5 leaves these out of the tokenizer_config.json it saves, and
# llama.cpp's converter then falls back to its per-vocabulary default (BOS on for SentencePiece vocabularies): a
# ChatML model whose base adds no BOS would get one at serving time that training never saw.
_ADD_FLAGS = ("add_bos_token", "add_eos_token")


def copy_trained_tokenizer(adapter: Path, merged: Path, base: Path | None = None) -> list[str]:
    """The tokenizer files training wrote, over the base's copies that merge-lora put in the merged folder; the
    base's add_bos_token/add_eos_token kept where the trained config lacks them."""
    copied = []
    for name in TOKENIZER_FILES:
        src = adapter / name
        if src.is_file():
            shutil.copy2(src, merged / name)
            copied.append(name)
    if base is not None:
        keep_add_flags(merged, base)
    return copied


def keep_add_flags(model_dir: Path, base: Path) -> None:
    """The base's add_bos_token/add_eos_token in `model_dir`'s tokenizer_config.json where it lacks them."""
    cfg_path, base_cfg = model_dir / "tokenizer_config.json", base / "tokenizer_config.json"
    if base_cfg.is_file() and cfg_path.is_file():
        cfg, flags = json.loads(cfg_path.read_text("utf-8")), json.loads(base_cfg.read_text("utf-8"))
        kept = {k: flags[k] for k in _ADD_FLAGS if k in flags and k not in cfg}
        if kept:
            atomic.write_json(cfg_path, {**cfg, **kept})
