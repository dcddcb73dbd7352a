"""Live training progress from the plugin's metrics.jsonl: a rich bar on a terminal, plain lines otherwise."""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from tutor_wrap.core.units import GIB, duration


def tokens_per_second(prev: dict, row: dict) -> float | None:
    """Tokens trained between two logged steps over the time between them. Axolotl's `tokens/total` counts from
    the start of training, so the rate is its difference, not its value, over the interval."""
    if "tokens/total" not in row or "tokens/total" not in prev or not prev.get("time"):
        return None
    dt, dn = row["time"] - prev["time"], row["tokens/total"] - prev["tokens/total"]
    return dn / dt if dt > 0 and dn >= 0 else None


class TrainProgress:
    def __init__(self, console: Console, metrics: Path, max_steps: int | None = None, plain_every_s: float = 10.0):
        self.console = console
        self.metrics = Path(metrics)
        self._offset = 0
        self._last: dict = {}
        self._total = max_steps
        self._plain_every = plain_every_s
        self._last_plain = 0.0
        self._printed_step = -1
        self._tok_rate: float | None = None
        self._bar: Progress | None = None
        self._task = None
        if console.is_terminal:
            self._bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[stats]}"), TimeRemainingColumn(), console=console)
            self._bar.start()
            self._task = self._bar.add_task("train", total=max_steps, stats="starting (loading model and data)")

    def _read_new(self) -> list[dict]:
        try:
            with open(self.metrics, "rb") as fh:
                fh.seek(self._offset)
                chunk = fh.read()
        except OSError:
            return []
        end = chunk.rfind(b"\n")
        if end < 0:
            return []
        self._offset += end + 1
        out = []
        for line in chunk[: end + 1].splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def _stats(self) -> str:
        r = self._last
        parts = []
        if "loss" in r:
            parts.append(f"loss {r['loss']:.4f}")
        if "learning_rate" in r:
            parts.append(f"lr {r['learning_rate']:.2e}")
        if self._tok_rate:
            parts.append(f"{self._tok_rate:.0f} tok/s")
        if "gpu_max_reserved_bytes" in r:
            parts.append(f"GPU {r['gpu_max_reserved_bytes'] / GIB:.1f} GiB")
        return "  ".join(parts)

    def update(self) -> None:
        for row in self._read_new():
            if row.get("max_steps"):
                self._total = row["max_steps"]
            if row.get("event") == "begin" and row.get("resumed_from_step"):
                self.console.print(f"train: resumed at step {row['resumed_from_step']}")
            if row.get("event") == "log":
                self._tok_rate = tokens_per_second(self._last, row) or self._tok_rate
                self._last = row
            if row.get("event") == "checkpoint":
                self.console.print(f"train: checkpoint saved at step {row['step']}")
        step = self._last.get("step", 0)
        if self._bar is not None:
            self._bar.update(self._task, completed=step, total=self._total, stats=self._stats())
        elif self._last and step != self._printed_step and time.time() - self._last_plain >= self._plain_every:
            self._last_plain = time.time()
            self._printed_step = step
            eta = ""
            if self._total and step and self._last.get("elapsed_s"):
                eta = f"  eta {self._last['elapsed_s'] / step * (self._total - step):.0f}s"
            print(f"train: step {step}/{self._total or '?'}  {self._stats()}{eta}", flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


@contextmanager
def progress_bar(console: Console, label: str, total: int) -> Iterator[Callable[[], None]]:
    """n of N for a loop of slow steps (eval's generations): a bar on a terminal, one line per 10 elsewhere."""
    done = 0
    if console.is_terminal:
        with Progress(TextColumn(f"[bold]{escape(label)}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      console=console, transient=True) as bar:
            task = bar.add_task(label, total=total)
            yield lambda: bar.advance(task)
        console.print(f"{escape(label)}: {total} answers")
        return

    lock = threading.Lock()   # answers may come from several threads (one per llama-server)
    t0 = time.monotonic()

    def advance() -> None:
        nonlocal done
        with lock:
            done += 1
            if done % 10 == 0 or done == total:
                left = (time.monotonic() - t0) / done * (total - done)
                print(f"{label}: {done}/{total}" + (f", about {duration(left)} left" if done < total else ""),
                      flush=True)

    yield advance
