"""Drive llama.cpp's real tools: convert_hf_to_gguf.py, llama-quantize, llama-simple, llama-perplexity; read GGUF
metadata. Where the tools are is a machine fact (machine/tools.py: `locate`)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tutor_wrap.core.errors import TutorWrapError
from tutor_wrap.core import rss
from tutor_wrap.core.proc import append_log, run_logged
from tutor_wrap.machine.host import usable_cpus
from tutor_wrap.machine.tools import LlamaCpp, locate  # noqa: F401  (locate: callers find the tools through here)
from tutor_wrap.models.gguf_file import read_gguf_header
from tutor_wrap.planning.budgets import gguf_kv
from tutor_wrap.planning.generation import Device, Offload, offload


def convert(ll: LlamaCpp, model_dir: Path, out: Path, outtype: str, log: Path, *,
            vocab_only: bool = False, peak_to: Path | None = None) -> subprocess.CompletedProcess:
    """`peak_to`: measure the converter's peak RSS into that file (core/rss.read_peak)."""
    args = [sys.executable, str(ll.converter), str(model_dir), "--outfile", str(out), "--outtype", outtype,
            *(["--vocab-only"] if vocab_only else [])]
    return run_logged(rss.wrap(args, peak_to) if peak_to else args, log, env=ll.env())


def quantize(ll: LlamaCpp, src: Path, out: Path, qtype: str, log: Path, *,
             peak_to: Path | None = None) -> tuple[int, str]:
    """Run llama-quantize; return (exit code, raw output) for the fallback report. `peak_to`: as `convert`'s."""
    threads = str(usable_cpus() or os.cpu_count() or 1)
    args = [str(ll.tool("llama-quantize")), str(src), str(out), qtype, threads]
    proc = subprocess.run(rss.wrap(args, peak_to) if peak_to else args,
                          capture_output=True, text=True, env=ll.env(), check=False)
    text = proc.stdout + proc.stderr
    append_log(log, text)
    return proc.returncode, text


def fallback_count(quant_output: str) -> int:
    """How many tensors llama-quantize could not give the requested type (row size not a multiple of the type's
    block): its own summary line, else one per tensor line that says it fell back."""
    m = re.search(r"(\d+) of \d+ tensor\(s\) required fallback quantization", quant_output)
    if m:
        return int(m.group(1))
    return len(re.findall(r"-> falling back to", quant_output))


def tensor_type_counts(gguf_path: Path) -> dict[str, int]:
    return metadata(gguf_path)["tensor_types"]


def metadata(gguf_path: Path) -> dict:
    """The keys the checks read and the tensor count per type, from the file's header (models/gguf_file.py)."""
    h = read_gguf_header(gguf_path)
    get = h.fields.get
    arch = get("general.architecture")
    return {
        "architecture": arch,
        "file_type": get("general.file_type"),
        "context_length": get(f"{arch}.context_length"),
        "tokenizer_model": get("tokenizer.ggml.model"),
        "tokenizer_pre": get("tokenizer.ggml.pre"),
        "eos_token_id": get("tokenizer.ggml.eos_token_id"),
        "bos_token_id": get("tokenizer.ggml.bos_token_id"),
        "add_bos_token": get("tokenizer.ggml.add_bos_token"),
        "chat_template": get("tokenizer.chat_template"),
        "tensor_count": h.tensor_count,
        "tensor_types": h.tensor_types,
    }


@dataclass(frozen=True)
class Completion:
    text: str
    stopped_by_eos: bool
    n_tokens: int | None


def complete(ll: LlamaCpp, model: Path, prompt: str, *, n_predict: int, timeout: float = 300) -> Completion:
    """Greedy (temperature 0) completion of a raw prompt, no chat template, as the model was trained.

    Runs `llama-simple`, which samples greedily and writes with printf. `llama-completion` prints through an
    asynchronous logger that, in the pinned build, sometimes drops everything after start-up and still exits 0
    (seen here: 9 of 30 runs on a tiny model; 0 of 30 with llama-simple). The tool sizes the context to
    prompt + n_predict, and greedy decoding needs no seed.
    """
    # llama-simple offloads 99 layers unless told: a model that does not fit the GPU would fail to load there.
    args = [str(ll.tool("llama-simple")), "-m", str(model), "-n", str(n_predict),
            "-ngl", str(placement(ll, model, len(prompt) + n_predict).gpu_layers), prompt]
    proc = subprocess.run(args, capture_output=True, env=ll.env(), timeout=timeout, check=False)
    err = proc.stderr.decode("utf-8", "replace")
    m = re.search(r"decoded (\d+) tokens", err)
    if proc.returncode != 0 or m is None:
        raise TutorWrapError(f"llama-simple failed on {model.name} (exit {proc.returncode}):\n" + err[-1500:])
    out = proc.stdout.decode("utf-8", "replace")
    # llama-simple echoes the prompt (after BOS text and, for SentencePiece vocabularies, a leading space).
    start = out.find(prompt)
    if start < 0:
        raise TutorWrapError(f"llama-simple on {model.name}: the echoed prompt does not match the prompt sent",
                             hint="the tokenizer does not round-trip this prompt; check the GGUF's tokenizer")
    text = out[start + len(prompt):]
    text = text[:-1] if text.endswith("\n") else text  # the newline llama-simple prints at the end
    n = int(m.group(1))
    # The loop stops early only on an end-of-generation token.
    return Completion(text, n < n_predict, n)


