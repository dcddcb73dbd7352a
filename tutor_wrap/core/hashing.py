"""Content hashes: what a stage fingerprint and a cache key are made of."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def fingerprint(*parts: Any) -> str:
    """A stable hash of JSON-able values (recipe fields, upstream fingerprints, file hashes)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


FULL_HASH_MAX = 64 << 20    # files up to this size are hashed whole; larger ones are sampled
_SAMPLE = 1 << 20
WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth")


def _file_print(path: Path) -> str:
    size = path.stat().st_size
    if size <= FULL_HASH_MAX:
        return file_sha256(path)
    # A multi-GB model: its size and three 1 MiB samples (start, middle, end) catch a truncated, half-copied or
    # replaced file in milliseconds; a full hash would cost a minute per run of `run` on an 8B model.
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as fh:
        for offset in (0, size // 2, size - _SAMPLE):
            fh.seek(offset)
            h.update(fh.read(_SAMPLE))
    return "sampled:" + h.hexdigest()


def artifact_fingerprint(path: Path) -> dict[str, Any] | None:
    """What a finished stage recorded of one artifact, to trust it later only if it is still that: a file's size
    and content hash; a folder's weight files (tokenizer and config files beside them may be rewritten by a later
    stage, as merge writes the chat template into a full fine-tune's folder). None: the path does not exist."""
    path = Path(path)
    if path.is_file():
        return {"size": path.stat().st_size, "hash": _file_print(path)}
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
        return {"weights": {p.name: {"size": p.stat().st_size, "hash": _file_print(p)} for p in files}}
    return None
