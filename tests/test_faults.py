"""Fault matrix: SIGKILL `run` inside each stage in turn; the next `run` finishes with valid artifacts."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_e2e import STAGES, make_recipe

from tutor_wrap.backends import llamacpp, modelfile

pytestmark = pytest.mark.e2e


def _status(manifest: Path) -> dict:
    try:
        return {k: v.get("status") for k, v in json.loads(manifest.read_text())["stages"].items()}
    except (OSError, ValueError, KeyError):
        return {}


def test_sigkill_in_each_stage_then_run_completes(tiny_model, tmp_path):
    recipe = make_recipe(tmp_path, tiny_model)
    run = tmp_path / "run"
    args = [sys.executable, "-m", "tutor_wrap", "run", str(recipe), "--run-dir", str(run)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    killed_in = []
    for i, stage in enumerate(STAGES):
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        deadline = time.time() + 900
        while time.time() < deadline and proc.poll() is None:
            # Kill in this stage, or in a later one if this one was too quick to be seen.
            running = [s for s in STAGES[i:] if _status(run / "manifest.json").get(s) == "running"]
            if running:
                proc.send_signal(signal.SIGKILL)
                killed_in.append(running[0])
                break
            time.sleep(0.002)
        proc.wait()
    # The fast stages (deploy takes milliseconds) may finish before a poll sees them; the slow ones never do.
    assert {"plan", "train", "merge", "export", "eval"} <= set(killed_in), killed_in
    assert _status(run / "manifest.json")["eval"] != "done"

    final = subprocess.run(args, capture_output=True, text=True, env=env, timeout=1800)
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
    m = json.loads((run / "manifest.json").read_text())
    assert all(m["stages"][s]["status"] == "done" for s in STAGES)
    # Nothing half-written under a final name, no leftovers beside them.
    assert not list(run.rglob("*.partial")) and not list(run.rglob(".*.work"))
    q4 = run / m["stages"]["export"]["artifacts"]["gguf_Q4_K_M"]
    assert llamacpp.metadata(q4)["file_type"] == 15
    modelfile.validate((run / "deploy/Modelfile").read_text(), run / "deploy")
    assert json.loads((run / "eval/report.json").read_text())["n_prompts"] == 4
