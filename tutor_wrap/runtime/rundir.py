"""The run directory and its manifest: the single source of truth between stages.

A stage never asks another stage anything; it reads what the manifest recorded. That is what makes resume simple:
a stage whose record says `done` with the same input fingerprint is skipped, anything else is redone.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tutor_wrap.core import atomic
from tutor_wrap.core.errors import TutorWrapError


MANIFEST = "manifest.json"
SCHEMA_VERSION = 1


@dataclass
class RunDir:
    path: Path

    @classmethod
    def create(cls, path: Path) -> "RunDir":
        path = Path(path).resolve()
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / ".write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise TutorWrapError(
                f"run directory {path} is not writable ({exc.strerror})",
                hint="choose another place with --run-dir, or fix its permissions",
            ) from None
        return cls(path)

    def sub(self, *parts: str) -> Path:
        p = self.path.joinpath(*parts)
        p.mkdir(parents=True, exist_ok=True)
        return p

    def rel(self, p: Path) -> str:
        return os.path.relpath(Path(p).resolve(), self.path)

    def abs(self, rel: str) -> Path:
        return (self.path / rel).resolve()

    # manifest ---------------------------------------------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        f = self.path / MANIFEST
        if not f.exists():
            return {"schema": SCHEMA_VERSION, "stages": {}}
        try:
            data = json.loads(f.read_text("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            # Writes are atomic, so this is hand-editing or a foreign file: start the stages over rather than guess.
            return {"schema": SCHEMA_VERSION, "stages": {}}
        data.setdefault("stages", {})
        return data

    def update_manifest(self, **top: Any) -> None:
        m = self.manifest()
        m.update(top)
        atomic.write_json(self.path / MANIFEST, m)

    def stage(self, name: str) -> dict[str, Any]:
        return self.manifest()["stages"].get(name, {})

    def record_stage(self, name: str, **fields: Any) -> None:
        m = self.manifest()
        rec = m["stages"].get(name, {})
        rec.update(fields)
        rec["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        m["stages"][name] = rec
        atomic.write_json(self.path / MANIFEST, m)

    def invalidate_from(self, names: list[str]) -> None:
        m = self.manifest()
        for n in names:
            if n in m["stages"]:
                m["stages"][n]["status"] = "stale"
        atomic.write_json(self.path / MANIFEST, m)

    def artifact(self, stage: str, key: str) -> Path:
        """The absolute path of an artifact an earlier stage recorded; a clear error if it is not there."""
        rec = self.stage(stage)
        rel = rec.get("artifacts", {}).get(key)
        if rec.get("status") != "done" or rel is None:
            raise TutorWrapError(
                f"{self.path / MANIFEST}: stage '{stage}' has not finished (no '{key}' recorded)",
                hint=f"run the whole recipe, or `--from {stage}`",
            )
        p = self.abs(rel)
        if not p.exists():
            raise TutorWrapError(
                f"{p} was recorded by stage '{stage}' but is missing",
                hint=f"re-run with `--from {stage}`",
            )
        return p
