"""Merge stage: check RAM and disk first, then `axolotl merge-lora`, then fix what it copies, then verify.

1. `choose_method` predicts the peak RSS (`predict_sizes`, from the real shard sizes) and the disk the merged
   model takes; if that does not fit RAM + swap (as WSL caps them) or the disk, TutorWrapError with the numbers
   and the remedy, before any file or folder exists.
2. `axolotl merge-lora` (memory_efficient by default) into a hidden work dir, peak RSS measured by the kernel.
3. Axolotl copies tokenizer and config files from the *base model* folder; training may have changed the
   tokenizer (added pad or special tokens), so the trained ones are copied over the merged output; a
   `quantization_config` (QLoRA base) is removed so the merged model loads as plain weights.
4. `python -m tutor_wrap.merge_verify` in a subprocess: the merged model against base + adapter through PEFT
   (logits, fp32) and tensor by tensor. A mismatch fails the stage and nothing is kept; the result goes into
   merge/report.json under `verification`.
"""

from __future__ import annotations

import json
import math
import shutil
import time
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


# Calibrated with bench/merge_bench.py (bench/README.md "Merge benchmark"); see predict_sizes.
RUNTIME_BYTES = int(0.75 * GIB)    # `axolotl merge-lora` of the 7 MB test model: 0.75-0.76 GiB peak RSS, either method
EFFICIENT_TOTAL_FACTOR = 0.0       # memory_efficient: nothing scales with the whole model ...
EFFICIENT_SHARD_FACTOR = 3.0       # ... the shard being merged, 2-3.4x (see predict_sizes)
LEGACY_TOTAL_FACTOR = 1.08         # legacy: the whole model in its own dtype, +8%
LEGACY_SHARD_FACTOR = 1.0          # ... plus save_pretrained's staging of one shard
ADAPTER_FACTOR = 1.0               # the adapter state dict, loaded whole


def predict(model_dir: Path, adapter_dir: Path, hw: Hardware, method: str) -> MergeBudget:
    """Peak host RAM of a merge method, from the real shard sizes on disk."""
    shards = [p.stat().st_size for p in weight_files(model_dir)]
    adapter = sum(p.stat().st_size for p in adapter_dir.glob("adapter_model.safetensors"))
    return predict_sizes(shards, adapter, hw, method)


def predict_sizes(shards: list[int], adapter: int, hw: Hardware, method: str) -> MergeBudget:
    """Peak host RAM (RSS) of each merge method from shard sizes; disk = the merged model (the base's size).

    Both methods: runtime + a x all shards + b x largest shard + adapter, fitted to the peak RSS that
    bench/merge_bench.py measured on synthetic bf16 Llamas (1.6 GB in 6 x 300 MB and in 3 x 600 MB shards,
    0.98 GB in 4 x 290 MB; two runs each, bench/README.md "Merge benchmark"):
    memory_efficient: a = 0, b = 3.0. Axolotl reads one shard through a memory map, copies its tensors and
    builds the merged copies before writing; the measured peak was 2.1-3.4 x the largest shard above the
    runtime, varying between identical runs by up to 23% (the mapped file pages count in RSS only while the
    kernel keeps them; other jobs ran on the machine). b = 3.0 sits at the top of that range: a refusal should
    not be wrong the other way. So the peak follows the *largest shard*, not the model: 16 GB in 5 GB shards
    needs ~14.8 GiB, in 2 GB shards ~6.4 GiB.
    legacy: a = 1.08, b = 1.0 (repeatable to 1%): the whole model (merge() pins the load dtype to the base's
    own, so bytes in memory = bytes on disk) plus one shard of save_pretrained staging.
    runtime = 0.75 GiB: the peak of merging the 7 MB test model (the imports, either method).
    """
    total, largest = sum(shards), (max(shards) if shards else 0)
    if method == "legacy":
        peak = RUNTIME_BYTES + LEGACY_TOTAL_FACTOR * total + LEGACY_SHARD_FACTOR * largest
    else:
        peak = RUNTIME_BYTES + EFFICIENT_TOTAL_FACTOR * total + EFFICIENT_SHARD_FACTOR * largest
    peak = int(peak + ADAPTER_FACTOR * adapter)
    usable = hw.ram_available_bytes + hw.swap_free_bytes
    return MergeBudget(method, peak, total, usable, hw.disk_free_bytes)


