"""Chat data through every stage on the tiny chat model (ChatML tokens, its own SmolLM2-shaped template): OpenAI-style
rows in the model's own template, and ShareGPT rows in the named chatml template. Axolotl trains, merges; llama.cpp
converts, quantizes; llama-server serves the GGUF's template; eval compares base and tune."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tiny_model import CHAT_DEFAULT_SYSTEM, CHAT_TEMPLATE
from tutor_wrap.backends import llamacpp, modelfile
from tutor_wrap.data.chat_templates import CHATML

pytestmark = pytest.mark.e2e

STAGES = ["plan", "train", "merge", "export", "deploy", "eval"]


def conversation(i: int) -> list[dict]:
    turns = [{"role": "user", "content": f"Say ok to request {i}."}, {"role": "assistant", "content": "ok"}]
    if i % 4 == 0:    # some two-turn conversations: the second answer is trained too
        turns += [{"role": "user", "content": f"And request {i + 1}?"}, {"role": "assistant", "content": "ok"}]
    return turns


TRAIN = [conversation(i) for i in range(24)]
# Held-out rows: one ends with its reference answer, the others at the user turn; one has its own system message.
EVAL = [conversation(101)[:1], [{"role": "system", "content": "Answer briefly."}, *conversation(102)[:1]],
        conversation(104)[:3], conversation(103)]
SHAREGPT_NAMES = {"system": "system", "user": "human", "assistant": "gpt"}


def write_rows(path: Path, convs: list[list[dict]], shape: str) -> None:
    if shape == "chat":
        rows = [{"messages": c} for c in convs]
    else:
        rows = [{"conversations": [{"from": SHAREGPT_NAMES[m["role"]], "value": m["content"]} for m in c]} for c in convs]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def make_recipe(tmp: Path, model: Path, shape: str, template: str) -> Path:
    (tmp / "data").mkdir()
    write_rows(tmp / "data/train.jsonl", TRAIN, shape)
    write_rows(tmp / "data/eval.jsonl", EVAL, shape)
    recipe = {
        "name": "tinychat",
        "base_model": str(model),
        "dataset": {"path": "data/train.jsonl", "format": shape, "chat_template": template},
        "method": "lora",
        "lora": {"r": 8, "alpha": 16},
        "train": {"max_steps": 12, "learning_rate": 0.01, "sequence_len": 256, "batch_size": 4, "micro_batch_size": 4},
        "export": {"quant_types": ["Q4_K_M"]},
        "ollama": {"model": "tiny-chat", "parameters": {"temperature": 0.0}},
        "eval": {"prompts": "data/eval.jsonl", "max_tokens": 12, "primary_metric": "eos_rate"},
    }
    p = tmp / "tinychat.yml"
    p.write_text(yaml.safe_dump(recipe))
    return p


@pytest.fixture(scope="module", params=[("chat", "tokenizer"), ("sharegpt", "chatml")], ids=["chat-own", "sharegpt-chatml"])
def chat_run(request, tiny_chat_model, tmp_path_factory):
    shape, template = request.param
    tmp = tmp_path_factory.mktemp(f"e2e-{shape}")
    recipe = make_recipe(tmp, tiny_chat_model, shape, template)
    proc = subprocess.run([sys.executable, "-m", "tutor_wrap", "run", str(recipe), "--run-dir", str(tmp / "run")],
                          cwd=tmp, capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return tmp / "run", template, proc


def test_every_stage_ran_and_axolotl_trained_chat_rows(chat_run):
    run, template, _ = chat_run
    m = json.loads((run / "manifest.json").read_text())
    assert [s for s in STAGES if m["stages"][s]["status"] == "done"] == STAGES
    cfg = yaml.safe_load((run / "axolotl.yml").read_text())
    assert cfg["datasets"][0]["type"] == "chat_template"
    assert cfg["chat_template"] == ("tokenizer_default" if template == "tokenizer" else "chatml")
    assert cfg["eot_tokens"] == ["<|im_end|>"]
    losses = [json.loads(line)["loss"] for line in (run / "train/metrics.jsonl").read_text().splitlines()
              if '"loss"' in line and json.loads(line).get("event") == "log"]
    assert losses[-1] < losses[0] * 0.5


def test_merged_model_and_gguf_carry_the_training_template(chat_run):
    run, template, _ = chat_run
    expected = CHAT_TEMPLATE if template == "tokenizer" else CHATML.jinja
    assert json.loads((run / "merge/model/tokenizer_config.json").read_text())["chat_template"] == expected
    meta = llamacpp.metadata(run / "export/tinychat-Q4_K_M.gguf")
    assert meta["chat_template"] == expected


def test_modelfile_serves_the_template_with_its_default_system(chat_run):
    run, template, _ = chat_run
    text = (run / "deploy/Modelfile").read_text()
    cmds = {c.name: c for c in modelfile.validate(text, run / "deploy")}
    assert cmds["template"].args == CHATML.template
    # The model's own template inserts a default system text; Ollama prepends the Modelfile's SYSTEM the same way.
    if template == "chatml":
        assert "system" not in cmds      # plain ChatML inserts no system text, and an empty SYSTEM is not written
    else:
        assert cmds["system"].args == CHAT_DEFAULT_SYSTEM
    stops = [c.args for c in modelfile.parse(text) if c.key == "stop"]
    assert stops[0] == "<|im_end|>" and "<|im_start|>" in stops


def test_llama_server_renders_every_conversation_as_trained(chat_run):
    run, _, _ = chat_run
    serving = json.loads((run / "deploy/deploy.json").read_text())["serving_check"]
    assert serving["ok"] and serving["rows"] == len(EVAL)
    assert serving["templates_matching"] == serving["answers_matching"] == len(EVAL)


def test_eval_prompts_with_the_last_user_turn_and_the_tune_stops(chat_run):
    run, template, proc = chat_run
    report = json.loads((run / "eval/report.json").read_text())
    assert report["n_prompts"] == len(EVAL)
    assert [p["instruction"] for p in report["prompts"]] == [c[-1]["content"] if c[-1]["role"] == "user" else
                                                              c[-2]["content"] for c in EVAL]
    assert report["tuned"]["eos_rate"] > report["base"]["eos_rate"]
    # Trained in the base's own template, the base arm already is the base in its own template.
    assert ("base_own_template" in report["arms"]) == (template != "tokenizer")
    assert "eos_rate" in proc.stdout
