"""A real hub-compatible server on loopback for the download tests: olah (PyPI `olah`, a self-hosted Hugging Face
mirror) serving local git repositories through the hub's API, in offline mode (it never reaches the real hub).

`make test` installs it into .cache/olah (Makefile: HUB_SERVER). huggingface_hub talks to it through HF_ENDPOINT.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OLAH = REPO / ".cache" / "olah" / "bin" / "olah-cli"


def git(cwd: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout.strip()


def commit_files(repo: Path, files: dict[str, bytes], message: str) -> str:
    """Write `files` into the git repository at `repo` (made if new) and commit them; returns the commit."""
    if not (repo / ".git").exists():
        repo.mkdir(parents=True, exist_ok=True)
        git(repo, "init", "-q", "-b", "main")
    for name, data in files.items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_bytes(data)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Hub:
    url: str
    mirrors: Path
    log: Path

    def repo(self, kind: str, repo_id: str) -> Path:
        return self.mirrors / f"{kind}s" / repo_id

    def requests(self) -> str:
        return self.log.read_text("utf-8", "replace")


@contextmanager
def serve(root: Path):
    """olah on 127.0.0.1 on a free port, serving git repositories under root/mirrors/{models,datasets}/ORG/NAME;
    stopped (its whole process group) when the block ends, also on error."""
    if not OLAH.is_file():
        raise RuntimeError(f"{OLAH} is missing: `make test` installs it (or `make {OLAH.relative_to(REPO)}`)")
    mirrors = root / "mirrors"
    (mirrors / "models").mkdir(parents=True, exist_ok=True)
    (mirrors / "datasets").mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = root / "olah.toml"
    config.write_text(f"""[basic]
host = "127.0.0.1"
port = {port}
repos-path = "{root / 'repos'}"
mirrors-path = ["{mirrors}"]
mirror-scheme = "http"
mirror-netloc = "127.0.0.1:{port}"
mirror-lfs-netloc = "127.0.0.1:{port}"

[accessibility]
offline = true
""")
    log = root / "olah.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(OLAH), "-c", str(config)], cwd=root, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(url + "/", timeout=2)
                break
            except urllib.error.HTTPError:
                break                       # it answers (a 404 for / is an answer)
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"olah did not start: {log.read_text()[-2000:]}")
                time.sleep(0.2)
        yield Hub(url, mirrors, log)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
