"""What this machine measured, kept and used (planning/calibration.py): a real merge records its peak beside the
prediction, the store survives concurrent writers, plans for a hardware profile never use this machine's numbers,
and the `calibration` command shows and resets it. How much closer the predictions get is bench/calibration.py's."""

import json
import multiprocessing
import os
import subprocess
import sys

import pytest

from tutor_wrap.core.errors import TutorWrapError
from tutor_wrap.machine.profiles import load_profile
from tutor_wrap.planning import budgets, calibration

pytestmark = pytest.mark.tools


def _cli(*args: str, store) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tutor_wrap", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TUTOR_WRAP_CALIBRATION": str(store), "CUDA_VISIBLE_DEVICES": ""})


@pytest.mark.e2e   # two merges through the CLI
def test_a_merge_records_its_peak_and_the_next_prediction_says_where_it_comes_from(tiny_model, tmp_path):
    from test_merge import make_adapter

    store = tmp_path / "store.json"
    adapter = make_adapter(tiny_model, tmp_path / "adapter")
    proc = _cli("merge", "--base", str(tiny_model), "--adapter", str(adapter), "--out", str(tmp_path / "m"), "--json",
                "--no-verify", store=store)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert "published constants" in report["basis"]
    recs = json.loads(store.read_text())["records"]
    assert len(recs) == 1 and recs[0]["kind"] == "merge" and recs[0]["method"] == "memory_efficient"
    assert recs[0]["measured_bytes"] == report["measured_peak_rss_bytes"]
    assert recs[0]["predicted_bytes"] == report["predicted_peak_rss_bytes"]
    # the next merge here is predicted from it, and says so
    proc = _cli("merge", "--base", str(tiny_model), "--adapter", str(adapter), "--out", str(tmp_path / "m2"),
                "--json", "--no-verify", store=store)
    again = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert again["basis"].startswith("measured on this machine in ") and str(tmp_path / "m") in again["basis"]
    shown = _cli("calibration", "--json", store=store)
    assert shown.returncode == 0 and len(json.loads(shown.stdout)["records"]) == 2
    assert "forgot 2 measurements" in _cli("calibration", "--reset", store=store).stdout
    assert json.loads(store.read_text())["records"] == []


def test_a_plan_for_another_machine_uses_no_measurement_from_this_one(monkeypatch, tmp_path):
    monkeypatch.setenv("TUTOR_WRAP_CALIBRATION", str(tmp_path / "store.json"))
    profile = load_profile("rtx3060-12gb")
    before = budgets.predict_sizes([5 * 10**9], 10**8, profile, "memory_efficient")
    # records of every machine key there is: a profile has none of its own
    store = {"records": [{"machine": "x", "kind": "merge", "method": "memory_efficient", "run": "r", "time": "t",
                          "predicted_bytes": 10**10, "measured_bytes": 10**9, "model_part_bytes": 9 * 10**9}]}
    (tmp_path / "store.json").write_text(json.dumps(store))
    after = budgets.predict_sizes([5 * 10**9], 10**8, profile, "memory_efficient")
    assert calibration.machine_key(profile) is None and after == before


def _record_many(args):
    store, n = args
    os.environ["TUTOR_WRAP_CALIBRATION"] = store
    from tutor_wrap.machine.probe import probe

    hw = probe()
    for i in range(n):
        calibration.record(hw, "merge", f"run-{os.getpid()}-{i}", 100, 90, method="legacy", model_part_bytes=1)


def test_concurrent_runs_all_land(tmp_path):
    store = str(tmp_path / "store.json")
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        pool.map(_record_many, [(store, 25), (store, 25)])
    recs = json.loads((tmp_path / "store.json").read_text())["records"]
    assert len(recs) == 50 and len({r["run"] for r in recs}) == 50


def _train_record(hw, run: str, part: int, measured: int, dtype: str = "fp32", fixed: int = 0) -> dict:
    return {"machine": calibration.machine_key(hw), "kind": "train-cpu", "run": run, "time": "t", "method": "lora",
            "dtype": dtype, "predicted_bytes": measured, "measured_bytes": measured, "model_part_bytes": part,
            "fixed_bytes": fixed}


