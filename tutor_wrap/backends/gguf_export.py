"""HF model folder -> f16 GGUF (llama.cpp's converter) -> each quant type (llama-quantize).

Used by the export stage for the fine-tuned model and by eval for the base model's GGUF of the same type.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tutor_wrap.backends import llamacpp
from tutor_wrap.core import atomic, rss
from tutor_wrap.core.errors import TutorWrapError
from tutor_wrap.core.hashing import file_sha256, fingerprint
from tutor_wrap.core.paths import cache_dir
from tutor_wrap.core.proc import tail
from tutor_wrap.core.units import GIB
from tutor_wrap.models.files import read_config, source_bytes_per_param, weight_files
from tutor_wrap.planning.budgets import disk_needed

# How a full disk shows up: ENOSPC from Python, numpy's short write in the converter, llama.cpp's write errors.
_DISK_FULL = re.compile(r"No space left on device|Errno 28|requested and \d+ written|failed to write|short write")


@dataclass
class GgufFile:
    """One GGUF the export wrote, and what was measured on it."""
    path: str                                  # its name, in the export folder
    size_bytes: int
    metadata: dict                             # llamacpp.metadata: the header facts the checks read
    fallback_tensors: int | None = None        # tensors llama-quantize kept at another type (None: not quantized)
    sample: str | None = None                  # checks/gguf.py's few greedy tokens
    chat_template_matches_training: bool = False
    perplexity: float | None = None            # on the held-out reference answers (checks/fidelity.py)
    perplexity_change_pct: float | None = None     # ... against the unquantized GGUF
    agreement_with_unquantized: dict | None = None  # greedy agreement with the unquantized GGUF
    made_peak_rss_bytes: int | None = None     # the converter's or llama-quantize's peak RSS while writing it

    @property
    def file_type(self) -> int | None:
        return self.metadata.get("file_type")


@dataclass
class ExportReport:
    """export/report.json (and a cached base GGUF's report.json): written from this record, read back with `load`."""
    llama_cpp: str
    outtype: str                               # the unquantized file's type: "f16" or "bf16"
    files: dict[str, GgufFile] = field(default_factory=dict)   # by type: "F16", "Q4_K_M", ...
    chat_template: str | None = None
    fidelity: dict = field(default_factory=dict)   # checks/fidelity.export_fidelity's
    source: str | None = None                  # the model folder (cached GGUFs)

    @property
    def unquantized_kind(self) -> str:
        return self.outtype.upper()

    def save(self, path: Path) -> None:
        atomic.write_json(path, asdict(self))

    @classmethod
    def load(cls, path: Path) -> "ExportReport":
        d = json.loads(path.read_text("utf-8"))
        d["files"] = {k: GgufFile(**v) for k, v in d.get("files", {}).items()}
        return cls(**d)


def check_convertible(model_dir: Path) -> dict:
    cfg = json.loads((model_dir / "config.json").read_text("utf-8"))
    if "quantization_config" in cfg:
        raise TutorWrapError(f"{model_dir / 'config.json'} still carries a quantization_config; llama.cpp's converter "
                             "fails on it", hint="merge into a 16-bit base (the merge stage strips it; re-run `--from merge`)")
    return cfg


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "config.json", "vocab.json",
                    "merges.txt", "special_tokens_map.json")


def vocab_problem(ll: llamacpp.LlamaCpp, model_dir: Path) -> str | None:
    """Why llama.cpp's converter would refuse this model's tokenizer at export (None: it takes it), found by
    converting the vocabulary alone (`--vocab-only`, seconds) now instead of the whole model after training: an
    unrecognised BPE pre-tokenizer, a missing tokenizer.model. Cached per tokenizer and llama.cpp build."""
    parts = [ll.version] + [file_sha256(model_dir / n) for n in _TOKENIZER_FILES if (model_dir / n).is_file()]
    memo = cache_dir() / "converter-vocab" / f"{fingerprint(*parts)}.json"
    if memo.is_file():
        return json.loads(memo.read_text("utf-8")).get("problem")
    memo.parent.mkdir(parents=True, exist_ok=True)
    out = memo.with_suffix(".gguf.partial")
    log = memo.with_suffix(".log")
    log.unlink(missing_ok=True)
    proc = llamacpp.convert(ll, model_dir, out, "f16", log, vocab_only=True)
    out.unlink(missing_ok=True)
    problem = None
    if proc.returncode != 0:
        text = tail(log, 40)
        if "BPE pre-tokenizer was not recognized" in text:
            problem = "its BPE pre-tokenizer is not one this llama.cpp knows"
        else:
            errors = [line for line in text.splitlines() if re.match(r"^\w*(Error|Exception)\b", line.strip())]
            problem = (errors[-1].strip() if errors else f"exit {proc.returncode}")[:300]
    atomic.write_json(memo, {"problem": problem, "llama_cpp": ll.version})
    return problem


