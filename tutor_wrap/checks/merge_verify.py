"""Check that a merged model is what base + LoRA adapter compute, before anything downstream trusts it.

    python -m tutor_wrap.checks.merge_verify BASE ADAPTER MERGED [--json] [--ram-budget BYTES] [--no-logits]

Two checks, both on CPU in float32, weights read from safetensors only (`trust_remote_code=False`, offline):

weights (always; streaming, one tensor at a time, so it fits any machine that could merge)
    For every tensor of the merged model: an adapted weight must equal W + scale * B @ A computed here in fp32
    from the base and the adapter files (scale = alpha / r, or alpha / sqrt(r) with rsLoRA), element by element
    within |merged - expected| <= RTOL_WEIGHT[dtype] * (|W| + |scale * B @ A|) + 1e-5 * max|scale * B @ A|; every other tensor
    must equal the base's cast to the merged tensor's dtype, exactly (a merge may store in another dtype).
    RTOL_WEIGHT is four unit roundoffs of the dtype the merged tensor is stored in (bf16 2^-6, fp16 2^-9, fp32
    2^-22): a merge that computes in that dtype rounds W, B @ A and their sum once each (legacy merges in the
    load dtype), the fourth leaves room for another summation order. Rounding errors scale with the operands
    (|W| + |dW|), not with a sum that may cancel to ~0. The absolute term covers fp32 reordering of B @ A.
    Adapters this check cannot rebuild by itself (DoRA, rank/alpha patterns, modules_to_save, trainable tokens,
    non-LoRA PEFT types) skip it with the reason; the logits check still covers them.

logits (when base + adapter in fp32 fit the RAM budget, else "skipped: needs X GiB")
    Next-token logits of the merged model against base + adapter through PEFT (unmerged), on INPUTS fixed token
    sequences, one model loaded at a time (peak = one fp32 model + the adapter + ~1 GiB runtime). Passes when
    max|merged - reference| <= RTOL_LOGITS[dtype] * max|reference| + 1e-4. With an fp32 merged model the only
    difference is summation order (measured ~1e-6 relative on the tiny test model), so 1e-4 is a wide margin
    that a dropped adapter or a changed weight still fails. A 16-bit merged model rounds every adapted weight once
    more (relative 2^-9 each, bf16); the logits then drift by a few tenths of a percent per layer: 1.2% of their
    largest value on bench/merge_bench.py's 13-layer bf16 model (top-1 agreement 99.2%); deeper models should
    drift more (roughly with sqrt(depth); not measured here). bf16/fp16 get 5e-2: 4x the measured noise, below
    what an unmerged adapter does to any adapter worth merging (34% on the bench model); a weaker adapter's
    merge is still checked element by element by the weight check.
    `adapter_effect` (max|reference - base|) is recorded too: a merge that changed nothing fails whenever the
    adapter's own effect exceeds the tolerance, and the report shows by how much.

Output: one JSON object (with --json), exit 0 = passed or skipped, 1 = mismatch, 2 = could not run.
The module imports torch only inside the functions that need it, so the merge stage can import it cheaply.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from tutor_wrap.backends.hf_generate import Request, greedy_texts
from tutor_wrap.core import atomic
from tutor_wrap.core.errors import TutorWrapError
from tutor_wrap.core.proc import append_log, die_with_parent, tail, tool_env
from tutor_wrap.core.units import GIB
from tutor_wrap.planning.budgets import hf_reference_need_of
from tutor_wrap.models.files import adapter_config, lora_pairs, param_stats, read_header, weight_files

INPUTS = (4, 32)                 # sequences x tokens of the logits check
RTOL_LOGITS = {"F32": 1e-4, "BF16": 5e-2, "F16": 5e-2}
ATOL_LOGITS = 1e-4
RTOL_WEIGHT = {"F32": 4 * 2.0**-24, "BF16": 4 * 2.0**-8, "F16": 4 * 2.0**-11}  # 4 unit roundoffs
ATOL_WEIGHT_OF_DELTA = 1e-5
UNSUPPORTED_FOR_WEIGHTS = ("use_dora", "modules_to_save", "trainable_token_indices", "rank_pattern", "alpha_pattern",
                           "fan_in_fan_out", "lora_bias", "layer_replication")


# ---- torch-free helpers (also used by the merge stage) ------------------------------------------------------------


def logits_need_bytes(base: Path, adapter: Path) -> int:
    """RAM the logits check needs: one model in fp32 + its largest shard while loading + the adapter + runtime."""
    ad = Path(adapter) / "adapter_model.safetensors"
    return hf_reference_need_of(base)[0] + (2 * ad.stat().st_size if ad.is_file() else 0)


def available_ram() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001
        return 0


def ram_for_checks(ram_budget: int | None) -> int:
    """RAM the logits checks may use: what is available, capped by the caller's budget."""
    have = available_ram()
    if ram_budget is not None:
        have = min(have, ram_budget) if have else ram_budget
    return have


