"""Merge stage: check RAM and disk first, then `axolotl merge-lora`, then fix what it copies from the base.

Axolotl copies tokenizer and config files from the *base model* folder; training may have changed the tokenizer
(added pad or special tokens), so the trained ones are copied over the merged output afterwards.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from tutor_wrap import atomic
from tutor_wrap.errors import TutorWrapError
from tutor_wrap.hardware import GIB, Hardware
from tutor_wrap.proc import tail, venv_bin
from tutor_wrap.rss import run_measured
from tutor_wrap.rundir import file_sha256
from tutor_wrap.stages import Context, StageResult

NAME = "merge"
DEPENDS = ("train",)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "chat_template.json", "added_tokens.json")


@dataclass(frozen=True)
class MergeBudget:
    method: str
    predicted_peak_rss_bytes: int
    disk_needed_bytes: int
    ram_swap_available_bytes: int
    disk_free_bytes: int

    @property
    def fits(self) -> bool:
        return self.predicted_peak_rss_bytes <= self.ram_swap_available_bytes and self.disk_needed_bytes <= self.disk_free_bytes


def weight_files(model_dir: Path) -> list[Path]:
    return sorted(model_dir.glob("*.safetensors"))


def predict(model_dir: Path, adapter_dir: Path, hw: Hardware, method: str) -> MergeBudget:
    """Peak host RAM of a merge method, from the real shard sizes on disk."""
    shards = [p.stat().st_size for p in weight_files(model_dir)]
    adapter = sum(p.stat().st_size for p in adapter_dir.glob("adapter_model.safetensors"))
    return predict_sizes(shards, adapter, hw, method)


def predict_sizes(shards: list[int], adapter: int, hw: Hardware, method: str) -> MergeBudget:
    """Peak host RAM of each merge method from shard sizes.

    memory_efficient holds one shard, its merged copy and the adapter; legacy holds the whole model plus the
    adapter. A fixed 1.2 GiB covers the Python process with torch and transformers imported (measured here:
    about 1.1 GiB RSS for an idle `axolotl merge-lora` on CPU).
    """
    runtime = int(1.2 * GIB)
    total = sum(shards)
    if method == "legacy":
        peak = runtime + int(total * 1.1) + adapter
    else:
        peak = runtime + 2 * (max(shards) if shards else 0) + adapter
    usable = hw.ram_available_bytes + hw.swap_free_bytes
    return MergeBudget(method, peak, total, usable, hw.disk_free_bytes)


def choose_method(model_dir: Path, adapter_dir: Path, hw: Hardware, requested: str = "auto") -> MergeBudget:
    if requested != "auto":
        b = predict(model_dir, adapter_dir, hw, requested)
    else:
        # memory_efficient first: it needs far less RAM and is Axolotl's default.
        b = predict(model_dir, adapter_dir, hw, "memory_efficient")
    if not b.fits:
        need_ram = max(0, b.predicted_peak_rss_bytes - b.ram_swap_available_bytes)
        need_disk = max(0, b.disk_needed_bytes - b.disk_free_bytes)
        remedy = []
        if need_ram:
            gib = int(need_ram / GIB) + 2
            remedy.append(f"add swap: sudo bash tools/make_swapfile.sh {gib}G"
                          + ("; under WSL also raise memory/swap in %UserProfile%\\.wslconfig ([wsl2] memory=..., swap=...)" if hw.wsl else ""))
        if need_disk:
            remedy.append(f"free {need_disk / GIB:.1f} GiB of disk where the run dir is")
        raise TutorWrapError(
            f"merge ({b.method}) needs {b.predicted_peak_rss_bytes / GIB:.1f} GiB of RAM+swap and "
            f"{b.disk_needed_bytes / GIB:.1f} GiB of disk; this machine has {b.ram_swap_available_bytes / GIB:.1f} GiB "
            f"and {b.disk_free_bytes / GIB:.1f} GiB. Nothing was written.",
            hint="; ".join(remedy),
        )
    return b


def strip_quantization(config_path: Path) -> bool:
    cfg = json.loads(config_path.read_text("utf-8"))
    if "quantization_config" not in cfg:
        return False
    del cfg["quantization_config"]
    atomic.write_json(config_path, cfg)
    return True


def merge(base: Path, adapter: Path, out: Path, axolotl_cfg: dict, hw: Hardware, *, method: str = "auto",
          log: Path) -> dict:
    """Merge `adapter` into `base`, writing a complete model folder at `out` (or nothing)."""
    budget = choose_method(base, adapter, hw, method)
    work = out.parent / f".{out.name}.work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cfg = dict(axolotl_cfg)
    cfg.update(base_model=str(base), lora_model_dir=str(adapter), output_dir=str(work), merge_method=budget.method)
    cfg.pop("resume_from_checkpoint", None)
    cfg_path = work / "merge.yml"
    atomic.write_text(cfg_path, yaml.safe_dump(cfg, sort_keys=False))
    rc, peak = run_measured([venv_bin("axolotl"), "merge-lora", str(cfg_path), "--lora-model-dir", str(adapter)], log)
    merged = work / "merged"
    if rc != 0 or not weight_files(merged):
        raise TutorWrapError(f"merge: axolotl merge-lora failed (exit {rc}); log: {log}\n{tail(log, 15)}",
                             hint="read the log; if it was killed, check RAM with `python -m tutor_wrap preflight`")
    for name in TOKENIZER_FILES:
        src = adapter / name
        if src.is_file():
            shutil.copy2(src, merged / name)
    stripped = strip_quantization(merged / "config.json")
    if out.exists():
        shutil.rmtree(out)
    merged.rename(out)
    shutil.rmtree(work, ignore_errors=True)
    return {**asdict(budget), "measured_peak_rss_bytes": peak, "stripped_quantization_config": stripped}


def inputs(ctx: Context) -> dict:
    return {"train": ctx.run.stage("train").get("fingerprint")}


def run(ctx: Context) -> StageResult:
    cfg = yaml.safe_load((ctx.run.path / "axolotl.yml").read_text("utf-8"))
    out_dir = ctx.run.artifact("train", "output_dir")
    merge_dir = ctx.run.sub("merge")
    if not cfg.get("adapter"):
        # A full fine-tune has nothing to merge: the trained folder is the model.
        return StageResult({"model": ctx.run.rel(out_dir)}, info={"method": "none (full fine-tune)"})
    base = Path(cfg["base_model"])
    if not base.is_dir():
        raise TutorWrapError(f"merge: base model {base} is not a local folder", hint="merge needs the base weights on disk")
    report = merge(base, out_dir, merge_dir / "model", cfg, ctx.hardware, log=merge_dir / "merge.log")
    report["weights_sha256"] = {p.name: file_sha256(p) for p in weight_files(merge_dir / "model")}
    atomic.write_json(merge_dir / "report.json", report)
    ctx.console.print(f"merge: {report['method']}, predicted peak RSS {report['predicted_peak_rss_bytes'] / GIB:.2f} GiB, "
                      f"measured {report['measured_peak_rss_bytes'] / GIB:.2f} GiB")
    return StageResult({"model": ctx.run.rel(merge_dir / "model"), "report": ctx.run.rel(merge_dir / "report.json")},
                       info={"method": report["method"]})
