"""Peak-RSS predictions before and after calibrating on this machine (planning/calibration.py): the merge's and a
CPU training process's.

merge (the default). For each model: a LoRA adapter (all linear layers), then `tutor_wrap merge` (memory_efficient, no verification)
with an empty calibration store (before: the published constants), and again after a calibrating merge of
*another* model (held out: the measurement must carry over, not repeat itself) and of the same model (the issue's
"after one calibrating run" of the demo). Prints each prediction's error against its measured peak, medians and max.

    .venv/bin/python bench/calibration.py [--models tiny,smollm2] [--repeat 1]

train. Each configuration (model x micro-batch x sequence length) trains for three steps through `tutor_wrap run
--until train` with an empty store; the train stage records the trainer's peak RSS with the prediction from the
published constants for the largest batch the run drew ("before"; a short run need not draw the plan's worst one).
Then every measured peak is predicted again from one calibrating run's record at a time ("after": the same
configuration, or held out when the calibrating run was another one).

    .venv/bin/python bench/calibration.py --stage train [--configs tiny:4:256,smollm2:1:256,...]

export. Each model converted to an f16 GGUF, quantized to Q4_K_M and served (one answer, 384-token context): each
tool's measured peak RSS beside the published prediction (planning/budgets.export_need, serve_need).

    .venv/bin/python bench/calibration.py --stage export [--models tiny,smollm2]
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


RECIPE = """name: {name}
base_model: {base}
dataset:
  path: {repo}/recipes/data/python_tutor.jsonl
  format: alpaca
method: lora
lora: {{r: 16, alpha: 32, targets: all-linear}}
train: {{max_steps: 3, save_steps: 3, learning_rate: 3.0e-4, sequence_len: {seq}, batch_size: {micro},
        micro_batch_size: {micro}}}
ollama: {{model: calib-bench}}
"""


def _cli(args: list[str], store: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "TUTOR_WRAP_CALIBRATION": str(store), "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "tutor_wrap", *args], capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.exit(proc.stdout[-1500:] + proc.stderr[-1500:])
    return proc


def bench_train(configs: list[str], work: Path) -> None:
    """Train each configuration once (the measurement, with the prediction from the published constants for the
    largest batch it drew), then predict each measured peak from one calibrating run's record at a time."""
    from tutor_wrap.machine.probe import probe
    from tutor_wrap.planning import calibration
    from tutor_wrap.planning.planner import CPU_TOKEN_FACTOR, CPU_TRAIN_RUNTIME_BYTES

    records = {}
    for cfg in configs:
        name, micro, seq = cfg.split(":")
        recipe = work / f"{name}-{micro}-{seq}.yml"
        recipe.write_text(RECIPE.format(name=f"{name}-{micro}-{seq}", base=_model(name, work), repo=REPO, micro=micro,
                                        seq=seq))
        store = work / f"store-{recipe.stem}.json"
        store.unlink(missing_ok=True)
        _cli(["run", str(recipe), "--run-dir", str(work / "runs" / recipe.stem), "--until", "train"], store)
        records[cfg] = rec = json.loads(store.read_text())["records"][-1]
        print(f"trained {cfg}: largest batch {rec['batch_tokens']} tokens, measured "
              f"{rec['measured_bytes'] / 2**30:.3f} GiB", flush=True)
    hw = probe()
    rows = [(cfg, "before", r["predicted_bytes"], r["measured_bytes"]) for cfg, r in records.items()]
    one = work / "store-one.json"
    os.environ["TUTOR_WRAP_CALIBRATION"] = str(one)
    for calib, crec in records.items():
        one.write_text(json.dumps({"records": [crec]}))
        fit = calibration.fit(hw, "train-cpu", CPU_TRAIN_RUNTIME_BYTES, CPU_TOKEN_FACTOR, method=crec["method"],
                              dtype=crec["dtype"])
        for cfg, r in records.items():
            pred = fit.runtime_bytes + r["fixed_bytes"] + fit.factor * r["model_part_bytes"]
            rows.append((cfg, f"after ({'same' if cfg == calib else 'held out: ' + calib})", pred, r["measured_bytes"]))
    print(f"{'configuration':<20}{'prediction':<34}{'predicted GiB':>14}{'measured GiB':>14}{'error':>9}")
    errs: dict[str, list[float]] = {"before": [], "after (same)": [], "after (held out)": []}
    for cfg, when, pred, meas in rows:
        err = 100 * (pred - meas) / meas
        print(f"{cfg:<20}{when:<34}{pred / 2**30:>14.3f}{meas / 2**30:>14.3f}{err:>+8.1f}%")
        errs["after (held out)" if "held out" in when else when].append(abs(err))
    for when, e in errs.items():
        if e:
            print(f"{when}: median |error| {statistics.median(e):.1f}%, max {max(e):.1f}% over {len(e)} predictions")


