"""The data report the plan stage writes (plan/data.json, plan/lengths.png, plan/data.html) and its terminal line:
what training will read, counted with the base model's own tokenizer, as the plan will use it."""

from __future__ import annotations

import html
import io
import math
import statistics
from pathlib import Path

from tutor_wrap.core import atomic
from tutor_wrap.runtime.html_page import page, png_img


def summarize(*, rows: list, lengths: list[int] | None, sequence_len: int, strategy: str, batch: int,
              accumulation: int, packing: bool, max_steps: int | None, epochs: float | None,
              seconds_per_micro_batch: float | None, roles: list[list[str]] | None, overlap: dict | None) -> dict:
    """The report's facts. `strategy`: Axolotl's excess_length_strategy (drop or truncate rows past sequence_len);
    `batch`: rows per optimizer step (micro-batch x accumulation x processes), `accumulation` of them the micro-batches
    each process runs per step; `seconds_per_micro_batch`: the planner's estimate; `roles`: each chat row's turns."""
    out: dict = {"rows": len(rows), "sequence_len": sequence_len, "excess_length_strategy": strategy}
    if lengths:
        over = [n for n in lengths if n > sequence_len]
        trained = [min(n, sequence_len) for n in lengths] if strategy == "truncate" else \
            [n for n in lengths if n <= sequence_len]
        per_epoch = sum(trained)
        steps_per_epoch = max(1, math.ceil(per_epoch / (sequence_len * batch)) if packing
                              else math.ceil(len(trained) / batch))
        steps = max_steps or max(1, math.ceil((epochs or 1.0) * steps_per_epoch))
        out.update({
            "tokens": sum(lengths), "tokens_min": min(lengths), "tokens_median": statistics.median(lengths),
            "tokens_max": max(lengths), "rows_over_sequence_len": len(over),
            "rows_dropped": 0 if strategy == "truncate" else len(over),
            "rows_truncated": len(over) if strategy == "truncate" else 0,
            "training_tokens_per_epoch": per_epoch, "steps_per_epoch": steps_per_epoch, "steps": steps,
            "epochs": round(steps / steps_per_epoch, 2), "rows_per_step": batch, "packing": packing,
            "seconds_per_step": round(accumulation * seconds_per_micro_batch, 1) if seconds_per_micro_batch else None,
            "training_seconds": round(steps * accumulation * seconds_per_micro_batch) if seconds_per_micro_batch
            else None,
        })
    if roles:
        turns = [len(r) for r in roles]
        counts: dict[str, int] = {}
        for r in roles:
            for role in r:
                counts[role] = counts.get(role, 0) + 1
        out.update({"turns_min": min(turns), "turns_median": statistics.median(turns), "turns_max": max(turns),
                    "turns_by_role": counts})
    if overlap:
        out["overlap"] = {"eval_rows_exact": len({p["line"] for p in overlap["exact"]}),
                          "eval_rows_near": len({p["line"] for p in overlap["near"]}),
                          "near_copy_training_rows": len(overlap["near_train"]), "threshold": overlap["threshold"]}
    return out


def line(s: dict, where: str) -> str:
    """The terminal summary."""
    if "tokens" not in s:
        return f"data: {s['rows']} rows (not measured: no tokenizer here)"
    parts = [f"data: {s['rows']} rows, {s['tokens']:,} tokens (median {s['tokens_median']:g}, max {s['tokens_max']})"]
    if s["rows_over_sequence_len"]:
        parts.append(f"{s['rows_over_sequence_len']} longer than sequence_len {s['sequence_len']} "
                     + ("truncated" if s["rows_truncated"] else "dropped"))
    parts.append(f"{s['training_tokens_per_epoch']:,} training tokens per epoch, {s['steps_per_epoch']} steps per "
                 f"epoch, {s['steps']} steps")
    if s.get("training_seconds") is not None:
        parts.append(f"about {_duration(s['training_seconds'])} at ~{s['seconds_per_step']:.1f} s per step (the "
                     "planner's estimate)")
    if "turns_median" in s:
        parts.append(f"turns per row {s['turns_min']}-{s['turns_max']}")
    return "; ".join(parts) + f"; report: {where}"


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{seconds / 60:.0f} min" if seconds >= 90 else \
        f"{seconds:.0f} s"


def histogram_png(lengths: list[int], sequence_len: int) -> bytes:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.hist(lengths, bins=min(40, max(5, len(set(lengths)))), color="#4c72b0", alpha=0.85)
    ax.axvline(sequence_len, color="#c44e52", linestyle="--", label=f"sequence_len {sequence_len}")
    ax.set_xlabel("tokens per row (prompt + answer, the base model's tokenizer)")
    ax.set_ylabel("rows")
    ax.set_title("training row lengths")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def write(s: dict, lengths: list[int] | None, out_dir: Path, title: str) -> dict[str, Path]:
    """data.json, lengths.png (when rows were measured) and data.html (self-contained), each written atomically."""
    files = {"data_json": out_dir / "data.json", "data_html": out_dir / "data.html"}
    atomic.write_json(files["data_json"], s)
    img = ""
    if lengths:
        png = histogram_png(lengths, s["sequence_len"])
        files["lengths_png"] = out_dir / "lengths.png"
        atomic.write_bytes(files["lengths_png"], png)
        img = png_img(png, "row lengths")
    def cell(v) -> str:
        if isinstance(v, dict):
            return "<br>".join(f"{html.escape(str(k))}: {html.escape(str(x))}" for k, x in v.items())
        return html.escape(f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v))

    rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{cell(v)}</td></tr>" for k, v in s.items())
    atomic.write_text(files["data_html"], page(f"Data: {title}", f"""<h1>Data: {html.escape(title)}</h1>
<p>What training reads, counted with the base model's tokenizer, as planned.</p><table>{rows}</table>{img}""",
                                               width=900))
    return files
