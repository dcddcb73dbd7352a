"""Write-then-rename helpers: a finished artifact's name never points at half-written bytes."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from tutor_wrap.core.errors import TutorWrapError


def _fsync_dir(path: Path) -> None:
    # The rename is only durable once the directory entry is flushed (power loss after rename).
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    try:
        _write_bytes(path, data)
    except OSError as exc:
        raise TutorWrapError(f"cannot write {path}: {exc.strerror or exc}",
                             hint="choose another path, or free disk / fix the folder's permissions") from None


def _write_bytes(path: Path, data: bytes) -> None:
    if path.is_dir():
        raise IsADirectoryError(21, "it is a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")
