"""Merge benchmark: predicted vs measured peak RSS of `axolotl merge-lora`, memory_efficient vs legacy.

    .venv/bin/python bench/merge_bench.py [--work DIR] [--layers 13] [--methods memory_efficient,legacy]
                                          [--no-verify] [--csv bench/results/merge-cpu.csv]

Builds (once, cached in --work) a synthetic Llama: random init, bf16, safetensors in 6 shards (hidden 2048,
intermediate 5632, 13 layers, 16 heads, vocab 32000: 0.80 B parameters, 1.60 GB), and a LoRA adapter for it made
with PEFT (r 16, alpha 32, all linear layers, B matrices initialised non-zero so the merge changes every adapted
weight). Then, for each method, runs the project's own merge code path (`tutor_wrap.stages.merge.merge`: the
budget check, `axolotl merge-lora` under `tutor_wrap.core.rss.run_measured`, the tokenizer copy and the verification
subprocess) and prints method, predicted peak RSS, measured peak RSS, error %, and the memory_efficient / legacy
ratio. Writes the rows to the CSV and the exact command, versions and machine to a sidecar JSON beside it.

Targets: memory_efficient peak <= 0.5 x legacy; prediction within 15% of the measurement for both methods.
Exits 0 when both targets hold, 1 otherwise (it is a check as well as a report).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

HIDDEN, INTER, HEADS, VOCAB = 2048, 5632, 16, 32000
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def build_model(base: Path, layers: int, shard: str) -> None:
    """Random bf16 Llama in several safetensors shards, with the tiny test model's Llama-style tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tiny_model import build_tiny_llama

    tok_src = build_tiny_llama(base.parent / "tokenizer-src")
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=layers,
                      num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=2048,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(base, max_shard_size=shard)
    for name in TOKENIZER_FILES:
        shutil.copy2(tok_src / name, base / name)
    shutil.rmtree(tok_src, ignore_errors=True)
    return model


def build_adapter(model, adapter: Path, r: int = 16, alpha: int = 32) -> None:
    import torch
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules="all-linear", task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:  # PEFT initialises B to zero: a merge would change nothing
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * 0.01)
    pm.save_pretrained(adapter)


def ensure_inputs(work: Path, layers: int, shard: str) -> tuple[Path, Path]:
    base, adapter = work / "base", work / "adapter"
    stamp = work / "READY.json"
    want = {"layers": layers, "shard": shard, "hidden": HIDDEN, "vocab": VOCAB}
    if stamp.is_file() and json.loads(stamp.read_text()) == want:
        return base, adapter
    shutil.rmtree(base, ignore_errors=True)
    shutil.rmtree(adapter, ignore_errors=True)
    t = time.perf_counter()
    model = build_model(base, layers, shard)
    build_adapter(model, adapter)
    del model
    stamp.write_text(json.dumps(want))
    print(f"built {base} and {adapter} in {time.perf_counter() - t:.0f} s", flush=True)
    return base, adapter


