"""Eval's content checks on crafted answers, run for real (sandboxed python processes), and its statistics
against textbook figures."""

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
