"""Merge stage on a real tiny Llama and a real PEFT adapter: verification, refusal, tokenizer copy, config fixes.

One real merge (the CLI: `python -m tutor_wrap merge ... --json`, which runs `axolotl merge-lora` and the
verification subprocess) is shared by the module; the tamper tests edit copies of its output.
"""

import json
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from tutor_wrap.core.errors import TutorWrapError
from tutor_wrap.backends import axolotl_merge
from tutor_wrap.checks import merge_verify
from tutor_wrap.core.units import GIB
from tutor_wrap.machine.hardware import Hardware
from tutor_wrap.planning import budgets
from tutor_wrap.machine.profiles import load_profile
from tutor_wrap.backends import merge as merge_lib
from tutor_wrap.stages import merge as merge_stage

# one worker builds the module's merged model once (under make test-fast's two workers each would build it)
pytestmark = pytest.mark.tools

REPO = Path(__file__).resolve().parents[1]
ADAPTED = "model.layers.0.self_attn.q_proj.weight"
MARKER_MAX_LEN = 777  # the adapter's tokenizer_config differs from the base's by this


def make_adapter(base: Path, out: Path, *, r: int = 8, alpha: int = 16, seed: int = 1) -> Path:
    """A real PEFT LoRA adapter for `base` (all linear layers), B initialised non-zero so merging changes weights,
    saved with the base's tokenizer files, one of them changed (as training that adds tokens would)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    pm = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules="all-linear", task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    pm.save_pretrained(out)
    for name in ("tokenizer.json", "special_tokens_map.json"):
        shutil.copy2(base / name, out / name)
    tc = json.loads((base / "tokenizer_config.json").read_text())
    tc["model_max_length"] = MARKER_MAX_LEN
    (out / "tokenizer_config.json").write_text(json.dumps(tc, indent=2))
    return out


# Built once per test session (20 s): `make test-fast` runs this module on one worker (--dist loadfile).
@pytest.fixture(scope="session")
def adapter(tiny_model, tmp_path_factory) -> Path:
    return make_adapter(tiny_model, tmp_path_factory.mktemp("adapter") / "adapter")


@pytest.fixture(scope="session")
def merged(tiny_model, adapter, tmp_path_factory):
    """(output dir, report) of a real merge through the CLI."""
    tmp = tmp_path_factory.mktemp("merged")
    out = tmp / "model"
    proc = subprocess.run([sys.executable, "-m", "tutor_wrap", "merge", "--base", str(tiny_model), "--adapter",
                           str(adapter), "--out", str(out), "--json"], capture_output=True, text=True, cwd=tmp,
                          timeout=900, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads(proc.stdout[proc.stdout.index("{"):])


def run_verify(base: Path, adapter: Path, merged: Path, *extra: str) -> tuple[int, dict]:
    proc = subprocess.run([sys.executable, "-m", "tutor_wrap.checks.merge_verify", str(base), str(adapter), str(merged),
                           "--json", *extra], capture_output=True, text=True, timeout=600)
    return proc.returncode, json.loads(proc.stdout.strip().splitlines()[-1])


def tamper(src: Path, dst: Path, key: str, fn) -> Path:
    """Copy a merged model folder and change one tensor of its safetensors."""
    import torch  # noqa: F401
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    f = next(p for p in sorted(dst.glob("*.safetensors")) if key in merge_stage_keys(p))
    tensors = load_file(f)
    tensors[key] = fn(tensors[key].clone())
    save_file(tensors, f, metadata={"format": "pt"})
    return dst


def merge_stage_keys(path: Path) -> set:
    from tutor_wrap.models.files import read_header

    return set(read_header(path))


def small(hw: Hardware, ram_gib: float, swap_gib: float = 0.0, **kw) -> Hardware:
    return replace(hw, ram_available_bytes=int(ram_gib * GIB), swap_free_bytes=int(swap_gib * GIB), **kw)


# ---- the real merge ------------------------------------------------------------------------------------------------

def test_cli_merge_is_verified_against_peft(merged):
    out, report = merged
    v = report["verification"]
    assert v["status"] == "passed" and v["ok"] is True
    # fp32 tiny model: the merged model reproduces PEFT's unmerged logits to float rounding
    assert v["max_abs_diff"] <= v["tolerance"] and v["max_abs_diff"] < 1e-4
    assert v["inputs"]["sequences"] * v["inputs"]["tokens"] >= 64
    lg = v["logits"]
    # a next-token flip is allowed only at a near-tie the tolerance explains (summation order differs by CPU)
    assert lg["status"] == "passed" and lg["merged_dtype"] == "F32" and lg["flips_beyond_ties"] == 0
    # the adapter really changes the output, far beyond the tolerance: a merge that dropped it would fail
    assert lg["adapter_effect"] > 100 * lg["tolerance"]
    w = v["weights"]
    assert w["status"] == "passed" and w["adapted_tensors"] == 14 and w["tensors"] == 21
    assert report["method"] == "memory_efficient"
    assert report["measured_peak_rss_bytes"] > 0.3 * GIB
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".")) == []  # no work dir left


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="torch's AVX2 code path is x86's")
def test_the_verdict_holds_on_torchs_avx2_code_path(merged, tiny_model, adapter):
    """torch picks its CPU kernels by ISA (ATEN_CPU_CAPABILITY): the fp32 tolerance covers summation order on any.
    The host's default path is the merge's own verification (test_cli_merge_is_verified_against_peft)."""
    out, _ = merged
    env = {"ATEN_CPU_CAPABILITY": "avx2"}
    proc = subprocess.run([sys.executable, "-m", "tutor_wrap.checks.merge_verify", str(tiny_model), str(adapter),
                           str(out), "--json"], capture_output=True, text=True, timeout=600, env={**os.environ, **env})
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0 and res["status"] == "passed", res
    assert res["logits"]["max_abs_diff"] < res["logits"]["tolerance"] / 10


def test_merged_weights_differ_from_base(merged, tiny_model):
    from safetensors.torch import load_file

    out, _ = merged
    a, b = load_file(out / "model.safetensors"), load_file(tiny_model / "model.safetensors")
    assert not (a[ADAPTED] == b[ADAPTED]).all()
    assert (a["model.embed_tokens.weight"] == b["model.embed_tokens.weight"]).all()


def test_tokenizer_files_come_from_the_adapter(merged, adapter, tiny_model):
    out, _ = merged
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == MARKER_MAX_LEN
    assert json.loads((tiny_model / "tokenizer_config.json").read_text())["model_max_length"] != MARKER_MAX_LEN
    assert (out / "tokenizer.json").read_bytes() == (adapter / "tokenizer.json").read_bytes()


def test_merged_config_has_no_quantization_config(merged, tmp_path):
    out, report = merged
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert report["stripped_quantization_config"] is False
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    p = tmp_path / "config.json"
    p.write_text(json.dumps(cfg))
    assert axolotl_merge.strip_quantization(p) is True
    again = json.loads(p.read_text())
    assert "quantization_config" not in again and again["hidden_size"] == cfg["hidden_size"]
    assert axolotl_merge.strip_quantization(p) is False


# ---- verification catches a wrong merge -----------------------------------------------------------------------------

def test_verification_fails_when_a_merged_tensor_is_tampered(merged, tiny_model, adapter, tmp_path):
    out, _ = merged
    bad = tamper(out, tmp_path / "bad", ADAPTED, lambda t: t * 1.5)
    rc, res = run_verify(tiny_model, adapter, bad)
    assert rc == 1 and res["status"] == "failed" and res["ok"] is False
    assert res["logits"]["status"] == "failed" and res["max_abs_diff"] > res["tolerance"]
    assert [f["key"] for f in res["weights"]["failures"]] == [ADAPTED]
    with pytest.raises(TutorWrapError, match="does not match base \\+ adapter"):
        merge_verify.check_verification(res, tmp_path / "merge.log")


def test_weight_check_catches_a_single_changed_element(merged, tiny_model, adapter, tmp_path):
    """One element off by 1e-3 hides in the logits noise of some models; the tensor-by-tensor check names it."""
    out, _ = merged

    def nudge(t):
        t[3, 5] += 1e-3
        return t

    bad = tamper(out, tmp_path / "bad", "model.layers.1.mlp.down_proj.weight", nudge)
    rc, res = run_verify(tiny_model, adapter, bad, "--no-logits")
    assert rc == 1 and res["weights"]["status"] == "failed"
    assert "1 of" in res["weights"]["failures"][0]["why"]


def test_verification_fails_when_the_adapter_was_not_merged(tiny_model, adapter):
    rc, res = run_verify(tiny_model, adapter, tiny_model)  # the base itself posing as the merge
    assert rc == 1 and res["status"] == "failed"
    assert res["logits"]["max_abs_diff"] == pytest.approx(res["logits"]["adapter_effect"])
    assert len(res["weights"]["failures"]) == 14


def test_logits_check_is_skipped_with_the_need_when_ram_is_short(merged, tiny_model, adapter):
    out, _ = merged
    rc, res = run_verify(tiny_model, adapter, out, "--ram-budget", str(100 * 2**20))
    assert rc == 0 and res["status"] == "passed" and res["ok"] is True  # the streaming weight check still ran
    assert res["logits"]["status"] == "skipped" and res["logits"]["reason"].startswith("skipped: needs ")
    assert "GiB" in res["logits"]["reason"] and res["weights"]["status"] == "passed"


def test_verifier_refuses_pickle_only_adapters(tiny_model, adapter, tmp_path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy2(adapter / "adapter_config.json", pickled)
    (pickled / "adapter_model.bin").write_bytes(b"not read")
    rc, res = run_verify(tiny_model, pickled, tiny_model)
    assert rc == 2 and res["status"] == "error" and "safetensors" in res["error"]


# ---- refusal: nothing written --------------------------------------------------------------------------------------

def _assert_refused_and_empty(tmp: Path, fn):
    before = sorted(p.relative_to(tmp) for p in tmp.rglob("*"))
    with pytest.raises(TutorWrapError) as ei:
        fn()
    assert sorted(p.relative_to(tmp) for p in tmp.rglob("*")) == before
    return str(ei.value)


def test_refusal_on_the_reference_users_wsl_box_writes_nothing(tiny_model, adapter, tmp_path):
    hw = small(load_profile("rtx3060-12gb"), ram_gib=0.3, swap_gib=0.1)   # the profile, with a busy RAM
    out = tmp_path / "deep" / "model"
    msg = _assert_refused_and_empty(tmp_path, lambda: merge_lib.merge(
        tiny_model, adapter, out, {}, hw, log=tmp_path / "deep" / "merge.log"))
    assert not (tmp_path / "deep").exists()
    assert "Nothing was written" in msg and "RAM+swap short by" in msg and "(WSL caps)" in msg
    assert "profile rtx3060-12gb" in msg and "0.3 GiB RAM + 0.1 GiB swap" in msg
    assert ".wslconfig" in msg and "[wsl2]" in msg and "swap=" in msg and "wsl --shutdown" in msg


def test_refusal_on_linux_suggests_a_swapfile(tiny_model, adapter, tmp_path):
    hw = small(load_profile("cpu-only"), ram_gib=0.2)
    b = budgets.predict(tiny_model, adapter, hw, "memory_efficient")
    msg = _assert_refused_and_empty(tmp_path, lambda: merge_lib.merge(
        tiny_model, adapter, tmp_path / "model", {}, hw, log=tmp_path / "merge.log"))
    assert f"needs {b.predicted_peak_rss_bytes / GIB:.1f} GiB of RAM+swap" in msg
    assert "sudo bash tools/make_swapfile.sh" in msg and ".wslconfig" not in msg


def test_refusal_for_disk_names_what_to_free(tiny_model, adapter, tmp_path):
    hw = replace(load_profile("cpu-only"), disk_free_bytes=1024)
    msg = _assert_refused_and_empty(tmp_path, lambda: merge_lib.merge(
        tiny_model, adapter, tmp_path / "model", {}, hw, log=tmp_path / "merge.log"))
    assert "disk short by" in msg and "free " in msg and "RAM+swap short" not in msg


def test_legacy_refusal_points_to_memory_efficient(tmp_path):
    gb = 10**9
    hw = small(load_profile("rtx3060-12gb"), ram_gib=6.8, swap_gib=4.0)
    shards = [2 * gb] * 8  # an 8B model in bf16, 2 GB shards
    legacy = budgets.predict_sizes(shards, 80 * 10**6, hw, "legacy")
    eff = budgets.predict_sizes(shards, 80 * 10**6, hw, "memory_efficient")
    assert not legacy.fits and eff.fits  # the seed report's "Killed" merge, and the way out of it
    err = budgets.refusal(legacy, hw, eff)
    assert "--method memory_efficient" in str(err) and "Nothing was written" in str(err)


def test_stage_refusal_leaves_no_merge_dir(tiny_model, adapter, tmp_path):
    """Through the stage: the run dir gains no merge/ folder, no log, no work dir."""
    import yaml
    from rich.console import Console

    from tutor_wrap.runtime.rundir import RunDir
    from tutor_wrap.recipe.schema import Recipe
    from tutor_wrap.recipe.resolve import resolve
    from tutor_wrap.stages.base import Context

    run = RunDir.create(tmp_path / "run")
    (run.path / "axolotl.yml").write_text(yaml.safe_dump({"base_model": str(tiny_model), "adapter": "lora"}))
    run.record_stage("train", status="done", artifacts={"output_dir": os.path.relpath(adapter, run.path)})
    hw = small(load_profile("rtx3060-12gb"), ram_gib=0.2)
    before = sorted(p.name for p in run.path.iterdir())
    with pytest.raises(TutorWrapError, match="Nothing was written"):
        recipe = Recipe.model_validate({"name": "t", "base_model": str(tiny_model), "dataset": {"path": "d.jsonl"},
                                        "ollama": {"model": "t"}})
        merge_stage.run(Context(resolved=resolve(recipe), run=run, hardware=hw, console=Console(quiet=True)))
    assert sorted(p.name for p in run.path.iterdir()) == before and not (run.path / "merge").exists()


# ---- the prediction -------------------------------------------------------------------------------------------------

def test_prediction_follows_the_largest_shard_for_memory_efficient_and_the_model_for_legacy():
    hw = load_profile("cpu-only")
    gb = 10**9
    # the same 16 GB model in 5 GB or in 2 GB shards
    eff5 = budgets.predict_sizes([5 * gb] * 3 + [1 * gb], 0, hw, "memory_efficient")
    eff2 = budgets.predict_sizes([2 * gb] * 8, 0, hw, "memory_efficient")
    leg5 = budgets.predict_sizes([5 * gb] * 3 + [1 * gb], 0, hw, "legacy")
    leg2 = budgets.predict_sizes([2 * gb] * 8, 0, hw, "legacy")
    assert eff2.predicted_peak_rss_bytes < eff5.predicted_peak_rss_bytes < leg2.predicted_peak_rss_bytes
    assert leg2.predicted_peak_rss_bytes > 16 * gb             # legacy holds the whole model
    assert eff2.predicted_peak_rss_bytes < 8 * gb               # memory_efficient does not
    assert eff5.disk_needed_bytes == leg5.disk_needed_bytes == 16 * gb


def test_prediction_on_a_model_it_was_not_fitted_to():
    """bench/results/merge-cpu-28layers.csv: a 3.1 GB model in 11 shards, measured after the factors were fitted on
    the 1.0-1.6 GB runs (bench/README.md). The prediction must not be under the measured peak by more than 10%
    (a refusal must not let a merge be killed) and not over it by more than 30% (the spread between runs)."""
    import csv

    hw = load_profile("cpu-only")
    path = Path(__file__).parents[1] / "bench" / "results" / "merge-cpu-28layers.csv"
    rows = list(csv.DictReader(l for l in path.read_text().splitlines() if not l.startswith("#")))
    assert {r["method"] for r in rows} == {"memory_efficient", "legacy"}
    for r in rows:
        total, largest, n = int(r["model_bytes"]), int(r["largest_shard_bytes"]), int(r["shards"])
        shards = [largest] * (n - 1) + [total - largest * (n - 1)]
        pred = budgets.predict_sizes(shards, int(r["adapter_bytes"]), hw, r["method"]).predicted_peak_rss_bytes
        measured = int(r["measured_peak_rss_bytes"])
        assert 0.9 * measured <= pred <= 1.3 * measured, (r["method"], pred, measured)


def test_merge_config_pins_the_base_dtype_and_fills_schema_keys(tiny_model, adapter, tmp_path):
    cfg = axolotl_merge.merge_config({"bf16": "auto", "resume_from_checkpoint": "x"}, tiny_model, adapter, tmp_path,
                                   "legacy")
    assert cfg["bf16"] is False and cfg["fp16"] is False  # the tiny model is stored in fp32
    assert cfg["merge_method"] == "legacy" and cfg["lora_model_dir"] == str(adapter)
    assert cfg["datasets"] and cfg["micro_batch_size"] == 1 and "resume_from_checkpoint" not in cfg
