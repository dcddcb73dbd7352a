"""Plans for every shipped recipe on every shipped profile, validated by Axolotl's own schema."""

from pathlib import Path

import pytest

from tutor_wrap.data import formats
from tutor_wrap.data.chat_templates import CHATML
from tutor_wrap.machine.hardware import Hardware
from tutor_wrap.recipe.resolve import dataset_format
from tutor_wrap.backends import axolotl_config
from tutor_wrap.machine import profiles
from tutor_wrap.core.errors import TutorWrapError
from tutor_wrap.planning.budgets import hf_reference_mode, hf_reference_need
from tutor_wrap.planning.generation import generation_layout
from tutor_wrap.planning.planner import cpu_threads, make_plan, planned_sequence_len
from tutor_wrap.recipe.load import load_recipe

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.yml"))
# The demo's local SmolLM2 folder exists only after `make demo`; the same architecture is in the catalog.
STAND_IN = {"demo": "HuggingFaceTB/SmolLM2-135M-Instruct", "demo-chat": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def format_for(r):
    """The recipe's format; a stand-in hub model has no tokenizer here, so chat rows get SmolLM2's ChatML."""
    if r.dataset.format == "alpaca" or r.base_model_path() is not None:
        return dataset_format(r)
    return formats.get(r.dataset.format, CHATML)


def recipe_for_planning(path: Path):
    r = load_recipe(path)
    try:
        r.base_model_path()
    except TutorWrapError:
        r = r.model_copy(update={"base_model": STAND_IN[r.name]})
    return r


def test_every_recipe_plans_and_validates_on_every_profile(tmp_path):
    assert len(RECIPES) >= 2 and len(profiles.names()) >= 9
    for path in RECIPES:
        r = recipe_for_planning(path)
        for name in profiles.names():
            hw = profiles.load_profile(name)
            try:
                plan = make_plan(r, hw)   # every shipped recipe fits every shipped machine (or says it is impractical)
            except TutorWrapError as exc:
                # ... or, a GPU recipe on the CPU profile, needs more RAM than it has: refused, pointing to a GPU
                assert not hw.gpus and "of RAM" in str(exc) and "train on a GPU" in exc.hint, (path.name, name, exc)
                continue
            assert (plan.accelerator == "cpu") == (not hw.gpus), (path.name, name)
            assert plan.verdict == "fits" or (plan.verdict == "impractical" and not hw.gpus), (path.name, name)
            cfg = axolotl_config.render(r, plan, format_for(r), base_model=r.base_model, dataset_path=r.resolve(r.dataset.path),
                                        run_dir=tmp_path / r.name)
            assert axolotl_config.validate(cfg, source=f"{path.name} on {name}") == [], (path.name, name)
            if plan.memory:
                assert plan.memory["total_gib"] <= plan.budget_gib, (path.name, name)


def test_seed_recipe_fits_the_rtx3060_with_its_breakdown():
    r = load_recipe(REPO / "recipes/python-tutor-llama3-8b-rtx3060.yml")
    plan = make_plan(r, profiles.load_profile("rtx3060-12gb"))
    assert plan.method == "qlora" and plan.dtype == "bf16" and plan.sample_packing
    assert plan.micro_batch_size * plan.gradient_accumulation_steps == 8  # the recipe's effective batch
    assert plan.memory["total_gib"] <= plan.budget_gib <= 12
    for part in ("weights_quantized_gib", "weights_16bit_gib", "adapter_params_grads_optimizer_gib",
                 "activations_gib", "logits_loss_gib", "cuda_context_gib", "allocator_margin_gib"):
        assert plan.memory[part] > 0, part
    assert all(c.reason for c in plan.choices)


def test_seed_recipe_on_cpu_only_is_impractical_with_the_time_per_step():
    r = load_recipe(REPO / "recipes/python-tutor-llama3-8b-rtx3060.yml")
    cpu = profiles.load_profile("cpu-only")
    # 8B in fp32 (no 4-bit on this profile's stack) does not fit its RAM, and would crawl if it did
    with pytest.raises(TutorWrapError, match="of RAM .* and would be impractical anyway") as refused:
        make_plan(r, cpu)
    assert "train on a GPU" in refused.value.hint
    # with the RAM of a large server it fits, and the time per step is what says no
    from dataclasses import replace

    plan = make_plan(r, replace(cpu, ram_available_bytes=512 * 2**30, ram_total_bytes=512 * 2**30))
    assert plan.verdict == "impractical" and plan.seconds_per_step > 120
    assert any(c.knob == "time_per_step" and "impractical" in c.reason for c in plan.choices)


def test_cpu_plan_avoids_cuda_only_paths():
    r = recipe_for_planning(REPO / "recipes/demo.yml")
    plan = make_plan(r, profiles.load_profile("cpu-only"))
    assert (plan.dtype, plan.optimizer, plan.lora_kernels, plan.sample_packing) == ("fp32", "adamw_torch", False, False)


@pytest.mark.parametrize("lengths, expected", [(None, 1024), ([100, 173], 192), ([1500, 200], 1024)])
def test_sequence_len_follows_the_real_rows(lengths, expected):
    assert planned_sequence_len(1024, lengths)[0] == expected


def _cpu_box(**kw) -> Hardware:
    base = dict(source="test", cpu_count=16, ram_total_bytes=64 << 30, ram_available_bytes=60 << 30,
                swap_total_bytes=0, swap_free_bytes=0, disk_free_bytes=500 << 30, cpu_physical_cores=8)
    return Hardware(**{**base, **kw})


@pytest.mark.parametrize("kw, threads", [
    ({}, 8),                                              # one per physical core, not per hyper-thread
    ({"cpu_busy": 4.2}, 6),                               # 4 of 16 CPUs busy: 2 of the 8 cores left to it
    ({"cpu_usable": 4}, 4),                               # a container or taskset allows 4 CPUs
    ({"cpu_busy": 16.0}, 1),                              # a saturated machine still trains, on one thread
    ({"cpu_physical_cores": None, "cpu_count": 2}, 2),    # a profile without the physical count
])
def test_cpu_threads_follow_cores_affinity_and_load(kw, threads):
    n, _ = cpu_threads(_cpu_box(**kw))
    assert n == threads


@pytest.mark.parametrize("kw, requests, servers, threads", [
    ({}, 30, 4, 2),                                       # 8 cores: capped at 4 servers, the cores shared out
    ({"cpu_physical_cores": 2, "cpu_count": 2}, 30, 2, 1),  # the demo's machine: two one-thread servers
    ({}, 3, 3, 2),                                        # no more servers than requests
    ({"cpu_busy": 16.0}, 30, 1, 1),                       # a saturated machine: one server, one thread
])
def test_eval_generation_shares_the_cores_out_over_servers(kw, requests, servers, threads):
    layout = generation_layout(_cpu_box(**kw), requests)
    assert (layout.servers, layout.threads) == (servers, threads)


def test_eval_generation_on_a_gpu_is_one_server_and_a_cpu_build_there_uses_the_cores():
    from tutor_wrap.planning.generation import Device, offload

    hw = profiles.load_profile("rtx3060-12gb")
    card = Device("CUDA0", hw.gpus[0].name, hw.gpus[0].vram_total_bytes, hw.gpus[0].vram_total_bytes)
    on_gpu = generation_layout(hw, 30, offload([card], model_bytes=5 * 2**30, kv_bytes=2**29, layers=32))
    assert (on_gpu.servers, on_gpu.threads, on_gpu.gpu_layers) == (1, None, 33)
    # llama.cpp built for the CPU on that machine: the CPU layout, saying why
    cpu_build = generation_layout(hw, 30, offload([], model_bytes=5 * 2**30, kv_bytes=2**29, layers=32, backend="cpu"))
    assert cpu_build.gpu_layers == 0 and cpu_build.threads and "lists no GPU device" in cpu_build.why


def test_cpu_plan_states_and_passes_its_thread_count():
    r = recipe_for_planning(REPO / "recipes/demo.yml")
    plan = make_plan(r, _cpu_box(cpu_busy=2.0))
    assert plan.cpu_threads == 7
    assert any(c.knob == "cpu_threads" and "2.0 CPUs in use" in c.reason and "OMP_NUM_THREADS" in c.reason
               for c in plan.choices)
    assert make_plan(r, profiles.load_profile("rtx3060-12gb")).cpu_threads is None


def test_cpu_processes_split_the_threads_and_the_batch():
    r = recipe_for_planning(REPO / "recipes/demo.yml")
    r = r.model_copy(update={"train": r.train.model_copy(update={"batch_size": 8, "micro_batch_size": None})})
    one = make_plan(r, _cpu_box())
    two = make_plan(r, _cpu_box(), processes=2)
    assert (one.num_processes, two.num_processes) == (1, 2)
    assert two.cpu_threads == one.cpu_threads // 2            # the 8 cores shared, not 8 threads each
    assert two.micro_batch_size * two.gradient_accumulation_steps * 2 == \
        one.micro_batch_size * one.gradient_accumulation_steps   # the same effective batch
    assert any(c.knob == "num_processes" and "gloo" in c.reason for c in two.choices)
    assert not any(c.knob == "num_processes" for c in one.choices)


@pytest.mark.parametrize("hw, processes, says", [
    (lambda: profiles.load_profile("2x-rtx4090-24gb"), 1, "one process per GPU"),
    (lambda: profiles.load_profile("rtx3060-12gb"), 2, "CUDA_VISIBLE_DEVICES"),
    (lambda: _cpu_box(cpu_usable=4), 6, "--num-processes 4 or fewer"),
    (lambda: _cpu_box(), 0, "at least 1"),
])
def test_processes_the_machine_cannot_run_are_refused_at_plan_time(hw, processes, says):
    r = recipe_for_planning(REPO / "recipes/demo.yml")
    with pytest.raises(TutorWrapError) as exc:
        make_plan(r, hw(), processes=processes)
    assert says in str(exc.value) + (exc.value.hint or "")


def test_several_gpus_plan_one_process_each_whether_asked_or_not():
    r = recipe_for_planning(REPO / "recipes/demo.yml")
    hw = profiles.load_profile("2x-rtx4090-24gb")
    assert make_plan(r, hw).num_processes == make_plan(r, hw, processes=2).num_processes == 2


def test_processes_never_grow_the_recipes_batch(tmp_path):
    r = recipe_for_planning(REPO / "recipes/demo.yml")
    small = r.model_copy(update={"train": r.train.model_copy(update={"batch_size": 2, "micro_batch_size": 2})})
    with pytest.raises(TutorWrapError) as exc:
        make_plan(small, _cpu_box(), processes=2)
    assert "train.batch_size 2 is smaller than 2 processes x micro-batch 2" in str(exc.value)


def test_export_hf_reference_fits_the_ram_or_is_skipped_with_the_numbers():
    """The reference user's merged Llama 3 8B (bf16, 16 GB in shards of about 5 GB) would need about 35 GiB in fp32:
    on the RTX 3060 box's RAM the export skips that comparison instead of being killed; a 135M model runs beside
    the conversion; one that fits only alone waits for the converter to finish."""
    hw = profiles.load_profile("rtx3060-12gb")
    mode, why = hf_reference_mode(hf_reference_need(8_030_000_000, 5 << 30), 16 << 30, hw.ram_available_bytes)
    assert mode == "skip" and "GiB of RAM" in why
    assert hf_reference_mode(hf_reference_need(135_000_000, 540 << 20), 540 << 20, hw.ram_available_bytes)[0] == "beside"
    need = hf_reference_need(1_500_000_000, 3 << 30)              # 1.5B: about 9.6 GiB in fp32
    assert hf_reference_mode(need, 3 << 30, need + (1 << 30))[0] == "after"


def test_a_job_no_card_setting_can_hold_is_refused_with_the_smallest_need():
    """A full fine-tune of the 8B: its bf16 weights alone (2 bytes a parameter) exceed the 12 GiB card."""
    r = load_recipe(REPO / "recipes/python-tutor-llama3-8b-rtx3060.yml").model_copy(update={"method": "full"})
    with pytest.raises(TutorWrapError, match="no plan fits") as e:
        make_plan(r, profiles.load_profile("rtx3060-12gb"))
    need = float(str(e.value).split("needs ")[1].split(" GiB")[0])
    assert need > 8.03e9 * 2 / 2**30 > 12    # at least the weights, gradients and states come on top


def test_the_cpu_dtype_follows_the_measurement_for_the_cpus_isa(monkeypatch):
    from tutor_wrap.planning import planner

    avx2 = ["avx2", "fma", "f16c"]
    bf16_cpu = avx2 + ["avx512f", "avx512_bf16"]
    assert planner.cpu_dtype(avx2)[0] == "fp32" and "AVX2" in planner.cpu_dtype(avx2)[1]
    amx = bf16_cpu + ["amx_tile", "amx_bf16"]
    assert planner.cpu_dtype(amx) == ("fp32", planner.cpu_dtype(amx)[1]) and "not measured" in planner.cpu_dtype(amx)[1]
    # a level is planned in bf16 exactly when its measurement clears the rule, and the figure is the reason
    monkeypatch.setattr(planner, "CPU_BF16_MEASURED", {"AVX512-BF16": ((1.5, 1.6), (0.1, 0.2), "a test CPU")})
    dtype, why = planner.cpu_dtype(bf16_cpu)
    assert dtype == "bf16" and "x1.50-1.60" in why and "a test CPU" in why
    monkeypatch.setattr(planner, "CPU_BF16_MEASURED", {"AVX512-BF16": ((1.5, 1.6), (2.0, 3.0), "a test CPU")})
    assert planner.cpu_dtype(bf16_cpu)[0] == "fp32"   # faster, but the model learned less


def test_the_planned_context_holds_the_longest_eval_prompt():
    """Rows of 100 tokens would shorten 1024 to 128; eval serves its prompts in that context, so a 300-token
    eval prompt keeps 320 (the next multiple of 64)."""
    assert planned_sequence_len(1024, [100, 90])[0] == 128
    seq, why = planned_sequence_len(1024, [100, 90], eval_prompt=300)
    assert seq == 320 and "eval prompt is 300 tokens" in why
