"""Export stage: merged HF model -> f16 GGUF (llama.cpp's converter) -> each quant type, each one verified."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from tutor_wrap import atomic, llamacpp
from tutor_wrap.errors import TutorWrapError
from tutor_wrap.hardware import GIB
from tutor_wrap.proc import tail
from tutor_wrap.stages import Context, StageResult

NAME = "export"
DEPENDS = ("merge",)

# Fraction of the f16 size each quant type takes (bits per weight / 16, rounded up for the 16-bit tensors that
# k-quants keep); used only to check free disk before writing.
_SIZE_RATIO = {"Q8_0": 0.55, "Q6_K": 0.43, "Q5_K_M": 0.37, "Q5_K_S": 0.36, "Q5_0": 0.36, "Q5_1": 0.39,
               "Q4_K_M": 0.32, "Q4_K_S": 0.30, "Q4_0": 0.29, "Q4_1": 0.32, "IQ4_NL": 0.30, "IQ4_XS": 0.28,
               "Q3_K_L": 0.28, "Q3_K_M": 0.26, "Q3_K_S": 0.23, "Q2_K": 0.21}
# How a full disk shows up: ENOSPC from Python, numpy's short write in the converter, llama.cpp's write errors.
_DISK_FULL = re.compile(r"No space left on device|Errno 28|requested and \d+ written|failed to write|short write")


def source_bytes_per_param(cfg: dict) -> int:
    """Bytes per weight as stored: fp32 checkpoints are twice the size of the f16 GGUF made from them."""
    return 4 if str(cfg.get("torch_dtype") or cfg.get("dtype")) == "float32" else 2


def disk_needed(weights_bytes: int, src_bytes: int, quant_types: list[str]) -> tuple[int, int]:
    """(f16 GGUF bytes, bytes for the f16 plus every quant): the estimate both export and preflight check."""
    f16 = int(weights_bytes * 2 / src_bytes)
    return f16, int(f16 * (1 + sum(_SIZE_RATIO.get(q, 0.6) for q in quant_types)))


def check_convertible(model_dir: Path) -> dict:
    cfg = json.loads((model_dir / "config.json").read_text("utf-8"))
    if "quantization_config" in cfg:
        raise TutorWrapError(f"{model_dir / 'config.json'} still carries a quantization_config; llama.cpp's converter "
                             "fails on it", hint="merge into a 16-bit base (the merge stage strips it; re-run `--from merge`)")
    return cfg


def outtype_for(cfg: dict, accelerator: str) -> str:
    """bf16 only when the model is bf16 and a GPU will run it; f16 is what CPUs and Ollama run everywhere."""
    dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "")
    return "bf16" if dtype == "bfloat16" and accelerator != "cpu" else "f16"


def convert_model(ll: llamacpp.LlamaCpp, model_dir: Path, out: Path, outtype: str, log: Path) -> None:
    tmp = out.with_name(f".{out.name}.partial")
    tmp.unlink(missing_ok=True)
    proc = llamacpp.convert(ll, model_dir, tmp, outtype, log)
    if proc.returncode != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        text = tail(log, 60)
        if "BPE pre-tokenizer was not recognized" in text:
            raise TutorWrapError("export: llama.cpp's converter does not recognise this tokenizer's pre-tokenizer",
                                 hint="use a newer llama.cpp (LLAMA_CPP_DIR) that knows it, or a base model whose tokenizer "
                                      f"it supports; log: {log}")
        unsupported = re.search(r"Model (\S+) is not supported", text)
        if unsupported:
            raise TutorWrapError(f"export: llama.cpp's converter does not support the architecture "
                                 f"{unsupported.group(1)} ({model_dir / 'config.json'}); log: {log}",
                                 hint="pick a base model llama.cpp supports (Llama, Mistral, Qwen2, Gemma, Phi...), "
                                      "or a newer llama.cpp via LLAMA_CPP_DIR")
        if _DISK_FULL.search(text):
            raise TutorWrapError(f"export: the disk filled up while writing {out.name}; nothing was kept", hint="free disk and re-run")
        raise TutorWrapError(f"export: convert_hf_to_gguf.py failed (exit {proc.returncode}); log: {log}\n{tail(log, 12)}")
    os.replace(tmp, out)


def verify(ll: llamacpp.LlamaCpp, gguf: Path, expect_type: str) -> dict:
    meta = llamacpp.metadata(gguf)
    want = llamacpp.FILE_TYPES[expect_type]
    problems = []
    if meta["file_type"] != want:
        problems.append(f"general.file_type is {meta['file_type']}, expected {want} ({expect_type})")
    if not meta["architecture"]:
        problems.append("no general.architecture")
    if not meta["tokenizer_model"]:
        problems.append("no tokenizer.ggml.model")
    if meta["eos_token_id"] is None:
        problems.append("no tokenizer.ggml.eos_token_id")
    sample = llamacpp.complete(ll, gguf, "def hello():", n_predict=8)
    # Whitespace or an immediate EOS is still a model that loads and runs; no tokens at all is not.
    if not sample.text and not sample.stopped_by_eos and not sample.n_tokens:
        problems.append("generated nothing")
    if problems:
        raise TutorWrapError(f"export: {gguf.name} failed verification: " + "; ".join(problems))
    return {**meta, "size_bytes": gguf.stat().st_size, "sample": sample.text[:200]}


def export_model(model_dir: Path, out_dir: Path, stem: str, quant_types: list[str], accelerator: str,
                 log: Path) -> dict:
    ll = llamacpp.locate()
    cfg = check_convertible(model_dir)
    outtype = outtype_for(cfg, accelerator)
    weights = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    f16_size, need = disk_needed(weights, source_bytes_per_param(cfg), quant_types)
    free = shutil.disk_usage(out_dir).free
    if need > free:
        raise TutorWrapError(f"export needs about {need / GIB:.1f} GiB of disk (f16 {f16_size / GIB:.1f} GiB + quants); "
                             f"{free / GIB:.1f} GiB free in {out_dir}", hint="free disk space or move the run dir")
    report = {"llama_cpp": ll.version, "outtype": outtype, "files": {}}
    f16 = out_dir / f"{stem}-{outtype.upper()}.gguf"
    convert_model(ll, model_dir, f16, outtype, log)
    report["files"][outtype.upper()] = {"path": f16.name, **verify(ll, f16, outtype.upper())}
    for q in quant_types:
        out = out_dir / f"{stem}-{q}.gguf"
        tmp = out.with_name(f".{out.name}.partial")
        tmp.unlink(missing_ok=True)
        rc, counts, text = llamacpp.quantize(ll, f16, tmp, q, log)
        if rc != 0 or not tmp.is_file():
            tmp.unlink(missing_ok=True)
            if _DISK_FULL.search(text):
                raise TutorWrapError(f"export: the disk filled up while quantizing {q}; nothing was kept", hint="free disk and re-run")
            raise TutorWrapError(f"export: llama-quantize {q} failed (exit {rc}); log: {log}\n{text[-800:]}")
        os.replace(tmp, out)
        report["files"][q] = {"path": out.name, "tensor_types": counts, "fallback_tensors": llamacpp.fallback_count(text),
                              **verify(ll, out, q)}
    return report


AGREE_PROMPTS = 5      # greedy agreement is checked on the first few held-out prompts
AGREE_TOKENS = 16      # ... over this many generated tokens


def ppl_ctx(tokenizer_json: Path, text: str) -> int:
    """A llama-perplexity context that gives at least two chunks of the reference text (at most 128 tokens)."""
    from tokenizers import Tokenizer

    n = len(Tokenizer.from_file(str(tokenizer_json)).encode(text).ids)
    ctx = 128
    while ctx > 16 and 2 * ctx > n:
        ctx //= 2
    return ctx


def fidelity(recipe, model_dir: Path, out_dir: Path, report: dict) -> dict:
    """HF vs f16 greedy agreement; per quant, agreement with f16 and the perplexity change on reference answers."""
    from tutor_wrap import fidelity as fid
    from tutor_wrap.dataset import load_alpaca
    from tutor_wrap.prompt_format import for_dataset

    if recipe.eval is None:
        return {"skipped": "the recipe has no eval prompts"}
    fmt = for_dataset(recipe.dataset.format)
    rows = load_alpaca(recipe.resolve(recipe.eval.prompts), require_output=False).rows
    prompts = [fmt.render(r.instruction, r.input) for r in rows]
    ll = llamacpp.locate()
    tok_json = model_dir / "tokenizer.json"
    files = report["files"]
    f16_kind = report["outtype"].upper()
    f16 = out_dir / files[f16_kind]["path"]
    few = prompts[:AGREE_PROMPTS]
    hf = fid.hf_continuations(model_dir, few, AGREE_TOKENS, out_dir / ".hf_greedy.json")
    ref = fid.gguf_continuations(ll, f16, few, AGREE_TOKENS)
    result = {"hf_vs_" + f16_kind: fid.agreement(hf, ref, tok_json, AGREE_TOKENS)}
    ref_file = fid.reference_text([(p, r.output) for p, r in zip(prompts, rows)], out_dir / "reference.txt")
    ctx = ppl_ctx(tok_json, ref_file.read_text("utf-8")) if ref_file else None
    base_ppl = llamacpp.perplexity(ll, f16, ref_file, ctx=ctx)[0] if ref_file else None
    if base_ppl is not None:
        files[f16_kind]["perplexity"] = base_ppl
    for q, info in files.items():
        if q == f16_kind:
            continue
        gguf = out_dir / info["path"]
        info["agreement_with_" + f16_kind] = fid.agreement(fid.gguf_continuations(ll, gguf, few, AGREE_TOKENS), ref,
                                                           tok_json, AGREE_TOKENS)
        if ref_file:
            ppl = llamacpp.perplexity(ll, gguf, ref_file, ctx=ctx)[0]
            info["perplexity"] = ppl
            info["perplexity_change_pct"] = round(100 * (ppl - base_ppl) / base_ppl, 2)
    result["reference"] = {"rows_with_answers": sum(bool(r.output) for r in rows), "ppl_ctx": ctx}
    return result


def inputs(ctx: Context) -> dict:
    return {"merge": ctx.run.stage("merge").get("fingerprint"), "quant_types": ctx.recipe.export.quant_types,
            "accelerator": ctx.hardware.accelerator,
            "eval": ctx.recipe.eval.model_dump(mode="json") if ctx.recipe.eval else None}


def run(ctx: Context) -> StageResult:
    model_dir = ctx.run.artifact("merge", "model")
    out_dir = ctx.run.sub("export")
    report = export_model(model_dir, out_dir, ctx.recipe.name, ctx.recipe.export.quant_types, ctx.hardware.accelerator,
                          out_dir / "export.log")
    report["fidelity"] = fidelity(ctx.recipe, model_dir, out_dir, report)
    atomic.write_json(out_dir / "report.json", report)
    arts = {"report": ctx.run.rel(out_dir / "report.json")}
    for kind, info in report["files"].items():
        arts[f"gguf_{kind}"] = ctx.run.rel(out_dir / info["path"])
        agree = next((v for k, v in info.items() if k.startswith("agreement_with_")), None)
        ctx.console.print(f"export: {info['path']}  {info['size_bytes'] / 1e6:.1f} MB  file_type {info['file_type']}"
                          + (f"  fallback tensors {info['fallback_tensors']}" if "fallback_tensors" in info else "")
                          + (f"  PPL {info['perplexity']:.3f}" if "perplexity" in info else "")
                          + (f" ({info['perplexity_change_pct']:+.2f}%)" if "perplexity_change_pct" in info else "")
                          + (f"  greedy agreement with f16 {agree['agree']}/{agree['prompts']} on "
                             f"{agree['tokens']} tokens" if agree else ""))
    hf = next((v for k, v in report["fidelity"].items() if k.startswith("hf_vs_")), None)
    if hf:
        ctx.console.print(f"export: merged HF model vs {report['outtype'].upper()} GGUF: {hf['agree']}/"
                          f"{hf['prompts']} prompts agree on the first {hf['tokens']} greedy tokens "
                          f"(mean matching prefix {hf['mean_matching_prefix']:.1f})")
    return StageResult(arts, info={"llama_cpp": report["llama_cpp"]})
