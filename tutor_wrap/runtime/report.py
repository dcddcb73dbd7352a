"""The end-of-run summary a person reads: where each artifact is, how big, and base vs tuned."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table


def _size(p: Path) -> int:
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def print_summary(manifest: dict, run_dir: Path, console: Console) -> None:
    table = Table(title=escape(f"run {manifest.get('recipe')} ({run_dir})"))
    for col in ("stage", "status", "artifact", "size"):
        table.add_column(col)
    for name, rec in manifest.get("stages", {}).items():
        arts = rec.get("artifacts") or {}
        if not arts:
            table.add_row(name, rec.get("status", "?"), "", "")
        for i, (key, rel) in enumerate(arts.items()):
            p = run_dir / rel
            table.add_row(name if i == 0 else "", rec.get("status", "?") if i == 0 else "", escape(f"{key}: {rel}"),
                          _human(_size(p)) if p.exists() else "missing")
    console.print(table)
    train = manifest.get("stages", {}).get("train", {}).get("info", {})
    if train.get("loss_start_mean") is not None:
        console.print(f"loss (mean of {train['loss_window']} steps): {train['loss_start_mean']:.3f} at the start -> "
                      f"{train['loss_end_mean']:.3f} at the end, {train.get('steps')} steps")
    ev = manifest.get("stages", {}).get("eval", {}).get("info", {})
    if "primary_metric" in ev:
        console.print(f"eval ({ev['primary_metric']}): base {ev['base']:.3f} -> tuned {ev['tuned']:.3f}")