def _verdict(out: dict) -> dict:
    """status/ok from the weight and logits parts, and the summary fields the merge report shows (logits when they
    ran, else the weight check's worst tensor)."""
    states = [out["weights"]["status"], out["logits"]["status"]]
    out["status"] = "failed" if "failed" in states else ("passed" if "passed" in states else "skipped")
    out["ok"] = {"passed": True, "failed": False, "skipped": None}[out["status"]]
    lg, w = out["logits"], out["weights"]
    if lg["status"] != "skipped":
        out.update(max_abs_diff=lg["max_abs_diff"], rel_err=lg["rel_err"], tolerance=lg["tolerance"], inputs=lg["inputs"])
    else:
        out.update(max_abs_diff=(w.get("worst") or {}).get("max_abs_diff"), rel_err=None,
                   tolerance=w.get("tolerance"), inputs=None)
    return out


def fixed_inputs(vocab: int, n_seq: int = INPUTS[0], n_tok: int = INPUTS[1], seed: int = 0) -> list[list[int]]:
    """Deterministic token ids (a 64-bit LCG, no RNG library), first token of each row = 1 (BOS for Llama)."""
    state, rows = seed * 2654435761 + 1, []
    for _ in range(n_seq):
        row = [1 if vocab > 1 else 0]
        while len(row) < n_tok:
            state = (state * 6364136223846793005 + 1442695040888963407) % 2**64
            row.append(int((state >> 33) % vocab))
        rows.append(row)
    return rows


# ---- the checks (torch) -------------------------------------------------------------------------------------------


