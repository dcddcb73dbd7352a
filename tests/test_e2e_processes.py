"""Several training processes on one machine, for real: `run --num-processes 2` on the CPU trains the tiny model
with two ranks through accelerate (torchrun) and gloo, survives a SIGKILL mid-training by resuming with the same
two processes, and the rest of the pipeline takes the one adapter it saved."""

import json
import os
import subprocess
import sys

import pytest

from test_e2e import EVAL
from test_train_recovery import kill_after_checkpoint, long_rows, write_recipe

STEPS, SAVE_EVERY, ROWS, MICRO = 40, 10, 32, 2

# The planner refuses more training processes than CPUs this process may use (a 1-CPU container, taskset).
pytestmark = [pytest.mark.e2e, pytest.mark.skipif(hasattr(os, "sched_getaffinity") and len(os.sched_getaffinity(0)) < 2,
                                reason="two training processes need two usable CPUs")]

# A person's `accelerate config` from another project: one GPU id with multi-GPU. accelerate launch reads it from
# $HF_HOME/accelerate/default_config.yaml when it is given no --config_file, and then refuses a 2-process launch.
FOREIGN_ACCELERATE_DEFAULT = "compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\ngpu_ids: '0'\nnum_processes: 1\n"


def foreign_hf_home(tmp):
    home = tmp / "hf-home"
    (home / "accelerate").mkdir(parents=True)
    (home / "accelerate/default_config.yaml").write_text(FOREIGN_ACCELERATE_DEFAULT)
    return home


def _metrics(run_dir):
    path = run_dir / "train/metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


@pytest.fixture(scope="module")
def two_process_run(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e-procs")
    (tmp / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in EVAL[:3]))
    recipe = write_recipe(tmp, tiny_model, long_rows(ROWS),
                          {"max_steps": STEPS, "batch_size": 4, "micro_batch_size": MICRO, "save_steps": SAVE_EVERY},
                          export={"quant_types": ["Q8_0"]},
                          eval={"prompts": "eval.jsonl", "max_tokens": 8, "primary_metric": "eos_rate"})
    run_dir = tmp / "run"
    args = [sys.executable, "-m", "tutor_wrap", "run", str(recipe), "--run-dir", str(run_dir), "--num-processes", "2"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HOME", str(foreign_hf_home(tmp)))   # the plan's launch must not take it
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
        kill_after_checkpoint([*args, "--until", "train"], run_dir, SAVE_EVERY, ranks=2)
        killed_at = max(r["step"] for r in _metrics(run_dir) if r.get("event") == "log")
        second = subprocess.run(args, capture_output=True, text=True, timeout=1800, env=env)
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    return run_dir, killed_at, second


def test_the_foreign_accelerate_default_would_break_a_bare_launch(tmp_path):
    """The fixture's foreign default config bites a launch without --config_file: the run above trained through
    it because tutor_wrap launches with its own accelerate config."""
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines",
                           "1", "--multi_gpu", "-m", "json.tool", "--help"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HOME": str(foreign_hf_home(tmp_path))})
    assert proc.returncode != 0 and "Less than two GPU ids" in proc.stderr, proc.stderr[-2000:]


def test_the_plan_launches_two_cpu_processes(two_process_run):
    run_dir, _, _ = two_process_run
    plan = json.loads((run_dir / "plan.json").read_text())["plan"]
    assert plan["num_processes"] == 2 and plan["cpu_threads"] >= 1
    # the recipe's batch of 4 = micro-batch 2 x 2 processes: no accumulation left
    assert plan["gradient_accumulation_steps"] == 1
    log = (run_dir / "train/train.log").read_text()
    assert "--num_processes 2" in log and "--multi_gpu" in log
    assert f"--config_file {run_dir / 'train/accelerate.yml'}" in log
    # Axolotl's resolved config, as each rank printed it: the plan's loader setting reached both ranks (Axolotl's own
    # default would be one loader process per rank, forked from it)
    assert log.count('"dataloader_num_workers": 0,') >= 2 and '"dataloader_num_workers": 2' not in log


def test_the_ranks_share_the_rows_and_hold_the_same_weights(two_process_run):
    run_dir, _, _ = two_process_run
    rows = _metrics(run_dir)
    begins = [r for r in rows if r.get("event") == "begin"]
    assert begins and all(b["world_size"] == 2 for b in begins)
    # gradients averaged: both ranks' trainable weights hashed equal after the first step of each launch and at the end
    ranks = [r for r in rows if r.get("event") == "ranks"]
    assert len(ranks) >= 3 and all(r["in_sync"] and len(set(r["digests"])) == 1 and len(r["digests"]) == 2
                                   and r["backend"] == "gloo" for r in ranks)
    # each rank reads half of the rows: an epoch is ROWS / (MICRO x 2) optimizer steps, not ROWS / MICRO
    last = max((r for r in rows if r.get("event") == "log" and "epoch" in r and "loss" in r), key=lambda r: r["step"])
    assert last["epoch"] == pytest.approx(last["step"] * MICRO * 2 / ROWS, rel=0.01)
    info = json.loads((run_dir / "manifest.json").read_text())["stages"]["train"]["info"]
    assert info["processes"] == 2 and info["ranks_in_sync_at"][-1] == STEPS


def test_metrics_are_written_once_and_the_adapter_saved_once(two_process_run):
    run_dir, killed_at, _ = two_process_run
    rows = _metrics(run_dir)
    resume = max(i for i, r in enumerate(rows) if r.get("event") == "begin")
    for part in (rows[:resume], rows[resume:]):   # a resume logs the steps after its checkpoint again
        steps = [r["step"] for r in part if r.get("event") == "log" and "loss" in r]
        assert len(steps) == len(set(steps)), "a step was logged by more than one rank"
    out = run_dir / "train/out"
    found = sorted(str(p.relative_to(out)) for p in out.rglob("*.safetensors"))
    assert found == sorted(["adapter_model.safetensors"]
                           + [f"{c.name}/adapter_model.safetensors" for c in out.glob("checkpoint-*")])


def test_a_sigkill_resumes_with_the_same_two_processes(two_process_run):
    run_dir, killed_at, _ = two_process_run
    log = (run_dir / "train/train.log").read_text()
    assert "[tutor_wrap] resuming from checkpoint-" in log
    begin = [r for r in _metrics(run_dir) if r.get("event") == "begin"][-1]
    assert begin["world_size"] == 2 and SAVE_EVERY <= begin["resumed_from_step"] <= killed_at
    # a checkpoint holds both ranks' random states, so each rank's data order goes on where it stopped
    for ckpt in (run_dir / "train/out").glob("checkpoint-*"):
        assert {p.name for p in ckpt.glob("rng_state*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}
    info = json.loads((run_dir / "manifest.json").read_text())["stages"]["train"]["info"]
    assert info["steps"] == STEPS and info["resumed_from"] == f"checkpoint-{begin['resumed_from_step']}"


def test_the_pipeline_goes_on_from_the_two_process_adapter(two_process_run):
    run_dir, _, _ = two_process_run
    m = json.loads((run_dir / "manifest.json").read_text())
    assert all(m["stages"][s]["status"] == "done" for s in ("merge", "export", "deploy", "eval"))
    assert json.loads((run_dir / "merge/report.json").read_text())["verification"]["status"] == "passed"
