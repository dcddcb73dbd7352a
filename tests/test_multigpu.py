"""Several GPUs: DDP when the per-GPU plan fits, DeepSpeed ZeRO-2/3 when the model state does not; the memory
model sizes each GPU's share; the generated DeepSpeed JSON; accelerate's launch arguments."""

import json
from dataclasses import replace
from pathlib import Path

import pytest

from tutor_wrap.data.alpaca import ALPACA
from tutor_wrap.backends import axolotl_config
from tutor_wrap.machine import profiles
from tutor_wrap.models.catalog import lookup
from tutor_wrap.planning.distributed import accelerate_args, deepspeed_config
from tutor_wrap.core.errors import TutorWrapError
from tutor_wrap.planning.memory import Knobs, estimate
from tutor_wrap.planning.planner import SAFETY, make_plan
from tutor_wrap.recipe.load import load_recipe

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]
SEED = REPO / "recipes" / "python-tutor-llama3-8b-rtx3060.yml"
LLAMA_70B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192,
             "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
             "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192,
             "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


def seed(method):
    return load_recipe(SEED).model_copy(update={"method": method})


def reason(plan, knob):
    return next(c.reason for c in plan.choices if c.knob == knob)


def rendered(r, plan, run_dir):
    cfg = axolotl_config.render(r, plan, ALPACA, base_model=r.base_model, dataset_path=r.resolve(r.dataset.path),
                                run_dir=run_dir)
    assert axolotl_config.validate(cfg, source=f"{r.name} on {plan.num_processes} GPUs") == []
    return cfg


def test_lora_8b_on_two_4090s_is_ddp(tmp_path):
    r = seed("lora")
    plan = make_plan(r, profiles.load_profile("2x-rtx4090-24gb"))
    assert (plan.method, plan.sharding, plan.num_processes) == ("lora", "ddp", 2)
    assert "DDP over 2 GPUs" in reason(plan, "sharding")
    assert plan.memory["total_gib"] <= plan.budget_gib
    assert plan.micro_batch_size * plan.gradient_accumulation_steps * 2 == r.train.batch_size
    cfg = rendered(r, plan, tmp_path)
    assert "deepspeed" not in cfg and cfg["ddp_find_unused_parameters"] is False
    assert axolotl_config.write_sidecars(cfg) == []


def test_full_8b_on_8_h100s_shards_with_deepspeed(tmp_path):
    r = seed("full")
    hw = profiles.load_profile("8x-h100-80gb")
    plan = make_plan(r, hw)
    assert plan.method == "full" and plan.num_processes == 8 and plan.sharding in ("zero2", "zero3")
    # why: the memory model says DDP (every GPU holds weights + grads + AdamW states) does not fit one H100
    arch = lookup(r.base_model)
    budget = hw.gpus[0].vram_total_bytes * (1 - SAFETY)
    ddp = estimate(arch, Knobs(method="full", seq_len=plan.sequence_len, micro_batch=1, grad_ckpt=True,
                               optimizer="adamw_torch", num_gpus=8, sharding="ddp"))
    assert ddp.total > budget
    assert plan.memory["total_gib"] <= plan.budget_gib
    assert "ddp needs" in reason(plan, "sharding")
    cfg = rendered(r, plan, tmp_path)
    written = axolotl_config.write_sidecars(cfg)
    assert [str(p) for p in written] == [cfg["deepspeed"]]
    ds = json.loads(Path(cfg["deepspeed"]).read_text())
    assert ds["zero_optimization"]["stage"] == {"zero2": 2, "zero3": 3}[plan.sharding]


def test_lora_70b_on_8_h100s_needs_zero3(tmp_path):
    model = tmp_path / "llama-70b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(LLAMA_70B))
    r = seed("lora").model_copy(update={"base_model": str(model)})
    plan = make_plan(r, profiles.load_profile("8x-h100-80gb"))
    assert (plan.method, plan.sharding) == ("lora", "zero3")   # 140 GB of bf16 weights: only sharding them fits
    assert plan.lora_kernels is False and "ZeRO-3" in reason(plan, "lora_kernels")
    cfg = rendered(r, plan, tmp_path / "run")
    assert cfg["deepspeed"].endswith("deepspeed_zero3.json")


def test_memory_model_shares_the_state_over_the_gpus():
    arch = lookup("meta-llama/Meta-Llama-3-8B")
    k = Knobs(method="full", seq_len=1024, micro_batch=1, grad_ckpt=True, optimizer="adamw_torch")
    one = estimate(arch, k).total
    totals = {s: estimate(arch, replace(k, num_gpus=8, sharding=s)).total for s in ("ddp", "zero2", "zero3")}
    assert totals["zero3"] < totals["zero2"] < one < totals["ddp"]


def test_more_gpus_than_fit_still_fails_with_the_sharding_named():
    with pytest.raises(TutorWrapError, match="even with zero3"):
        make_plan(seed("full"), profiles.load_profile("2x-rtx4090-24gb"))