def check_weights(base: Path, adapter: Path, merged: Path) -> dict:
    """Tensor by tensor: merged == base + scale * B @ A (adapted) or == base (everything else)."""
    import torch
    from safetensors import safe_open

    t0 = time.perf_counter()
    acfg = adapter_config(adapter)
    if acfg.get("peft_type", "LORA") != "LORA":
        return {"status": "skipped", "reason": f"peft_type {acfg.get('peft_type')} is not LoRA"}
    bad = [k for k in UNSUPPORTED_FOR_WEIGHTS if acfg.get(k)]
    if bad:
        return {"status": "skipped", "reason": f"adapter uses {', '.join(bad)}: only the logits check applies"}
    r, alpha = int(acfg["r"]), float(acfg["lora_alpha"])
    scale = alpha / math.sqrt(r) if acfg.get("use_rslora") else alpha / r
    pairs = lora_pairs(adapter)

    base_index = {k: f for f in weight_files(base) for k in read_header(f)}
    merged_index = {k: f for f in weight_files(merged) for k in read_header(f)}
    tied = bool(json.loads((base / "config.json").read_text("utf-8")).get("tie_word_embeddings"))
    missing = sorted(k for k in base_index if k not in merged_index and not (tied and k == "lm_head.weight"))
    extra = sorted(k for k in merged_index if k not in base_index)
    unmatched = sorted(k for k in pairs if k not in base_index)

    failures, adapted, worst = [], 0, {"key": None, "max_abs_diff": 0.0, "ratio": 0.0}
    handles: dict[Path, object] = {}

    def get(f: Path, key: str):
        if f not in handles:
            handles[f] = safe_open(str(f), framework="pt", device="cpu")
        return handles[f].get_tensor(key)

    with safe_open(str(adapter / "adapter_model.safetensors"), framework="pt", device="cpu") as ad:
        for key in sorted(merged_index):
            if key not in base_index:
                continue
            m_raw = get(merged_index[key], key)
            b_raw = get(base_index[key], key)
            b = b_raw.to(torch.float32)
            m = m_raw.to(torch.float32)
            if m.shape != b.shape:
                failures.append({"key": key, "why": f"shape {tuple(m.shape)} != base {tuple(b.shape)}"})
                continue
            if key in pairs:
                adapted += 1
                a_k, b_k = pairs[key]
                delta = scale * (ad.get_tensor(b_k).to(torch.float32) @ ad.get_tensor(a_k).to(torch.float32))
                expected = b + delta
                dtype = str(m_raw.dtype).replace("torch.", "")
                rtol = RTOL_WEIGHT.get({"float32": "F32", "bfloat16": "BF16", "float16": "F16"}.get(dtype, "BF16"), RTOL_WEIGHT["BF16"])
                atol = ATOL_WEIGHT_OF_DELTA * float(delta.abs().max()) + 1e-12
                err = (m - expected).abs()
                allowed = rtol * (b.abs() + delta.abs()) + atol
                ratio = float((err / allowed).max())
                if ratio >= worst["ratio"]:
                    worst = {"key": key, "max_abs_diff": float(err.max()), "ratio": ratio}
                if ratio > 1.0:
                    n_bad = int((err > allowed).sum())
                    failures.append({"key": key, "why": f"{n_bad} of {err.numel()} elements off W + scale*B@A "
                                                        f"(max abs diff {float(err.max()):.3g}, "
                                                        f"max |delta| {float(delta.abs().max()):.3g})"})
                del delta, expected, err, allowed
            elif not (torch.equal(m_raw, b_raw) if m_raw.dtype == b_raw.dtype
                      else torch.equal(m, b_raw.to(m_raw.dtype).to(torch.float32))):
                failures.append({"key": key, "why": f"not adapted but changed (max abs diff {float((m - b).abs().max()):.3g})"})
            del m, b, m_raw, b_raw
    handles.clear()
    gc.collect()
    if missing:
        failures.append({"key": ", ".join(missing[:5]), "why": f"{len(missing)} base tensor(s) missing from the merged model"})
    if unmatched:
        failures.append({"key": ", ".join(unmatched[:5]), "why": f"{len(unmatched)} adapter module(s) match no base tensor"})
    return {
        "status": "passed" if not failures else "failed",
        "tensors": len(merged_index), "adapted_tensors": adapted, "scale": scale,
        "worst": worst, "extra_tensors": extra[:10], "failures": failures[:20],
        "tolerance": {"rtol_by_dtype": RTOL_WEIGHT, "atol_of_max_delta": ATOL_WEIGHT_OF_DELTA},
        "seconds": round(time.perf_counter() - t0, 1),
    }


def _load_causal_lm(path: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, use_safetensors=True,
                                                trust_remote_code=False, local_files_only=True, low_cpu_mem_usage=True).eval()


def _merged_logits(merged: Path, ids, greedy: Request | None = None):
    """The merged model's logits on `ids` (fp32, loaded alone and freed after), its stored dtype, and, while it is
    loaded, the answer to `greedy` (the export's reference continuations; None when not asked)."""
    import torch

    m = _load_causal_lm(merged)
    with torch.no_grad():
        got = m(input_ids=ids).logits.float()
    texts = None
    if greedy is not None:
        from transformers import AutoTokenizer

        texts = greedy_texts(m, AutoTokenizer.from_pretrained(str(merged), trust_remote_code=False), greedy)
    del m
    gc.collect()
    return got, param_stats(merged)["dtype"] or "F32", texts