def _ram_remedy(hw: Hardware, deficit: int) -> str:
    """Swap for Linux; the .wslconfig lines under WSL (its memory and swap caps are set from Windows)."""
    from tutor_wrap import preflight

    gib = math.ceil(deficit / GIB) + 2
    if hw.wsl:
        wsl = None
        if hw.source == "probe":
            from tutor_wrap.probe_host import wsl_info

            wsl = wsl_info(hw.ram_total_bytes, hw.swap_total_bytes)
        return "raise WSL's memory/swap in " + preflight.wsl_raise(hw, wsl, deficit)
    return f"add {gib} GiB of swap: sudo bash tools/make_swapfile.sh {gib}G (then run the merge again)"


def refusal(b: MergeBudget, hw: Hardware, other: MergeBudget | None = None) -> TutorWrapError:
    need_ram = max(0, b.predicted_peak_rss_bytes - b.ram_swap_available_bytes)
    need_disk = max(0, b.disk_needed_bytes - b.disk_free_bytes)
    remedy = []
    if need_ram:
        if other is not None and other.fits:
            remedy.append(f"use --method {other.method} (predicted peak {other.predicted_peak_rss_bytes / GIB:.1f} GiB)")
        remedy.append(_ram_remedy(hw, need_ram))
    if need_disk:
        remedy.append(f"free {math.ceil(need_disk / GIB * 10) / 10:.1f} GiB of disk where the output goes "
                      f"(or write it to a bigger disk)")
    short = []
    if need_ram:
        short.append(f"RAM+swap short by {need_ram / GIB:.1f} GiB")
    if need_disk:
        short.append(f"disk short by {need_disk / GIB:.1f} GiB")
    return TutorWrapError(
        f"merge ({b.method}) needs {b.predicted_peak_rss_bytes / GIB:.1f} GiB of RAM+swap (predicted peak RSS) and "
        f"{b.disk_needed_bytes / GIB:.1f} GiB of disk; this machine{'' if hw.source == 'probe' else f' (profile {hw.source})'} "
        f"has {hw.ram_available_bytes / GIB:.1f} GiB RAM + {hw.swap_free_bytes / GIB:.1f} GiB swap free"
        f"{' (WSL caps)' if hw.wsl else ''} and {b.disk_free_bytes / GIB:.1f} GiB of disk: {', '.join(short)}. "
        f"Nothing was written.",
        hint="; ".join(remedy),
    )


def choose_method(model_dir: Path, adapter_dir: Path, hw: Hardware, requested: str = "auto") -> MergeBudget:
    """The method to run and its budget, or a TutorWrapError (with numbers and the remedy) if it cannot fit."""
    if not weight_files(model_dir):
        raise TutorWrapError(f"merge: no *.safetensors weights in {model_dir}",
                             hint="the merge reads safetensors only; convert the base model first")
    # auto = memory_efficient: it needs far less RAM and is Axolotl's default; legacy never fits where it doesn't.
    method = "memory_efficient" if requested == "auto" else requested
    b = predict(model_dir, adapter_dir, hw, method)
    if not b.fits:
        other = predict(model_dir, adapter_dir, hw, "memory_efficient") if method == "legacy" else None
        raise refusal(b, hw, other)
    return b


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
    from tutor_wrap.merge_verify import param_stats

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


def verify_merged(base: Path, adapter: Path, merged: Path, log: Path, *, ram_budget: int | None = None) -> dict:
    """`python -m tutor_wrap.merge_verify BASE ADAPTER MERGED --json` in a subprocess (torch stays out of this
    process and its memory is returned when it exits); its JSON result, stderr appended to `log`."""
    import subprocess
    import sys

    from tutor_wrap.proc import die_with_parent, tool_env

    args = [sys.executable, "-m", "tutor_wrap.merge_verify", str(base), str(adapter), str(merged), "--json"]
    if ram_budget:
        args += ["--ram-budget", str(int(ram_budget))]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as fh:
        fh.write(("\n$ " + " ".join(args) + "\n").encode())
        fh.flush()
        proc = subprocess.run(args, stdout=subprocess.PIPE, stderr=fh, env=tool_env(), check=False,
                              preexec_fn=die_with_parent)
    out = proc.stdout.decode("utf-8", errors="replace").strip()
    with open(log, "ab") as fh:
        fh.write((out + "\n").encode())
    try:
        res = json.loads(out.splitlines()[-1])
    except (ValueError, IndexError):
        res = {"status": "error", "ok": None, "error": f"no result (exit {proc.returncode})"}
    res["returncode"] = proc.returncode
    return res


