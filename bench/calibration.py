"""The merge's peak-RSS prediction before and after calibrating on this machine (planning/calibration.py).

For each model: a LoRA adapter (all linear layers), then `tutor_wrap merge` (memory_efficient, no verification)
with an empty calibration store (before: the published constants), and again after a calibrating merge of
*another* model (held out: the measurement must carry over, not repeat itself) and of the same model (the issue's
"after one calibrating run" of the demo). Prints each prediction's error against its measured peak, medians and max.

    .venv/bin/python bench/calibration.py [--models tiny,smollm2] [--repeat 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def adapter_for(base: Path, out: Path) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    pm.save_pretrained(out)
    for f in base.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copy2(f, out / f.name)
    return out


def merge(base: Path, adapter: Path, out: Path, store: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "TUTOR_WRAP_CALIBRATION": str(store), "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "tutor_wrap", "merge", "--base", str(base), "--adapter", str(adapter),
                           "--out", str(out), "--no-verify", "--json"], capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.exit(proc.stderr[-2000:])
    r = json.loads(proc.stdout[proc.stdout.index("{"):])
    return {"predicted": r["predicted_peak_rss_bytes"], "measured": r["measured_peak_rss_bytes"],
            "error_pct": r["prediction_error_pct"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="tiny,smollm2")
    ap.add_argument("--repeat", type=int, default=1)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="calib-bench-"))
    models = {}
    for name in a.models.split(","):
        if name == "tiny":
            from tiny_model import build_tiny_llama
            models[name] = build_tiny_llama(work / "tiny")
        elif name == "smollm2":
            models[name] = REPO / ".cache" / "models" / "SmolLM2-135M-Instruct"
        else:
            models[name] = Path(name)
    adapters = {n: adapter_for(m, work / f"{n}-adapter") for n, m in models.items()}
    rows = []
    for _ in range(a.repeat):
        for name, base in models.items():
            store = work / f"store-{name}.json"
            store.unlink(missing_ok=True)
            before = merge(base, adapters[name], work / "out", store)              # empty store: published constants
            rows.append((name, "before", before))
            after_self = merge(base, adapters[name], work / "out", store)          # calibrated on itself
            rows.append((name, "after (same model)", after_self))
            for other, obase in models.items():                                    # calibrated on another model
                if other == name:
                    continue
                cross = work / f"store-{other}-then-{name}.json"
                cross.unlink(missing_ok=True)
                merge(obase, adapters[other], work / "out", cross)
                rows.append((name, f"after ({other})", merge(base, adapters[name], work / "out", cross)))
    print(f"{'model':<10}{'prediction':<22}{'predicted GiB':>14}{'measured GiB':>14}{'error':>9}")
    for name, when, r in rows:
        print(f"{name:<10}{when:<22}{r['predicted'] / 2**30:>14.3f}{r['measured'] / 2**30:>14.3f}"
              f"{r['error_pct']:>+8.1f}%")
    for when in ("before", "after"):
        errs = [abs(r["error_pct"]) for _, w, r in rows if w.startswith(when)]
        print(f"{when}: median |error| {statistics.median(errs):.1f}%, max {max(errs):.1f}% over {len(errs)} merges")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
