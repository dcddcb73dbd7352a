import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.tools

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


def test_preflight_json_on_this_machine_is_fast_and_matches_psutil():
    import json

    import psutil

    proc = cli("preflight", "--json")
    assert proc.returncode in (0, 1), proc.stderr
    rep = json.loads(proc.stdout)
    hw = rep["hardware"]
    assert abs(hw["ram_total_bytes"] - psutil.virtual_memory().total) <= 0.01 * psutil.virtual_memory().total
    assert abs(hw["swap_total_bytes"] - psutil.swap_memory().total) <= 0.01 * max(1, psutil.swap_memory().total)
    assert "torch" in json.dumps(rep["software"])


def test_preflight_for_the_seed_on_its_machine_reports_the_merge_risk(tmp_path):
    import json

    proc = cli("preflight", "recipes/python-tutor-llama3-8b-rtx3060.yml", "--hardware", "rtx3060-12gb", "--json",
               "--save-profile", str(tmp_path / "p.yml"))
    assert proc.returncode == 1  # a stage won't fit: exit 1, as documented
    stages = {(s["stage"], s.get("resource")): s for s in json.loads(proc.stdout)["stages"]}
    assert stages[("train", "VRAM")]["verdict"] == "fits"
    merge = stages[("merge", "RAM+swap")]
    assert merge["verdict"] in ("tight", "won't fit") and "wsl --shutdown" in merge["remedy"]
    assert (tmp_path / "p.yml").read_text().count("RTX 3060") == 1


def test_preflight_bad_arguments_exit_2():
    assert cli("preflight", "--hardware").returncode == 2


def test_estimate_answers_json_without_torch():
    import json

    proc = cli("estimate", "--model", "llama-3-8b", "--method", "qlora", "--lora-r", "32", "--lora-targets", "q,v",
               "--seq-len", "1024", "--micro-batch", "1", "--grad-ckpt", "on", "--optimizer", "paged_adamw_8bit",
               "--attn", "sdpa", "--loss", "cce", "--packing", "on", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert 5 < doc["total_gib"] < 12 and doc["knobs"]["lora_targets"] == ["q_proj", "v_proj"]
    assert cli("estimate", "--model", "no-such-model").returncode == 1


@pytest.mark.e2e   # the CLI through several stages
def test_names_with_brackets_print_as_written(tiny_model, tmp_path):
    """Rich markup in a run dir's name (`exp [v2]`, a stray `[/x]`) is printed as written, not read as markup."""
    import json

    import yaml

    (tmp_path / "d.jsonl").write_text(json.dumps({"instruction": "Say ok.", "input": "", "output": "ok"}) + "\n")
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump({"name": "br", "base_model": str(tiny_model), "dataset": {"path": "d.jsonl"},
                                      "train": {"max_steps": 1, "sequence_len": 64}, "ollama": {"model": "br"}}))
    run = tmp_path / "exp [v2] [/x]"
    import os

    proc = subprocess.run([sys.executable, "-m", "tutor_wrap", "run", str(recipe), "--run-dir", str(run), "--until",
                           "plan"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "500"})   # one line per message: no wrapping to undo
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"-> {run}" in proc.stdout and (run / "axolotl.yml").is_file()


def test_a_planned_value_the_axolotl_block_replaces_is_said_beside_the_plan(tiny_model, tmp_path):
    """The plan's table and plan.json never show a value the trainer will not get: a planned key the recipe's
    axolotl: block sets differently is a choice of its own; one it sets to the planned value, or a key the plan
    does not set, is not."""
    import json

    import yaml

    (tmp_path / "d.jsonl").write_text(json.dumps({"instruction": "Say ok.", "input": "", "output": "ok"}) + "\n")
    recipe = {"name": "ov", "base_model": str(tiny_model), "dataset": {"path": "d.jsonl"},
              "train": {"max_steps": 1, "sequence_len": 64}, "ollama": {"model": "ov"}}

    def plan(block):
        (tmp_path / "r.yml").write_text(yaml.safe_dump({**recipe, **({"axolotl": block} if block else {})}))
        proc = cli("plan", str(tmp_path / "r.yml"), "--no-validate", "--json", "--out", str(tmp_path / "a.yml"),
                   cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
        out = json.loads(proc.stdout[proc.stdout.index("{"):])["plan"]
        return out, {c["knob"]: c for c in out["choices"]}

    own, _ = plan(None)        # what this machine's plan picks itself (a CPU or a GPU plan)
    ckpt = own["gradient_checkpointing"]
    replanned, choices = plan({"gradient_checkpointing": not ckpt, "optimizer": own["optimizer"], "warmup_steps": 0})
    assert replanned["gradient_checkpointing"] == ckpt and choices["gradient_checkpointing"]["value"] == ckpt
    said = choices["axolotl.gradient_checkpointing"]
    assert said["value"] is (not ckpt) and f"over the plan's {ckpt}" in said["reason"], said
    assert "axolotl.optimizer" not in choices and "axolotl.warmup_steps" not in choices
    assert yaml.safe_load((tmp_path / "a.yml").read_text())["gradient_checkpointing"] is (not ckpt)


def test_preflight_json_ok_agrees_with_its_exit_code():
    """The reference user's job on their WSL box: the merge won't fit, so `ok` is false and the exit is 1."""
    import json

    proc = cli("preflight", "recipes/python-tutor-llama3-8b-rtx3060.yml", "--hardware", "rtx3060-12gb", "--json")
    report = json.loads(proc.stdout)
    assert "won't fit" in [v["verdict"] for v in report["stages"]]
    assert report["ok"] is False and proc.returncode == 1
