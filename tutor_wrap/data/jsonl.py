"""JSON Lines reading with errors that name the file and the lines: shared by every dataset format."""

from __future__ import annotations

import json
from pathlib import Path

from tutor_wrap.core.errors import TutorWrapError


def line_numbers(lines: list[int], limit: int = 5) -> str:
    shown = ", ".join(str(n) for n in lines[:limit])
    return shown + (f" and {len(lines) - limit} more" if len(lines) > limit else "")


def read_objects(path: Path, *, example: str, key: str = "dataset.path") -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line; one TutorWrapError for a missing file, bad UTF-8, lines that
    are not JSON or not objects. `example` is one valid line, shown in the fix; `key` is the recipe key naming it.

    Also read: a UTF-8 byte-order mark (Windows editors write one) and a whole-file JSON array of objects (the
    original alpaca_data.json shape, which Axolotl's loader reads too); array elements count as lines 1, 2, ...
    """
    path = Path(path)
    if path.is_dir():
        raise TutorWrapError(f"{key}: {path} is a folder, not a file", hint=f"point {key} at the JSONL file inside it")
    if not path.is_file():
        raise TutorWrapError(f"dataset {path} does not exist", hint=f"check {key} in the recipe (relative to the recipe file)")
    raw = path.read_bytes()
    _refuse_tables(path, raw, key)
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff") or (len(raw) > 3 and raw[1:4:2] == b"\x00\x00"):
        raise TutorWrapError(f"{path}: UTF-16 text (Windows' \"Unicode\"); {key} takes UTF-8",
                             hint=f"re-save it as UTF-8: iconv -f utf-16 -t utf-8 {path} > {path.with_suffix('.utf8.jsonl')}")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise TutorWrapError(f"{path}:{line}: not UTF-8 text", hint="re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)") from None
    if text.lstrip().startswith("["):
        if raw.startswith(b"\xef\xbb\xbf") and key == "dataset.path":
            # Hugging Face datasets' JSON loader, which Axolotl trains from, reads JSON Lines with a byte-order
            # mark but not a JSON array with one ("Expected object or value"): refused now, not at train time.
            raise TutorWrapError(f"{path}: a JSON array that starts with a byte-order mark, which Axolotl's loader "
                                 "cannot read", hint=f"save it without the mark: sed -i '1s/^\\xEF\\xBB\\xBF//' {path}")
        return _json_array(path, text)
    out: list[tuple[int, dict]] = []
    bad_json: list[int] = []
    not_obj: list[int] = []
    surrogates: list[int] = []
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
        if ("\\ud" in line or "\\uD" in line) and _lone_surrogate(obj):
            surrogates.append(n)
            continue
        out.append((n, obj))
    if bad_json:
        raise TutorWrapError(f"{path}: not JSON Lines: line {line_numbers(bad_json)} is not valid JSON",
                             hint=f"each line must be one JSON object, e.g. {example}")
    if not_obj:
        raise TutorWrapError(f"{path}: line {line_numbers(not_obj)} is not a JSON object", hint="each line must be one {...} object")
    if surrogates:
        raise TutorWrapError(f"{path}: line {line_numbers(surrogates)} holds a \\ud800-\\udfff escape that is half of "
                             "a character (a broken emoji or a cut string): not text a tokenizer can read",
                             hint="fix or drop those rows (the writer split a surrogate pair)")
    return out


def _lone_surrogate(value) -> bool:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_lone_surrogate(v) for v in value.values())
    if isinstance(value, list):
        return any(_lone_surrogate(v) for v in value)
    return False


_TABLES = {".parquet": "Parquet", ".csv": "CSV", ".tsv": "TSV", ".arrow": "Arrow", ".xlsx": "Excel"}
_READERS = {"Parquet": "read_parquet('{p}')", "CSV": "read_csv('{p}', keep_default_na=False)",
            "TSV": "read_csv('{p}', sep='\\t', keep_default_na=False)", "Arrow": "read_feather('{p}')",
            "Excel": "read_excel('{p}')"}


def _refuse_tables(path: Path, raw: bytes, key: str) -> None:
    """A table file (Parquet, CSV...) named by its format, with the command that turns it into JSON Lines: the rows
    are checked, measured and rendered from JSON, and 'not UTF-8' or 'not JSON Lines' would not say why."""
    kind = "Parquet" if raw[:4] == b"PAR1" else _TABLES.get(path.suffix.lower())
    if kind is None:
        return
    out = path.with_suffix(".jsonl")
    convert = (f"python -c \"import pandas as pd; pd.{_READERS[kind].format(p=path)}.to_json('{out}', "
               "orient='records', lines=True, force_ascii=False)\"")
    raise TutorWrapError(f"{path}: a {kind} file; {key} takes JSON Lines (one JSON object per line) or a JSON array",
                         hint=f"convert it, then point {key} at {out.name}: {convert}")


def _json_array(path: Path, text: str) -> list[tuple[int, dict]]:
    try:
        items = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TutorWrapError(f"{path}:{exc.lineno}: the file starts like a JSON array but is not valid JSON ({exc.msg})",
                             hint="fix the JSON there, or write one object per line (JSON Lines)") from None
    if not isinstance(items, list):
        raise TutorWrapError(f"{path}: the file starts like a JSON array but is not one",
                             hint="write one object per line (JSON Lines), or one [ {...}, ... ] array")
    bad = [i for i, item in enumerate(items, start=1) if not isinstance(item, dict) or _lone_surrogate(item)]
    if bad:
        raise TutorWrapError(f"{path}: array element {line_numbers(bad)} is not a JSON object",
                             hint="each element must be one {...} object")
    return list(enumerate(items, start=1))
