import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "tutor_wrap", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_help_and_plan_rendering_never_import_torch_or_axolotl():
    code = ("import sys, runpy; sys.argv=['tutor_wrap', 'plan', 'recipes/python-tutor-llama3-8b-rtx3060.yml', '--hardware', 'rtx3060-12gb', '--json'];\n"
            "try:\n    runpy.run_module('tutor_wrap', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'axolotl', 'transformers'))\n"
            "print('HEAVY', heavy)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert "HEAVY []" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert '"method": "qlora"' in proc.stdout and '"total_gib"' in proc.stdout


def test_help_lists_the_commands():
    proc = cli("--help")
    assert proc.returncode == 0
    for name in ("run", "plan", "merge", "deploy", "eval"):
        assert name in proc.stdout


def test_bad_recipe_is_one_line_of_error_and_exit_1(tmp_path):
    bad = tmp_path / "r.yml"
    bad.write_text("name: x\nbase_model: ./m\ndataset:\n  path: d.jsonl\nollama:\n  model: x\nlerning_rate: 1\n")
    proc = cli("run", str(bad), "--run-dir", str(tmp_path / "run"))
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "r.yml:7: unknown key 'lerning_rate'" in proc.stderr
    assert not (tmp_path / "run").exists()  # nothing half-made for a recipe that never loaded


def test_run_dir_that_cannot_be_created(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    proc = cli("run", "recipes/demo.yml", "--run-dir", str(blocker / "run"))
    assert proc.returncode == 1
    assert "is not writable" in proc.stderr and "Traceback" not in proc.stderr
