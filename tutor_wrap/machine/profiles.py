"""Saved machines: plan and preflight for a machine you are not on (the recipe's `hardware:` key).

A profile is the `Hardware` record as YAML; the shipped ones live in tutor_wrap/profiles/*.yml. Sizes are bytes,
or strings with a binary unit ("12288MiB", "7.5GiB") for hand-written files.
"""

from __future__ import annotations

import re
from dataclasses import fields, replace
from pathlib import Path

import yaml

from tutor_wrap.core import atomic
from tutor_wrap.core.errors import TutorWrapError
from tutor_wrap.machine.hardware import Hardware
from tutor_wrap.machine.vendors import by_name

PROFILE_DIR = Path(__file__).resolve().parent / "profiles"
_UNIT = {"B": 1, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4}
_SIZE_KEYS = ("ram_total_bytes", "ram_available_bytes", "swap_total_bytes", "swap_free_bytes", "disk_free_bytes",
              "vram_total_bytes", "vram_free_bytes")


def names() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yml"))


def _size(value, where: str) -> int | None:
    if value is None or isinstance(value, int):
        return value
    m = re.match(r"^\s*([\d.]+)\s*([KMGT]iB|B)\s*$", str(value), re.I)
    if not m:
        raise TutorWrapError(f"{where}: {value!r} is not a size", hint="write bytes (12884901888) or e.g. 12288MiB / 12GiB")
    return int(float(m.group(1)) * _UNIT[m.group(2).upper()])


def _sizes(d: dict, where: str) -> dict:
    return {k: (_size(v, f"{where}: {k}") if k in _SIZE_KEYS else v) for k, v in d.items()}


def _resolve(name_or_file: str | Path) -> tuple[Path, str]:
    p = Path(name_or_file).expanduser()
    if p.suffix in (".yml", ".yaml") or p.is_file():
        if not p.is_file():
            raise TutorWrapError(f"hardware profile {p} does not exist", hint=f"shipped profiles: {', '.join(names())}")
        return p, p.stem
    shipped = PROFILE_DIR / f"{name_or_file}.yml"
    if not shipped.is_file():
        raise TutorWrapError(f"unknown hardware profile {name_or_file!r}",
                             hint=f"use one of {', '.join(names())}, or a path to a .yml saved with save_profile")
    return shipped, str(name_or_file)


def load_profile(name_or_file: str | Path) -> Hardware:
    """A shipped profile by name (`rtx3060-12gb`) or a YAML file; `source` is set to the profile's name."""
    path, name = _resolve(name_or_file)
    try:
        data = yaml.safe_load(path.read_text("utf-8")) or {}
    except yaml.YAMLError as exc:
        raise TutorWrapError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise TutorWrapError(f"{path}: a profile is a mapping of Hardware fields")
    data = _sizes(data, str(path))
    data["gpus"] = [_sizes(g, f"{path}: gpus[{i}]") for i, g in enumerate(data.get("gpus") or [])]
    data.pop("source", None)
    try:
        hw = Hardware.from_dict({"source": name, **data})
    except KeyError as exc:
        raise TutorWrapError(f"{path}: unknown key(s) {exc.args[0]}",
                             hint="keys are the fields of tutor_wrap.machine.hardware.Hardware and GPU") from None
    except TypeError as exc:
        missing = str(exc).partition("missing ")[2] or str(exc)
        raise TutorWrapError(f"{path}: missing {missing}".replace("positional argument", "key").replace(
            "argument", "key"), hint="required: cpu_count, ram_total_bytes, ram_available_bytes, swap_total_bytes, "
                                     "swap_free_bytes, disk_free_bytes") from None
    except ValueError as exc:
        raise TutorWrapError(f"{path}: {exc}") from None
    _check_types(hw, path)
    _check_sense(hw, path)
    return hw