def outtype_for(cfg: dict, accelerator: str) -> str:
    """bf16 only when the model is bf16 and a GPU will run it; f16 is what CPUs and Ollama run everywhere."""
    dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "")
    return "bf16" if dtype == "bfloat16" and accelerator != "cpu" else "f16"


def convert_model(ll: llamacpp.LlamaCpp, model_dir: Path, out: Path, outtype: str, log: Path) -> int:
    """The GGUF written whole under its name or not at all; returns the converter's peak RSS."""
    tmp = out.with_name(f".{out.name}.partial")
    tmp.unlink(missing_ok=True)
    peak_file = log.with_name(f".{out.name}.rss.json")
    proc = llamacpp.convert(ll, model_dir, tmp, outtype, log, peak_to=peak_file)
    peak = rss.read_peak(peak_file)
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
    return peak


def gguf_file(gguf: Path, **measured) -> GgufFile:
    return GgufFile(gguf.name, gguf.stat().st_size, llamacpp.metadata(gguf), **measured)


def export_model(model_dir: Path, out_dir: Path, stem: str, quant_types: list[str], accelerator: str,
                 log: Path) -> ExportReport:
    """The f16 (or bf16) GGUF of `model_dir` and each quant type, each written under a temporary name and renamed
    when complete; disk is checked first. The report lists each file with its metadata (checks/gguf.py verifies it)."""
    ll = llamacpp.locate()
    cfg = check_convertible(model_dir)
    outtype = outtype_for(cfg, accelerator)
    weights = sum(p.stat().st_size for p in weight_files(model_dir))
    f16_size, need = disk_needed(weights, source_bytes_per_param(cfg), quant_types)
    free = shutil.disk_usage(out_dir).free
    if need > free:
        raise TutorWrapError(f"export needs about {need / GIB:.1f} GiB of disk (f16 {f16_size / GIB:.1f} GiB + quants); "
                             f"{free / GIB:.1f} GiB free in {out_dir}", hint="free disk space or move the run dir")
    report = ExportReport(ll.version, outtype)
    f16 = out_dir / f"{stem}-{outtype.upper()}.gguf"
    peak = convert_model(ll, model_dir, f16, outtype, log)
    report.files[outtype.upper()] = gguf_file(f16, made_peak_rss_bytes=peak or None)
    for q in quant_types:
        out = out_dir / f"{stem}-{q}.gguf"
        tmp = out.with_name(f".{out.name}.partial")
        tmp.unlink(missing_ok=True)
        peak_file = log.with_name(f".{out.name}.rss.json")
        rc, text = llamacpp.quantize(ll, f16, tmp, q, log, peak_to=peak_file)
        peak = rss.read_peak(peak_file)
        if rc != 0 or not tmp.is_file():
            tmp.unlink(missing_ok=True)
            if _DISK_FULL.search(text):
                raise TutorWrapError(f"export: the disk filled up while quantizing {q}; nothing was kept", hint="free disk and re-run")
            raise TutorWrapError(f"export: llama-quantize {q} failed (exit {rc}); log: {log}\n{text[-800:]}")
        os.replace(tmp, out)
        report.files[q] = gguf_file(out, fallback_tensors=llamacpp.fallback_count(text), made_peak_rss_bytes=peak or None)
    return report


_CACHE_FORMAT = 2   # of an entry's report.json (ExportReport); entries of another format are built again


def cached_gguf(model_dir: Path, quant: str, accelerator: str, log: Path) -> tuple[Path, ExportReport]:
    """`model_dir`'s GGUF of one quant type, built once per model content + quant type + llama.cpp build and reused
    by later runs and recipes (eval's base model). The entry appears under its final name only when complete
    (built in a temporary folder, renamed); a lock keeps two runs from building the same entry at once."""
    import fcntl
    import tempfile

    ll = llamacpp.locate()
    files = sorted(p for p in model_dir.iterdir() if p.is_file() and p.suffix in (".safetensors", ".json", ".model"))
    key = fingerprint({p.name: file_sha256(p) for p in files}, quant, ll.version,
                      outtype_for(read_config(model_dir), accelerator), _CACHE_FORMAT)
    root = cache_dir() / "gguf"
    entry = root / key
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (entry / "report.json").is_file():
            tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root))
            try:
                report = export_model(model_dir, tmp, "model", [quant], accelerator, log)
                (tmp / report.files.pop(report.unquantized_kind).path).unlink()   # only the quant is reused
                report.source = str(model_dir)
                report.save(tmp / "report.json")
                shutil.rmtree(entry, ignore_errors=True)
                os.replace(tmp, entry)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    report = ExportReport.load(entry / "report.json")
    return entry / report.files[quant].path, report
