import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from tutor_wrap.models.catalog import lookup
from tutor_wrap.core.errors import TutorWrapError
from tutor_wrap.core.units import GIB as GiB
from tutor_wrap.planning.memory import Knobs, estimate, fits, search

pytestmark = pytest.mark.tools

RTX3060 = 12 * GiB      # 12288 MiB card

SEED = Knobs(method="qlora", lora_r=32, lora_targets="all-linear", seq_len=1024, micro_batch=1, grad_ckpt=True,
             optimizer="paged_adamw_8bit", attn="sdpa", packing=False, loss="standard", dtype="bf16")


@pytest.fixture(scope="module")
def l3():
    return lookup("llama-3-8b")


def total(arch, **kw):
    return estimate(arch, dataclasses.replace(SEED, **kw)).total


def test_qlora_weight_and_adapter_sizes(l3):
    br = estimate(l3, SEED)
    # NF4 with double quantization as bitsandbytes stores it, measured on a real 4096 x 4096 layer: packed codes,
    # 8-bit absmax per block and the second-level scales (what QLoRA keeps of every decoder linear layer)
    import bitsandbytes.functional as bf
    import torch

    w = torch.randn(4096, 4096, dtype=torch.bfloat16)
    q, st = bf.quantize_4bit(w, quant_type="nf4", compress_statistics=True, quant_storage=torch.bfloat16)
    stored = sum(t.numel() * t.element_size() for t in (q, st.absmax, st.state2.absmax, st.state2.code, st.offset))
    assert br.weights_quantized == pytest.approx(l3.decoder_linear_params * stored / w.numel(), rel=0.01)
    # Axolotl keeps embed_tokens + lm_head in bf16 for qlora: 2 x 525 M x 2 B
    assert br.weights_16bit == pytest.approx(2 * 128256 * 4096 * 2, rel=0.01)
    # 83.9 M LoRA params: fp32 weights + fp32 grads + ~2.03 B of 8-bit Adam states
    assert br.adapter_params_grads_optimizer == pytest.approx(83_886_080 * 10.03, rel=0.01)
    adamw = estimate(l3, dataclasses.replace(SEED, optimizer="adamw_torch"))
    assert adamw.adapter_params_grads_optimizer == 83_886_080 * 16


def test_fp32_embeddings_of_plain_peft(l3):
    plain = estimate(l3, dataclasses.replace(SEED, kbit_fp32_embeddings=True))
    ax = estimate(l3, SEED)
    assert plain.weights_16bit == pytest.approx(2 * ax.weights_16bit, rel=0.01)
    assert plain.logits_loss > ax.logits_loss


@pytest.mark.parametrize("method,accum", [("full", 4), ("lora", 1), ("lora8bit", 1), ("qlora", 1), ("qlora", 8)])
def test_monotone_in_seq_and_micro_batch(l3, method, accum):
    seqs = [total(l3, method=method, grad_accum=accum, seq_len=s) for s in (256, 512, 1024, 2048, 4096)]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    mbs = [total(l3, method=method, grad_accum=accum, micro_batch=m) for m in (1, 2, 4, 8)]
    assert mbs == sorted(mbs) and len(set(mbs)) == len(mbs)


def test_full_without_accumulation_never_decreases(l3):
    # grads replace freed activations: flat while the gradients dominate, never lower
    seqs = [total(l3, method="full", grad_accum=1, seq_len=s) for s in (256, 1024, 4096, 16384)]
    assert seqs == sorted(seqs) and seqs[-1] > seqs[0]
    assert total(l3, method="full", grad_accum=4) > total(l3, method="full", grad_accum=1)


def test_savings_are_savings(l3):
    base = dict(method="lora", grad_ckpt=False, optimizer="adamw_torch", loss="standard", seq_len=2048)
    ref = total(l3, **base)
    assert total(l3, **{**base, "grad_ckpt": True}) < ref
    assert total(l3, **{**base, "method": "qlora"}) < total(l3, **{**base, "method": "lora8bit"}) < ref
    assert total(l3, **{**base, "loss": "cce"}) < total(l3, **{**base, "loss": "chunked"}) < ref
    assert total(l3, **{**base, "optimizer": "adamw_bnb_8bit"}) < ref
    assert total(l3, **{**base, "attn": "eager"}) > ref
    full = dict(base, method="full")
    assert total(l3, **{**full, "optimizer": "adamw_bnb_8bit"}) < total(l3, **full)


