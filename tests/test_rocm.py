"""AMD/ROCm facts in the planner: each one chosen with its reason (tests on profiles and synthetic GPUs)."""

import re
import tomllib
from dataclasses import replace
from pathlib import Path

import pytest

from tutor_wrap.data.alpaca import ALPACA
from tutor_wrap.backends import axolotl_config
from tutor_wrap.data import formats
from tutor_wrap.machine import amd
from tutor_wrap.machine import profiles
from tutor_wrap.core.errors import TutorWrapError
from tutor_wrap.planning.planner import make_plan
from tutor_wrap.recipe.load import load_recipe

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]
RADEON_RECIPE = REPO / "recipes" / "llama3-8b-metamathqa-radeon.yml"
MI300X_RECIPE = REPO / "recipes" / "llama2-7b-lora-mi300x.yml"


def reason(plan, knob):
    return next(c.reason for c in plan.choices if c.knob == knob)


def test_radeon_seed_plan_states_every_rocm_fact():
    r = load_recipe(RADEON_RECIPE)
    plan = make_plan(r, profiles.load_profile("radeon-rx7900xtx-24gb"))
    assert plan.accelerator == "amd" and plan.method == "qlora" and plan.dtype == "bf16"
    assert "gfx1100" in reason(plan, "dtype")
    assert plan.attention == "sdpa" and "ROCm" in reason(plan, "attention")
    assert plan.lora_kernels is False and "ROCm" in reason(plan, "lora_kernels")
    bnb = reason(plan, "bitsandbytes")
    assert "assuming the pinned bitsandbytes 0.50.2" in bnb and "0.49" in bnb
    assert plan.optimizer == "adamw_bnb_8bit"
    assert plan.memory["total_gib"] <= plan.budget_gib <= 24
    assert plan.micro_batch_size * plan.gradient_accumulation_steps == r.train.batch_size


def test_mi300x_seed_plan_is_bf16_lora_with_sdpa():
    r = load_recipe(MI300X_RECIPE)
    plan = make_plan(r, profiles.load_profile("mi300x-192gb"))
    assert (plan.method, plan.dtype, plan.attention, plan.lora_kernels) == ("lora", "bf16", "sdpa", False)
    assert "gfx942" in reason(plan, "dtype")
    assert plan.memory["total_gib"] <= plan.budget_gib


@pytest.mark.parametrize("recipe, profile", [(RADEON_RECIPE, "radeon-rx7900xtx-24gb"), (MI300X_RECIPE, "mi300x-192gb")])
def test_rocm_yaml_turns_off_cuda_only_paths_and_validates(recipe, profile, tmp_path):
    r = load_recipe(recipe)
    plan = make_plan(r, profiles.load_profile(profile))
    cfg = axolotl_config.render(r, plan, ALPACA, base_model=r.base_model, dataset_path=None, run_dir=tmp_path)
    assert cfg["attn_implementation"] == "sdpa" and cfg["bf16"] is True
    assert cfg["lora_mlp_kernel"] is cfg["lora_qkv_kernel"] is cfg["lora_o_kernel"] is False
    assert cfg["datasets"][0]["path"] == r.dataset.hub
    assert axolotl_config.validate(cfg, source=recipe.name) == []


def test_rdna2_without_bf16_gets_fp16():
    hw = profiles.load_profile("radeon-rx7900xtx-24gb")
    g = replace(hw.gpus[0], name="Radeon RX 6800 XT", gfx_target="gfx1030", bf16=True)  # the flag is overruled
    plan = make_plan(load_recipe(RADEON_RECIPE), replace(hw, gpus=[g]))
    assert plan.dtype == "fp16" and "gfx1030" in reason(plan, "dtype")


def _probed_radeon(bnb_version):
    # What the probe records on a ROCm machine with this bitsandbytes installed (and no flash-attn).
    return replace(profiles.load_profile("radeon-rx7900xtx-24gb"), source="probe", packages={"bitsandbytes": bnb_version})


def test_probe_reads_the_installed_bitsandbytes():
    plan = make_plan(load_recipe(RADEON_RECIPE), _probed_radeon("0.50.2"))
    assert plan.method == "qlora" and "bitsandbytes 0.50.2 installed" in reason(plan, "bitsandbytes")


def test_old_bitsandbytes_on_rocm_means_no_4bit():
    # 0.49.x: ROCm wheels (8-bit optimizers) but not the fixed 4-bit path; QLoRA becomes LoRA if that fits
    r = load_recipe(MI300X_RECIPE).model_copy(update={"method": "qlora"})
    hw = replace(profiles.load_profile("mi300x-192gb"), source="probe", packages={"bitsandbytes": "0.49.1"})
    plan = make_plan(r, hw)
    assert plan.method == "lora" and plan.optimizer == "adamw_bnb_8bit"
    assert "4-bit needs 0.50.0" in reason(plan, "bitsandbytes")
    assert "bitsandbytes" in reason(plan, "method")


def test_no_rocm_bitsandbytes_means_torch_adamw():
    r = load_recipe(MI300X_RECIPE)
    hw = replace(profiles.load_profile("mi300x-192gb"), source="probe", packages={"bitsandbytes": "0.48.2"})
    plan = make_plan(r, hw)
    assert plan.method == "lora" and plan.optimizer == "adamw_torch"
    assert "0.49.0" in reason(plan, "optimizer")


def test_qlora_on_a_24gb_radeon_without_4bit_support_says_why():
    # An 8B model in 16-bit LoRA does not fit 24 GB; without 4-bit there is no plan, and the hint says why.
    hw = _probed_radeon("0.48.2")
    r = load_recipe(RADEON_RECIPE).model_copy(
        update={"train": load_recipe(RADEON_RECIPE).train.model_copy(update={"sequence_len": 8192})})
    with pytest.raises(TutorWrapError) as e:
        make_plan(r, hw)
    assert "no plan fits" in str(e.value) and "bitsandbytes >= 0.50" in (e.value.hint or "")


def test_the_assumed_bitsandbytes_is_pyprojects_pin():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text("utf-8"))["project"]["dependencies"]
    pin = next(re.search(r"==(\S+)", d).group(1) for d in deps if d.startswith("bitsandbytes"))
    assert amd.BNB_PINNED == pin


def test_nvidia_plans_keep_the_cuda_paths():
    r = load_recipe(REPO / "recipes" / "python-tutor-llama3-8b-rtx3060.yml")
    plan = make_plan(r, profiles.load_profile("rtx3060-12gb"))
    assert plan.lora_kernels is True and not any(c.knob == "bitsandbytes" for c in plan.choices)


def test_hub_dataset_recipe_rules(tmp_path):
    bad = tmp_path / "r.yml"
    bad.write_text("name: x\nbase_model: meta-llama/Meta-Llama-3-8B\ndataset: {hub: a/b, path: d.jsonl}\n"
                   "ollama: {model: x}\n")
    with pytest.raises(TutorWrapError, match="exactly one"):
        load_recipe(bad)
    r = load_recipe(RADEON_RECIPE)
    assert r.dataset.hub_split == "train[:10000]" and r.resolve(r.dataset.path) is None
    fmt = formats.get("alpaca")
    entry = fmt.axolotl_dataset(r.dataset, None)
    # Axolotl's user-defined type renders a row exactly like the alpaca format eval and the Modelfile use
    assert entry["type"]["no_input_format"].format(instruction="Q") == fmt.render("Q")
    assert entry["type"]["format"].format(instruction="Q", input="C") == fmt.render("Q", "C")
    assert entry["type"]["field_instruction"] == "query" and entry["type"]["field_output"] == "response"
