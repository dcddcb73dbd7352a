"""QLoRA, the reference user's method, run for real on the CPU (bitsandbytes' CPU backend) on the tiny model:
Axolotl trains on an NF4 base; the merge reproduces that NF4 model + adapter (not the full-precision base) and is
verified against it; the merged model converts, quantizes, serves and is evaluated like any other."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from test_e2e import EVAL, TRAIN


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
    assert v["logits"]["top1_agreement"] >= 0.99 and v["logits"]["max_abs_diff"] <= v["logits"]["tolerance"]
    # how far the full-precision merge would have been from the trained model: recorded, and further than ours
    fp = v["logits"]["full_precision_merge_vs_trained"]
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
