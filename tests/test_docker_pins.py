"""The Dockerfiles pin what pyproject.toml pins, run as a non-root user, declare the volumes, build llama.cpp with
the project's script. No Docker engine runs here, so these are checks on the text."""

import re
import tomllib
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = [REPO / "docker" / "Dockerfile.cuda", REPO / "docker" / "Dockerfile.rocm"]


def pyproject_pins() -> dict[str, str]:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text("utf-8"))["project"]["dependencies"]
    pins = {}
    for d in deps:
        m = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*==\s*([^\s;]+)\s*", d)
        if m:
            pins[m.group(1).lower()] = m.group(2)
    return pins


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = "\n".join(line for line in path.read_text("utf-8").splitlines() if not line.lstrip().startswith("#"))
    text = re.sub(r"\\\n", " ", text)
    out = []
    for line in text.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_pyproject_has_the_core_pins():
    assert {"axolotl", "torch", "transformers", "peft", "accelerate", "bitsandbytes"} <= set(pyproject_pins())


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_pins_match_pyproject(path):
    runs = " ".join(a for i, a in instructions(path) if i == "RUN")
    found = {m.group(1).lower(): m.group(2) for m in re.finditer(r"\b([A-Za-z0-9_.-]+)==([0-9][^\s\"';]*)", runs)}
    for name, version in pyproject_pins().items():
        assert found.get(name) == version, f"{path.name}: {name} is {found.get(name)}, pyproject pins {version}"
    extra = {n: v for n, v in found.items() if n in pyproject_pins() and pyproject_pins()[n] != v}
    assert not extra


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_base_image_is_pinned(path):
    froms = [a for i, a in instructions(path) if i == "FROM"]
    assert froms
    for image in froms:
        ref = image.split()[0]
        name, _, tag = ref.partition("@")[0].rpartition(":")
        assert name and tag and tag != "latest" or "@sha256:" in ref, f"{path.name}: {ref} is not pinned"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_runs_as_a_non_root_user(path):
    users = [a.split()[0] for i, a in instructions(path) if i == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), path.name
    assert any(i == "RUN" and "useradd" in a and users[-1] in a for i, a in instructions(path))


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_declares_volumes_for_runs_and_the_hf_cache(path):
    ins = instructions(path)
    vols = " ".join(a for i, a in ins if i == "VOLUME")
    env = " ".join(a for i, a in ins if i == "ENV")
    hf_home = re.search(r"HF_HOME=(\S+)", env)
    assert hf_home and hf_home.group(1) in vols, f"{path.name}: HF_HOME must be a volume"
    assert "/runs" in vols
    workdir = [a for i, a in ins if i == "WORKDIR"][-1]
    assert workdir in vols, "the working directory (where runs/ is written) is a volume"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_builds_llamacpp_with_the_project_script_and_installs_tutor_wrap(path):
    ins = instructions(path)
    assert any(i == "RUN" and "tools/build_llamacpp.py" in a for i, a in ins)
    assert any(i == "COPY" and "tools/build_llamacpp.py" in a for i, a in ins)
    assert any(i == "ENV" and "LLAMA_CPP_DIR=" in a for i, a in ins)
    assert any(i == "RUN" and re.search(r"pip install\s+/opt/tutor_wrap\b", a) for i, a in ins)
    # torch comes from the accelerator's own wheel index, not a bare PyPI resolve
    assert any(i == "RUN" and re.search(r"torch==\S+ --index-url", a) for i, a in ins)


def test_rocm_image_uses_a_rocm_index_and_base():
    ins = instructions(REPO / "docker" / "Dockerfile.rocm")
    assert "rocm" in [a for i, a in ins if i == "FROM"][0]
    assert any(i == "ARG" and "TORCH_INDEX=" in a and "/rocm" in a for i, a in ins)
