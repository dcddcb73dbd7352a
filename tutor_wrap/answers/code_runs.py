"""Does the Python in an answer run? Each fenced python block runs in its own process, sandboxed as far as an
unprivileged tool can: a fresh temporary working dir and HOME, a minimal environment, CPU-time, memory, file-size
and process limits, a wall-clock timeout, and no network (a network namespace where `unshare` allows one, else the
socket module replaced before the code runs). It cannot hide files the user can read by absolute path: the answers
are a small model's, run on the machine that trained it.
"""

from __future__ import annotations

import functools
import re
import resource
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass

from tutor_wrap.answers.check import AnswerCheck, Verdict

_BLOCK = re.compile(r"```(?:python|py|python3)[ \t]*\n(.*?)```", re.S | re.I)
CPU_S = 5
# Wall clock outlasts the CPU limit by enough that a loop meets the CPU limit (the clearer message) even with a
# quarter of a core, as on a busy 2-core box or laptop.
TIMEOUT_S = 4 * CPU_S
MEMORY_BYTES = 1024**3
FILE_BYTES = 1024**2
# Runs before the answer's code: any socket use fails the way a machine without network fails.
# (used only where no network namespace can be made).
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
    error: str | None       # the last line of the first failing block's stderr (or why nothing ran)


def python_blocks(text: str) -> list[str]:
    return _BLOCK.findall(text)


def _limits() -> None:
    resource.setrlimit(resource.RLIMIT_CPU, (CPU_S, CPU_S))
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_BYTES, MEMORY_BYTES))
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_BYTES, FILE_BYTES))
    resource.setrlimit(resource.RLIMIT_NPROC, (64, 64))


@functools.lru_cache(maxsize=1)
def _netns_prefix() -> tuple[str, ...]:
    """`unshare` into a new network namespace (root: --net; others: a user namespace too) if this kernel allows it."""
    exe = shutil.which("unshare")
    if exe is None:
        return ()
    for prefix in ((exe, "--net"), (exe, "--user", "--map-root-user", "--net")):
        try:
            ok = subprocess.run([*prefix, sys.executable, "-c", "pass"], capture_output=True, timeout=10).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            ok = False
        if ok:
            return prefix
    return ()


def run_block(code: str) -> tuple[bool, str | None]:
    with tempfile.TemporaryDirectory(prefix="tutor-wrap-code-") as tmp:
        env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "PYTHONDONTWRITEBYTECODE": "1",
               "PYTHONHASHSEED": "0", "LANG": "C.UTF-8"}
        netns = _netns_prefix()
        args = [*netns, sys.executable, "-I", "-c", code if netns else _NO_NETWORK + code]
        try:
            proc = subprocess.run(args, cwd=tmp, env=env, capture_output=True, timeout=TIMEOUT_S,
                                  preexec_fn=_limits, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return False, f"did not finish within {TIMEOUT_S} s"
    if proc.returncode == 0:
        return True, None
    if proc.returncode in (-9, -24):   # SIGKILL / SIGXCPU from the CPU-time limit
        return False, f"stopped by the {CPU_S} s CPU-time limit"
    lines = [l for l in proc.stderr.decode("utf-8", "replace").splitlines() if l.strip()]
    return False, (lines[-1] if lines else f"exit {proc.returncode}")[:300]


def check(text: str) -> CodeResult:
    """All python blocks of `text` run without error (an answer without one does not pass)."""
    blocks = python_blocks(text)
    if not blocks:
        return CodeResult(False, 0, "no python block")
    for code in blocks:
        ok, error = run_block(code)
        if not ok:
            return CodeResult(False, len(blocks), error)
    return CodeResult(True, len(blocks), None)


def _judge(text: str, _on: bool, _reference: str | None) -> Verdict:
    ran = check(text)
    return Verdict(ran.runs, ran.error)


CHECK = AnswerCheck("code_runs", bool, content=True, needs_reference=False, judge=_judge,
                    doc="every python block of the answer runs (sandboxed)")
