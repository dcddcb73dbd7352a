"""The GGUF half on a GPU backend, proven without a GPU: llama.cpp built with Vulkan (`make test` builds it once
into .cache/llama.cpp-vulkan) on Mesa's lavapipe, a software Vulkan device. The same trained run's export,
deploy and eval stages are run again on that build, every llama.cpp call offloading all layers, and the greedy
answers are compared with the CPU build's."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from test_e2e import EVAL, PLANTED, make_recipe
from tutor_wrap.recipe.load import load_recipe
from tutor_wrap.recipe.resolve import resolve

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
VULKAN = REPO / ".cache" / "llama.cpp-vulkan"
# ggml-vulkan uses GPUs only; a CPU-type device (lavapipe) is used when named by index.
SOFTWARE_DEVICE = {"GGML_VK_VISIBLE_DEVICES": "0"}
OFFLOADED = re.compile(r"offloaded (\d+)/(\d+) layers to GPU")


@pytest.fixture(scope="module")
def vulkan_dir():
    record = VULKAN / "BUILD_OK.json"
    assert record.is_file(), "no Vulkan build: `make test` builds it (tools/build_llamacpp.py --backend vulkan)"
    assert json.loads(record.read_text())["backend"] == "vulkan"
    return VULKAN / "src"


def _locate(vulkan_dir, monkeypatch, **env):
    from tutor_wrap.backends import llamacpp

    monkeypatch.setenv("LLAMA_CPP_DIR", str(vulkan_dir))
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    if not env:
        monkeypatch.delenv("GGML_VK_VISIBLE_DEVICES", raising=False)
    return llamacpp.locate()


def test_the_build_lists_the_software_device_only_when_named(vulkan_dir, monkeypatch, tiny_model, tmp_path):
    """Unnamed, lavapipe is not a GPU to ggml: no device, nothing offloaded (as on a machine without a GPU). Named,
    it is a device with its memory, and the tiny model fits it whole."""
    from tutor_wrap.backends import llamacpp
    from tutor_wrap.backends.gguf_export import convert_model

    gguf = tmp_path / "tiny-F16.gguf"
    convert_model(llamacpp.locate(), tiny_model, gguf, "f16", tmp_path / "convert.log")
    ll = _locate(vulkan_dir, monkeypatch)
    assert ll.backend == "vulkan"
    assert llamacpp.devices(ll) == []
    cpu = llamacpp.placement(ll, gguf, 256)
    assert cpu.gpu_layers == 0 and "lists no GPU device" in cpu.why
    ll = _locate(vulkan_dir, monkeypatch, **SOFTWARE_DEVICE)
    (dev,) = llamacpp.devices(ll)
    assert dev.name == "Vulkan0" and "llvmpipe" in dev.description and dev.free_bytes > 0
    placed = llamacpp.placement(ll, gguf, 256)
    assert placed.full and placed.gpu_layers == placed.layers + 1 and "Vulkan0" in placed.why


def _run(args: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tutor_wrap", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=1800, env={**os.environ, "CUDA_VISIBLE_DEVICES": "", **PLANTED, **env})


def test_export_deploy_and_eval_offloaded_to_vulkan_answer_as_the_cpu_build(vulkan_dir, tiny_model, tmp_path):
    recipe = make_recipe(tmp_path, tiny_model)
    r = yaml.safe_load(recipe.read_text())
    r.pop("tracking")
    recipe.write_text(yaml.safe_dump(r))
    run = tmp_path / "run"
    cpu = _run(["run", str(recipe), "--run-dir", str(run)], tmp_path, {})
    assert cpu.returncode == 0, cpu.stdout[-3000:] + cpu.stderr[-3000:]
    on_cpu = {name: json.loads((run / name).read_text()) for name in ("eval/report.json", "deploy/deploy.json")}
    shutil.copytree(run / "eval", tmp_path / "eval-cpu")

    env = {"LLAMA_CPP_DIR": str(VULKAN), **SOFTWARE_DEVICE}     # the --dest folder (its tree is in src/)
    vk = _run(["run", str(recipe), "--run-dir", str(run), "--from", "export"], tmp_path, env)
    assert vk.returncode == 0, vk.stdout[-3000:] + vk.stderr[-3000:]
    report = json.loads((run / "eval/report.json").read_text())
    deploy = json.loads((run / "deploy/deploy.json").read_text())

    # every llama-server of the three stages put all layers (and the output) on the Vulkan device
    layers = report["generation"]["gpu_layers"] - 1
    assert layers >= 1 and deploy["serving_check"]["gpu_layers"] == layers + 1
    logs = [run / "eval/llama-server-base.log", run / "eval/llama-server-tuned.log", run / "deploy/llama-server.log",
            *run.glob("export/*.fidelity-server.log")]
    assert len(logs) == 5      # the fidelity servers of the F16 and the Q4_K_M GGUFs
    for log in logs:
        assert OFFLOADED.search(log.read_text()).groups() == (str(layers + 1), str(layers + 1)), log
    assert "Vulkan0" in report["generation"]["why"] and on_cpu["eval/report.json"]["generation"]["gpu_layers"] == 0

    # the same answers, greedy, prompt by prompt and arm by arm; where the two builds part, the CPU build's choice
    # was a near-tie that the two backends' rounding (Vulkan's matmuls accumulate in another order) can flip
    before = on_cpu["eval/report.json"]
    differ = [(i, arm, a[arm]["text"], b[arm]["text"]) for i, (a, b) in enumerate(zip(before["prompts"], report["prompts"]))
              for arm in report["arms"] if a[arm]["text"] != b[arm]["text"]]
    assert not [d for d in differ if d[1] == "tuned"], differ
    assert len(differ) <= len(EVAL), differ
    resolved = resolve(load_recipe(recipe))
    for i, arm, cpu_text, vk_text in differ:
        assert arm == "base", arm          # the own-template arm would be a chat request; none differed here
        _a_near_tie(run / report["base_gguf"], vulkan_dir, resolved.fmt.prompt(resolved.eval_rows[i]), cpu_text,
                    vk_text, tmp_path)
    assert deploy["serving_check"]["ok"] and on_cpu["deploy/deploy.json"]["serving_check"]["ok"]
    # the metrics the answers decide are the same; the held-out perplexity sums log-probabilities that the two
    # backends round differently (Vulkan's matmuls accumulate in another order), so it is not compared bit for bit
    answered = {k: v for k, v in report["tuned"].items() if k != "heldout_ppl"}
    assert answered == {k: v for k, v in before["tuned"].items() if k != "heldout_ppl"}


def _top(server, prompt: str) -> dict[str, float]:
    """The next token's top-5 log-probabilities, greedy, prompt cache off."""
    res = server._post("/completion", {"prompt": prompt, "n_predict": 1, "n_probs": 5, "temperature": 0,
                                       "cache_prompt": False, "seed": 0})
    return {t["token"]: t["logprob"] for t in res["completion_probabilities"][0]["top_logprobs"]}


