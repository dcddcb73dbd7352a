"""Eval's content checks on crafted answers, run for real (sandboxed python processes), and its statistics
against textbook figures."""

import os
import subprocess
from pathlib import Path

import pytest

from tutor_wrap.answers import code_runs
from tutor_wrap.checks.answers import judge
from tutor_wrap.checks.stats import mcnemar_exact, paired, wilson
from tutor_wrap.data.alpaca import ALPACA
from tutor_wrap.recipe.schema import EvalChecks

pytestmark = pytest.mark.tools

CHECKS = EvalChecks(code_block=True, code_runs=True, max_words=200)


def answer(code: str) -> str:
    return f"Here is how.\n\n```python\n{code}\n```"


def test_code_that_runs_passes_and_wrong_code_is_not_green():
    good = judge(answer("print('a-b'.partition('-'))"), True, ALPACA.section_markers, CHECKS)
    assert good.format_pass and good.all_pass and good.checks["code_runs"]
    # well formatted, stops by itself, has a code block: and its code raises (the demo's str.partition case)
    wrong = judge(answer("str.partition('a', 3)"), True, ALPACA.section_markers, CHECKS)
    assert wrong.format_pass and not wrong.all_pass
    assert wrong.details["code_runs"].startswith("TypeError")


@pytest.mark.parametrize("code, why", [
    ("while True:\n    pass", "CPU-time limit"),
    ("import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=3)", "Network is unreachable"),
    ("import urllib.request\nurllib.request.urlopen('http://example.com', timeout=3)", "URLError"),
])
def test_code_that_loops_or_reaches_the_network_fails(code, why):
    res = code_runs.check(answer(code))
    assert not res.runs and why in res.error


def test_code_writes_only_into_its_own_temporary_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = code_runs.check(answer("import os\nopen('written.txt', 'w').write('x')\nprint(os.getcwd())"))
    assert res.runs
    assert not (tmp_path / "written.txt").exists()          # not in the caller's folder
    big = code_runs.check(answer("open('big.bin', 'wb').write(b'0' * (8 * 1024 * 1024))"))
    assert not big.runs                                       # the file-size limit stops an 8 MB write


# Hostile answers, through the path eval takes (check -> the sandbox). This machine (and CI) has bubblewrap:
# `make test` installs it; where it is missing the tests say so instead of passing on a weaker box.
def needs_sandbox(test):
    # They count the sandbox user's processes, so they must not run beside each other: they stay in this module,
    # which `make test-fast` (--dist loadfile) runs on one worker.
    skip = pytest.mark.skipif(code_runs.sandbox_problem() is not None,
                              reason=f"no sandbox here: {code_runs.sandbox_problem()}")
    return skip(test)
TOKEN = "hf_PLANTEDsandboxTOKEN0123456789abcdef"


@needs_sandbox
def test_code_cannot_write_outside_its_box_even_as_root(tmp_path):
    target = tmp_path / "escaped.txt"          # a path the caller (root on CI) may write
    for where in (target, "/usr/escaped.txt", "/etc/escaped.txt", "/root/escaped.txt"):
        res = code_runs.check(answer(f"open({str(where)!r}, 'w').write('x')"))
        assert not res.runs and ("No such file" in res.error or "Read-only" in res.error), res.error
    assert not target.exists() and not Path("/usr/escaped.txt").exists()
    # what the machine holds is not there at all: the home, the work tree, /etc
    res = code_runs.check(answer(f"import os\nassert not any(os.path.exists(p) for p in ({str(Path.cwd())!r}, "
                                 "'/root', '/home', '/etc/passwd')), os.listdir('/')"))
    assert res.runs, res.error


