"""Where the external tools are: llama.cpp (converter, quantizer, generators) and Ollama.

llama.cpp search order: `LLAMA_CPP_DIR` (a llama.cpp checkout with a build), tools on PATH plus
`LLAMA_CPP_CONVERTER`, then the project's managed build from the pinned llama-cpp-python sdist
(`tools/build_llamacpp.py`). Finding them reads files only; running them is backends/llamacpp.py's job.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from tutor_wrap.core.errors import TutorWrapError
from tutor_wrap.core.paths import REPO_DIR, cache_dir
from tutor_wrap.core.proc import tool_env
from tutor_wrap.machine.host import cpu_feature_words


@dataclass(frozen=True)
class LlamaCpp:
    converter: Path
    gguf_py: Path | None
    bin_dir: Path
    version: str
    backend: str | None = None     # the GPU backend its build record names ("cpu", "cuda", "hip", "vulkan"); None: unknown

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
            return LlamaCpp(conv, gguf_py if gguf_py.is_dir() else None, bin_dir, version, _recorded_backend(root))
    return None


def _recorded_backend(root: Path) -> str | None:
    """The backend build_llamacpp.py recorded for the tree at `root` (its BUILD_OK.json sits one level up); an
    older record without one was a CPU build."""
    try:
        info = json.loads((root.parent / "BUILD_OK.json").read_text("utf-8"))
    except (OSError, ValueError):
        return None
    return info.get("backend", "cpu") if isinstance(info, dict) else None


def locate() -> LlamaCpp:
    env_dir = os.environ.get("LLAMA_CPP_DIR")
    if env_dir:
        root = Path(env_dir).expanduser()
        # a checkout, or a folder tools/build_llamacpp.py --dest made (its tree is in src/)
        found = _from_dir(root, f"LLAMA_CPP_DIR={env_dir}") or _from_dir(root / "src", f"LLAMA_CPP_DIR={env_dir}")
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
        try:
            info = json.loads(marker.read_text("utf-8"))
        except (OSError, ValueError):
            info = None
        isa = info.get("cpu_isa") if isinstance(info, dict) else None
        if not isinstance(info, dict) or not (isa is None or isinstance(isa, list)):
            raise TutorWrapError(f"{marker} is not the build record build_llamacpp.py writes",
                                 hint=f"delete it and run `{sys.executable} {REPO_DIR / 'tools' / 'build_llamacpp.py'}`"
                                      " (or `make setup`)")
        lacking = sorted(set(isa or []) - cpu_feature_words())
        if lacking:
            # A native build from another machine (a copied .cache) would die of an illegal instruction mid-stage.
            raise TutorWrapError(f"the llama.cpp build in {managed} was made for a CPU with {', '.join(lacking[:5])}, "
                                 "which this CPU lacks",
                                 hint=f"run `{sys.executable} {REPO_DIR / 'tools' / 'build_llamacpp.py'}` (or `make "
                                      "setup`): it rebuilds for this CPU")
        found = _from_dir(managed / "src", f"llama-cpp-python {info.get('llama_cpp_python')} "
                                            f"(llama.cpp {info.get('llama_cpp_build')})")
        if found is not None:
            return found
    raise TutorWrapError(
        "llama.cpp was not found (LLAMA_CPP_DIR, llama-quantize on PATH with LLAMA_CPP_CONVERTER, or the managed build)",
        hint=f"run `{sys.executable} {REPO_DIR / 'tools' / 'build_llamacpp.py'}` (about 15 min on 2 cores, once)",
    )


def converter_architectures(ll: LlamaCpp) -> set[str]:
    """The HF `architectures` names this llama.cpp's converter registers (read from its sources, not run)."""
    import re

    sources = [ll.converter] + sorted((ll.converter.parent / "conversion").glob("*.py"))
    names: set[str] = set()
    for src in sources:
        try:
            text = src.read_text("utf-8", errors="replace")
        except OSError:
            continue
        for args in re.findall(r"@\w+\.register\(([^)]*)\)", text):
            names.update(re.findall(r"[\"']([A-Za-z0-9_]+)[\"']", args))
    return names


OLLAMA_ENV = "TUTOR_WRAP_OLLAMA"
OLLAMA_OFF = ("off", "no", "0", "false")


def ollama_off() -> bool:
    return (os.environ.get(OLLAMA_ENV) or "").strip().lower() in OLLAMA_OFF


def ollama() -> str | None:
    """The ollama binary: $TUTOR_WRAP_OLLAMA (a path or name; "off" to write the Modelfile and print the commands
    without creating the model, as on a machine without Ollama), else the one on PATH, if any."""
    chosen = (os.environ.get(OLLAMA_ENV) or "").strip()
    if not chosen:
        return shutil.which("ollama")
    if ollama_off():
        return None
    found = shutil.which(os.path.expanduser(chosen))
    if found is None:
        raise TutorWrapError(f"{OLLAMA_ENV}={chosen}: no such executable",
                             hint="point it at the ollama binary, set it to off, or unset it to use the one on PATH")
    return found
