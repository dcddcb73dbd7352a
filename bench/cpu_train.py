"""CPU training speed: math threads and dtype, on a real run's Axolotl config (the demo's by default).

    .venv/bin/python bench/cpu_train.py [--run runs/demo] [--steps 8] [--threads 1 2] [--dtypes fp32 bf16]

Trains each (threads, dtype) variant of RUN/axolotl.yml for --steps steps from the same seed, through the same
launch as the train stage (accelerate + Axolotl + tutor_wrap's metrics plugin; bf16 on a CPU through the plugin's
`use_cpu`), and prints per variant: the median seconds per step over steps 3..N (the first steps warm up), the
final loss, and ratios against the first variant. Each variant's metrics.jsonl is kept under bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tutor_wrap.backends.axolotl_metrics import ENV_METRICS, ENV_USE_CPU, read_metrics  # noqa: E402
from tutor_wrap.backends.axolotl_train import launch_args  # noqa: E402
from tutor_wrap.core.proc import tool_env  # noqa: E402


def run_variant(cfg: dict, threads: int, dtype: str, steps: int, work: Path, out: Path) -> dict:
    cfg = {**cfg, "max_steps": steps, "save_steps": None, "output_dir": str(work / "out"),
           "dataset_prepared_path": str(work / "prepared"), "bf16": dtype == "bf16", "fp16": False}
    cfg.pop("num_epochs", None)
    yml = work / "axolotl.yml"
    yml.write_text(yaml.safe_dump(cfg))
    metrics = out / f"metrics-t{threads}-{dtype}.jsonl"
    metrics.unlink(missing_ok=True)
    env = tool_env({ENV_METRICS: str(metrics), "OMP_NUM_THREADS": str(threads), ENV_USE_CPU: "1",
                    "CUDA_VISIBLE_DEVICES": ""})
    log = out / f"train-t{threads}-{dtype}.log"
    with open(log, "wb") as fh:
        rc = subprocess.run(launch_args(yml, {"num_processes": 1, "accelerator": "cpu"}), env=env, stdout=fh,
                            stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise SystemExit(f"variant threads={threads} dtype={dtype} failed (exit {rc}); log: {log}")
    rows = [r for r in read_metrics(metrics) if r.get("event") == "log" and "loss" in r]
    times = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(rows, rows[1:])]
    per_step = statistics.median(times[2:]) if len(times) > 2 else statistics.median(times)
    return {"threads": threads, "dtype": dtype, "s_per_step": round(per_step, 3), "steps": len(rows),
            "losses": [round(r["loss"], 4) for r in rows], "final_loss": rows[-1]["loss"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, default=REPO / "runs/demo")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    args = ap.parse_args()
    cfg = yaml.safe_load((args.run / "axolotl.yml").read_text())
    out = REPO / "bench/results"
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for threads in args.threads:
        for dtype in args.dtypes:
            with tempfile.TemporaryDirectory(prefix="tw-bench-") as tmp:
                r = run_variant(cfg, threads, dtype, args.steps, Path(tmp), out)
            results.append(r)
            print(f"threads {threads}  {dtype:4}  {r['s_per_step']:6.2f} s/step (median of steps 3..{r['steps']})  "
                  f"final loss {r['final_loss']:.4f}", flush=True)
    ref = results[0]
    print(f"\nagainst threads {ref['threads']} {ref['dtype']}:")
    for r in results[1:]:
        print(f"  threads {r['threads']} {r['dtype']}: speed x{ref['s_per_step'] / r['s_per_step']:.2f}, final loss "
              f"{100 * (r['final_loss'] - ref['final_loss']) / ref['final_loss']:+.1f}%")
    (out / "cpu_train.json").write_text(json.dumps({"run": str(args.run), "results": results}, indent=1))


if __name__ == "__main__":
    main()