def _logit_stats(got, ref) -> dict:
    diff = (got - ref).abs()
    ref_max = float(ref.abs().max())
    return {"max_abs_diff": float(diff.max()), "rel_err": float(diff.max()) / ref_max if ref_max else None,
            "top1_agreement": float((got.argmax(-1) == ref.argmax(-1)).float().mean())}


def _flips_beyond_ties(got, ref, tol: float) -> int:
    """Positions where the merged model's next token differs from the reference's although the reference preferred
    its own token by more than 2 * tol: no error within tol can explain such a flip (near-ties may flip)."""
    import torch

    pick = got.argmax(-1)
    margin = ref.max(-1).values - torch.gather(ref, -1, pick.unsqueeze(-1)).squeeze(-1)
    return int((margin > 2 * tol).sum())


def check_logits(base: Path, adapter: Path, merged: Path, greedy: Request | None = None) -> tuple[dict, dict | None]:
    """Merged model vs base + adapter (PEFT, unmerged), fp32, one model in memory at a time; and the answer to
    `greedy` from the merged model while it is loaded (None when not asked)."""
    import torch
    from peft import PeftModel

    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = _load_causal_lm(base)
    vocab = int(model.get_input_embeddings().weight.shape[0])
    # An adapter trained with added tokens carries a bigger embedding (modules_to_save / trainable tokens).
    for k, t in read_header(adapter / "adapter_model.safetensors").items():
        if k.endswith("embed_tokens.weight") and "lora_" not in k and t["shape"][0] != vocab:
            model.resize_token_embeddings(t["shape"][0])
            vocab = t["shape"][0]
    ids = torch.tensor(fixed_inputs(vocab), dtype=torch.long)
    model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False).eval()
    with torch.no_grad():
        ref = model(input_ids=ids).logits.float()
        with model.disable_adapter():
            plain = model(input_ids=ids).logits.float()
    del model
    gc.collect()
    got, dtype, texts = _merged_logits(merged, ids, greedy)
    diff = (got - ref).abs()
    max_abs, ref_max = float(diff.max()), float(ref.abs().max())
    tol = RTOL_LOGITS.get(dtype, 5e-2) * ref_max + ATOL_LOGITS
    flips = _flips_beyond_ties(got, ref, tol)
    return {
        "status": "passed" if max_abs <= tol and flips == 0 and torch.isfinite(got).all() else "failed",
        "flips_beyond_ties": flips,
        "max_abs_diff": max_abs, "mean_abs_diff": float(diff.mean()), "rel_err": max_abs / ref_max if ref_max else None,
        "tolerance": tol, "rtol": RTOL_LOGITS.get(dtype, 5e-2), "atol": ATOL_LOGITS, "merged_dtype": dtype,
        "reference_max_abs": ref_max, "adapter_effect": float((ref - plain).abs().max()),
        "top1_agreement": float((got.argmax(-1) == ref.argmax(-1)).float().mean()),
        "inputs": {"sequences": int(ids.shape[0]), "tokens": int(ids.shape[1]), "vocab": vocab,
                   "generator": "fixed_inputs(vocab, seed=0): 64-bit LCG, BOS first"},
        "seconds": round(time.perf_counter() - t0, 1),
    }, texts


