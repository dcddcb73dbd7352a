"""The data report the plan stage writes: rows and tokens as training will read them, what sequence_len drops,
steps and tokens per epoch, a histogram, for alpaca and chat rows."""

import json
import math
import subprocess
import sys

import pytest
import yaml

pytestmark = pytest.mark.e2e   # the CLI through the plan stage

SHORT = [{"instruction": f"Name a Python builtin number {i}.", "input": "", "output": "len"} for i in range(10)]
LONG = [{"instruction": "Repeat this: " + " ".join(f"word{j}" for j in range(300)), "input": "", "output": "ok"}
        for _ in range(3)]


def test_plan_writes_the_data_report(tiny_model, tmp_path):
    rows = SHORT[:5] + LONG + SHORT[5:]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {"name": "dr", "base_model": str(tiny_model), "dataset": {"path": "train.jsonl"},
              "train": {"epochs": 2, "sequence_len": 128, "batch_size": 2, "micro_batch_size": 2},
              "ollama": {"model": "dr"}}
    (tmp_path / "r.yml").write_text(yaml.safe_dump(recipe))
    proc = subprocess.run([sys.executable, "-m", "tutor_wrap", "run", "r.yml", "--until", "plan", "--run-dir", "run"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((tmp_path / "run/plan/data.json").read_text())
    assert s["rows"] == 13 and s["rows_over_sequence_len"] == 3 and s["rows_dropped"] == 3
    assert s["tokens_max"] > 128 > s["tokens_min"]
    # what trains: the ten short rows, in steps of two rows (no packing planned on a CPU), twice
    assert s["training_tokens_per_epoch"] <= s["tokens"] - 3 * 129   # the three long rows do not train
    assert s["rows_per_step"] == 2 and s["steps_per_epoch"] == math.ceil(10 / 2) and s["steps"] == 10
    assert (tmp_path / "run/plan/lengths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (tmp_path / "run/plan/data.html").read_text()
    assert "data:image/png;base64," in page and "rows_dropped" in page
    said = " ".join(proc.stdout.split())    # the terminal line, as Rich wrapped it
    assert "data: 13 rows" in said and "3 longer than sequence_len 128 dropped" in said
    m = json.loads((tmp_path / "run/manifest.json").read_text())
    assert m["stages"]["plan"]["artifacts"]["data_html"] == "plan/data.html"