@pytest.mark.parametrize("sharding, stage", [("zero2", 2), ("zero3", 3)])
def test_deepspeed_config_is_what_hf_and_axolotl_read(sharding, stage):
    cfg = deepspeed_config(sharding)
    assert cfg["zero_optimization"]["stage"] == stage
    # batch, precision and clipping come from the Axolotl YAML through transformers' "auto" filling
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
                "gradient_clipping"):
        assert cfg[key] == "auto"
    assert cfg["bf16"]["enabled"] == cfg["fp16"]["enabled"] == "auto"
    if stage == 3:
        z = cfg["zero_optimization"]
        assert z["stage3_gather_16bit_weights_on_model_save"] is True
        assert z["stage3_prefetch_bucket_size"] == z["stage3_param_persistence_threshold"] == "auto"
    from accelerate.utils.deepspeed import HfDeepSpeedConfig

    hf = HfDeepSpeedConfig(json.loads(json.dumps(cfg)))
    assert hf.get_value("zero_optimization.stage") == stage and hf.is_zero3() == (stage == 3)


def test_accelerate_args_one_and_several_machines():
    plan = {"num_processes": 8}
    assert accelerate_args(plan) == ["--num_processes", "8", "--num_machines", "1", "--multi_gpu",
                                     "--main_process_port", "0"]   # accelerate picks a free port
    assert accelerate_args({"num_processes": 1}) == ["--num_processes", "1", "--num_machines", "1"]
    two = accelerate_args(plan, {"num_machines": 2, "machine_rank": 1, "main_process_ip": "10.0.0.1"})
    assert two == ["--num_processes", "16", "--num_machines", "2", "--multi_gpu", "--machine_rank", "1",
                   "--main_process_ip", "10.0.0.1", "--main_process_port", "29500"]
    with pytest.raises(TutorWrapError):
        accelerate_args(plan, {"num_machines": 2, "machine_rank": 0})
    with pytest.raises(TutorWrapError):
        accelerate_args(plan, {"num_machines": 2, "machine_rank": 2, "main_process_ip": "10.0.0.1"})
    from accelerate.commands.launch import launch_command_parser

    ns = launch_command_parser().parse_args([*two, "-m", "axolotl.cli.train", "cfg.yml"])
    assert (ns.num_processes, ns.num_machines, ns.machine_rank, ns.main_process_ip, ns.main_process_port) == (
        16, 2, 1, "10.0.0.1", 29500)
    assert ns.multi_gpu and ns.module and ns.training_script == "axolotl.cli.train"


def _sharded_plans(tmp_path):
    full = seed("full")
    model = tmp_path / "llama-70b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(LLAMA_70B))
    lora70 = seed("lora").model_copy(update={"base_model": str(model)})
    hw = profiles.load_profile("8x-h100-80gb")
    return [(r, make_plan(r, hw)) for r in (full, lora70)]


def test_the_written_deepspeed_json_passes_transformers_accelerate_and_deepspeed(tmp_path):
    """What a multi-GPU run would hand over, parsed by the three readers it meets there, without a GPU:
    transformers fills every "auto" from the TrainingArguments Axolotl builds from our YAML and from the model's
    hidden size, then DeepSpeed's own DeepSpeedConfig validates the result (its pydantic ZeRO model and the batch
    arithmetic), and accelerate's DeepSpeedPlugin reads the file as `accelerate launch` would."""
    pytest.importorskip("deepspeed")   # in the dev extras; a user's GPU machine has it through axolotl[deepspeed]
    from types import SimpleNamespace

    from accelerate.utils import DeepSpeedPlugin
    from deepspeed.runtime.config import DeepSpeedConfig
    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    stages = set()
    for r, plan in _sharded_plans(tmp_path):
        cfg = rendered(r, plan, tmp_path / f"run-{r.method}")
        path = axolotl_config.write_sidecars(cfg)[0]
        args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True,   # the values, not the device
                                 per_device_train_batch_size=cfg["micro_batch_size"],
                                 gradient_accumulation_steps=cfg["gradient_accumulation_steps"],
                                 learning_rate=cfg["learning_rate"], weight_decay=cfg["weight_decay"],
                                 bf16=cfg["bf16"], fp16=cfg["fp16"])
        hf = HfTrainerDeepSpeedConfig(str(path))
        hf.trainer_config_process(args)
        hidden = lookup(r.base_model).hidden_size
        hf.trainer_config_finalize(args, SimpleNamespace(config=SimpleNamespace(hidden_size=hidden)), 100)
        assert '"auto"' not in json.dumps(hf.config), "an 'auto' value nobody fills would reach DeepSpeed"

        ds = DeepSpeedConfig(hf.config)
        stage = {"zero2": 2, "zero3": 3}[plan.sharding]
        stages.add(stage)
        assert ds.zero_optimization_stage == stage and ds.zero_enabled
        assert ds.train_micro_batch_size_per_gpu == plan.micro_batch_size
        assert ds.gradient_accumulation_steps == plan.gradient_accumulation_steps
        assert ds.bfloat16_config.enabled == (plan.dtype == "bf16") and not ds.float16_config.enabled
        if stage == 3:
            assert ds.zero_config.gather_16bit_weights_on_model_save is True
            assert ds.zero_config.prefetch_bucket_size == int(0.9 * hidden * hidden)

        plugin = DeepSpeedPlugin(hf_ds_config=str(path))
        assert plugin.zero_stage == stage and plugin.hf_ds_config.is_zero3() == (stage == 3)
    assert stages == {2, 3}   # full 8B on 8 H100s shards at ZeRO-2, LoRA 70B needs ZeRO-3: both files parsed