def verify(base: Path, adapter: Path, merged: Path, *, ram_budget: int | None = None, logits: bool = True,
           greedy: Request | None = None) -> dict:
    base, adapter, merged = Path(base), Path(adapter), Path(merged)
    if not (adapter / "adapter_model.safetensors").is_file():
        raise FileNotFoundError(f"{adapter}/adapter_model.safetensors not found (only safetensors adapters are read)")
    for d in (base, merged):
        if not weight_files(d):
            raise FileNotFoundError(f"{d}: no *.safetensors weights (only safetensors are read)")
    out: dict = {"base": str(base), "adapter": str(adapter), "merged": str(merged)}
    out["weights"] = check_weights(base, adapter, merged)
    need = logits_need_bytes(base, adapter)
    have = ram_for_checks(ram_budget)
    out["logits_need_bytes"] = need
    if not logits:
        out["logits"] = {"status": "skipped", "reason": "--no-logits"}
    elif need > have:
        out["logits"] = {"status": "skipped", "reason": f"skipped: needs {need / GIB:.1f} GiB of RAM for one fp32 model, "
                                                        f"{have / GIB:.1f} GiB available", "needs_bytes": need,
                         "available_bytes": have}
    else:
        out["logits"], out["greedy"] = check_logits(base, adapter, merged, greedy)
    return _verdict(out)


# ---- QLoRA: the reference is the model training ran (NF4 base + adapter), not the full-precision base ---------
#
# Which arithmetic is the reference. Training's forward through a bitsandbytes 4-bit layer with gradients on
# (bnb.matmul_4bit -> MatMul4Bit) dequantizes the NF4 weight to the compute dtype and multiplies with torch; only
# inference calls without gradients take one of bitsandbytes' fused 4-bit kernels, and which one depends on the
# machine: on an AVX512-BF16 CPU, Linear4bit.forward in eval mode repacks the weight and runs a bf16 kernel whatever
# the compute dtype (bitsandbytes 0.50, nn/modules.py and backends/cpu/ops.py: a kernels-community build when the
# hub cache has it, else its own C++), elsewhere torch's gemm on the dequantized weight; a GPU runs CUDA/HIP
# kernels. Judging the merge against whichever kernel loaded made the check pass on one host and fail on another
# (issue 28: logits 0.021 off against a tolerance of 5e-4 on an AVX-512 EPYC, weights equal to 4e-9). So the
# reference is kernel-independent: the plain model in fp32 whose quantized layers carry bitsandbytes' own
# dequantized weights rounded to the compute dtype (the values training multiplied with), plus the adapter through
# PEFT, unmerged. Merged and reference then differ only by torch's fp32 summation order and the merged model's
# storage rounding: the same tolerances as the plain LoRA check (RTOL_LOGITS). What the fused kernel of this machine
# computes is recorded beside it (`kernel_vs_reference`), not judged.


def _quantized_layers(model) -> dict:
    """The 4-bit layers of a bitsandbytes-loaded model, keyed like the checkpoint's weight tensors."""
    import bitsandbytes as bnb

    return {f"{name}.weight": mod for name, mod in model.named_modules() if isinstance(mod, bnb.nn.Linear4bit)}


def _nf4_weight_check(base: Path, adapter: Path, merged: Path, quantized: dict, compute_dtype: str, pairs: dict,
                      scale: float) -> dict:
    """Every quantized layer of the merged model = its dequantized NF4 weight + the LoRA delta (the stored dtype's
    rounding tolerance); every other tensor = the base's exactly. One tensor dequantized at a time."""
    import torch
    from safetensors import safe_open

    from tutor_wrap.backends.nf4_merge import dequantized

    base_index = {k: f for f in weight_files(base) for k in read_header(f)}
    merged_index = {k: f for f in weight_files(merged) for k in read_header(f)}
    failures, worst = [], {"key": None, "ratio": 0.0}
    missing = sorted(set(base_index) - set(merged_index))
    if missing:
        failures.append({"key": ", ".join(missing[:5]), "why": f"{len(missing)} base tensor(s) missing"})
    with safe_open(str(adapter / "adapter_model.safetensors"), framework="pt", device="cpu") as ad:
        for key in sorted(set(merged_index) & set(base_index)):
            with safe_open(str(merged_index[key]), framework="pt", device="cpu") as f:
                m_raw = f.get_tensor(key)
            with safe_open(str(base_index[key]), framework="pt", device="cpu") as f:
                b_raw = f.get_tensor(key)
            if key not in quantized:
                if not torch.equal(m_raw, b_raw):
                    failures.append({"key": key, "why": "not quantized in training, but differs from the base"})
                continue
            expected = dequantized(quantized[key], compute_dtype)
            delta = torch.zeros_like(expected)
            if key in pairs:
                a_k, b_k = pairs[key]
                delta = scale * (ad.get_tensor(b_k).to(torch.float32) @ ad.get_tensor(a_k).to(torch.float32))
            rtol = RTOL_WEIGHT.get({"float32": "F32", "bfloat16": "BF16", "float16": "F16"}.get(
                str(m_raw.dtype).replace("torch.", ""), "BF16"), RTOL_WEIGHT["BF16"])
            err = (m_raw.to(torch.float32) - expected - delta).abs()
            allowed = rtol * (expected.abs() + delta.abs()) + ATOL_WEIGHT_OF_DELTA * float(delta.abs().max()) + 1e-12
            ratio = float((err / allowed).max())
            if ratio >= worst["ratio"]:
                worst = {"key": key, "ratio": ratio, "max_abs_diff": float(err.max())}
            if ratio > 1.0:
                failures.append({"key": key, "why": f"differs from NF4 weight + adapter (max abs diff {float(err.max()):.3g})"})
    return {"status": "passed" if not failures else "failed", "tensors": len(merged_index),
            "quantized_tensors": len(quantized), "adapted_tensors": len(pairs), "worst": worst, "failures": failures[:20]}


