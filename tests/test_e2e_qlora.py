"""QLoRA, the reference user's method, run for real on the CPU (bitsandbytes' CPU backend) on the tiny model:
Axolotl trains on an NF4 base; the merge reproduces that NF4 model + adapter (not the full-precision base) and is
verified against it; the merged model converts, quantizes, serves and is evaluated like any other."""

import json
import os
import platform
import shutil
import subprocess
import sys

import pytest
import yaml

from test_e2e import EVAL, TRAIN

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def qlora_run(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e-qlora")
    (tmp / "data").mkdir()
    (tmp / "data/train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TRAIN))
    (tmp / "data/eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in EVAL))
    recipe = {
        "name": "tinyq", "base_model": str(tiny_model),
        "dataset": {"path": "data/train.jsonl", "format": "alpaca"},
        "method": "qlora", "lora": {"r": 8, "alpha": 16},
        "train": {"max_steps": 12, "learning_rate": 0.01, "sequence_len": 256, "batch_size": 4, "micro_batch_size": 4},
        "export": {"quant_types": ["Q4_K_M"]},
        "ollama": {"model": "tiny-q", "parameters": {"temperature": 0.0}},
        "eval": {"prompts": "data/eval.jsonl", "max_tokens": 12, "primary_metric": "eos_rate"},
    }
    (tmp / "tinyq.yml").write_text(yaml.safe_dump(recipe))
    proc = subprocess.run([sys.executable, "-m", "tutor_wrap", "run", str(tmp / "tinyq.yml"), "--run-dir",
                           str(tmp / "run")], cwd=tmp, capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return tmp / "run", proc


def test_the_plan_keeps_qlora_and_axolotl_trains_on_nf4(qlora_run):
    run, _ = qlora_run
    plan = json.loads((run / "plan.json").read_text())["plan"]
    assert plan["method"] == "qlora"
    cfg = yaml.safe_load((run / "axolotl.yml").read_text())
    assert cfg["adapter"] == "qlora" and cfg["load_in_4bit"] is True
    assert "bitsandbytes" in next(c["reason"] for c in plan["choices"] if c["knob"] == "method")
    assert (run / "train/out/adapter_model.safetensors").is_file()


def test_the_merge_reproduces_the_trained_nf4_model(qlora_run):
    run, proc = qlora_run
    report = json.loads((run / "merge/report.json").read_text())
    assert report["method"] == "nf4"
    v = report["verification"]
    assert v["status"] == "passed" and "NF4 base" in v["reference"]
    assert v["weights"]["status"] == "passed" and v["weights"]["adapted_tensors"] > 0
    # every decoder projection was NF4 in training; embeddings, head and norms stayed as stored, checked exactly
    assert v["weights"]["quantized_tensors"] == 2 * 7
    lg = v["logits"]
    assert lg["max_abs_diff"] <= lg["tolerance"] and lg["flips_beyond_ties"] == 0
    # fp32 merged model against the fp32 reference: summation order only, far inside the tolerance
    assert lg["merged_dtype"] == "F32" and lg["max_abs_diff"] < lg["tolerance"] / 10
    # what this machine's bitsandbytes kernel computes is recorded beside the judged reference
    assert "bitsandbytes" in lg["kernel_vs_reference"]["what"]
    # how far the full-precision merge would have been from the trained model: recorded, and further than ours
    fp = lg["full_precision_merge_vs_trained"]
    assert fp["max_abs_diff"] > v["logits"]["max_abs_diff"]
    cfg = json.loads((run / "merge/model/config.json").read_text())
    assert "quantization_config" not in cfg


def test_the_qlora_model_exports_serves_and_is_evaluated(qlora_run):
    run, proc = qlora_run
    m = json.loads((run / "manifest.json").read_text())
    assert all(m["stages"][s]["status"] == "done" for s in ("export", "deploy", "eval"))
    serving = json.loads((run / "deploy/deploy.json").read_text())["serving_check"]
    assert serving["ok"]
    report = json.loads((run / "eval/report.json").read_text())
    assert report["tuned"]["eos_rate"] > report["base"]["eos_rate"]


def test_a_merge_into_the_full_precision_base_fails_the_qlora_check(qlora_run, tiny_model, tmp_path):
    """What a plain LoRA merge (PEFT's merge_and_unload on the full-precision base) makes of a QLoRA adapter is not
    the trained model: the QLoRA verification refuses it."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tutor_wrap.checks.merge_verify import verify_nf4

    run, _ = qlora_run
    adapter = run / "train/out"
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().save_pretrained(tmp_path / "fp-merge")
    res = verify_nf4(tiny_model, adapter, tmp_path / "fp-merge", "float32", full_precision_drift=False)
    assert res["status"] == "failed" and res["weights"]["status"] == "failed"
    assert res["logits"]["status"] == "failed"


# ---- the check judges what it claims on any CPU code path, and still fails a wrong merge ---------------------------

CPU_PATHS = ["default"] + (["avx2"] if platform.machine() in ("x86_64", "AMD64") else [])


def nf4_verify(base, adapter, merged, env_extra=None):
    """The QLoRA check as the merge stage runs it: its own process, JSON on the last line."""
    proc = subprocess.run([sys.executable, "-m", "tutor_wrap.checks.merge_verify", str(base), str(adapter), str(merged),
                           "--nf4", "float32", "--json"], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": "", **(env_extra or {})})
    return proc.returncode, json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("cpu_path", CPU_PATHS)
def test_the_qlora_check_passes_on_each_cpu_code_path(qlora_run, tiny_model, cpu_path):
    """torch picks its CPU kernels by ISA (ATEN_CPU_CAPABILITY); bitsandbytes picks its 4-bit kernel by ISA and cache.
    The verdict must not depend on either: the reference is the dequantized model's plain fp32 forward."""
    run, _ = qlora_run
    env = {} if cpu_path == "default" else {"ATEN_CPU_CAPABILITY": cpu_path}
    rc, res = nf4_verify(tiny_model, run / "train/out", run / "merge/model", env)
    assert rc == 0 and res["status"] == "passed", res
    assert res["logits"]["max_abs_diff"] < res["logits"]["tolerance"] / 10


def test_the_qlora_logits_check_is_skipped_with_the_need_when_ram_is_short(qlora_run, tiny_model):
    """The reference user's 8B on 16 GB: one fp32 model does not fit, so the logits check says what it needs and the
    streaming weight check still judges every tensor (it used to load the fp32 model regardless)."""
    run, _ = qlora_run
    proc = subprocess.run([sys.executable, "-m", "tutor_wrap.checks.merge_verify", str(tiny_model), str(run / "train/out"),
                           str(run / "merge/model"), "--nf4", "float32", "--ram-budget", "1000", "--json"],
                          capture_output=True, text=True, timeout=900, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0 and res["status"] == "passed", res
    assert res["logits"]["status"] == "skipped" and res["logits"]["needs_bytes"] > 1000
    assert res["weights"]["status"] == "passed" and res["weights"]["quantized_tensors"] == 2 * 7


def _rewrite_adapted(merged, adapter, dst, fn):
    """A copy of the merged model with fn(weight, delta) in place of each adapted weight (delta = scale * B @ A)."""
    import torch
    from safetensors.torch import load_file, save_file

    from tutor_wrap.models.files import adapter_config, lora_pairs

    shutil.copytree(merged, dst)
    acfg = adapter_config(adapter)
    scale = acfg["lora_alpha"] / acfg["r"]
    ad = load_file(adapter / "adapter_model.safetensors")
    changed = 0
    for f in sorted(dst.glob("*.safetensors")):
        tensors = load_file(f)
        for key, (a_k, b_k) in lora_pairs(adapter).items():
            if key in tensors:
                new = fn(key, tensors[key], scale * (ad[b_k].to(torch.float32) @ ad[a_k].to(torch.float32)))
                if new is not None:
                    tensors[key], changed = new.to(tensors[key].dtype).contiguous(), changed + 1
        save_file(tensors, f, metadata={"format": "pt"})
    assert changed
    return dst


def test_a_merge_with_twice_the_lora_scale_fails_the_qlora_check(qlora_run, tiny_model, tmp_path):
    run, _ = qlora_run
    adapter = run / "train/out"
    bad = _rewrite_adapted(run / "merge/model", adapter, tmp_path / "x2", lambda k, w, d: w + d)
    rc, res = nf4_verify(tiny_model, adapter, bad)
    assert rc == 1 and res["weights"]["status"] == "failed" and res["logits"]["status"] == "failed"
    assert res["logits"]["max_abs_diff"] > res["logits"]["tolerance"]


def test_a_merge_that_missed_one_adapted_layer_fails_the_qlora_check(qlora_run, tiny_model, tmp_path):
    run, _ = qlora_run
    adapter = run / "train/out"
    missed = "model.layers.1.mlp.down_proj.weight"
    bad = _rewrite_adapted(run / "merge/model", adapter, tmp_path / "missed",
                           lambda k, w, d: w - d if k == missed else None)
    rc, res = nf4_verify(tiny_model, adapter, bad)
    assert rc == 1 and res["status"] == "failed"
    assert [f["key"] for f in res["weights"]["failures"]] == [missed]
