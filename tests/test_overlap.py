"""Held-out prompts that are not held out (data/overlap.py, recipe/resolve.check_overlap): planted exact and near
copies, with small edits, and repeated eval prompts, each reported with both files' line numbers, the same way by
`plan`, `preflight` and `run`."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tutor_wrap.data.overlap import NEAR_JACCARD, Text, find, jaccard, shingles

pytestmark = pytest.mark.tools

TOPICS = ["reverse a list", "count the vowels in a string", "read a CSV file into dictionaries", "merge two sorted lists",
          "check whether a number is prime", "flatten a nested list", "parse an ISO date", "remove duplicate items",
          "sum the digits of an integer", "find the longest word in a sentence", "convert Celsius to Fahrenheit",
          "compute a factorial recursively", "group words by their first letter", "validate an email address",
          "transpose a matrix given as lists", "format a number with thousands separators"]
TRAIN = [{"instruction": f"Write a short Python function to {t}.", "input": "",
          "output": f"Here is one way to {t}:\n\n```python\ndef solve(x):\n    return x  # {t}\n```"} for t in TOPICS]
FRESH = [{"instruction": "Explain what a Python generator is and when to use one.", "output": "A generator yields values lazily."},
         {"instruction": "How do I open a file safely so it is closed after use?", "output": "Use a with block: it closes the file."}]


def _write(tmp: Path, model: Path, train: list[dict], heldout: list[dict], **eval_over) -> Path:
    (tmp / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (tmp / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in heldout))
    recipe = {"name": "ov", "base_model": str(model), "dataset": {"path": "train.jsonl"},
              "train": {"max_steps": 1, "sequence_len": 256}, "ollama": {"model": "ov"},
              "eval": {"prompts": "eval.jsonl", **eval_over}}
    (tmp / "recipe.yml").write_text(yaml.safe_dump(recipe))
    return tmp / "recipe.yml"


def _cli(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tutor_wrap", *args], cwd=tmp, capture_output=True, text=True,
                          timeout=300)


def test_planted_exact_copy_with_changed_case_and_spacing_is_an_error_with_both_lines(tiny_model, tmp_path):
    copied = {"instruction": "  WRITE a short python function to   merge two sorted lists. ", "output": "x"}
    recipe = _write(tmp_path, tiny_model, TRAIN, [FRESH[0], copied, FRESH[1]])
    for args in (("plan", str(recipe), "--no-validate"), ("preflight", str(recipe)),
                 ("run", str(recipe), "--until", "plan", "--run-dir", "run")):
        proc = _cli(tmp_path, *args)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, (args, proc.stderr[-2000:])
        # eval line 2 is training line 4 (TOPICS[3]), named in both files
        assert "eval.jsonl: line 2: the prompt is also in the training rows (eval.jsonl line 2 = train.jsonl line 4" \
            in proc.stderr, (args, proc.stderr[-2000:])
        assert "eval.allow_overlap: true" in proc.stderr
    assert not (tmp_path / "run" / "axolotl.yml").exists()


def test_a_copied_reference_answer_is_an_error_too(tiny_model, tmp_path):
    leaked = {"instruction": "Show me how to flatten lists inside lists.", "output": TRAIN[5]["output"]}
    proc = _cli(tmp_path, "plan", str(_write(tmp_path, tiny_model, TRAIN, [FRESH[0], leaked])), "--no-validate")
    assert proc.returncode == 1
    assert "line 2: the answer is also in the training rows (eval.jsonl line 2 = train.jsonl line 6" in proc.stderr


def test_repeated_eval_prompts_are_an_error(tiny_model, tmp_path):
    again = {"instruction": FRESH[0]["instruction"].lower(), "output": "y"}
    proc = _cli(tmp_path, "plan", str(_write(tmp_path, tiny_model, TRAIN, [FRESH[0], FRESH[1], again])),
                "--no-validate")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "eval.jsonl: line 3 repeats an earlier prompt (line 3 = line 1" in proc.stderr
    assert "counts twice in the paired test" in proc.stderr


@pytest.mark.parametrize("edit", [
    lambda s: s.replace("function", "funtcion"),                       # a typo
    lambda s: s.replace("Write a short", "Please write a short"),      # a word added
    lambda s: s.rstrip(".") + "?",                                     # punctuation changed
    lambda s: s.replace("short ", ""),                                 # a word dropped
])
def test_planted_near_copies_are_warnings_with_both_lines(tiny_model, tmp_path, edit):
    near = {"instruction": edit(TRAIN[9]["instruction"]), "output": "z"}
    proc = _cli(tmp_path, "plan", str(_write(tmp_path, tiny_model, TRAIN, [FRESH[0], near])), "--no-validate")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "1 eval rows are near-copies of training rows in train.jsonl" in proc.stderr
    assert "line 2 ~ line 10 (prompt" in proc.stderr


def test_allow_overlap_keeps_them_and_says_so(tiny_model, tmp_path):
    copied = {"instruction": TRAIN[2]["instruction"], "output": "x"}
    proc = _cli(tmp_path, "plan", str(_write(tmp_path, tiny_model, TRAIN, [FRESH[0], copied], allow_overlap=True)),
                "--no-validate")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "1 eval rows are also training rows (eval.allow_overlap: true): line 2 ~ line 3 (prompt, 1.00)" in proc.stderr


def test_near_copy_training_rows_are_counted_with_examples(tiny_model, tmp_path):
    twin = dict(TRAIN[7], output=TRAIN[7]["output"].replace("Here is one way", "Here is a way"))
    proc = _cli(tmp_path, "plan", str(_write(tmp_path, tiny_model, TRAIN + [twin], FRESH)), "--no-validate")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"train.jsonl: 1 rows are near-copies of an earlier row (Jaccard >= {NEAR_JACCARD}" in proc.stderr
    assert f"line {len(TRAIN) + 1} ~ line 8 (row" in proc.stderr


def test_distinct_questions_on_one_theme_are_not_near_copies():
    """The threshold's other side, on the recipes' own data: no two different tutoring prompts count as copies."""
    root = Path(__file__).resolve().parents[1] / "recipes" / "data"
    train = [json.loads(line) for line in (root / "python_tutor.jsonl").read_text().splitlines() if line.strip()]
    heldout = [json.loads(line) for line in (root / "python_tutor_eval.jsonl").read_text().splitlines() if line.strip()]
    texts = [Text(i + 1, r["instruction"], r["output"]) for i, r in enumerate(train)]
    ov = find(texts, [Text(i + 1, r["instruction"], r.get("output", "")) for i, r in enumerate(heldout)])
    assert ov.exact == [] and ov.near == [] and ov.repeated_eval == []
    # and the similarity of the closest pair is well below the threshold, not just under it
    closest = max(jaccard(shingles(h["instruction"]), shingles(t["instruction"])) for h in heldout for t in train)
    assert closest < NEAR_JACCARD - 0.1, closest


def test_the_eval_report_gives_the_metrics_without_the_overlapping_prompts():
    """What eval writes beside the verdict when some prompts are copies of training rows: the subset's own rates
    and paired test, computed from the same judged answers (the e2e run covers the case where every prompt is one)."""
    from tutor_wrap.checks.answers import judge
    from tutor_wrap.data.overlap import Overlap, Pair
    from tutor_wrap.recipe.schema import EvalChecks
    from tutor_wrap.runtime.eval_report import overlap_line, render_markdown
    from tutor_wrap.stages.evaluate import _without_overlap

    checks = EvalChecks()
    # base never stops; the tune stops on every prompt but the copied one (line 3), where base and tune tie
    base = [judge("and then", False, (), checks) for _ in range(5)]
    tuned = [judge("ok", line != 3, (), checks) for line in range(1, 6)]
    ov = Overlap(exact=[Pair(3, 12, "prompt", 1.0)], near=[Pair(5, 2, "prompt", 0.81)])
    out = _without_overlap({"base": base, "tuned": tuned}, [1, 2, 3, 4, 5], set(ov.eval_lines), ov, "eos_rate")
    wo = out["without_overlap"]
    assert out["overlap"]["eval_lines"] == [3, 5] and wo["n_prompts"] == 3
    assert wo["tuned"]["eos_rate"] == 1.0 and wo["base"]["eos_rate"] == 0.0
    st = wo["stats"]["tuned_vs_base"]
    assert (st["wins"], st["losses"], st["ties"]) == (3, 0, 0) and st["p_value"] == 0.25   # exact McNemar, 3 of 3
    report = {"recipe": "r", "primary_metric": "eos_rate", "n_prompts": 5, "quant_type": "Q4_K_M", "seed": 0,
              "max_tokens": 8, "arms": ["base", "tuned"], "best_baseline": "base", "stats": {},
              "base": {"eos_rate": 0.0}, "tuned": {"eos_rate": 0.8}, "prompts": [], **out}
    line = overlap_line(report)
    assert line.startswith("2 of 5 held-out prompts overlap the training rows (1 exact, 1 near-copies")
    assert "without them (3 prompts): eos_rate tuned 1.000 vs base (training format) 0.000, 3 better" in line
    assert line in render_markdown(report, None)


def _chat(*turns: str) -> dict:
    return {"messages": [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]}


def test_a_trained_turn_inside_a_longer_conversation_counts(tiny_chat_model, tmp_path):
    """Chat rows: each trained user turn and its answer is a training pair of its own, and an eval row asks its
    last user turn (the turns before it are context)."""
    a1 = "A variable is a name bound to a value; assigning again rebinds the name to the new value."
    train = [_chat("What is a variable in Python?", a1, "And a constant?", "Python has none; write NAMES_IN_CAPS."),
             _chat("How do I check the type of a value?", "Call type(value), or isinstance(value, int) to test it.")]
    cases = {  # eval row -> what must be said
        "first turn of a two-turn row": (_chat("what is a variable in python?", "x"), "the prompt is also"),
        "its answer, the question rephrased": (_chat("Tell me about Python variables, briefly.", a1), "the answer is"),
        "a trained question after new context": (_chat("Hi, I am learning Python today.", "Great, ask away.",
                                                       "How do I check the type of a value?"), "the prompt is also"),
    }
    for name, (row, said) in cases.items():
        (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
        (tmp_path / "eval.jsonl").write_text(json.dumps(_chat("Explain decorators with an example.", "A wrapper."))
                                             + "\n" + json.dumps(row) + "\n")
        recipe = {"name": "ovc", "base_model": str(tiny_chat_model),
                  "dataset": {"path": "train.jsonl", "format": "chat", "chat_template": "chatml"},
                  "train": {"max_steps": 1, "sequence_len": 256}, "ollama": {"model": "ovc"},
                  "eval": {"prompts": "eval.jsonl"}}
        (tmp_path / "r.yml").write_text(yaml.safe_dump(recipe))
        proc = _cli(tmp_path, "plan", "r.yml", "--no-validate")
        assert proc.returncode == 1 and f"eval.jsonl: line 2: {said}" in proc.stderr, (name, proc.stderr[-1500:])


def test_short_or_shared_answers_are_not_leaks(tiny_model, tmp_path):
    """"The answer is: 7" under different questions (math data), and one boilerplate answer many rows share."""
    train = [{"instruction": f"What is {a} + {b}?", "input": "", "output": f"The answer is: {a + b}"}
             for a in range(1, 8) for b in range(1, 8)]
    boiler = "Thanks for asking! Please see the official Python documentation for the details of this topic."
    train += [{"instruction": f"Where can I read about {t}?", "input": "", "output": boiler} for t in TOPICS[:6]]
    heldout = [{"instruction": "Tom has 3 apples and buys 4 more. How many now?", "output": "The answer is: 7"},
               {"instruction": "Where do I learn about asyncio?", "output": boiler}]
    proc = _cli(tmp_path, "plan", str(_write(tmp_path, tiny_model, train, heldout)), "--no-validate")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "near-copies of an earlier row" not in proc.stderr    # different questions, one shared answer


def test_a_row_repeated_with_other_case_or_spacing_is_a_near_copy(tiny_model, tmp_path):
    twin = dict(TRAIN[2], instruction=TRAIN[2]["instruction"].upper().replace(" ", "  "))
    proc = _cli(tmp_path, "plan", str(_write(tmp_path, tiny_model, TRAIN + [twin], FRESH)), "--no-validate")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"line {len(TRAIN) + 1} ~ line 3 (row, 1.00)" in proc.stderr


def test_preflight_says_what_plan_says_about_an_eval_prompt_past_the_context(tiny_model, tmp_path):
    long = {"instruction": "Summarize: " + " ".join(f"w{i}" for i in range(600)), "output": "short"}
    recipe = _write(tmp_path, tiny_model, TRAIN, [FRESH[0], long])
    said = {cmd: _cli(tmp_path, *args) for cmd, args in (("plan", ("plan", str(recipe), "--no-validate")),
                                                         ("preflight", ("preflight", str(recipe))))}
    for cmd, proc in said.items():
        assert proc.returncode == 1 and "eval.jsonl: line 2" in proc.stderr and "context" in proc.stderr, \
            (cmd, proc.stderr[-1500:])
