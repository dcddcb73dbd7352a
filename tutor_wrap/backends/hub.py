"""The Hugging Face hub: which files of a repository the pipeline reads, their sizes before a byte is written, the
download into the standard HF cache (resumable: huggingface_hub keeps a partial file and continues it), and a hub
dataset's split materialized as JSON Lines.

The token is huggingface_hub's own business (HF_TOKEN or `hf auth login`): it is never passed, printed or written
here, and no error message quotes a response body.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from tutor_wrap.core import atomic
from tutor_wrap.core.errors import TutorWrapError

# What the pipeline reads of a model repository (top level only): config, tokenizer, chat template, safetensors
# and their index. Never `original/` (Meta's consolidated .pth, as large again) or other formats' copies.
MODEL_FILES = ("*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "*.jinja", "merges.txt", "vocab.txt")
# Mistral's repositories carry their own-format copy of the weights beside the HF shards (consolidated.safetensors,
# as large again) and its params.json: the HF loaders read neither.
NOT_HF = ("consolidated*", "params.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "*.tiktoken", "vocab.json")
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


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatch(name, p) for p in patterns)


def choose_model_files(names: list[str], *, allow_pickle: bool, trust_remote_code: bool) -> list[str]:
    top = [n for n in names if "/" not in n and not _matches(n, NOT_HF)]
    chosen = [n for n in top if _matches(n, MODEL_FILES)]
    if not any(n.endswith(".safetensors") for n in chosen) and allow_pickle:
        chosen += [n for n in top if any(fnmatch.fnmatch(n, p) for p in PICKLE_FILES)]
    if trust_remote_code:
        chosen += [n for n in top if any(fnmatch.fnmatch(n, p) for p in CODE_FILES)]
    return sorted(set(chosen))


def choose_dataset_files(names: list[str], split: str | None = None) -> list[str]:
    """The data files; of one split only when the files are named by split (data/train-00000-of-00002.parquet,
    test.jsonl, the layouts `datasets` reads splits from), else all of them (one file is the train split)."""
    data = sorted(n for n in names if _matches(n.rsplit("/", 1)[-1], DATA_FILES) and not n.rsplit("/", 1)[-1].startswith("."))
    if split:
        named = re.compile(rf"(^|[/_.-]){re.escape(split)}([/_.-]|$)")
        mine = [n for n in data if named.search(n)]
        if mine:
            return mine
    return data


def _model_problem(repo: str, names: list[str], chosen: list[str], allow_pickle: bool) -> tuple[str, str] | None:
    """What makes a model repository unusable, known from its file list before a byte is downloaded."""
    if "config.json" not in chosen:
        return (f"{repo} has no config.json: it is not a model in the Hugging Face format",
                "pick the repository of the model in the transformers format")
    if not any(n.endswith(".safetensors") for n in chosen):
        if any(_matches(n, PICKLE_FILES) for n in names) and not allow_pickle:
            return (f"{repo} has only pickled weights (pytorch_model*.bin), which can run code when loaded",
                    "set `allow_pickle_weights: true` in the recipe if you trust it, or pick a repository with "
                    "*.safetensors")
        if not any(_matches(n, PICKLE_FILES) for n in chosen):
            return f"{repo} has no weights (*.safetensors) at its top level", "pick the repository of the full model"
    if not any(_matches(n, TOKENIZER_FILES) for n in chosen):
        return (f"{repo} has no tokenizer ({', '.join(TOKENIZER_FILES)})",
                "pick a repository that ships its tokenizer (base and Instruct models do)")
    return None


def page(repo: str, repo_type: str) -> str:
    from huggingface_hub import constants

    return f"{constants.ENDPOINT.rstrip('/')}/{'datasets/' if repo_type == 'dataset' else ''}{repo}"


def _hub_error(exc: Exception, repo: str, repo_type: str, revision: str | None, where: str) -> TutorWrapError:
    """One clear sentence and the fix for what the hub answered; never the response body (it may echo headers)."""
    from huggingface_hub import errors as e

    import httpx

    what = f"{where}: {'dataset ' if repo_type == 'dataset' else ''}{repo}"
    if isinstance(exc, e.HFValidationError):
        return TutorWrapError(f"{what} is not a valid hub id ({str(exc).splitlines()[0][:160]})",
                              hint="write it as ORG/NAME (letters, digits, '-', '_', '.'), as the model's page shows it")
    if isinstance(exc, OSError) and not isinstance(exc, httpx.HTTPError):
        return TutorWrapError(f"{what}: the Hugging Face cache could not be written ({exc.strerror or exc})",
                              hint=CACHE_FIX)
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


CACHE_FIX = "set HF_HOME (or HF_HUB_CACHE) to a folder you can write, on a disk with room for the model"
OFFLINE_FIX = ("without the hub: run `python -m tutor_wrap fetch RECIPE` where it is reachable and copy the Hugging "
               "Face cache (HF_HUB_CACHE), or point the recipe at local files")


def _has_token() -> bool:
    from huggingface_hub import get_token

    try:
        return get_token() is not None
    except OSError:          # HF_HOME is not a folder: no stored token there (check_cache says why)
        return False


def check_cache(where: str) -> Path:
    """The HF cache folder, made if missing, refused with the fix when it cannot be written (a read-only mount,
    HF_HOME under a file): said before anything is asked of the hub."""
    from huggingface_hub import constants

    cache = Path(constants.HF_HUB_CACHE)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        probe = cache / f".tutor_wrap-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise TutorWrapError(f"{where}: the Hugging Face cache {cache} cannot be written ({exc.strerror or exc})",
                             hint=CACHE_FIX) from None
    return cache


def remote(repo: str, repo_type: str, revision: str | None, *, allow_pickle: bool = False,
           trust_remote_code: bool = False, split: str | None = None, where: str = "") -> Remote:
    """The files the pipeline needs from `repo` at `revision`, their sizes and what the cache lacks (network)."""
    from huggingface_hub import HfApi, snapshot_download

    try:
        api = HfApi()
        info = (api.model_info if repo_type == "model" else api.dataset_info)(repo, revision=revision)
        names = [s.rfilename for s in info.siblings or []]
        chosen = (choose_model_files(names, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
                  if repo_type == "model" else choose_dataset_files(names, split))
        if repo_type == "model" and (problem := _model_problem(repo, names, chosen, allow_pickle)):
            raise TutorWrapError(f"{where}: {problem[0]}", hint=problem[1])
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
    huggingface_hub's progress bar shows bytes and rate. Returns the snapshot folder.

    One file at a time, in this thread: snapshot_download's worker threads finish the file they are on after
    Ctrl-C (minutes for a 5 GB shard); here the interrupt stops the transfer where it is, its partial file kept.
    Small files first: a refusal or an interrupt comes before the long transfers."""
    from huggingface_hub import hf_hub_download

    path = None
    try:
        for name in sorted(r.missing, key=lambda n: (r.missing[n], n)):
            path = hf_hub_download(r.repo, name, repo_type=r.repo_type, revision=r.commit)
        if path is None:   # nothing was missing: the snapshot the dry run found
            path = hf_hub_download(r.repo, next(iter(r.files)), repo_type=r.repo_type, revision=r.commit)
    except Exception as exc:
        raise _hub_error(exc, r.repo, r.repo_type, r.commit, where) from None
    snapshot = Path(path)
    while snapshot.parent.name != "snapshots":
        snapshot = snapshot.parent
    return snapshot