def verify_nf4(base: Path, adapter: Path, merged: Path, compute_dtype: str, *, full_precision_drift: bool = True,
               greedy: Request | None = None, ram_budget: int | None = None) -> dict:
    """A QLoRA merge against the model training ran: the base as bitsandbytes quantized it (loaded as Axolotl loads
    it) + the adapter. Weights: see _nf4_weight_check. Logits on INPUTS: the merged model against the
    kernel-independent reference (see above), within RTOL_LOGITS of the merged dtype, and no next-token flip that
    the tolerance cannot explain; skipped with the numbers when the 4-bit model and one fp32 model do not fit the
    RAM (`ram_budget`, as the LoRA check). `full_precision_drift` also measures how far a merge into the
    full-precision base (what a plain LoRA merge computes) would be from the trained model."""
    import torch
    from peft import PeftModel

    from tutor_wrap.backends.nf4_merge import dequantized, load_nf4

    t0 = time.perf_counter()
    acfg = adapter_config(adapter)
    r, alpha = int(acfg["r"]), float(acfg["lora_alpha"])
    scale = alpha / math.sqrt(r) if acfg.get("use_rslora") else alpha / r
    pairs = lora_pairs(adapter)
    nf4 = load_nf4(base, compute_dtype)
    quantized = _quantized_layers(nf4)
    weights = _nf4_weight_check(base, adapter, merged, quantized, compute_dtype, pairs, scale)
    out = {"base": str(base), "adapter": str(adapter), "merged": str(merged),
           "reference": f"the trained model: NF4 base (bitsandbytes' dequantized weights in {compute_dtype}) + "
                        "adapter, plain fp32 forward", "weights": weights, "greedy": None}
    # Peak of the logits check: the 4-bit model (the NF4 merge's own footprint, about a quarter of the fp32 need
    # and below it) beside one fp32 model.
    need = int(logits_need_bytes(base, adapter) * 1.25)
    have = ram_for_checks(ram_budget)
    out["logits_need_bytes"] = need
    if need > have:
        logits = {"status": "skipped", "reason": f"skipped: needs {need / GIB:.1f} GiB of RAM for the 4-bit and one "
                                                 f"fp32 model, {have / GIB:.1f} GiB available",
                  "needs_bytes": need, "available_bytes": have}
        del nf4, quantized
        gc.collect()
    else:
        vocab = int(nf4.get_input_embeddings().weight.shape[0])
        ids = torch.tensor(fixed_inputs(vocab), dtype=torch.long)
        # One fp32 model: with the adapter on the full-precision base first (the drift a plain merge would have),
        # then with its quantized layers set, one at a time, to the dequantized weights: the reference. Taken before
        # the 4-bit model runs: on an AVX512-BF16 CPU its first eval-mode forward repacks the weights in place.
        ref_model = PeftModel.from_pretrained(_load_causal_lm(base), str(adapter), is_trainable=False).eval()
        inner = ref_model.get_base_model()
        with torch.no_grad():
            fp_logits = ref_model(input_ids=ids).logits.float() if full_precision_drift else None
            for key, layer in quantized.items():
                mod = inner.get_submodule(key.removesuffix(".weight"))
                getattr(mod, "base_layer", mod).weight.copy_(dequantized(layer, compute_dtype))
            ref = ref_model(input_ids=ids).logits.float()
        del ref_model, inner
        gc.collect()
        # This machine's 4-bit kernel, for the record only.
        trained = PeftModel.from_pretrained(nf4, str(adapter), is_trainable=False).eval()
        with torch.no_grad():
            kernel = trained(input_ids=ids).logits.float()
        del trained, nf4, quantized
        gc.collect()
        got, dtype, texts = _merged_logits(merged, ids, greedy)
        out["greedy"] = texts
        ref_max = float(ref.abs().max())
        tol = RTOL_LOGITS.get(dtype, 5e-2) * ref_max + ATOL_LOGITS
        stats = _logit_stats(got, ref)
        flips = _flips_beyond_ties(got, ref, tol)
        ok = stats["max_abs_diff"] <= tol and flips == 0 and bool(torch.isfinite(got).all())
        logits = {"status": "passed" if ok else "failed", **stats, "tolerance": tol,
                  "rtol": RTOL_LOGITS.get(dtype, 5e-2), "atol": ATOL_LOGITS, "flips_beyond_ties": flips,
                  "merged_dtype": dtype, "reference_max_abs": ref_max,
                  "kernel_vs_reference": {**_logit_stats(kernel, ref),
                                          "what": "bitsandbytes' 4-bit inference kernel on this machine (not judged)"},
                  "inputs": {"sequences": int(ids.shape[0]), "tokens": int(ids.shape[1]), "vocab": vocab}}
        if fp_logits is not None:
            logits["full_precision_merge_vs_trained"] = _logit_stats(fp_logits, ref)
    out["logits"] = logits
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return _verdict(out)


