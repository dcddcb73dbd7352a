"""What this machine measured: every run's peaks beside the predictions, kept for the user's later plans.

The store is one JSON file in the user's cache dir (`TUTOR_WRAP_CALIBRATION` names another), shared by every run
dir and recipe; each record carries the machine and stack it was measured on (`machine_key`), and only records of
the same key are used. A write takes a lock and replaces the file atomically: two runs finishing at once both land.

Used so far, each a runtime floor plus a part that scales with the model (published constants, set at the top of
their run-to-run spread), fitted to what this machine measured: the merge's peak RSS (budgets.predict_sizes) and a
CPU training process's peak RSS (planner.make_plan, memory.cpu_train_part).
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from tutor_wrap.core import atomic
from tutor_wrap.core.errors import TutorWrapError
from tutor_wrap.core.hashing import fingerprint
from tutor_wrap.machine.hardware import Hardware

STACK = ("torch", "axolotl", "transformers", "peft", "bitsandbytes")
RECENT = 3           # measurements older than the last 2 x RECENT of a kind are not used
FLAG_PCT = 15        # a prediction further off than this is said in the run's summary


def store_path() -> Path:
    env = os.environ.get("TUTOR_WRAP_CALIBRATION")
    if env is not None:
        if not env.strip():
            raise TutorWrapError("TUTOR_WRAP_CALIBRATION is set but empty (is a shell variable unset?)",
                                 hint="unset it to use ~/.cache/tutor_wrap/calibration.json, or name a file")
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tutor_wrap" / "calibration.json"


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def machine_key(hw: Hardware) -> str | None:
    """This machine and its stack; None for a hardware profile (a plan for another machine uses no measurement
    from this one)."""
    if hw.source != "probe":
        return None
    return fingerprint(hw.cpu_model, hw.cpu_count, round(hw.ram_total_bytes / 2**30),
                       [(g.name, g.vram_total_bytes) for g in hw.gpus], {p: _version(p) for p in STACK})


@contextmanager
def _locked():
    path = store_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield path


_NEEDED = {"machine": str, "kind": str, "run": str, "predicted_bytes": int, "measured_bytes": int}


def _valid(r: object) -> bool:
    return isinstance(r, dict) and all(isinstance(r.get(k), t) and not isinstance(r.get(k), bool)
                                       for k, t in _NEEDED.items())


def problem(path: Path | None = None) -> str | None:
    """What is wrong with the store file (None: absent, or a store of records). A damaged store is read as its valid
    records: a cache must not stop a plan, but `calibration` says so."""
    path = path or store_path()
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text("utf-8"))
    except IsADirectoryError:
        return f"{path} is a folder, not a file"
    except OSError as exc:
        return f"{path} cannot be read ({exc.strerror or exc})"
    except ValueError as exc:
        return f"{path} is not valid JSON ({exc})"
    if not isinstance(data, dict) or not isinstance(data.get("records"), list):
        return f"{path} is not a calibration store (a JSON object with a list of records)"
    bad = sum(1 for r in data["records"] if not _valid(r))
    return f"{path}: {bad} of its {len(data['records'])} records are not measurements tutor_wrap wrote" if bad else None


def _read(path: Path) -> list[dict]:
    try:
        data = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return []
    records = data.get("records") if isinstance(data, dict) else None
    return [r for r in records if _valid(r)] if isinstance(records, list) else []


def records(hw: Hardware | None = None) -> list[dict]:
    """Every record, or this machine's (same key) when `hw` is given."""
    all_ = _read(store_path())
    if hw is None:
        return all_
    key = machine_key(hw)
    return [r for r in all_ if key is not None and r.get("machine") == key]


def record(hw: Hardware, kind: str, run: str, predicted: int, measured: int, **knobs) -> dict | None:
    """Add one measurement (bytes) with the knobs that determine it; None when `hw` is a profile, not this machine.
    Storing is best effort: a cache dir that cannot be written loses the measurement, not the run."""
    key = machine_key(hw)
    if key is None or not measured:
        return None
    rec = {"machine": key, "kind": kind, "run": run, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
           "predicted_bytes": int(predicted), "measured_bytes": int(measured), **knobs}
    try:
        with _locked() as path:
            atomic.write_json(path, {"records": _read(path) + [rec]})
    except OSError:
        return None
    return rec


