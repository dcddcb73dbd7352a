"""Reading an Alpaca JSON Lines file, with errors that name the line."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tutor_wrap.errors import TutorWrapError


@dataclass(frozen=True)
class AlpacaRow:
    line: int
    instruction: str
    input: str
    output: str


@dataclass(frozen=True)
class Dataset:
    path: Path
    rows: list[AlpacaRow]
    warnings: list[str]


def _numbers(lines: list[int], limit: int = 5) -> str:
    shown = ", ".join(str(n) for n in lines[:limit])
    return shown + (f" and {len(lines) - limit} more" if len(lines) > limit else "")


def load_alpaca(path: Path, *, require_output: bool = True) -> Dataset:
    path = Path(path)
    if not path.is_file():
        raise TutorWrapError(f"dataset {path} does not exist", hint="check dataset.path in the recipe (relative to the recipe file)")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise TutorWrapError(f"{path}:{line}: not UTF-8 text", hint="re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)") from None
    rows: list[AlpacaRow] = []
    bad_json: list[int] = []
    not_obj: list[int] = []
    missing: dict[str, list[int]] = {}
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            bad_json.append(n)
            continue
        if not isinstance(obj, dict):
            not_obj.append(n)
            continue
        needed = ("instruction", "output") if require_output else ("instruction",)
        absent = [k for k in needed if not isinstance(obj.get(k), str) or not obj.get(k).strip()]
        for k in absent:
            missing.setdefault(k, []).append(n)
        if absent:
            continue
        inp = obj.get("input") or ""
        if not isinstance(inp, str):
            missing.setdefault("input (as a string)", []).append(n)
            continue
        rows.append(AlpacaRow(n, obj["instruction"], inp, obj.get("output", "")))
    if bad_json:
        raise TutorWrapError(
            f"{path}: not JSON Lines: line {_numbers(bad_json)} is not valid JSON",
            hint='each line must be one JSON object, e.g. {"instruction": "...", "input": "", "output": "..."}',
        )
    if not_obj:
        raise TutorWrapError(f"{path}: line {_numbers(not_obj)} is not a JSON object", hint="each line must be one {...} object")
    if missing:
        key, lines = next(iter(missing.items()))
        raise TutorWrapError(
            f"{path}: line {_numbers(lines)}: missing or empty '{key}'",
            hint="every Alpaca row needs a non-empty 'instruction' and 'output' ('input' may be empty)",
        )
    if not rows:
        raise TutorWrapError(f"{path}: the dataset is empty", hint="add at least one Alpaca row")
    warnings = []
    seen: dict[tuple[str, str, str], int] = {}
    dups = []
    for r in rows:
        key = (r.instruction.strip(), r.input.strip(), r.output.strip())
        if key in seen:
            dups.append(r.line)
        else:
            seen[key] = r.line
    if dups:
        warnings.append(f"{path}: line {_numbers(dups)} duplicate an earlier row (they weigh twice in training)")
    return Dataset(path, rows, warnings)
