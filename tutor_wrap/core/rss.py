"""Peak RSS of a tool run, measured by the kernel.

`getrusage(RUSAGE_CHILDREN)` reports the largest waited-for descendant, but over the whole life of the
calling process (training would dominate a later merge), so each measured tool runs under a fresh small
wrapper process: `python -m tutor_wrap.core.rss OUT.json -- cmd ...`.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from tutor_wrap.core.proc import run_logged


def wrap(args: Sequence[str], out: Path) -> list[str]:
    """`args` run under the measuring wrapper, which writes their peak RSS to `out` (read it with `read_peak`)."""
    out.unlink(missing_ok=True)
    return [sys.executable, "-m", "tutor_wrap.core.rss", str(out), "--", *args]


def read_peak(out: Path) -> int:
    """The peak the wrapper wrote (0 when it wrote none), the file removed."""
    try:
        peak = int(json.loads(out.read_text())["peak_rss_bytes"])
    except (OSError, ValueError, KeyError):
        peak = 0
    out.unlink(missing_ok=True)
    return peak


def run_measured(args: Sequence[str], log: Path, *, env: dict[str, str] | None = None) -> tuple[int, int]:
    """Run `args` (output to `log`); return (exit code, peak RSS in bytes of it and its descendants)."""
    out = log.with_suffix(".rss.json")
    proc = run_logged(wrap(args, out), log, env=env)
    return proc.returncode, read_peak(out)


def main(argv: list[str]) -> int:
    out, sep, *cmd = argv
    if sep != "--" or not cmd:
        print("usage: python -m tutor_wrap.core.rss OUT.json -- cmd ...", file=sys.stderr)
        return 2
    rc = subprocess.call(cmd)
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
    try:
        Path(out).write_text(json.dumps({"peak_rss_bytes": peak_kib * 1024, "returncode": rc}))
    except OSError:   # a full disk loses the measurement, never the tool's own exit code
        pass
    return rc


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