def test_a_fit_reproduces_the_runs_it_comes_from_and_uses_only_matching_knobs(monkeypatch, tmp_path):
    """Runtime from the run with the smallest model part, factor from the one with the largest: the fitted line
    passes through both measurements; a run with other knobs (dtype) is not used."""
    from tutor_wrap.machine.probe import probe

    store = tmp_path / "store.json"
    monkeypatch.setenv("TUTOR_WRAP_CALIBRATION", str(store))
    hw = probe()
    # (scaled part, measured, fixed part)
    small, large = (12 * 2**20, 950 * 2**20, 8 * 2**20), (3 * 2**30, 3900 * 2**20, 600 * 2**20)
    recs = [_train_record(hw, "run-small", *small[:2], fixed=small[2]),
            _train_record(hw, "run-large", *large[:2], fixed=large[2]),
            _train_record(hw, "run-bf16", 2**30, 9 * 2**30, dtype="bf16")]
    store.write_text(json.dumps({"records": recs}))
    published_factor = 1.3
    fit = calibration.fit(hw, "train-cpu", 2**30, published_factor, method="lora", dtype="fp32")
    # the small run's tiny scaled part is taken at the published factor; the large run sets the factor
    part, measured, fixed = small
    assert fit.runtime_bytes + fixed + published_factor * part == pytest.approx(measured, abs=1)
    part, measured, fixed = large
    assert fit.runtime_bytes + fixed + fit.factor * part == pytest.approx(measured, rel=1e-3)
    assert "run-large" in fit.basis and "run-small" in fit.basis and "run-bf16" not in fit.basis
    assert calibration.fit(hw, "train-cpu", 2**30, method="qlora", dtype="fp32") is None


