"""Find llama.cpp and drive its real tools: convert_hf_to_gguf.py, llama-quantize, llama-completion.

Search order: `LLAMA_CPP_DIR` (a llama.cpp checkout with a build), tools on PATH plus `LLAMA_CPP_CONVERTER`,
then the project's managed build from the pinned llama-cpp-python sdist (`tools/build_llamacpp.py`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tutor_wrap.errors import TutorWrapError
from tutor_wrap.paths import REPO_DIR, cache_dir
from tutor_wrap.proc import tool_env

# llama-quantize's names -> general.file_type values (llama.cpp's LLAMA_FTYPE enum).
FILE_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10,
              "Q3_K_S": 11, "Q3_K_M": 12, "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16, "Q5_K_M": 17,
              "Q6_K": 18, "IQ4_NL": 25, "IQ4_XS": 30, "BF16": 32}


@dataclass(frozen=True)
class LlamaCpp:
    converter: Path
    gguf_py: Path | None
    bin_dir: Path
    version: str

    def tool(self, name: str) -> Path:
        p = self.bin_dir / name
        if not p.is_file():
            raise TutorWrapError(f"llama.cpp tool {name} not found in {self.bin_dir}",
                                 hint="run `python tools/build_llamacpp.py` (or `make setup`)")
        return p

    def env(self) -> dict[str, str]:
        extra = {}
        if self.gguf_py is not None:
            # The converter must use the gguf-py it ships with: the PyPI gguf may lag its architectures.
            extra["PYTHONPATH"] = os.pathsep.join(filter(None, [str(self.gguf_py), os.environ.get("PYTHONPATH")]))
        return tool_env(extra)


def _from_dir(root: Path, version: str) -> LlamaCpp | None:
    conv = root / "convert_hf_to_gguf.py"
    for bin_dir in (root / "build" / "bin", root / "bin", root):
        if conv.is_file() and (bin_dir / "llama-quantize").is_file():
            gguf_py = root / "gguf-py"
            return LlamaCpp(conv, gguf_py if gguf_py.is_dir() else None, bin_dir, version)
    return None


def locate() -> LlamaCpp:
    env_dir = os.environ.get("LLAMA_CPP_DIR")
    if env_dir:
        found = _from_dir(Path(env_dir).expanduser(), f"LLAMA_CPP_DIR={env_dir}")
        if found is None:
            raise TutorWrapError(f"LLAMA_CPP_DIR={env_dir} has no convert_hf_to_gguf.py and built llama-quantize",
                                 hint="build it there (cmake -B build && cmake --build build) or unset LLAMA_CPP_DIR")
        return found
    on_path = shutil.which("llama-quantize")
    conv_env = os.environ.get("LLAMA_CPP_CONVERTER")
    if on_path and conv_env and Path(conv_env).is_file():
        conv = Path(conv_env)
        gguf_py = conv.parent / "gguf-py"
        return LlamaCpp(conv, gguf_py if gguf_py.is_dir() else None, Path(on_path).parent, "PATH")
    managed = cache_dir() / "llama.cpp"
    marker = managed / "BUILD_OK.json"
    if marker.is_file():
        info = json.loads(marker.read_text("utf-8"))
        found = _from_dir(managed / "src", f"llama-cpp-python {info.get('llama_cpp_python')} "
                                            f"(llama.cpp {info.get('llama_cpp_build')})")
        if found is not None:
            return found
    raise TutorWrapError(
        "llama.cpp was not found (LLAMA_CPP_DIR, llama-quantize on PATH with LLAMA_CPP_CONVERTER, or the managed build)",
        hint=f"run `{sys.executable} {REPO_DIR / 'tools' / 'build_llamacpp.py'}` (about 7 min on 2 cores, once)",
    )


def convert(ll: LlamaCpp, model_dir: Path, out: Path, outtype: str, log: Path) -> subprocess.CompletedProcess:
    from tutor_wrap.proc import run_logged

    return run_logged([sys.executable, str(ll.converter), str(model_dir), "--outfile", str(out), "--outtype", outtype],
                      log, env=ll.env())


def quantize(ll: LlamaCpp, src: Path, out: Path, qtype: str, log: Path) -> tuple[int, dict[str, int], str]:
    """Run llama-quantize; return (exit code, tensor-type counts, raw output) for the fallback report."""
    threads = str(max(1, os.cpu_count() or 1))
    proc = subprocess.run([str(ll.tool("llama-quantize")), str(src), str(out), qtype, threads],
                          capture_output=True, text=True, env=ll.env(), check=False)
    text = proc.stdout + proc.stderr
    with open(log, "a", encoding="utf-8") as fh:
        fh.write(text)
    return proc.returncode, tensor_type_counts(out) if proc.returncode == 0 else {}, text


def fallback_count(quant_output: str) -> int:
    """How many tensors llama-quantize could not give the requested type (row size not a multiple of 256)."""
    return len(re.findall(r"(?i)fallback|using fallback quantization|not divisible by", quant_output))


def tensor_type_counts(gguf_path: Path) -> dict[str, int]:
    from gguf import GGUFReader

    counts: dict[str, int] = {}
    for t in GGUFReader(str(gguf_path)).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return counts


def metadata(gguf_path: Path) -> dict:
    from gguf import GGUFReader

    r = GGUFReader(str(gguf_path))

    def get(key):
        f = r.get_field(key)
        return None if f is None else f.contents()

    arch = get("general.architecture")
    return {
        "architecture": arch,
        "file_type": get("general.file_type"),
        "context_length": get(f"{arch}.context_length"),
        "tokenizer_model": get("tokenizer.ggml.model"),
        "tokenizer_pre": get("tokenizer.ggml.pre"),
        "eos_token_id": get("tokenizer.ggml.eos_token_id"),
        "bos_token_id": get("tokenizer.ggml.bos_token_id"),
        "tensor_count": len(r.tensors),
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
    args = [str(ll.tool("llama-simple")), "-m", str(model), "-n", str(n_predict), prompt]
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


def perplexity(ll: LlamaCpp, model: Path, text_file: Path, *, ctx: int = 128, timeout: float = 1800) -> tuple[float, float]:
    """llama-perplexity over a text file: (PPL, its +/- estimate). Scores the second half of each `ctx` chunk."""
    threads = str(max(1, os.cpu_count() or 1))
    args = [str(ll.tool("llama-perplexity")), "-m", str(model), "-f", str(text_file), "-c", str(ctx), "-b", str(ctx),
            "--log-colors", "off", "-t", threads]
    # Same logger as llama-completion (see `complete`): a run that lost its output is run again.
    for _ in range(5):
        proc = subprocess.run(args, capture_output=True, env=ll.env(), timeout=timeout, check=False)
        text = (proc.stdout + proc.stderr).decode("utf-8", "replace")
        m = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", text)
        if proc.returncode != 0 or m:
            break
    if proc.returncode != 0 or not m:
        raise TutorWrapError(f"llama-perplexity failed on {model.name} (exit {proc.returncode}):\n{text[-1500:]}",
                             hint="the reference text may be shorter than two chunks; add rows with outputs to the eval file")
    return float(m.group(1)), float(m.group(2))
