"""Running the real tools (accelerate, axolotl, llama.cpp): argument lists only, offline environment, logs on disk."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Sequence

from tutor_wrap.core.errors import TutorWrapError

# Hubs are unreachable here and must never be contacted by surprise elsewhere; telemetry stalls start-up.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "AXOLOTL_DO_NOT_TRACK": "1",
    "DO_NOT_TRACK": "1",
    "WANDB_DISABLED": "true",
    "WANDB_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
}

_HF_TOKEN = re.compile(r"\bhf_[A-Za-z0-9]{20,}")
_KEYED = re.compile(r"(?i)(\w*(?:hf_?token|access_token|auth_token|api[_-]?key|secret|password))(\s*[=:]\s*)\S+")


def redact(text: str) -> str:
    """Blank out anything that looks like a token before it reaches a log, a report or the screen."""
    return _KEYED.sub(r"\1\2[redacted]", _HF_TOKEN.sub("hf_[redacted]", text))


def die_with_parent() -> None:
    """preexec_fn: on Linux, the child gets SIGTERM when tutor_wrap dies, even by SIGKILL.

    Without it a killed `run` leaves Axolotl training on as an orphan, holding the GPU and racing the next `run`.
    """
    if sys.platform != "linux":
        return
    import ctypes
    import signal

    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def tool_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OFFLINE_ENV)
    if extra:
        env.update(extra)
    return env


def venv_bin(name: str) -> str:
    """A console script installed beside the running interpreter (the project's venv)."""
    cand = Path(sys.executable).parent / name
    if cand.exists():
        return str(cand)
    raise TutorWrapError(f"'{name}' is not installed beside {sys.executable}", hint="run `make setup` (or pip install -e .) in this environment")


def _pump(stream, fh) -> None:
    """Copy a tool's output into its log line by line, scrubbed of secrets before a byte reaches the disk."""
    for line in iter(stream.readline, b""):
        fh.write(redact(line.decode("utf-8", "replace")).encode())
        fh.flush()
    stream.close()
    fh.close()


class LoggedProcess:
    """A running tool whose stdout and stderr go, redacted, to a log file (see start_logged)."""

    def __init__(self, proc: subprocess.Popen, pump: threading.Thread):
        self.proc, self._pump = proc, pump

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def poll(self) -> int | None:
        return self.proc.poll()

    def wait(self, timeout: float | None = None) -> int:
        rc = self.proc.wait(timeout)
        # A grandchild that outlives the tool may hold the pipe open: do not wait on it for ever.
        self._pump.join(timeout=10)
        return rc

    def terminate(self) -> None:
        self.proc.terminate()

    def kill(self) -> None:
        self.proc.kill()


def start_logged(args: Sequence[str], log: Path, *, env: dict[str, str] | None = None, cwd: Path | None = None,
                 new_session: bool = False) -> LoggedProcess:
    """Start a tool (an argument list, never a shell string) with its output appended to `log`, redacted."""
    log.parent.mkdir(parents=True, exist_ok=True)
    fh = open(log, "ab")
    fh.write(redact("\n$ " + " ".join(str(a) for a in args) + "\n").encode())
    fh.flush()
    try:
        proc = subprocess.Popen([str(a) for a in args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env=env or tool_env(), cwd=cwd, preexec_fn=die_with_parent,
                                start_new_session=new_session)
    except BaseException:
        fh.close()
        raise
    pump = threading.Thread(target=_pump, args=(proc.stdout, fh), daemon=True)
    pump.start()
    return LoggedProcess(proc, pump)


def run_logged(args: Sequence[str], log: Path, *, env: dict[str, str] | None = None, cwd: Path | None = None,
               timeout: float | None = None) -> subprocess.CompletedProcess:
    """Run a tool with stdout+stderr appended to `log` (redacted); return the completed process (never raises on rc)."""
    p = start_logged(args, log, env=env, cwd=cwd)
    try:
        rc = p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        raise
    return subprocess.CompletedProcess([str(a) for a in args], rc)


def append_log(log: Path, text: str) -> None:
    """Text a tool printed, added to its log through the same scrubbing."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as fh:
        fh.write(redact(text))


def tail(path: Path, n: int = 40) -> str:
    try:
        lines = path.read_text("utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    return redact("\n".join(lines[-n:]))