def test_eager_attention_is_quadratic(l3):
    def extra(s):
        return total(l3, attn="eager", seq_len=s, grad_ckpt=False) - total(l3, attn="sdpa", seq_len=s, grad_ckpt=False)
    assert extra(4096) == pytest.approx(4 * extra(2048), rel=0.05)


def test_seed_case_fits_rtx3060_and_lora_does_not(l3):
    assert fits(l3, SEED, RTX3060)
    assert not fits(l3, dataclasses.replace(SEED, method="lora"), RTX3060)
    assert not fits(l3, dataclasses.replace(SEED, method="lora"), RTX3060, safety=0.0)


def test_search_finds_a_plan_for_the_seed(l3):
    start = dataclasses.replace(SEED, method="lora", micro_batch=4)
    plans = search(l3, start, RTX3060, allow_qlora=True, allow_flash=False, safety=0.10)
    knobs, br, why = plans[0]
    assert knobs.method == "qlora" and br.total <= RTX3060 * 0.9 and fits(l3, knobs, RTX3060)
    assert knobs.seq_len == 1024 and knobs.optimizer.endswith("8bit") and knobs.attn == "sdpa"
    assert "fit" in why or "GiB" in why
    # fitting candidates come first, and no fitting plan is listed after a miss
    flags = [b.total <= RTX3060 * 0.9 for _, b, _ in plans]
    assert flags == sorted(flags, reverse=True)


def test_search_without_qlora_reports_misses(l3):
    plans = search(l3, dataclasses.replace(SEED, method="lora"), RTX3060, allow_qlora=False, allow_flash=True,
                   safety=0.10)
    assert plans and all(not fits(l3, k, RTX3060) for k, _, _ in plans)
    assert "does not fit" in plans[0][2]


def test_search_prefers_no_checkpointing_when_it_fits():
    small = lookup("smollm2-135m")
    plans = search(small, Knobs(method="lora", seq_len=512), 24 * GiB, allow_qlora=True, allow_flash=True,
                   safety=0.10)
    best = plans[0][0]
    assert best.method == "lora" and not best.grad_ckpt and best.micro_batch == 16 and best.attn == "flash"


def test_sharding_divides(l3):
    full = dict(method="full", optimizer="adamw_torch", seq_len=1024)
    one = estimate(l3, dataclasses.replace(SEED, **full))
    z2 = estimate(l3, dataclasses.replace(SEED, num_gpus=4, sharding="zero2", **full))
    z3 = estimate(l3, dataclasses.replace(SEED, num_gpus=4, sharding="zero3", **full))
    assert z3.total < z2.total < one.total
    assert z2.weights_16bit == one.weights_16bit and z3.weights_16bit < one.weights_16bit


@pytest.mark.parametrize("kw", [dict(method="dora"), dict(optimizer="sgd"), dict(attn="xformers"),
                                dict(seq_len=0), dict(micro_batch=-1), dict(dtype="fp8"), dict(lora_r=0),
                                dict(lora_targets=("q_proj", "nope"))])
def test_bad_knobs_are_user_errors(kw):
    with pytest.raises(TutorWrapError):
        Knobs(**kw)


def test_bench_runs():
    # The search's speed is the bench's to print (a timed unit test fails on a busy laptop), not a test's to gate.
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(repo / "bench/memory_bench.py")], capture_output=True, text=True,
                         check=True, cwd=repo)
    assert "planner search, Llama 3 8B on a 12 GiB card: median" in out.stdout
    # the summary line is the median of the rows it prints (the abs % error column of the rows marked for stats)
    rows = [ln.split() for ln in out.stdout.splitlines() if ln.rstrip().endswith((" yes", " no"))]
    errs = sorted(float(r[-2]) for r in rows if r[-1] == "yes")
    n = len(errs)
    median = (errs[n // 2] + errs[(n - 1) // 2]) / 2
    assert n >= 10 and f"{n} rows in stats" in out.stdout
    assert f"median abs error {median:.1f}%, max abs error {max(errs):.1f}%" in out.stdout
