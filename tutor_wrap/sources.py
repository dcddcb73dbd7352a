"""A recipe's hub sources made local: the base model and a hub dataset downloaded (`run`, `fetch`) or found in the
Hugging Face cache (`plan`, `preflight`, which never download), pinned to one commit, and the dataset's split
materialized as JSON Lines in the run dir.

`local_recipe` returns the recipe as the stages see it: a hub base model at the commit fetched (its snapshot folder
is then `base_model_path()`), a hub dataset replaced by its materialized file, so every check reads them like local
files. The commits go into manifest.json (`sources`); a rerun asks for the same ones, so it reads the same files.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from tutor_wrap.backends import hub
from tutor_wrap.core.errors import TutorWrapError
from tutor_wrap.core.hashing import fingerprint
from tutor_wrap.core.units import GIB
from tutor_wrap.data import formats
from tutor_wrap.machine.host import existing_dir
from tutor_wrap.models.hub_cache import record_ref, snapshot
from tutor_wrap.planning.budgets import disk_needed
from tutor_wrap.recipe.schema import Recipe


@dataclass(frozen=True)
class Source:
    repo: str
    repo_type: str
    revision: str            # as the recipe asks ("main" when it does not)
    commit: str | None       # the commit used; None: not downloaded
    path: Path | None = None  # the snapshot folder


def _asked(recipe: Recipe) -> list[tuple[str, str, str]]:
    out = []
    if recipe.is_hub_model:
        out.append(("base_model", recipe.base_model, recipe.revision or "main"))
    if recipe.dataset.hub:
        out.append(("dataset", recipe.dataset.hub, recipe.dataset.revision or "main"))
    return out


def _pinned(recorded: dict, key: str, repo: str, revision: str) -> str:
    """The commit a previous run of this run dir used for the same repository and revision, else the revision."""
    rec = recorded.get(key) or {}
    return rec["commit"] if rec.get("repo") == repo and rec.get("revision") == revision and rec.get("commit") else revision


def _check_disk(remotes: dict[str, hub.Remote], recipe: Recipe, run_dir: Path) -> None:
    """Refuse before a byte is written when the downloads plus what merge and export then write do not fit."""
    from huggingface_hub import constants

    cache = existing_dir(Path(constants.HF_HUB_CACHE))
    runs = existing_dir(run_dir)
    download = sum(r.missing_bytes for r in remotes.values())
    size = (lambda n: f"{n / GIB:.1f} GiB" if n >= GIB / 10 else f"{n / 1e6:.1f} MB")
    later = 0
    if "base_model" in remotes and recipe.method != "full":
        weights = sum(n for f, n in remotes["base_model"].files.items() if f.endswith(".safetensors"))
        later = weights + disk_needed(weights, 2, recipe.export.quant_types)[1]   # merged model, then the GGUFs
    if os.stat(cache).st_dev == os.stat(runs).st_dev:
        need = {cache: download + later}
    else:
        need = {cache: download, runs: later}
    for where, n in need.items():
        free = shutil.disk_usage(where).free
        if n > free:
            parts = ", ".join(f"{r.repo} {size(r.missing_bytes)}" for r in remotes.values() if r.missing)
            raise TutorWrapError(
                f"not enough disk for the downloads ({parts or 'none'}) and what merge and export then write "
                f"({size(later)}): {size(n)} needed on the disk of {where}, {size(free)} free; nothing was downloaded",
                hint="free disk space, or put the Hugging Face cache on a bigger disk (HF_HOME or HF_HUB_CACHE) and "
                     "the run elsewhere (--run-dir)")


def _renames(recipe: Recipe) -> dict[str, str]:
    """Hub columns -> the keys the recipe's format reads (`fields: {messages: COL}` for chat rows names the column
    of turns: the format's own key for it, `conversations` for ShareGPT rows)."""
    ds = recipe.dataset
    turns = formats.ROW_KEYS[ds.format][0]
    return {col: (turns if key == "messages" else key) for key, col in ds.fields.items()}


