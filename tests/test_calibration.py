"""What this machine measured, kept and used (planning/calibration.py): a real merge records its peak beside the
prediction, the store survives concurrent writers, plans for a hardware profile never use this machine's numbers,
and the `calibration` command shows and resets it. How much closer the predictions get is bench/calibration.py's."""

import json
import multiprocessing
import os
import subprocess
import sys

import pytest

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
