"""What the Hugging Face cache on this machine holds, read from its documented layout (no network, no download).

HF_HUB_CACHE/<models|datasets>--ORG--NAME/refs/<branch or tag> names a commit; snapshots/<commit>/ holds the files
of that commit that were downloaded. huggingface_hub, transformers, Axolotl and `hf download` all share it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

COMMIT = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class Snapshot:
    repo: str
    repo_type: str      # "model" or "dataset"
    commit: str
    path: Path          # the snapshot folder (links into the cache's blobs)


def repo_folder(repo: str, repo_type: str) -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE) / f"{repo_type}s--{repo.replace('/', '--')}"


def snapshot(repo: str, repo_type: str, revision: str | None) -> Snapshot | None:
    """The cached snapshot of `repo` at `revision` (a commit, or a branch/tag this cache has resolved before;
    None: "main"), or None when the cache has none."""
    folder = repo_folder(repo, repo_type)
    rev = revision or "main"
    commit = rev if COMMIT.match(rev) else None
    if commit is None:
        ref = folder / "refs" / rev
        try:
            commit = ref.read_text("utf-8").strip()
        except OSError:
            return None
    path = folder / "snapshots" / commit
    return Snapshot(repo, repo_type, commit, path) if path.is_dir() else None


def record_ref(repo: str, repo_type: str, ref: str, commit: str) -> None:
    """Note that branch/tag `ref` is `commit`, as huggingface_hub does when it downloads by a ref name (tutor_wrap
    downloads by the commit it resolved, so that the files cannot change mid-download): the next offline lookup of
    the ref finds the snapshot."""
    if COMMIT.match(ref) or "/" in ref.strip("/") and ".." in ref:
        return
    path = repo_folder(repo, repo_type) / "refs" / ref
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(commit)
    tmp.replace(path)