def reset() -> int:
    """Forget every measurement; returns how many there were."""
    with _locked() as path:
        n = len(_read(path))
        atomic.write_json(path, {"records": []})
    return n


@dataclass(frozen=True)
class Fit:
    runtime_bytes: int       # the floor: what the process holds before any of the model
    factor: float            # on the part that scales with the model
    basis: str               # where the numbers come from, for the plan's reasons


def fit(hw: Hardware, kind: str, published_runtime: int, published_factor: float = 1.0, **match) -> Fit | None:
    """A peak predicted as `runtime + fixed part + factor x scaled part`, fitted to this machine's measurements of
    `kind` whose knobs equal `match` (the merge method; training's method and dtype), or None without any. A
    record's `model_part_bytes` is its scaled part (the merge's shards; training's activations and logits) and
    `fixed_bytes` what is known exactly (training's weights and adapter states; 0 for the merge). The runtime comes
    from the measurement with the smallest model (where it is most of the peak), the factor from the one whose
    scaled part was the largest; one measurement of a large model keeps the published runtime and sets the factor,
    one of a tiny model sets the runtime: a measurement is never stretched over the part it says little about."""
    mine = [r for r in records(hw) if r.get("kind") == kind and all(r.get(k) == v for k, v in match.items())
            and isinstance(r.get("model_part_bytes"), int) and r["model_part_bytes"] >= 0][-2 * RECENT:]
    if not mine:
        return None

    def fixed(r: dict) -> int:
        return int(r.get("fixed_bytes") or 0)

    small = min(mine, key=lambda r: fixed(r) + r["model_part_bytes"])
    large = max(mine, key=lambda r: r["model_part_bytes"])
    if fixed(small) + small["model_part_bytes"] < published_runtime / 4:      # the runtime is most of that peak
        runtime = int(small["measured_bytes"] - fixed(small) - published_factor * small["model_part_bytes"])
    else:
        runtime = published_runtime
    factor = published_factor
    if large["model_part_bytes"] >= published_runtime / 4:
        factor = max(0.5, (large["measured_bytes"] - runtime - fixed(large)) / large["model_part_bytes"])
    runs = sorted({small["run"], large["run"]})
    return Fit(runtime, round(factor, 3), f"measured on this machine in {', '.join(runs)}")


TRUST_BOUNDS = (0.85, 1.5)    # how far one GPU run may move the memory model's figure, either way


def gpu_trust(hw: Hardware, method: str) -> tuple[float, str] | None:
    """What to multiply the memory model's VRAM figure by on this GPU for `method`, or None without a measurement:
    the last finished run's measured/predicted reserved peak (bounded by TRUST_BOUNDS), and never below what an
    out-of-memory showed: a run planned at X that ran out of a card with C usable needed more than C, so the factor
    is at least C / X there."""
    mine = [r for r in records(hw) if r.get("kind") == "train-gpu" and r.get("method") == method
            and r.get("predicted_bytes")][-2 * RECENT:]
    if not mine:
        return None
    ok = [r for r in mine if r.get("outcome", "ok") == "ok"]
    trust, why = 1.0, []
    if ok:
        lo, hi = TRUST_BOUNDS
        trust = min(max(ok[-1]["measured_bytes"] / ok[-1]["predicted_bytes"], lo), hi)
        why.append(f"measured on this machine in {ok[-1]['run']}")
    for r in (r for r in mine if r.get("outcome") == "oom"):
        if r["measured_bytes"] / r["predicted_bytes"] > trust:
            trust = r["measured_bytes"] / r["predicted_bytes"]
            why.append(f"out of memory at a predicted {r['predicted_bytes'] / 2**30:.1f} GiB in {r['run']}")
    return round(trust, 3), "; ".join(why)


KEPT = "the measurement is kept for this machine's next predictions (`python -m tutor_wrap calibration`)"


def keep(hw: Hardware, kind: str, run: str, predicted: int, measured: int, **knobs) -> tuple[float | None, bool]:
    """`record` the measurement; (how far the prediction was off in %, whether that is beyond FLAG_PCT: the run
    says so, ending with KEPT)."""
    record(hw, kind, run, predicted, measured, **knobs)
    off = off_by(predicted, measured)
    return off, off is not None and abs(off) > FLAG_PCT


def off_by(predicted: int, measured: int) -> float | None:
    return round(100 * (predicted - measured) / measured, 1) if measured else None