def _check_sense(hw: Hardware, path: Path) -> None:
    """Values no machine has (no CPU, more free than total): a plan made from them would mean nothing."""
    problems = []
    for name in ("cpu_count", "ram_total_bytes"):
        if getattr(hw, name) <= 0:
            problems.append(f"{name} is {getattr(hw, name)}: at least 1")
    for name in ("ram_available_bytes", "swap_total_bytes", "swap_free_bytes", "disk_free_bytes"):
        if getattr(hw, name) < 0:
            problems.append(f"{name} is {getattr(hw, name)}: not negative")
    for name in ("cpu_physical_cores", "cpu_usable"):
        v = getattr(hw, name)
        if v is not None and not 1 <= v <= hw.cpu_count:
            problems.append(f"{name} is {v}: 1 to cpu_count ({hw.cpu_count})")
    if hw.cpu_busy is not None and not 0 <= hw.cpu_busy <= hw.cpu_count:
        problems.append(f"cpu_busy is {hw.cpu_busy}: 0 to cpu_count ({hw.cpu_count})")
    if hw.ram_available_bytes > hw.ram_total_bytes:
        problems.append("ram_available_bytes is more than ram_total_bytes")
    if hw.swap_free_bytes > hw.swap_total_bytes:
        problems.append("swap_free_bytes is more than swap_total_bytes")
    for i, g in enumerate(hw.gpus):
        if g.vram_total_bytes <= 0:
            problems.append(f"gpus[{i}].vram_total_bytes is {g.vram_total_bytes}: at least 1")
        elif g.vram_free_bytes is not None and not 0 <= g.vram_free_bytes <= g.vram_total_bytes:
            problems.append(f"gpus[{i}].vram_free_bytes is outside 0..vram_total_bytes")
    if problems:
        raise TutorWrapError(f"{path}: {problems[0]}", hint="fix the profile (sizes: bytes or e.g. 12GiB), or write "
                             "this machine's with `preflight --save-profile FILE`")


_TYPES = {"int": (int,), "bool": (bool,), "str": (str,), "float": (int, float)}


def _check_types(hw: Hardware, path: Path) -> None:
    """A value of the wrong type (`cpu_count: eight`) is refused here, not met later as a traceback in the planner."""
    records = [("", hw)] + [(f"gpus[{i}].", g) for i, g in enumerate(hw.gpus)]
    for prefix, rec in records:
        for f in fields(rec):
            want = str(f.type).replace(" ", "").split("|")
            value = getattr(rec, f.name)
            if value is None and "None" in want:
                continue
            kinds = tuple(k for w in want for k in _TYPES.get(w, ()))
            if kinds and (not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool))):
                raise TutorWrapError(f"{path}: {prefix}{f.name} is {value!r} ({type(value).__name__}), "
                                     f"expected {' or '.join(w for w in want if w != 'None')}",
                                     hint="fix the value in the profile (sizes: bytes or e.g. 12GiB)")
    for i, g in enumerate(hw.gpus):
        try:
            by_name(g.vendor)
        except TutorWrapError as exc:
            raise TutorWrapError(f"{path}: gpus[{i}].vendor: {exc}", hint=exc.hint) from None


def save_profile(hw: Hardware, path: str | Path) -> Path:
    """Write `hw` as a profile (e.g. `probe()` on the training box, to plan from a laptop). Probe notes are
    dropped: they describe the probing machine, not the hardware; so are GPU UUIDs (they identify the very cards,
    and a profile is meant to be passed around)."""
    path = Path(path)
    data = replace(hw, source=path.stem, probe_notes=[], gpus=[replace(g, uuid=None) for g in hw.gpus]).to_dict()
    data.pop("probe_notes")
    for g in data["gpus"]:
        g.pop("uuid")
    atomic.write_text(path, "# tutor_wrap hardware profile (sizes in bytes)\n" + yaml.safe_dump(data, sort_keys=False))
    return path


def resolve_hardware(spec: str | None, run_dir: Path | None = None) -> Hardware:
    """The recipe's `hardware:` value: "auto" (or empty) probes this machine, anything else is a profile."""
    if not spec or spec == "auto":
        from tutor_wrap.machine.probe import probe

        return probe(run_dir)
    return load_profile(spec)
