"""Does the Python in an answer run? Each fenced python block runs in its own process inside a bubblewrap sandbox
(Debian's `bubblewrap`, the sandbox Flatpak uses): new user, PID, network, IPC and UTS namespaces (no network at
all; /proc shows the sandbox's own processes), the operating system's /usr mounted read-only and nothing else of
the machine (no home, no run dir, no /etc), a fresh size-capped tmpfs as the only writable path, an empty
environment, the whole process tree killed with the sandbox at the wall-clock timeout, and CPU-time, memory,
file-size and process-count limits. Run as root, the code runs as `nobody`, so the process limit holds.

Where no sandbox can be made (bubblewrap missing, user namespaces off), `code_runs: true` is refused at plan time
and in eval; `code_runs: unconfined` opts in to the old, weaker containment (a temporary folder and the limits
only), named as such in the report.
"""

from __future__ import annotations

import functools
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tutor_wrap.answers.check import AnswerCheck, Verdict

_BLOCK = re.compile(r"```(?:python|py|python3)[ \t]*\n(.*?)```", re.S | re.I)
CPU_S = 5
# Wall clock outlasts the CPU limit by enough that a loop meets the CPU limit (the clearer message) even with a
# quarter of a core, as on a busy 2-core box or laptop.
TIMEOUT_S = 4 * CPU_S
MEMORY_BYTES = 1024**3
FILE_BYTES = 1024**2
TMPFS_BYTES = 16 * 1024**2       # all the answer may write, in all its files together
PROCESSES = 64                   # the sandbox user's processes (a fork bomb stops here)
NOBODY = 65534
UNCONFINED = "unconfined"
NAMESPACE_RETRIES = 40           # x 0.25 s: how long a new sandbox waits for the last one's processes to go
_NAMESPACE_BUSY = b"Creating new namespace failed: Resource temporarily unavailable"        # the recipe's opt-in where no sandbox can be made
# The interpreter must be readable by the sandbox user: a pyenv or venv python under /root is not, for nobody.
SYSTEM_PYTHONS = ("/usr/bin/python3", "/usr/local/bin/python3")
# Unconfined runs only: any socket use fails the way a machine without network fails.
_NO_NETWORK = (
    "import socket as _s\n"
    "class _Blocked(_s.socket):\n"
    "    def __init__(self, *a, **k):\n"
    "        raise OSError(101, 'Network is unreachable (blocked by tutor_wrap eval)')\n"
    "def _no_dns(*a, **k):\n"
    "    raise OSError(101, 'Network is unreachable (blocked by tutor_wrap eval)')\n"
    "_s.socket = _Blocked; _s.getaddrinfo = _no_dns\n"
    "del _s, _Blocked, _no_dns\n"
)


@dataclass(frozen=True)
class CodeResult:
    runs: bool
    blocks: int
    error: str | None       # the last exception line of the first failing block's stderr (or why nothing ran)


def python_blocks(text: str) -> list[str]:
    return _BLOCK.findall(text)


def _as_root() -> bool:
    return os.geteuid() == 0


def _limits() -> None:
    """In the child, before bubblewrap starts: limits every process of the sandbox inherits; as root, become nobody
    first (root is exempt from the process-count limit, and may write anywhere a bind would expose)."""
    os.setsid()
    if _as_root():
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
    resource.setrlimit(resource.RLIMIT_CPU, (CPU_S, CPU_S))
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_BYTES, MEMORY_BYTES))
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_BYTES, FILE_BYTES))
    resource.setrlimit(resource.RLIMIT_NPROC, (PROCESSES, PROCESSES))


def _python() -> str:
    if not _as_root():
        return os.path.realpath(sys.executable)
    return next((p for p in SYSTEM_PYTHONS if os.path.exists(p)), os.path.realpath(sys.executable))


def _sandbox_args(python: str) -> list[str]:
    bwrap = shutil.which("bwrap")
    args = [bwrap, "--unshare-all", "--unshare-user", "--die-with-parent", "--new-session", "--disable-userns", "--clearenv",
            "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/tmp", "--setenv", "TMPDIR", "/tmp",
            "--setenv", "LANG", "C.UTF-8", "--setenv", "PYTHONDONTWRITEBYTECODE", "1",
            "--ro-bind", "/usr", "/usr", "--proc", "/proc", "--dev", "/dev",
            "--size", str(TMPFS_BYTES), "--tmpfs", "/tmp", "--chdir", "/tmp"]
    for link in ("bin", "lib", "lib64", "sbin"):
        target = Path("/") / link
        if target.is_symlink():
            args += ["--symlink", os.readlink(target), str(target)]
        elif target.is_dir():
            args += ["--ro-bind", str(target), str(target)]
    prefix = Path(python).resolve().parents[1]        # <prefix>/bin/python3.x: its stdlib lives under <prefix>
    if not str(prefix).startswith("/usr"):
        args += ["--ro-bind", str(prefix), str(prefix)]
    return args