def materialize(snapshot: Path, split: str, limit: int | None, renames: dict[str, str], required: tuple[str, ...],
                out: Path, where: str) -> int:
    """The dataset's `split` (first `limit` rows), columns renamed (column -> the format's key), written once as
    JSON Lines at `out` (temp name, then rename) beside its sha256 (`out`.sha256, so a file changed since is made
    again): training, eval and every check read those rows offline. Returns the number of rows."""
    import datasets

    try:
        ds = datasets.load_dataset(str(snapshot), split=f"{split}[:{limit}]" if limit else split)
    except ValueError as exc:
        if "split" in str(exc).lower():
            raise TutorWrapError(f"{where}: dataset.split {split!r} is not in the dataset ({str(exc)[:300]})",
                                 hint="name one of the splits the dataset card lists (usually train)") from None
        raise TutorWrapError(f"{where}: the dataset's files could not be read ({str(exc)[:300]})",
                             hint="check that the repository holds parquet, JSON Lines, JSON or CSV data files") from None
    missing = [c for c in renames if c not in ds.column_names]
    if missing:
        raise TutorWrapError(f"{where}: dataset.fields names columns {', '.join(missing)}, which the dataset does not "
                             f"have; its columns: {', '.join(ds.column_names)}",
                             hint="map each role onto one of those columns")
    have = {renames.get(c, c) for c in ds.column_names}
    if absent := [k for k in required if k not in have]:
        raise TutorWrapError(f"{where}: the rows need {', '.join(repr(k) for k in absent)}, and the dataset's columns "
                             f"are {', '.join(ds.column_names)}",
                             hint="map them with dataset.fields, e.g. fields: {"
                                  + ", ".join(f"{k}: COLUMN" for k in absent) + "}")
    lines = [json.dumps({renames.get(k, k): v for k, v in row.items()}, ensure_ascii=False, default=str) for row in ds]
    text = "\n".join(lines) + ("\n" if lines else "")
    atomic.write_text(out, text)
    atomic.write_text(out.with_name(out.name + ".sha256"), hashlib.sha256(text.encode("utf-8")).hexdigest() + "\n")
    return len(lines)


def materialized(out: Path) -> bool:
    """Is `out` the file materialize wrote (present, and its content what was recorded)?"""
    mark = out.with_name(out.name + ".sha256")
    try:
        return mark.read_text("utf-8").strip() == hashlib.sha256(out.read_bytes()).hexdigest()
    except OSError:
        return False