def check_verification(res: dict, log: Path) -> None:
    """Raise if the merged model does not compute what base + adapter compute (or the check could not run)."""
    status = res.get("status")
    if status in ("passed", "skipped"):
        return
    if status == "failed":
        fails = (res.get("weights") or {}).get("failures") or []
        lg = res.get("logits") or {}
        detail = "; ".join(f"{f['key']}: {f['why']}" for f in fails[:3])
        if lg.get("status") == "failed":
            detail = (f"logits max abs diff {lg['max_abs_diff']:.3g} > tolerance {lg['tolerance']:.3g} "
                      f"(adapter effect {lg['adapter_effect']:.3g})" + (f"; {detail}" if detail else ""))
        raise TutorWrapError(f"merge: the merged model does not match base + adapter: {detail}; details: {log}",
                             hint="do not use this model; check the adapter belongs to this base (same shapes, "
                                  "adapter_config.json base_model_name_or_path) and re-run the merge")
    raise TutorWrapError(f"merge: verification could not run: {res.get('error')}; log: {log}\n{tail(log, 15)}",
                         hint="read the log; the merged model was not checked, so it was not kept")


def merge(base: Path, adapter: Path, out: Path, axolotl_cfg: dict, hw: Hardware, *, method: str = "auto",
          log: Path, verify: bool = True) -> dict:
    """Merge `adapter` into `base`, writing a complete, verified model folder at `out` (or nothing).

    The budget check comes first: when the method does not fit RAM+swap or disk, TutorWrapError is raised
    before any file or folder (output, work dir, log) exists.
    """
    budget = choose_method(base, adapter, hw, method)
    work = out.parent / f".{out.name}.work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        cfg = merge_config(axolotl_cfg, base, adapter, work, budget.method)
        cfg_path = work / "merge.yml"
        atomic.write_text(cfg_path, yaml.safe_dump(cfg, sort_keys=False))
        t0 = time.perf_counter()
        rc, peak = run_measured([venv_bin("axolotl"), "merge-lora", str(cfg_path), "--lora-model-dir", str(adapter)], log)
        seconds = round(time.perf_counter() - t0, 1)
        merged = work / "merged"
        if rc != 0 or not weight_files(merged):
            raise TutorWrapError(f"merge: axolotl merge-lora failed (exit {rc}); log: {log}\n{tail(log, 15)}",
                                 hint="read the log; if it was killed, check RAM with `python -m tutor_wrap preflight`")
        for name in TOKENIZER_FILES:
            src = adapter / name
            if src.is_file():
                shutil.copy2(src, merged / name)
        stripped = strip_quantization(merged / "config.json")
        verification = None
        if verify:
            verification = verify_merged(base, adapter, merged, log, ram_budget=hw.ram_available_bytes)
            check_verification(verification, log)
        if out.exists():
            shutil.rmtree(out)
        merged.rename(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {**asdict(budget), "measured_peak_rss_bytes": peak, "merge_seconds": seconds,
            "prediction_error_pct": round(100 * (budget.predicted_peak_rss_bytes - peak) / peak, 1) if peak else None,
            "stripped_quantization_config": stripped, "verification": verification}


def _verification_line(v: dict | None) -> str:
    if not v:
        return "off"
    if v.get("status") == "skipped":
        return "skipped (" + "; ".join(str((v.get(k) or {}).get("reason")) for k in ("weights", "logits")) + ")"
    d = v.get("max_abs_diff")
    return f"{v.get('status')} (max abs diff {d:.3g}, tolerance {v.get('tolerance'):.3g})" if isinstance(
        v.get("tolerance"), float) and d is not None else str(v.get("status"))


def inputs(ctx: Context) -> dict:
    return {"train": ctx.run.stage("train").get("fingerprint")}


def run(ctx: Context) -> StageResult:
    cfg = yaml.safe_load((ctx.run.path / "axolotl.yml").read_text("utf-8"))
    out_dir = ctx.run.artifact("train", "output_dir")
    merge_dir = ctx.run.path / "merge"   # created only once the budget check passed (a refusal writes nothing)
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
                      f"measured {report['measured_peak_rss_bytes'] / GIB:.2f} GiB; verification "
                      + _verification_line(report.get("verification")))
    return StageResult({"model": ctx.run.rel(merge_dir / "model"), "report": ctx.run.rel(merge_dir / "report.json")},
                       info={"method": report["method"]})