def versions() -> dict:
    from importlib.metadata import version

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "peft", "axolotl", "safetensors", "accelerate"):
        try:
            out[pkg] = version(pkg)
        except Exception:  # noqa: BLE001 - a report, not a gate
            out[pkg] = None
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=REPO / ".cache" / "merge-bench")
    ap.add_argument("--layers", type=int, default=13)
    ap.add_argument("--shard", default="300MB", help="max_shard_size for save_pretrained")
    ap.add_argument("--methods", default="memory_efficient,legacy")
    ap.add_argument("--no-verify", action="store_true", help="skip the logits/weights verification subprocess")
    ap.add_argument("--csv", type=Path, default=REPO / "bench" / "results" / "merge-cpu.csv")
    args = ap.parse_args(argv)

    from tutor_wrap.core.units import GIB
    from tutor_wrap.machine.probe import probe
    from tutor_wrap.models.files import weight_files
    from tutor_wrap.backends.merge import merge
    from tutor_wrap.checks.merge_verify import verifier

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    base, adapter = ensure_inputs(work, args.layers, args.shard)
    shards = [p.stat().st_size for p in weight_files(base)]
    adapter_bytes = (adapter / "adapter_model.safetensors").stat().st_size
    print(f"base: {sum(shards) / 1e9:.2f} GB in {len(shards)} shards (largest {max(shards) / 1e9:.3f} GB); "
          f"adapter {adapter_bytes / 1e6:.1f} MB", flush=True)

    rows = []
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        out = work / f"merged-{method}"
        hw = probe(work)
        t = time.perf_counter()
        log = work / f"merge-{method}.log"
        report = merge(base, adapter, out, {"base_model": str(base), "adapter": "lora"}, hw, method=method, log=log,
                       verify=None if args.no_verify else verifier(base, adapter, log, ram_budget=hw.ram_available_bytes))
        secs = time.perf_counter() - t
        pred, meas = report.budget.predicted_peak_rss_bytes, report.measured_peak_rss_bytes
        ver = report.verification or {}
        rows.append({
            "method": method,
            "model_bytes": sum(shards),
            "shards": len(shards),
            "largest_shard_bytes": max(shards),
            "adapter_bytes": adapter_bytes,
            "predicted_peak_rss_bytes": pred,
            "measured_peak_rss_bytes": meas,
            "error_pct": round(100 * (pred - meas) / meas, 1) if meas else None,
            "merge_seconds": round(report.merge_seconds or secs, 1),
            "merged_bytes": sum(p.stat().st_size for p in weight_files(out)),
            "verification": ver.get("status"),
            "verify_max_abs_diff": ver.get("max_abs_diff"),
            "verify_rel_err": ver.get("rel_err"),
            "verify_seconds": ver.get("seconds"),
        })
        print(f"{method}: predicted {pred / GIB:.2f} GiB, measured {meas / GIB:.2f} GiB, {secs:.0f} s, "
              f"verification {ver.get('status')}", flush=True)
        shutil.rmtree(out, ignore_errors=True)

    by = {r["method"]: r for r in rows}
    ratio = None
    if "memory_efficient" in by and "legacy" in by and by["legacy"]["measured_peak_rss_bytes"]:
        ratio = by["memory_efficient"]["measured_peak_rss_bytes"] / by["legacy"]["measured_peak_rss_bytes"]

    print()
    print(f"{'method':<18}{'predicted GiB':>14}{'measured GiB':>14}{'error %':>9}{'seconds':>9}  verification")
    for r in rows:
        print(f"{r['method']:<18}{r['predicted_peak_rss_bytes'] / GIB:>14.2f}{r['measured_peak_rss_bytes'] / GIB:>14.2f}"
              f"{r['error_pct']:>9.1f}{r['merge_seconds']:>9.0f}  {r['verification']}")
    if ratio is not None:
        print(f"memory_efficient / legacy measured peak: {ratio:.2f} (target <= 0.50)")

    ok = all(r["error_pct"] is not None and abs(r["error_pct"]) <= 15 for r in rows)
    ok = ok and (ratio is None or ratio <= 0.5)
    ok = ok and all(r["verification"] in (None, "passed", "skipped") for r in rows)

    args.csv.parent.mkdir(parents=True, exist_ok=True)
    with open(args.csv, "w", newline="") as fh:
        fh.write(f"# {' '.join([Path(sys.executable).name, *sys.argv])}  (sidecar: {args.csv.with_suffix('.json').name})\n")
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    hw = probe(work)
    args.csv.with_suffix(".json").write_text(json.dumps({
        "command": " ".join([".venv/bin/python", "bench/merge_bench.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "versions": versions(),
        "machine": {"cpu_count": hw.cpu_count, "cpu_model": hw.cpu_model, "ram_total_bytes": hw.ram_total_bytes,
                    "os": hw.os, "load_avg_at_end": os.getloadavg()},
        "model": {"hidden": HIDDEN, "intermediate": INTER, "layers": args.layers, "heads": HEADS, "vocab": VOCAB,
                  "dtype": "bfloat16", "max_shard_size": args.shard, "bytes": sum(shards), "shards": len(shards)},
        "adapter": {"r": 16, "alpha": 32, "targets": "all-linear", "bytes": adapter_bytes},
        "rows": rows,
        "memory_efficient_over_legacy": ratio,
        "targets_met": ok,
    }, indent=2) + "\n")
    print(f"wrote {args.csv} and {args.csv.with_suffix('.json')}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
