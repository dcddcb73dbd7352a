"""Bad input, end to end through the CLI: one clear error naming the file/line/key and the fix, exit 1, no
traceback, and nothing already finished in the run directory changed."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

GOOD_ROW = {"instruction": "Explain lists.", "input": "", "output": "A list holds items.\n\n```python\nx = [1]\n```"}


def base_recipe(model: Path) -> dict:
    return {"name": "bad", "base_model": str(model), "dataset": {"path": "data.jsonl"},
            "train": {"max_steps": 1, "sequence_len": 256}, "ollama": {"model": "bad"}}


def edit(d: dict, dotted: str, value) -> dict:
    d = json.loads(json.dumps(d))
    keys = dotted.split(".")
    cur = d
    for k in keys[:-1]:
        cur = cur.setdefault(k, {})
    cur[keys[-1]] = value
    return d


def not_a_model(tmp: Path) -> str:
    (tmp / "empty-model").mkdir()
    return str(tmp / "empty-model")


def pickled_model(tmp: Path, model: Path) -> str:
    d = tmp / "pickled"
    d.mkdir()
    (d / "config.json").write_text((model / "config.json").read_text())
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    return str(d)


# (id, recipe text or a function of the good recipe dict, dataset bytes, expected text in the error)
CASES = [
    ("malformed-yaml", lambda r, t, m: "name: bad\nbase_model: x\n  dataset: [\n", None, "recipe.yml:3"),
    ("empty-recipe", lambda r, t, m: "", None, "the recipe is empty"),
    ("not-a-mapping", lambda r, t, m: "- just\n- a list\n", None, "must be a mapping"),
    ("unknown-key", lambda r, t, m: {**r, "sequence_length": 5}, None, "did you mean"),
    ("wrong-type", lambda r, t, m: edit(r, "train.sequence_len", "long"), None, "train.sequence_len"),
    ("out-of-range", lambda r, t, m: edit(r, "train.learning_rate", 3), None, "train.learning_rate"),
    ("unknown-quant", lambda r, t, m: edit(r, "export.quant_types", ["Q4_K_X"]), None, "unknown quant type"),
    ("bad-ollama-name", lambda r, t, m: edit(r, "ollama.model", "My Model"), None, "not a valid Ollama model name"),
    ("dataset-missing", lambda r, t, m: edit(r, "dataset.path", "nope.jsonl"), None, "does not exist"),
    ("dataset-empty", lambda r, t, m: r, b"", "the dataset is empty"),
    ("not-jsonl", lambda r, t, m: r, b'{"instruction": "a", "output": "b"}\nnot json\n', "line 2 is not valid JSON"),
    ("missing-output", lambda r, t, m: r, b'{"instruction": "a"}\n', "missing or empty 'output'"),
    ("not-utf8", lambda r, t, m: r, b'{"instruction": "caf\xe9", "output": "b"}\n', "not UTF-8"),
    ("rows-too-long", lambda r, t, m: edit(r, "train.sequence_len", 16), None, "every row is longer than sequence_len"),
    ("base-missing", lambda r, t, m: edit(r, "base_model", str(t / "no-model")), None, "is not a directory"),
    ("base-not-a-model", lambda r, t, m: edit(r, "base_model", not_a_model(t)), None, "no config.json"),
    ("pickled-weights", lambda r, t, m: edit(r, "base_model", pickled_model(t, m)), None, "allow_pickle_weights"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_clear_error(case, tiny_model, tmp_path):
    _, make, data, expected = case
    recipe = make(base_recipe(tiny_model), tmp_path, tiny_model)
    (tmp_path / "recipe.yml").write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe))
    (tmp_path / "data.jsonl").write_bytes(data if data is not None else (json.dumps(GOOD_ROW) + "\n").encode())
    run = tmp_path / "run"
    run.mkdir()
    finished = run / "axolotl.yml"
    finished.write_text("# a finished artifact from an earlier good run\n")
    proc = subprocess.run([sys.executable, "-m", "tutor_wrap", "run", str(tmp_path / "recipe.yml"), "--run-dir", str(run)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and expected in proc.stderr, proc.stderr[-2000:]
    assert "fix:" in proc.stderr or "(got" in proc.stderr or "line" in proc.stderr
    assert finished.read_text() == "# a finished artifact from an earlier good run\n"