@needs_sandbox
def test_code_sees_no_variable_of_its_caller(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    leak = ("import os, glob\n"
            "seen = str(dict(os.environ)) + ''.join(open(p, errors='replace').read() "
            "for p in glob.glob('/proc/*/environ'))\n"
            f"assert {TOKEN!r} not in seen, 'leaked'\n"
            "raise SystemExit(os.environ.get('HF_TOKEN', 'no token here'))")
    res = code_runs.check(answer(leak))
    assert not res.runs and res.error == "no token here" and TOKEN not in res.error


@needs_sandbox
def test_nothing_the_code_starts_outlives_it():
    marker = "301.25"
    res = code_runs.check(answer(f"import subprocess\nsubprocess.Popen(['sleep', {marker!r}])\nprint('left')"))
    assert res.runs
    assert _gone(["-f", f"sleep {marker}"])


@needs_sandbox
@pytest.mark.parametrize("code, why", [
    ("import os\nwhile True:\n    os.fork()", "Resource temporarily unavailable"),   # the process limit holds
    ("for i in range(64):\n    open(f'f{i}', 'wb').write(b'0' * 1000000)", "No space left on device"),
])
def test_a_fork_bomb_and_a_disk_filler_are_contained(code, why):
    res = code_runs.check(answer(code))
    assert not res.runs and why in res.error, res.error
    assert _gone(["-u", str(code_runs.NOBODY)]) or os.geteuid() != 0


def test_the_error_is_the_last_exception_line_even_when_stderr_ends_torn():
    # What a fork bomb's processes leave in the shared pipe when the sandbox kills them mid-write (seen in CI).
    torn = ("Traceback (most recent call last):\n  File \"<string>\", line 3, in <module>\n"
            "BlockingIOError: [Errno 11] Resource temporarily unavailable\nTraceback (most recent call last):\n")
    assert code_runs._error_line(torn) == "BlockingIOError: [Errno 11] Resource temporarily unavailable"
    assert code_runs._error_line("Traceback (most recent call last):\n") == "Traceback (most recent call last):"
    assert code_runs._error_line("\n") is None


def _gone(pgrep_args: list[str], within_s: float = 10.0) -> bool:
    """No process matches: the kernel takes the sandbox's PID namespace down with its first process, in moments."""
    import time

    deadline = time.monotonic() + within_s
    while subprocess.run(["pgrep", *pgrep_args], capture_output=True).returncode == 0:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def test_an_answer_without_python_does_not_count_as_running_code():
    res = code_runs.check("Lists hold items in order.")
    assert not res.runs and res.error == "no python block"


def test_mcnemar_and_wilson_match_textbook_values():
    # 10 discordant pairs for B, 2 for A: p = 2 * (C(12,0) + C(12,1) + C(12,2)) / 2^12 = 158/4096
    assert mcnemar_exact(10, 2) == pytest.approx(158 / 4096)
    assert mcnemar_exact(3, 3) == 1.0 and mcnemar_exact(0, 0) == 1.0
    # Wilson 95% interval for 15/30: 0.332 .. 0.668 (Newcombe 1998, method 3)
    lo, hi = wilson(15, 30)
    assert lo == pytest.approx(0.3315, abs=1e-3) and hi == pytest.approx(0.6685, abs=1e-3)
    st = paired([True, False, False, True], [True, True, True, False])
    assert (st["wins"], st["losses"], st["ties"]) == (2, 1, 1) and not st["significant"]


@pytest.mark.parametrize("text, reference, same", [
    ("24 + 18 = 42 muffins, 42 - 35 = 7.\nThe answer is: 7", "The answer is: 7", True),
    ("So 7 muffins are left. #### 7", "The answer is: 7", True),
    ("The area is \\boxed{40}", "The answer is: 40", True),
    ("Each costs $2.50, so the total is $9.25.", "The answer is: 9.25", True),
    ("It rose by 25%.", "The answer is: 25", True),
    ("The answer is: 1,024", "The answer is: 1024", True),
    ("The answer is: 6.0", "The answer is: 6", True),
    ("x = 6, so 3x + 7 = 25. The answer is: 18", "The answer is: 6", False),   # last marker wins, and it is wrong
    ("I am not sure.", "The answer is: 6", False),
])
def test_answer_match_reads_the_final_answer(text, reference, same):
    from tutor_wrap.answers.math_answer import matches

    assert matches(text, reference) is same


def test_the_math_eval_file_has_thirty_problems_with_answers():
    from pathlib import Path

    from tutor_wrap.data.alpaca import load_alpaca

    rows = load_alpaca(Path(__file__).parents[1] / "recipes/data/math_eval.jsonl").rows
    assert len(rows) >= 30 and all(r.output.startswith("The answer is: ") for r in rows)
