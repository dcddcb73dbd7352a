"""One `run` per run dir at a time: a second one would race the first's trainer and overwrite its artifacts.

The kernel's flock is held for as long as the process lives, so a run killed with -9 leaves a lock file that the
next run simply takes over (the file still names the dead PID, which is reported as a note).
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from tutor_wrap.core.errors import TutorWrapError

LOCK = ".tutor_wrap.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def run_dir_lock(run_dir: Path, note: Callable[[str], None] = lambda _msg: None) -> Iterator[None]:
    path = Path(run_dir) / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise TutorWrapError(f"{run_dir} is in use by another tutor_wrap run (PID {holder})",
                                 hint=f"wait for it to finish or stop it (`kill {holder}`), or use another --run-dir") from None
        previous = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if previous.isdigit() and int(previous) != os.getpid() and not _alive(int(previous)):
            note(f"took over the lock of an earlier run (PID {previous}) that ended without releasing it")
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
