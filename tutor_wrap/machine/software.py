"""The installed training stack, read from package metadata and files only: importing torch or axolotl takes
seconds and can itself crash on exactly the broken combinations this module exists to report.

`collect()` gathers a flat, JSON-able dict of versions; `check_stack(versions, accelerator)` is pure and turns it
into findings, each with the exact command that fixes it (tested on synthetic dicts).
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

from tutor_wrap.core.errors import TutorWrapError
from tutor_wrap.core.versions import version_tuple
from tutor_wrap.machine import tools
from tutor_wrap.machine import vendors as registry
from tutor_wrap.machine.vendors import by_bnb_kind, by_name, torch_build_label

PACKAGES = ("torch", "torchvision", "torchaudio", "axolotl", "transformers", "peft", "accelerate", "bitsandbytes",
            "flash-attn")
REQUIRED = ("torch", "axolotl", "transformers", "peft", "accelerate")
TORCH_INDEX = "https://download.pytorch.org/whl"


@dataclass(frozen=True)
class Finding:
    severity: str                  # "error" (will fail) | "warning" (may fail or be slow) | "info"
    what: str
    fix: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------- collect


def _dist(name: str):
    try:
        return metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return None


def _torch_build(dist) -> dict:
    """CUDA/ROCm build of torch from the text of torch/version.py (written at build time), not by importing it."""
    try:
        text = Path(dist.locate_file("torch/version.py")).read_text()
    except OSError:
        return {}
    out = {}
    for vendor in registry.VENDORS:
        m = re.search(rf"^{vendor.torch_version_attr}\s*(?::[^=]*)?=\s*'([^']+)'", text, re.M)
        out[vendor.torch_build_key] = m.group(1) if m else None
    return out


def _requires(dist, names: set[str]) -> list[str]:
    """This package's requirements on the stack's own packages, markers evaluated for this interpreter."""
    from packaging.requirements import Requirement

    out = []
    for line in dist.requires or []:
        try:
            req = Requirement(line)
        except Exception:
            continue
        if _norm(req.name) not in names:
            continue
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        out.append(f"{_norm(req.name)}{req.specifier}")
    return out


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _flash_attn_build(fa, torch) -> dict:
    """Which torch flash-attn was built for, where the metadata says it.

    Prebuilt wheels are named `flash_attn-2.8.3+cu12torch2.8cxx11abiFALSE-...whl`; pip records that URL in
    direct_url.json. A source build records nothing, so the fallback is order: a torch installed after
    flash-attn was compiled (torch's dist-info newer) is the classic cause of `undefined symbol` on import.
    """
    out = {"flash_attn_torch": None, "flash_attn_older_than_torch": False}
    try:
        url = json.loads(fa.read_text("direct_url.json") or "{}").get("url", "")
    except (ValueError, OSError):
        url = ""
    m = re.search(r"torch(\d+\.\d+)", url)
    if m:
        out["flash_attn_torch"] = m.group(1)
    try:
        fa_info = Path(fa._path).stat().st_mtime  # PathDistribution: the dist-info folder
        torch_info = Path(torch._path).stat().st_mtime
        out["flash_attn_older_than_torch"] = torch_info > fa_info + 60
    except (AttributeError, OSError):
        pass
    return out


def _llamacpp() -> dict:
    try:
        ll = tools.locate()
    except TutorWrapError as exc:
        return {"llama_cpp": None, "llama_cpp_error": str(exc).splitlines()[0]}
    return {"llama_cpp": ll.version, "llama_cpp_dir": str(ll.bin_dir), "llama_cpp_backend": ll.backend}


def collect() -> dict:
    """Versions and build facts of the stack in this interpreter's environment."""
    v: dict = {"python": ".".join(map(str, sys.version_info[:3])), "requires": {}}
    dists = {name: _dist(name) for name in PACKAGES}
    names = {_norm(n) for n in PACKAGES}
    for name, d in dists.items():
        v[name] = d.version if d else None
        if d is not None:
            v["requires"][name] = _requires(d, names)
    if dists["torch"] is not None:
        v.update(_torch_build(dists["torch"]))
        v["torch_build"] = torch_build_label(v)
    bnb = dists["bitsandbytes"]
    if bnb is not None:
        pkg = Path(bnb.locate_file("bitsandbytes"))
        v["bitsandbytes_libs"] = sorted(p.name for p in pkg.glob("libbitsandbytes_*")) if pkg.is_dir() else []
    if dists["flash-attn"] is not None and dists["torch"] is not None:
        v.update(_flash_attn_build(dists["flash-attn"], dists["torch"]))
    v.update(_llamacpp())
    try:
        v["ollama"] = tools.ollama()
    except TutorWrapError as exc:   # a TUTOR_WRAP_OLLAMA that names nothing: a finding here, not a crash
        v["ollama"], v["ollama_error"] = None, str(exc)
    v["ollama_off"] = tools.ollama_off()
    return v


# ------------------------------------------------------------------------------------------------ pure checks


def _local(version: str | None) -> str | None:
    """'2.9.1+cu128' -> 'cu128'; PyPI's default wheels carry no local tag."""
    return version.split("+", 1)[1] if version and "+" in version else None


def index_url(torch_version: str | None) -> str:
    """The PyTorch index matching torch's own build, so the companion wheel is built for the same CUDA/ROCm."""
    tag = _local(torch_version)
    return f" --index-url {TORCH_INDEX}/{tag}" if tag else ""


# Published pairs that break the "same patch" rule (pytorch/vision README and torchaudio's compatibility matrix).
_VISION_EXCEPTIONS = {(2, 0, 0): "0.15.1", (2, 0, 1): "0.15.2"}
_AUDIO_EXCEPTIONS = {(2, 0, 0): "2.0.1", (2, 0, 1): "2.0.2"}


def torchvision_for(torch_version: str) -> str | None:
    """torch 2.N.p -> torchvision 0.(N+15).p; torch 1.N -> 0.(N+1) (pytorch/vision README table: 2.13 -> 0.28)."""
    t = version_tuple(torch_version)
    if t is None:
        return None
    if t in _VISION_EXCEPTIONS:
        return _VISION_EXCEPTIONS[t]
    if t[0] == 2:
        return f"0.{t[1] + 15}.{t[2]}"
    if t[0] == 1 and t[1] >= 4:
        return f"0.{t[1] + 1}.{t[2]}"
    return None


def torchaudio_ok(torch_version: str, audio_version: str) -> bool:
    """Same release until 2.10; TorchAudio 2.11 is built on torch's stable ABI and works with 2.11 and later."""
    t, a = version_tuple(torch_version), version_tuple(audio_version)
    if t is None or a is None:
        return True
    if t in _AUDIO_EXCEPTIONS:
        return audio_version.split("+")[0] == _AUDIO_EXCEPTIONS[t]
    if t[:2] >= (2, 11):
        return (2, 11) <= a[:2] <= t[:2]
    return a[:2] == t[:2]


def torchaudio_for(torch_version: str) -> str | None:
    t = version_tuple(torch_version)
    if t is None:
        return None
    return _AUDIO_EXCEPTIONS.get(t) or f"{t[0]}.{t[1]}.{t[2]}"


def bnb_backend(libs: list[str], kind: str, runtime: str | None) -> str | None:
    """The libbitsandbytes_* file bitsandbytes would load, with its own selection rule (cextension.py): exact
    version, else the highest packaged one below it with the same major, else the lowest above it; never
    across majors. kind is "cuda" or "rocm"; runtime is torch.version.cuda / .hip ("12.8", "6.4.43482")."""
    rt = version_tuple(runtime)
    vendor = by_bnb_kind(kind)
    if rt is None or vendor is None:
        return None
    have = {}
    for name in libs:
        m = re.match(rf"^libbitsandbytes_{kind}(\d+)\.", name)
        if m:
            digits = m.group(1)
            split = vendor.bnb_major_digits
            have[(int(digits[:split]), int(digits[split:]))] = name
    want = rt[:2]
    if want in have:
        return have[want]
    lower = [k for k in have if k[0] == want[0] and k < want]
    higher = [k for k in have if k[0] == want[0] and k > want]
    if lower:
        return have[max(lower)]
    return have[min(higher)] if higher else None


def _spec_conflicts(v: dict) -> list[Finding]:
    """pip-check for the stack: a package's Requires-Dist on another stack package that the installed one breaks."""
    from packaging.specifiers import InvalidSpecifier, SpecifierSet

    out = []
    for pkg, reqs in (v.get("requires") or {}).items():
        for req in reqs:
            m = re.match(r"^([a-z0-9-]+)(.*)$", req)
            if not m or not m.group(2):
                continue
            dep, spec = m.group(1), m.group(2)
            have = v.get(dep)
            if have is None:
                continue
            try:
                ok = SpecifierSet(spec).contains(have, prereleases=True)
            except InvalidSpecifier:
                continue
            if not ok and dep not in ("torchvision", "torchaudio"):  # those two get their own, sharper finding
                out.append(Finding("error", f"{pkg} {v.get(pkg)} requires {dep}{spec}, but {dep} {have} is installed",
                                   f'pip install "{dep}{spec}"' + (index_url(v.get("torch")) if dep == "torch" else "")))
    return out


def _torch_findings(v: dict, accelerator: str) -> list[Finding]:
    torch = v.get("torch")
    if torch is None:
        return [Finding("error", "torch is not installed", "pip install torch==2.13.0"
                        + (f" --index-url {TORCH_INDEX}/cpu" if accelerator == "cpu" else ""))]
    built_for = [other for other in registry.VENDORS if v.get(other.torch_build_key)]
    plain = torch.split("+")[0]
    if accelerator == "cpu":
        if built_for:
            return [Finding("info", f"torch {torch} is a GPU build on a machine without a GPU: it runs on the CPU "
                            "(the CPU wheel is about 10x smaller)")]
        return []
    vendor = by_name(accelerator)
    if v.get(vendor.torch_build_key):
        return []
    build = built_for[0].runtime if built_for else "CPU-only"
    return [Finding("error", f"torch {torch} is a {build} build but this machine has an {vendor.label} GPU: training "
                    "would run on the CPU",
                    f"pip install --force-reinstall torch=={plain} --index-url {TORCH_INDEX}/{vendor.torch_index_tag}  "
                    f"({vendor.torch_index_note})")]


def _companion_findings(v: dict) -> list[Finding]:
    """torchvision/torchaudio built for another torch: the seed's "dependency hell" (import errors at start-up)."""
    torch, out = v.get("torch"), []
    if torch is None:
        return out
    tv = v.get("torchvision")
    if tv is not None:
        want = torchvision_for(torch)
        tvm, wm = version_tuple(tv), version_tuple(want)
        if want and tvm and wm and tvm[:2] != wm[:2]:
            out.append(Finding("error", f"torchvision {tv} does not match torch {torch} (torch {'.'.join(map(str, version_tuple(torch)[:2]))} "
                               f"pairs with torchvision {wm[0]}.{wm[1]})",
                               f"pip install --force-reinstall --no-deps torchvision=={want}{index_url(torch)}  "
                               "(or `pip uninstall torchvision`: axolotl does not need it)"))
    ta = v.get("torchaudio")
    if ta is not None and not torchaudio_ok(torch, ta):
        out.append(Finding("error", f"torchaudio {ta} does not match torch {torch}",
                           f"pip install --force-reinstall --no-deps torchaudio=={torchaudio_for(torch)}{index_url(torch)}  "
                           "(or `pip uninstall torchaudio`: axolotl does not need it)"))
    return out


def _bnb_findings(v: dict, accelerator: str) -> list[Finding]:
    bnb = v.get("bitsandbytes")
    if bnb is None:
        return [Finding("warning", "bitsandbytes is not installed: methods qlora and lora8bit and 8-bit optimizers "
                        "need it", "pip install bitsandbytes")]
    if accelerator == "cpu":
        return []
    vendor = by_name(accelerator)
    libs = v.get("bitsandbytes_libs") or []
    kind = vendor.bnb_lib_kind
    runtime = v.get(vendor.torch_build_key)
    if not any(n.startswith(f"libbitsandbytes_{kind}") for n in libs):
        return [Finding("error", f"bitsandbytes {bnb} has no {kind.upper()} backend (no libbitsandbytes_{kind}*.so in "
                        f"its package) but this machine has an {vendor.label} GPU: 4-bit/8-bit loading fails",
                        "pip install --force-reinstall bitsandbytes  (wheels since 0.45 ship CUDA and ROCm backends)")]
    if runtime and bnb_backend(libs, kind, runtime) is None:
        return [Finding("error", f"bitsandbytes {bnb} has no backend for torch's {vendor.runtime} {runtime} "
                        f"(it ships {', '.join(n for n in libs if kind in n)})",
                        "pip install --force-reinstall -U bitsandbytes")]
    return []


def _flash_findings(v: dict, accelerator: str) -> list[Finding]:
    fa = v.get("flash-attn")
    if fa is None:
        return []
    fix = ("pip install --no-build-isolation --force-reinstall flash-attn  (builds against the installed torch), "
           "or disable it: `axolotl: {flash_attention: false, sdp_attention: true}` in the recipe")
    if accelerator == "cpu":
        return [Finding("info", f"flash-attn {fa} is installed but there is no GPU: it will not be used")]
    built = v.get("flash_attn_torch")
    torch_mm = version_tuple(v.get("torch"))
    if built and torch_mm and built != f"{torch_mm[0]}.{torch_mm[1]}":
        return [Finding("error", f"flash-attn {fa} was built for torch {built}, torch {v.get('torch')} is installed: "
                        "importing it fails with `undefined symbol`", fix)]
    if v.get("flash_attn_older_than_torch"):
        return [Finding("warning", f"torch was installed after flash-attn {fa} was built; if `import flash_attn` fails "
                        "with `undefined symbol`, it was built for the old torch", fix)]
    return []


# The llama.cpp build a GPU machine wants, and what gets its toolchain (tools/build_llamacpp.py picks it by itself
# once the toolchain is there).
LLAMACPP_GPU_BUILD = {
    "nvidia": ("cuda", "install the CUDA toolkit (nvcc: apt-get install nvidia-cuda-toolkit, or NVIDIA's cuda-toolkit)"),
    "amd": ("hip", "install ROCm's HIP SDK (amdgpu-install --usecase=hiplibsdk)"),
}


def check_stack(versions: dict, accelerator: str) -> list[Finding]:
    """Known-bad combinations in `versions` (as collect() returns it) for a machine whose GPU is `accelerator`
    ("nvidia" | "amd" | "cpu"). Pure: no I/O."""
    v = versions
    out: list[Finding] = []
    py = version_tuple(v.get("python"))
    if py and py[:2] < (3, 10):
        out.append(Finding("error", f"Python {v['python']} is too old (axolotl needs 3.10+)",
                           "create the venv with python3.11: python3.11 -m venv .venv"))
    out += _torch_findings(v, accelerator)
    for name in REQUIRED[1:]:
        if v.get(name) is None:
            out.append(Finding("error", f"{name} is not installed", "pip install -e .  (installs the pinned stack)"))
    out += _companion_findings(v)
    out += _spec_conflicts(v)
    out += _bnb_findings(v, accelerator)
    out += _flash_findings(v, accelerator)
    if not v.get("llama_cpp"):
        out.append(Finding("warning", "llama.cpp tools not found: the export and eval stages need them"
                           + (f" ({v['llama_cpp_error']})" if v.get("llama_cpp_error") else ""),
                           "python tools/build_llamacpp.py  (or set LLAMA_CPP_DIR to a built checkout)"))
    elif v.get("llama_cpp_backend") == "cpu" and accelerator in LLAMACPP_GPU_BUILD:
        backend, step = LLAMACPP_GPU_BUILD[accelerator]
        out.append(Finding("warning", f"llama.cpp is built for the CPU only: the export checks, the serving check and "
                           f"eval will generate on the CPU, not on this {accelerator.upper()} GPU (an 8B Q4_K_M: about 8 "
                           "tokens/s from a desktop's memory against about 60 on an RTX 3060)",
                           f"{step}, then: python tools/build_llamacpp.py --backend {backend}"))
    if v.get("ollama_error"):
        out.append(Finding("error", v["ollama_error"],
                           "point TUTOR_WRAP_OLLAMA at the ollama binary, set it to off, or unset it"))
    elif v.get("ollama_off"):
        out.append(Finding("info", "TUTOR_WRAP_OLLAMA is off: deploy writes the Modelfile and prints the `ollama "
                           "create` command instead of running it"))
    elif not v.get("ollama"):
        out.append(Finding("info", "ollama is not on PATH: deploy writes the Modelfile and prints the `ollama create` "
                           "command instead of running it", "install Ollama from https://ollama.com/download"))
    return out
