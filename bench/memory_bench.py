"""Compare tutor_wrap.planning.memory.estimate with published peak-memory figures (bench/memory_devset.csv).

    python bench/memory_bench.py [--csv PATH] [--markdown]

One row per dev-set entry: settings, published figure, the prediction of the same kind, abs % error; then the
median and max abs % error over the rows marked in_stats=yes. Exits 0 (this is a report, not a gate).

Kinds: allocated -> Breakdown.allocated (torch max_memory_allocated / torchtune "active");
reserved -> Breakdown.reserved; nvidia-smi, capacity (largest setting that fit a card) and fit -> Breakdown.total.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tutor_wrap.models.catalog import Architecture, lookup  # noqa: E402
from tutor_wrap.core.units import GIB as GiB  # noqa: E402
from tutor_wrap.planning.memory import Knobs, estimate, search  # noqa: E402

# Models of the dev set that are not in the built-in catalog (public config.json values).
EXTRA = {
    # openlm-research/open_llama_3b_v2 config.json
    "openllama-3b-v2": Architecture(name="openllama-3b-v2", hidden_size=3200, intermediate_size=8640, num_layers=26,
                                    num_heads=32, num_kv_heads=32, head_dim=100, vocab_size=32000,
                                    tie_word_embeddings=False, max_position_embeddings=2048, torch_dtype="float16"),
}
UNITS = {"GiB": GiB, "GB": 10**9}


def _bool(s: str) -> bool:
    return s.strip().lower() in ("1", "true", "yes", "on")


def knobs_of(row: dict) -> Knobs:
    targets = row["lora_targets"].strip()
    targets = targets if targets == "all-linear" else tuple(t.strip() for t in targets.split(",") if t.strip())
    return Knobs(method=row["method"], lora_r=int(row["lora_r"]) or 8, lora_targets=targets,
                 seq_len=int(row["seq_len"]), micro_batch=int(row["micro_batch"]), grad_ckpt=_bool(row["grad_ckpt"]),
                 optimizer=row["optimizer"], attn=row["attn"], packing=_bool(row["packing"]), loss=row["loss"],
                 dtype=row["dtype"], lora_dropout=float(row["lora_dropout"]),
                 kbit_fp32_embeddings=_bool(row["kbit_fp32_embeddings"]))


def predicted_bytes(row: dict) -> int:
    arch = EXTRA.get(row["model"]) or lookup(row["model"])
    br = estimate(arch, knobs_of(row))
    return {"allocated": br.allocated, "reserved": br.reserved}.get(row["kind"], br.total)


def run(csv_path: Path, markdown: bool) -> tuple[float, float]:
    rows = list(csv.DictReader(csv_path.open(encoding="utf-8")))
    errs, all_errs = [], []
    header = ("id", "model", "method", "r", "seq x mb", "ckpt", "optim", "attn", "loss", "kind", "published GiB",
              "predicted GiB", "abs % err", "stats")
    out = []
    for row in rows:
        pub = float(row["published"]) * UNITS[row["unit"]]
        pred = predicted_bytes(row)
        err = abs(pred - pub) / pub * 100
        in_stats = _bool(row["in_stats"])
        all_errs.append(err)
        if in_stats:
            errs.append(err)
        out.append((row["id"], row["model"], row["method"], row["lora_r"] if row["method"] != "full" else "-",
                    f"{row['seq_len']}x{row['micro_batch']}", "on" if _bool(row["grad_ckpt"]) else "off",
                    row["optimizer"], row["attn"], row["loss"], row["kind"], f"{pub / GiB:.2f}", f"{pred / GiB:.2f}",
                    f"{err:.1f}", "yes" if in_stats else "no"))
    if markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for r in out:
            print("| " + " | ".join(r) + " |")
    else:
        widths = [max(len(str(x)) for x in col) for col in zip(header, *out)]
        for r in (header, *out):
            print("  ".join(str(x).ljust(w) for x, w in zip(r, widths)))
    med, mx = statistics.median(errs), max(errs)
    print(f"\n{len(errs)} rows in stats ({len(rows) - len(errs)} shown only): "
          f"median abs error {med:.1f}%, max abs error {mx:.1f}%")
    print(f"all {len(all_errs)} rows: median abs error {statistics.median(all_errs):.1f}%, "
          f"max abs error {max(all_errs):.1f}%")
    return med, mx


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--csv", type=Path, default=Path(__file__).with_name("memory_devset.csv"))
    ap.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = ap.parse_args(argv)
    run(args.csv, args.markdown)
    search_seconds()
    return 0


def search_seconds(repeats: int = 5) -> float:
    """How long the planner's knob search takes on the reference user's job (Llama 3 8B QLoRA, 12 GiB card): `plan`
    and `preflight` run it on every call, so it must stay interactive."""
    import time

    seed = Knobs(method="qlora", lora_r=32, lora_targets="all-linear", seq_len=1024, micro_batch=1, grad_ckpt=True,
                 optimizer="paged_adamw_8bit", attn="sdpa", packing=False, loss="standard", dtype="bf16")
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        search(lookup("llama-3-8b"), seed, 12 * GiB, allow_qlora=True, allow_flash=True, safety=0.1)
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    print(f"planner search, Llama 3 8B on a 12 GiB card: median {med * 1000:.2f} ms over {repeats}")
    return med


if __name__ == "__main__":
    sys.exit(main())