def bench_export(models: list[str], work: Path) -> None:
    """Convert, quantize (Q4_K_M) and serve each model; each measured peak RSS beside the published prediction
    (planning/budgets.export_need, serve_need; this machine's own records are kept out by an empty store)."""
    os.environ["TUTOR_WRAP_CALIBRATION"] = str(work / "empty-store.json")
    from tutor_wrap.backends import llamacpp
    from tutor_wrap.backends.gguf_export import convert_model
    from tutor_wrap.backends.llama_server import serve
    from tutor_wrap.core.rss import read_peak
    from tutor_wrap.machine.probe import probe
    from tutor_wrap.planning.budgets import export_need, serve_need

    hw, ll = probe(), llamacpp.locate()
    print(f"{'model':<10}{'step':<10}{'predicted MiB':>14}{'measured MiB':>14}{'error':>9}")
    for name in models:
        src = _model(name, work)
        f16, q4, log = work / f"{name}-F16.gguf", work / f"{name}-Q4_K_M.gguf", work / f"{name}.log"
        converted = convert_model(ll, src, f16, "f16", log)
        rows = [("convert", export_need("convert", f16.stat().st_size, hw), converted)]
        peak_file = work / ".q.rss.json"
        llamacpp.quantize(ll, f16, q4, "Q4_K_M", log, peak_to=peak_file)
        rows.append(("quantize", export_need("quantize", f16.stat().st_size, hw), read_peak(peak_file)))
        with serve(ll, q4, ctx=384, log=work / f"{name}-server.log") as server:
            server.complete("Write a Python function that adds two numbers.", n_predict=32)
            rows.append(("serve", serve_need(q4, 384, hw), server.peak_rss_bytes()))
        for step, need, peak in rows:
            err = 100 * (need["predicted_bytes"] - peak) / peak
            print(f"{name:<10}{step:<10}{need['predicted_bytes'] / 2**20:>14.0f}{peak / 2**20:>14.0f}{err:>+8.1f}%")


def _model(name: str, work: Path) -> Path:
    if name == "tiny":
        from tiny_model import build_tiny_llama
        return build_tiny_llama(work / "tiny") if not (work / "tiny").exists() else work / "tiny"
    if name == "smollm2":
        return REPO / ".cache" / "models" / "SmolLM2-135M-Instruct"
    return Path(name)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", choices=["merge", "train", "export"], default="merge")
    ap.add_argument("--models", default="tiny,smollm2", help="merge: the models")
    ap.add_argument("--configs", default="tiny:4:256,smollm2:1:256,smollm2:4:256,smollm2:8:256",
                    help="train: model:micro_batch:sequence_len, comma-separated")
    ap.add_argument("--repeat", type=int, default=1)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="calib-bench-"))
    if a.stage == "train":
        bench_train(a.configs.split(","), work)
        shutil.rmtree(work, ignore_errors=True)
        return
    if a.stage == "export":
        bench_export(a.models.split(","), work)
        shutil.rmtree(work, ignore_errors=True)
        return
    models = {}
    for name in a.models.split(","):
        models[name] = _model(name, work)
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