@functools.lru_cache(maxsize=1)
def sandbox_problem() -> str | None:
    """Why no sandbox can be made on this machine (None: it can). Tried once, for real."""
    if shutil.which("bwrap") is None:
        return "bubblewrap (bwrap) is not installed"
    python = _python()
    try:
        proc = subprocess.run([*_sandbox_args(python), python, "-I", "-c", "pass"], capture_output=True, text=True,
                              timeout=30, env={"PATH": "/usr/bin:/bin"}, preexec_fn=_limits)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"bubblewrap could not start ({exc})"
    if proc.returncode != 0:
        return f"bubblewrap cannot make a sandbox here ({(proc.stderr.strip().splitlines() or ['?'])[-1][:200]})"
    return None


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, 9)
    except (ProcessLookupError, PermissionError):
        pass


def run_block(code: str, *, confined: bool = True) -> tuple[bool, str | None]:
    """Run one block; (it ran without error, the last error line). `confined`: in the sandbox (refused where none
    can be made); otherwise in a temporary folder with the limits only (the recipe's `code_runs: unconfined`)."""
    python = _python()
    # An empty environment for bubblewrap itself too: the sandbox's PID 1 is bubblewrap, and its /proc/1/environ
    # would otherwise hand the answer the caller's variables, tokens included.
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
    with tempfile.TemporaryDirectory(prefix="tutor-wrap-code-") as tmp:
        if confined:
            problem = sandbox_problem()
            if problem:
                return False, f"not run: {problem}"
            args = [*_sandbox_args(python), python, "-I", "-c", code]
            cwd = "/"
        else:
            os.chmod(tmp, 0o777)
            env.update(HOME=tmp, TMPDIR=tmp, PYTHONDONTWRITEBYTECODE="1")
            args = [python, "-I", "-c", _NO_NETWORK + code]
            cwd = tmp
        for _ in range(NAMESPACE_RETRIES):
            proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    stdin=subprocess.DEVNULL, preexec_fn=_limits)
            try:
                _, err = proc.communicate(timeout=TIMEOUT_S)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                proc.communicate()
                return False, f"did not finish within {TIMEOUT_S} s"
            finally:
                _kill_group(proc)      # whatever it left behind in its session (a background sleeper) goes too
            # The kernel releases the previous sandbox's processes (a fork bomb's, say) a moment after its PID
            # namespace goes: until then they count against the process limit and bubblewrap cannot start.
            if not (confined and proc.returncode != 0 and _NAMESPACE_BUSY in err):
                break
            time.sleep(0.25)
    if proc.returncode == 0:
        return True, None
    # SIGKILL / SIGXCPU from the CPU-time limit: the signal itself unconfined, 128 + it through bubblewrap
    if proc.returncode in (-9, -24, 128 + 9, 128 + 24):
        return False, f"stopped by the {CPU_S} s CPU-time limit"
    return False, _error_line(err.decode("utf-8", "replace")) or f"exit {proc.returncode}"


def _error_line(stderr: str) -> str | None:
    """The last exception line of stderr. Not simply its last line: the processes of an answer that forks write
    their tracebacks into one pipe, and the sandbox kills them mid-write, so stderr may end in a torn traceback."""
    lines = [l for l in stderr.splitlines() if l.strip()]
    told = [l for l in lines if not l[0].isspace() and not l.startswith("Traceback (most recent call last)")]
    return (told or lines)[-1][:300] if lines else None


def check(text: str, *, confined: bool = True) -> CodeResult:
    """All python blocks of `text` run without error (an answer without one does not pass)."""
    blocks = python_blocks(text)
    if not blocks:
        return CodeResult(False, 0, "no python block")
    for code in blocks:
        ok, error = run_block(code, confined=confined)
        if not ok:
            return CodeResult(False, len(blocks), error)
    return CodeResult(True, len(blocks), None)


def _judge(text: str, value: bool | str, _reference: str | None) -> Verdict:
    ran = check(text, confined=value is True)
    return Verdict(ran.runs, ran.error)


def _value(v: bool | str) -> None:
    if not isinstance(v, bool) and v != UNCONFINED:
        raise ValueError(f"true, false or {UNCONFINED!r} (run without the sandbox, where none can be made), got {v!r}")


CHECK = AnswerCheck("code_runs", (bool, str), content=True, needs_reference=False, judge=_judge,
                    doc="every python block of the answer runs (in a bubblewrap sandbox)", validate=_value)