# ---- the caller's side (no torch): run the check in a subprocess and judge its result ------------------------


def verify_merged(base: Path, adapter: Path, merged: Path, log: Path, *, ram_budget: int | None = None,
                  nf4_compute_dtype: str | None = None, greedy: Request | None = None) -> dict:
    """`python -m tutor_wrap.checks.merge_verify BASE ADAPTER MERGED --json` in a subprocess (torch stays out of this
    process and its memory is returned when it exits); its JSON result, stderr appended to `log`."""
    args = [sys.executable, "-m", "tutor_wrap.checks.merge_verify", str(base), str(adapter), str(merged), "--json"]
    if ram_budget:
        args += ["--ram-budget", str(int(ram_budget))]
    if nf4_compute_dtype:
        args += ["--nf4", nf4_compute_dtype]
    if greedy is not None:
        spec = log.with_name(log.stem + ".greedy.json")
        atomic.write_json(spec, asdict(greedy))
        args += ["--greedy", str(spec)]
    append_log(log, "\n$ " + " ".join(args) + "\n")
    proc = subprocess.run(args, capture_output=True, env=tool_env(), check=False, preexec_fn=die_with_parent)
    out = proc.stdout.decode("utf-8", errors="replace").strip()
    append_log(log, proc.stderr.decode("utf-8", errors="replace") + out + "\n")
    try:
        res = json.loads(out.splitlines()[-1])
    except (ValueError, IndexError):
        res = {"status": "error", "ok": None, "error": f"no result (exit {proc.returncode})"}
    res["returncode"] = proc.returncode
    return res