def _materialized(recipe: Recipe, src: Source, run_dir: Path) -> Path:
    ds = recipe.dataset
    name = f"{ds.hub.replace('/', '--')}@{src.commit[:12]}-{ds.split}" + (f"-{ds.limit}" if ds.limit else "")
    # the column mapping changes the rows written: another mapping, another file
    return run_dir / "data" / (name + (f"-{fingerprint(sorted(ds.fields.items()))[:8]}" if ds.fields else "") + ".jsonl")


def local_recipe(recipe: Recipe, run_dir: Path, recorded: dict, *, download: bool,
                 console: Console | None = None) -> tuple[Recipe, dict]:
    """(the recipe with its hub sources made local, the sources record for the manifest). `download`: fetch what the
    cache lacks (off when the hub is: --offline, HF_HUB_OFFLINE=1); else only what is cached is used and the rest
    is left to check_inputs to report."""
    recipe.base_model_path()     # a base_model that is neither a folder nor a hub id is refused before any download
    asked = _asked(recipe)
    if not asked:
        return recipe, {}
    where = str(recipe.source)
    srcs: dict[str, Source] = {}
    if download and not hub.offline():
        hub.check_cache(where)
        remotes = {key: hub.remote(repo, "model" if key == "base_model" else "dataset", _pinned(recorded, key, repo, rev),
                                   allow_pickle=recipe.allow_pickle_weights, split=recipe.dataset.split,
                                   trust_remote_code=recipe.trust_remote_code, where=f"{where}: {key}")
                   for key, repo, rev in asked}
        _check_disk(remotes, recipe, run_dir)
        for (key, repo, rev) in asked:
            r = remotes[key]
            if r.missing and console is not None:
                console.print(f"fetch: {escape(repo)} at {r.commit[:12]}: {len(r.missing)} of {len(r.files)} files, "
                              f"{r.missing_bytes / 1e6:.1f} MB")
            path = hub.download(r, where=f"{where}: {key}")
            record_ref(repo, r.repo_type, _pinned(recorded, key, repo, rev), r.commit)
            srcs[key] = Source(repo, r.repo_type, rev, r.commit, path)
    else:
        for key, repo, rev in asked:
            kind = "model" if key == "base_model" else "dataset"
            snap = snapshot(repo, kind, _pinned(recorded, key, repo, rev))
            if snap is None and download:
                at = "" if rev == "main" else f" at revision {rev}"
                raise TutorWrapError(f"{where}: {key} {repo}{at} is not in the Hugging Face cache, and the hub is off "
                                     "(--offline or HF_HUB_OFFLINE=1)", hint=hub.OFFLINE_FIX)
            srcs[key] = Source(repo, kind, rev, snap.commit if snap else None, snap.path if snap else None)
    updates: dict = {}
    if "base_model" in srcs and srcs["base_model"].commit:
        updates["revision"] = srcs["base_model"].commit
    ds_src = srcs.get("dataset")
    if ds_src is not None and ds_src.path is not None:
        out = _materialized(recipe, ds_src, run_dir)
        if not hub.materialized(out):
            ds = recipe.dataset
            n = hub.materialize(ds_src.path, ds.split, ds.limit, _renames(recipe), formats.ROW_KEYS[ds.format], out,
                                f"{where}: dataset.hub {ds.hub}")
            if console is not None:
                short = f" (the split has only {n}: fewer than limit {ds.limit})" if ds.limit and n < ds.limit else ""
                console.print(f"fetch: {escape(ds.hub)} {escape(ds.hub_split)}: {n} rows{escape(short)} -> "
                              f"{escape(str(out))}")
        updates["dataset"] = recipe.dataset.model_copy(update={"path": out.resolve(), "hub": None, "split": "train",
                                                               "limit": None, "fields": {}, "revision": None})
    record = {key: {"repo": s.repo, "revision": s.revision, "commit": s.commit} for key, s in srcs.items() if s.commit}
    return recipe.model_copy(update=updates), record
