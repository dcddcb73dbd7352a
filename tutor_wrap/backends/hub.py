"""The Hugging Face hub: which files of a repository the pipeline reads, their sizes before a byte is written, the
download into the standard HF cache (resumable: huggingface_hub keeps a partial file and continues it), and a hub
dataset's split materialized as JSON Lines.

The token is huggingface_hub's own business (HF_TOKEN or `hf auth login`): it is never passed, printed or written
here, and no error message quotes a response body.
"""

from __future__ import annotations

import fnmatch
import json
import os
from dataclasses import dataclass
from pathlib import Path

from tutor_wrap.core import atomic
from tutor_wrap.core.errors import TutorWrapError

# What the pipeline reads of a model repository (top level only): config, tokenizer, chat template, safetensors
# and their index. Never `original/` (Meta's consolidated .pth, as large again) or other formats' copies.
MODEL_FILES = ("*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "*.jinja", "merges.txt", "vocab.txt")
PICKLE_FILES = ("pytorch_model*.bin",)
CODE_FILES = ("*.py",)
# A dataset repository's data files, in any folder (data/train-00000-of-00001.parquet, MetaMathQA-395K.json).
DATA_FILES = ("*.parquet", "*.jsonl", "*.json", "*.csv", "*.arrow", "*.jsonl.gz", "*.json.gz")


@dataclass(frozen=True)
class Remote:
    """A repository at one commit, and the files of it the pipeline needs."""
    repo: str
    repo_type: str                  # "model" or "dataset"
    commit: str
    files: dict[str, int]           # name -> bytes
    missing: dict[str, int]         # of those, what the local cache lacks

    @property
    def missing_bytes(self) -> int:
        return sum(self.missing.values())

    @property
    def total_bytes(self) -> int:
        return sum(self.files.values())


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def choose_model_files(names: list[str], *, allow_pickle: bool, trust_remote_code: bool) -> list[str]:
    top = [n for n in names if "/" not in n]
    chosen = [n for n in top if any(fnmatch.fnmatch(n, p) for p in MODEL_FILES)]
    if not any(n.endswith(".safetensors") for n in chosen) and allow_pickle:
        chosen += [n for n in top if any(fnmatch.fnmatch(n, p) for p in PICKLE_FILES)]
    if trust_remote_code:
        chosen += [n for n in top if any(fnmatch.fnmatch(n, p) for p in CODE_FILES)]
    return sorted(set(chosen))


def choose_dataset_files(names: list[str]) -> list[str]:
    return sorted(n for n in names if any(fnmatch.fnmatch(n.rsplit("/", 1)[-1], p) for p in DATA_FILES)
                  and not n.rsplit("/", 1)[-1].startswith("."))


def page(repo: str, repo_type: str) -> str:
    from huggingface_hub import constants

    return f"{constants.ENDPOINT.rstrip('/')}/{'datasets/' if repo_type == 'dataset' else ''}{repo}"


def _hub_error(exc: Exception, repo: str, repo_type: str, revision: str | None, where: str) -> TutorWrapError:
    """One clear sentence and the fix for what the hub answered; never the response body (it may echo headers)."""
    from huggingface_hub import errors as e

    what = f"{where}: {'dataset ' if repo_type == 'dataset' else ''}{repo}"
    has_token = _has_token()
    if isinstance(exc, e.GatedRepoError) or (isinstance(exc, e.HfHubHTTPError)
                                              and getattr(exc.response, "status_code", None) in (401, 403)
                                              and not isinstance(exc, e.RepositoryNotFoundError)):
        return TutorWrapError(
            f"{what} is gated: " + ("the token this machine gives has no access to it" if has_token
                                    else "downloading it needs a token of an account that accepted its license"),
            hint=f"accept the license at {page(repo, repo_type)} (signed in), then give a token: `hf auth login`, "
                 "or the HF_TOKEN environment variable (tutor_wrap never writes it anywhere)")
    if isinstance(exc, e.RevisionNotFoundError):
        return TutorWrapError(f"{what} has no revision {revision!r}",
                              hint=f"name a branch, tag or commit that {page(repo, repo_type)} lists, or remove "
                                   "`revision:` for main")
    if isinstance(exc, e.RepositoryNotFoundError):
        return TutorWrapError(f"{what} was not found on the hub ({page(repo, repo_type)})" +
                              ("" if has_token else "; a private repository needs a token"),
                              hint="check the id's spelling" + ("" if has_token else
                                                                  ", or give a token: `hf auth login` or HF_TOKEN"))
    if isinstance(exc, e.OfflineModeIsEnabled) or offline():
        return TutorWrapError(f"{what} is not in the Hugging Face cache, and the hub is off (--offline or "
                              "HF_HUB_OFFLINE=1)", hint=OFFLINE_FIX)
    status = getattr(getattr(exc, "response", None), "status_code", None)
    return TutorWrapError(f"{what}: the hub could not be reached or answered "
                          + (f"HTTP {status}" if status else type(exc).__name__),
                          hint="check the connection (and HF_ENDPOINT, HTTPS_PROXY), then run again; " + OFFLINE_FIX)


OFFLINE_FIX = ("without the hub: run `python -m tutor_wrap fetch RECIPE` where it is reachable and copy the Hugging "
               "Face cache (HF_HUB_CACHE), or point the recipe at local files")


def _has_token() -> bool:
    from huggingface_hub import get_token

    return get_token() is not None


def remote(repo: str, repo_type: str, revision: str | None, *, allow_pickle: bool = False,
           trust_remote_code: bool = False, where: str = "") -> Remote:
    """The files the pipeline needs from `repo` at `revision`, their sizes and what the cache lacks (network)."""
    from huggingface_hub import HfApi, snapshot_download

    try:
        api = HfApi()
        info = (api.model_info if repo_type == "model" else api.dataset_info)(repo, revision=revision)
        names = [s.rfilename for s in info.siblings or []]
        chosen = (choose_model_files(names, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
                  if repo_type == "model" else choose_dataset_files(names))
        if not chosen:
            raise TutorWrapError(f"{where}: {repo} has no files tutor_wrap can use ("
                                 + ("config, tokenizer and *.safetensors weights" if repo_type == "model" else
                                    "parquet, JSON Lines, JSON or CSV data files") + f"); it lists {len(names)} files",
                                 hint="pick a repository in the Hugging Face format"
                                      + (", or set allow_pickle_weights: true for one with only pytorch_model.bin"
                                         if repo_type == "model" and any(n.endswith(".bin") for n in names) else ""))
        plan = snapshot_download(repo, repo_type=repo_type, revision=info.sha, allow_patterns=chosen, dry_run=True)
    except TutorWrapError:
        raise
    except Exception as exc:  # the hub library's errors (HTTP, offline, connection) become one sentence each
        raise _hub_error(exc, repo, repo_type, revision, where) from None
    files = {f.filename: int(f.file_size or 0) for f in plan}
    return Remote(repo, repo_type, info.sha, files, {f.filename: int(f.file_size or 0) for f in plan if f.will_download})


def download(r: Remote, where: str = "") -> Path:
    """The needed files of `r` into the HF cache at its commit (a partial file from a killed run is continued);
    huggingface_hub's progress bar shows bytes and rate. Returns the snapshot folder."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(r.repo, repo_type=r.repo_type, revision=r.commit, allow_patterns=list(r.files),
                                      max_workers=4))
    except Exception as exc:
        raise _hub_error(exc, r.repo, r.repo_type, r.commit, where) from None


def materialize(snapshot: Path, split: str, limit: int | None, renames: dict[str, str], out: Path,
                where: str) -> Path:
    """The dataset's `split` (first `limit` rows), columns renamed (column -> the format's key), written once as
    JSON Lines at `out` (temp name, then rename): training, eval and every check read those rows offline."""
    import datasets

    try:
        ds = datasets.load_dataset(str(snapshot), split=f"{split}[:{limit}]" if limit else split)
    except ValueError as exc:
        if "split" in str(exc).lower():
            raise TutorWrapError(f"{where}: dataset.split {split!r} is not in {snapshot.name[:12]}'s data ({exc})",
                                 hint="name one of the splits the dataset card lists (usually train)") from None
        raise TutorWrapError(f"{where}: the dataset's files could not be read ({exc})") from None
    missing = [c for c in renames if c not in ds.column_names]
    if missing:
        raise TutorWrapError(f"{where}: dataset.fields names columns {', '.join(missing)}, which the dataset does not "
                             f"have; its columns: {', '.join(ds.column_names)}",
                             hint="map each role onto one of those columns")
    lines = []
    for row in ds:
        lines.append(json.dumps({renames.get(k, k): v for k, v in row.items()}, ensure_ascii=False, default=str))
    atomic.write_text(out, "\n".join(lines) + ("\n" if lines else ""))
    return out