_DEVICE_LINE = re.compile(r"^\s*(\S+): (.*) \((\d+) MiB, (\d+) MiB free\)\s*$")
_devices_seen: dict[tuple, list[Device]] = {}


def devices(ll: LlamaCpp) -> list[Device]:
    """The devices this llama.cpp build can offload to, with their free memory now, as llama.cpp itself lists them
    (`llama-server --list-devices`): none for a CPU build; for a GPU build the GPUs its backend sees (a software
    Vulkan device only when GGML_VK_VISIBLE_DEVICES names it). Asked once per process and device selection."""
    key = (str(ll.bin_dir), *(os.environ.get(v) for v in _DEVICE_ENV))
    if key not in _devices_seen:
        proc = subprocess.run([str(ll.tool("llama-server")), "--list-devices"], capture_output=True, text=True,
                              env=ll.env(), timeout=120, check=False)
        found = []
        for line in (proc.stdout + proc.stderr).splitlines():
            if m := _DEVICE_LINE.match(line):
                found.append(Device(m.group(1), m.group(2), int(m.group(3)) * 2**20, int(m.group(4)) * 2**20))
        _devices_seen[key] = found
    return _devices_seen[key]


# The variables that choose which devices a llama.cpp backend sees.
_DEVICE_ENV = ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "GGML_VK_VISIBLE_DEVICES")


def placement(ll: LlamaCpp, gguf: Path, ctx: int) -> Offload:
    """Where llama.cpp will run `gguf` with `ctx` tokens of KV cache: how many layers the build's devices take."""
    layers, kv = gguf_kv(gguf, ctx)
    return offload(devices(ll), model_bytes=gguf.stat().st_size, kv_bytes=kv, layers=layers, backend=ll.backend)


def perplexity(ll: LlamaCpp, model: Path, text_file: Path, *, ctx: int = 128, chunks: int | None = None,
               timeout: float = 1800) -> tuple[float, float]:
    """llama-perplexity over a text file: (PPL, its +/- estimate). Scores the second half of each `ctx` chunk,
    over the first `chunks` chunks (all of the text when None), with as many layers on the build's GPU as fit."""
    threads = str(usable_cpus() or os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(prefix="tw-ppl-") as tmp:
        log_file = Path(tmp) / "ppl.log"
        args = [str(ll.tool("llama-perplexity")), "-m", str(model), "-f", str(text_file), "-c", str(ctx), "-b",
                str(ctx), "--log-colors", "off", "-t", threads, "--log-file", str(log_file),
                "-ngl", str(placement(ll, model, ctx).gpu_layers)]
        if chunks:
            args += ["--chunks", str(chunks)]
        # Same asynchronous logger as llama-completion (see `complete`): on short runs the last lines are lost
        # from the console about half the time, and from --log-file about as often but independently, so both
        # are read and a run that lost them in both is run again (seen here: 11 of 20 short runs kept the file).
        for _ in range(12):
            log_file.unlink(missing_ok=True)
            proc = subprocess.run(args, capture_output=True, env=ll.env(), timeout=timeout, check=False)
            text = (proc.stdout + proc.stderr).decode("utf-8", "replace")
            if log_file.is_file():
                text += log_file.read_text("utf-8", "replace")
            m = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", text)
            if proc.returncode != 0 or m:
                break
    if proc.returncode != 0 or not m:
        raise TutorWrapError(f"llama-perplexity failed on {model.name} (exit {proc.returncode}):\n{text[-1500:]}",
                             hint="the reference text may be shorter than two chunks; add rows with outputs to the eval file")
    return float(m.group(1)), float(m.group(2))
