"""`runs` and `compare` on two real tiny runs that differ in their learning rate (tutor_wrap/compare.py): the listing,
what differs, and the paired test between the two fine-tuned models, recounted here from the eval reports."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from test_e2e import make_recipe, run_cli

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def two_runs(tiny_model, tmp_path_factory):
    """`good` learns to answer and stop; `weak` takes two steps at a learning rate too small to change anything."""
    tmp = tmp_path_factory.mktemp("compare")
    for name, lr, steps in (("good", 0.01, 12), ("weak", 1e-6, 2)):
        d = tmp / name
        d.mkdir()
        recipe = make_recipe(d, tiny_model)
        r = yaml.safe_load(recipe.read_text())
        r["name"], r["ollama"]["model"] = f"tiny-{name}", f"tiny-{name}"
        r["train"].update(learning_rate=lr, max_steps=steps, save_steps=steps)
        recipe.write_text(yaml.safe_dump(r))
        proc = run_cli("run", str(recipe), "--run-dir", str(tmp / "runs" / name), cwd=d)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp / "runs"


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tutor_wrap", *args], capture_output=True, text=True, timeout=300)


def _report(run: Path) -> dict:
    return json.loads((run / "eval/report.json").read_text())


def test_runs_lists_each_run_with_its_stages_and_primary_metric(two_runs):
    proc = cli("runs", str(two_runs), "--json")
    assert proc.returncode == 0, proc.stderr
    rows = {Path(r["path"]).name: r for r in json.loads(proc.stdout)}
    assert set(rows) == {"good", "weak"}
    for name, row in rows.items():
        report = _report(two_runs / name)
        assert all(s["status"] == "done" for s in row["stages"].values()), row["stages"]
        assert row["primary"] == ["eos_rate", report["tuned"]["eos_rate"], report[report["best_baseline"]]["eos_rate"]]
    shown = cli("runs", str(two_runs))
    assert shown.returncode == 0 and "tiny-good" in shown.stdout and "all done" in shown.stdout


def test_compare_names_what_differs_and_pairs_the_fine_tuned_models(two_runs, tmp_path):
    good, weak = two_runs / "good", two_runs / "weak"
    proc = cli("compare", str(good), str(weak), "--out", str(tmp_path / "cmp"), "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    diff = {d["key"]: d["values"] for d in out["differences"]}
    assert diff["learning_rate"] == ["0.01", "1e-06"] and diff["max_steps"] == ["12", "2"]
    (p,) = out["paired"]
    # recounted from the two reports: the tuned answers' own `eos` verdicts, prompt by prompt
    a = {row["instruction"]: row["tuned"]["eos"] for row in _report(good)["prompts"]}
    b = {row["instruction"]: row["tuned"]["eos"] for row in _report(weak)["prompts"]}
    assert p["shared_prompts"] == len(a) == len(b)
    assert (p["wins"], p["losses"]) == (sum(b[k] and not a[k] for k in a), sum(a[k] and not b[k] for k in a))
    assert p["wins"] + p["losses"] + p["ties"] == len(a)
    assert p["losses"] > 0, "the weak run should stop less often than the good one"
    page = (tmp_path / "cmp" / "compare.html").read_text()
    assert "McNemar" in page and 'src="data:image/png;base64,' in page and "tiny-weak" in page
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text())["paired"] == out["paired"]
    shown = cli("compare", str(good), str(weak), "--out", str(tmp_path / "cmp2"))
    assert shown.returncode == 0 and "learning_rate" in shown.stdout and "page:" in shown.stdout


def test_compare_refuses_what_cannot_be_compared(two_runs, tmp_path):
    good, weak = two_runs / "good", two_runs / "weak"
    # another quant type: the answers come from a different model file
    other = tmp_path / "weak-q8"
    shutil.copytree(weak, other)
    report = _report(other)
    report["quant_type"] = "Q8_0"
    (other / "eval/report.json").write_text(json.dumps(report))
    for args, says in (([str(good), str(other)], "different quant_type (Q4_K_M and Q8_0)"),
                       ([str(good), str(tmp_path)], "is not a run dir"),
                       ([str(good), str(good) + "/"], "is the same run dir as")):
        proc = cli("compare", *args, "--out", str(tmp_path / "never"))
        assert proc.returncode == 1 and says in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr)
    one = cli("compare", str(good), "--out", str(tmp_path / "never"))      # an argument error, as argparse's are
    assert one.returncode == 2 and "two or more run dirs" in one.stderr
    assert not (tmp_path / "never").exists()


def _copy(run: Path, to: Path) -> Path:
    shutil.copytree(run, to, ignore=shutil.ignore_patterns("*.gguf", "model", "out", "prepared"))
    return to


def test_damaged_run_files_are_named_not_tracebacks(two_runs, tmp_path):
    good = two_runs / "good"
    folder = tmp_path / "runs"
    folder.mkdir()
    _copy(good, folder / "fine")
    (_copy(good, folder / "listy") / "manifest.json").write_text("[1]")
    listed = cli("runs", str(folder), "--json")
    assert listed.returncode == 0, listed.stderr
    rows = {Path(r["path"]).name: r for r in json.loads(listed.stdout)}
    assert rows["fine"]["stages"]["eval"]["status"] == "done"      # one damaged run does not hide the others
    assert rows["listy"]["stages"] is None and "not a manifest tutor_wrap wrote" in rows["listy"]["notes"][0]
    for name, damage, says in (("report", ("eval/report.json", "{"), "report.json: not valid JSON"),
                               ("yaml", ("axolotl.yml", "a: [\n"), "axolotl.yml: not valid YAML"),
                               ("shape", ("eval/report.json", "[]"), "not an eval report tutor_wrap wrote")):
        bad = _copy(good, tmp_path / name)
        (bad / damage[0]).write_text(damage[1])
        proc = cli("compare", str(good), str(bad), "--out", str(tmp_path / f"out-{name}"))
        assert proc.returncode == 1 and says in proc.stderr and "Traceback" not in proc.stderr, (name, proc.stderr)


def test_the_page_goes_beside_the_runs_never_into_one(two_runs, tmp_path):
    good, weak = _copy(two_runs / "good", tmp_path / "good"), _copy(two_runs / "weak", tmp_path / "weak")
    before = sorted(p.relative_to(good) for p in good.rglob("*"))
    for inside in (good, good / "train", weak / "eval" / "new"):
        proc = cli("compare", str(good), str(weak), "--out", str(inside))
        assert proc.returncode == 1 and "inside the run dir" in proc.stderr, proc.stderr
    assert sorted(p.relative_to(good) for p in good.rglob("*")) == before
    # started from inside a run dir, the default is still beside the runs
    proc = subprocess.run([sys.executable, "-m", "tutor_wrap", "compare", ".", "../weak"], cwd=good,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "compare-good-vs-weak" / "compare.html").is_file()
    # the sentence gives the second run's pass rate first, as it reads ("B against A ... B's against A's")
    (p,) = json.loads((tmp_path / "compare-good-vs-weak" / "compare.json").read_text())["paired"]
    b_ci, a_ci = (f"{p[k][0]:.2f}-{p[k][1]:.2f}" for k in ("b_ci95", "a_ci95"))
    assert f"pass rate (95% interval) {b_ci} against {a_ci}" in proc.stdout.replace("\n", " ").replace("│", " ") \
        or f"{b_ci} against {a_ci}" in (tmp_path / "compare-good-vs-weak" / "compare.html").read_text()


def test_the_html_pages_render_in_a_real_browser(two_runs, tmp_path):
    """The compare page, a run's eval report and its data page in headless Chromium: no console error, every
    image decodes, and the page is no wider than a phone's window (wide tables scroll inside themselves)."""
    from browser import load

    good, weak = two_runs / "good", two_runs / "weak"
    assert cli("compare", str(good), str(weak), "--out", str(tmp_path / "cmp")).returncode == 0
    pages = {"compare": tmp_path / "cmp/compare.html", "eval-report": good / "eval/report.html",
             "data": good / "plan/data.html"}
    for name, path in pages.items():
        seen = load(path, name)
        assert seen["errors"] == [] and seen["broken_images"] == [], (name, seen)
        assert seen["images"] >= 1, name          # the loss curve / the lengths histogram
        assert seen["overflow_px"] == {"wide": 0, "narrow": 0}, (name, seen)
        assert all(s.stat().st_size > 5000 for s in seen["shots"]), name