def test_a_cpu_plan_predicts_training_ram_and_preflight_refuses_what_does_not_fit(monkeypatch, tmp_path, tiny_model):
    """A CPU plan carries a peak-RSS prediction; this machine's measured runtime floor replaces the published one
    (and the plan says so); preflight's train verdict weighs it against the RAM available, with the knobs to turn."""
    from dataclasses import replace

    from tutor_wrap.machine.probe import probe
    from tutor_wrap.planning.planner import CPU_TRAIN_RUNTIME_BYTES, make_plan
    from tutor_wrap.planning.preflight import train_verdict
    from tutor_wrap.recipe.load import load_recipe

    store = tmp_path / "store.json"
    monkeypatch.setenv("TUTOR_WRAP_CALIBRATION", str(store))
    recipe = load_recipe(_tiny_recipe(tmp_path, tiny_model))
    hw = replace(probe(), gpus=[])
    plan = make_plan(recipe, hw)
    published = plan.ram
    assert published["runtime_bytes"] == CPU_TRAIN_RUNTIME_BYTES and "published" in published["basis"]
    # a run of a tiny configuration here measured the floor (its model parts are small)
    floor = 700 * 2**20
    store.write_text(json.dumps({"records": [_train_record(hw, "run-a", 0, floor + 2**20, plan.dtype, fixed=2**20)]}))
    mine = make_plan(recipe, hw).ram
    assert mine["runtime_bytes"] == floor and "run-a" in mine["basis"]
    # the prediction moves by exactly what the measured floor differs from the published one
    assert mine["per_process_bytes"] - published["per_process_bytes"] == floor - CPU_TRAIN_RUNTIME_BYTES
    assert train_verdict(recipe, hw).verdict == "fits"
    # less RAM than the recipe's micro-batch needs: plan and preflight refuse alike, naming the knobs
    from tutor_wrap.planning.planner import cpu_train_ram

    one = cpu_train_ram(recipe, hw, plan.method, plan.dtype, 1 * plan.sequence_len)["per_process_bytes"]
    short = replace(hw, ram_available_bytes=(one + mine["per_process_bytes"]) // 2)
    with pytest.raises(TutorWrapError, match="CPU training at micro-batch 4 .* of RAM") as refused:
        make_plan(recipe, short)
    assert "train.micro_batch_size" in refused.value.hint and "train.sequence_len" in refused.value.hint
    v = train_verdict(recipe, short)
    assert v.verdict == "won't fit" and "micro-batch 4" in v.why and "train.micro_batch_size" in v.remedy
    # without a micro-batch in the recipe the plan lowers its own until the prediction fits, and says so
    free = recipe.model_copy(update={"train": recipe.train.model_copy(update={"micro_batch_size": None})})
    lowered = make_plan(free, short)
    assert lowered.micro_batch_size < 4 and lowered.ram["per_process_bytes"] <= short.ram_available_bytes
    assert any(c.knob == "micro_batch_size" and "lowered from 4" in c.reason for c in lowered.choices)


def test_a_gpu_runs_measurement_scales_the_next_plan_and_an_out_of_memory_lowers_trust(monkeypatch, tmp_path):
    """No GPU here, so the card is a profile's (an RTX 4090, then the reference user's 3060) on this machine's probe, and the
    measurements are records as the train stage writes them: a finished run's measured/predicted reserved peak
    scales the memory model's figure (bounded), an out-of-memory at a predicted X on a card with C usable raises it
    to at least C / X, the plan says so, and preflight's need is the scaled figure."""
    from dataclasses import replace

    from tutor_wrap.machine.probe import probe
    from tutor_wrap.planning.planner import make_plan
    from tutor_wrap.planning.preflight import train_verdict
    from test_planner import recipe_for_planning, REPO

    store = tmp_path / "store.json"
    monkeypatch.setenv("TUTOR_WRAP_CALIBRATION", str(store))
    def machine(profile: str):
        card = load_profile(profile)
        return replace(probe(), gpus=card.gpus, packages={**probe().packages, **card.packages})

    hw = machine("rtx4090-24gb")
    recipe = recipe_for_planning(REPO / "recipes" / "python-tutor-llama3-8b-rtx3060.yml")
    untrusted = make_plan(recipe, hw)
    assert calibration.gpu_trust(hw, untrusted.method) is None and untrusted.memory["trust"] == 1.0

    def rec(run, predicted, measured, outcome, on=None):
        return {"machine": calibration.machine_key(on or hw), "kind": "train-gpu", "run": run, "time": "t",
                "method": untrusted.method, "predicted_bytes": predicted, "measured_bytes": measured,
                "outcome": outcome}

    g = 2**30
    store.write_text(json.dumps({"records": [rec("run-ok", 10 * g, 11 * g, "ok")]}))
    assert calibration.gpu_trust(hw, untrusted.method)[0] == 1.1
    store.write_text(json.dumps({"records": [rec("run-ok", 10 * g, 40 * g, "ok")]}))
    assert calibration.gpu_trust(hw, untrusted.method)[0] == calibration.TRUST_BOUNDS[1]
    store.write_text(json.dumps({"records": [rec("run-ok", 10 * g, 9 * g, "ok"), rec("run-oom", 10 * g, 13 * g, "oom")]}))
    trust, why = calibration.gpu_trust(hw, untrusted.method)
    assert trust == 1.3 and "out of memory at a predicted 10.0 GiB in run-oom" in why
    trusted = make_plan(recipe, hw)
    assert trusted.memory["trust"] == 1.3
    assert any(c.knob == "memory_trust" and "run-oom" in c.reason for c in trusted.choices)
    # what it chose fits the card once scaled, and is no larger than what the model alone would have chosen
    assert trusted.memory["trusted_total_gib"] <= trusted.budget_gib
    assert trusted.memory["total_gib"] < untrusted.memory["total_gib"]
    v = train_verdict(recipe, hw)
    assert v.needs_bytes == int(trusted.memory["trusted_total_gib"] * 2**30)
    # the reference user's 3060, where the seed plan (QLoRA, micro-batch 1, checkpointing) is the smallest there
    # is: 10% more than the model predicted and nothing fits any more; the refusal says why
    small = machine("rtx3060-12gb")
    store.write_text(json.dumps({"records": [rec("run-oom", 10 * g, 11 * g, "oom", on=small)]}))
    with pytest.raises(TutorWrapError, match=r"x 1\.1: out of memory at a predicted 10\.0 GiB in run-oom"):
        make_plan(recipe, small)


def _tiny_recipe(tmp_path, tiny_model):
    recipe_path = tmp_path / "r.yml"
    recipe_path.write_text(f"name: r\nbase_model: {tiny_model}\ndataset: {{path: d.jsonl, format: alpaca}}\n"
                           "method: lora\ntrain: {sequence_len: 256, micro_batch_size: 4, batch_size: 4}\n"
                           "ollama: {model: r}\n")
    (tmp_path / "d.jsonl").write_text('{"instruction": "hi", "output": "hello"}\n')
    return recipe_path


def test_a_damaged_store_is_said_not_used_and_reset_repairs_it(tmp_path, tiny_model):
    store = tmp_path / "store.json"
    store.write_text('{"records": ["x", {"machine": "m"}]}')
    shown = _cli("calibration", store=store)
    assert shown.returncode == 1 and "damaged" in shown.stderr and "--reset" in shown.stderr
    assert "Traceback" not in shown.stderr
    # a plan reads past it (a cache must not stop a plan): the published constants
    planned = _cli("plan", str(_tiny_recipe(tmp_path, tiny_model)), "--no-validate", "--json", store=store)
    assert planned.returncode == 0, planned.stderr
    assert "published" in json.loads(planned.stdout[planned.stdout.index("{"):])["plan"]["ram"]["basis"]
    reset = _cli("calibration", "--reset", "--json", store=store)
    assert reset.returncode == 0 and json.loads(reset.stdout)["forgot"] == 0 and json.loads(reset.stdout)["was_damaged"]
    assert _cli("calibration", store=store).returncode == 0
    empty = _cli("calibration", "--reset", store="")
    assert empty.returncode == 1 and "TUTOR_WRAP_CALIBRATION is set but empty" in empty.stderr