def _a_near_tie(gguf: Path, vulkan_dir: Path, prompt: str, cpu_text: str, vk_text: str, tmp_path: Path) -> None:
    """At the first token where the two answers part, each build's top choice is the other's runner-up, and the CPU
    build's margin between them is no larger than what the two builds disagree on those two log-probabilities:
    exactly the condition under which rounding alone flips a greedy choice."""
    from tutor_wrap.backends import llamacpp
    from tutor_wrap.backends.llama_server import serve
    from tutor_wrap.machine.tools import _from_dir

    a_words, b_words = cpu_text.split(" "), vk_text.split(" ")     # the same words before they part, whole
    same = next((k for k, (x, y) in enumerate(zip(a_words, b_words)) if x != y), min(len(a_words), len(b_words)))
    common = " ".join(a_words[:same])
    with serve(llamacpp.locate(), gguf, ctx=256, log=tmp_path / "tie-cpu.log") as cpu:
        on_cpu = _top(cpu, prompt + common)
    os.environ.update(SOFTWARE_DEVICE)
    try:
        vk_build = _from_dir(vulkan_dir, "vulkan")
        with serve(vk_build, gguf, ctx=256, log=tmp_path / "tie-vk.log") as vk:
            on_vk = _top(vk, prompt + common)
    finally:
        os.environ.pop("GGML_VK_VISIBLE_DEVICES")
    a, b = max(on_cpu, key=on_cpu.get), max(on_vk, key=on_vk.get)
    assert a != b and {a, b} <= set(on_cpu) & set(on_vk), (on_cpu, on_vk)
    margin = on_cpu[a] - on_cpu[b]
    disagreement = abs(on_cpu[a] - on_vk[a]) + abs(on_cpu[b] - on_vk[b])
    assert margin <= disagreement + 1e-6, (a, b, margin, disagreement, on_cpu, on_vk)