def check_verification(res: dict, log: Path) -> None:
    """Raise if the merged model does not compute what base + adapter compute (or the check could not run)."""
    status = res.get("status")
    if status in ("passed", "skipped"):
        return
    if status == "failed":
        fails = (res.get("weights") or {}).get("failures") or []
        lg = res.get("logits") or {}
        detail = "; ".join(f"{f['key']}: {f['why']}" for f in fails[:3])
        if lg.get("status") == "failed":
            detail = (f"logits max abs diff {lg['max_abs_diff']:.3g} (tolerance {lg['tolerance']:.3g}), next-token "
                      f"agreement {lg.get('top1_agreement', 0):.0%}"
                      + (f", {lg['flips_beyond_ties']} flip(s) beyond near-ties" if lg.get("flips_beyond_ties") else "")
                      + (f", adapter effect {lg['adapter_effect']:.3g}" if "adapter_effect" in lg else "")
                      + (f"; {detail}" if detail else ""))
        raise TutorWrapError(f"merge: the merged model does not match base + adapter: {detail}; details: {log}",
                             hint="do not use this model; check the adapter belongs to this base (same shapes, "
                                  "adapter_config.json base_model_name_or_path) and re-run the merge")
    raise TutorWrapError(f"merge: verification could not run: {res.get('error')}; log: {log}\n{tail(log, 15)}",
                         hint="read the log; the merged model was not checked, so it was not kept")


def verifier(base: Path, adapter: Path, log: Path, *, ram_budget: int | None = None,
             greedy: Request | None = None):
    """The `verify` a merge takes (backends/merge.py): the merged folder against base + adapter, raising on a
    mismatch. `greedy`: continuations the check computes while it has the merged model loaded (the export's
    reference, checks/fidelity.py), recorded under `greedy`."""
    def verify(merged: Path, nf4_compute_dtype: str | None) -> dict:
        res = verify_merged(base, adapter, merged, log, ram_budget=ram_budget, nf4_compute_dtype=nf4_compute_dtype,
                            greedy=greedy)
        check_verification(res, log)
        return res

    return verify


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tutor_wrap.checks.merge_verify", description=__doc__.splitlines()[0])
    ap.add_argument("base", type=Path)
    ap.add_argument("adapter", type=Path)
    ap.add_argument("merged", type=Path)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--ram-budget", type=int, default=None, help="bytes of RAM the logits check may use")
    ap.add_argument("--no-logits", action="store_true", help="only the streaming weight check")
    ap.add_argument("--greedy", type=Path, metavar="JSON",
                    help='also greedy continuations from the loaded merged model: {"prompts": [...], "n": N}')
    ap.add_argument("--nf4", metavar="COMPUTE_DTYPE", choices=["float32", "bfloat16", "float16"],
                    help="a QLoRA merge: compare with the NF4 base + adapter that training ran")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    greedy = Request(**json.loads(args.greedy.read_text("utf-8"))) if args.greedy else None
    t0 = time.perf_counter()
    try:
        res = (verify_nf4(args.base, args.adapter, args.merged, args.nf4, greedy=greedy, ram_budget=args.ram_budget)
               if args.nf4 else
               verify(args.base, args.adapter, args.merged, ram_budget=args.ram_budget, logits=not args.no_logits,
                      greedy=greedy))
    except Exception as exc:  # noqa: BLE001 - reported as JSON to the parent
        res = {"status": "error", "ok": None, "error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(res) if args.json else f"error: {res['error']}")
        return 2
    res["seconds"] = round(time.perf_counter() - t0, 1)
    # This process's peak: the merge stage's budget covers its verification too (the fp32 logits check is
    # usually the larger of the two).
    res["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # KiB on Linux
    if args.json:
        print(json.dumps(res))
    else:
        print(f"{res['status']}: max abs diff {res['max_abs_diff']}, tolerance {res['tolerance']}")
        for part in ("weights", "logits"):
            print(f"  {part}: {json.dumps(res[part])}")
    return {"passed": 0, "skipped": 0, "failed": 1}[res["status"]]


if __name__ == "__main__":
    sys.exit(main())
