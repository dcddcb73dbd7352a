"""The llama.cpp build script after an interrupted download: only a verified file carries the final name."""

import importlib.util
import shutil
from pathlib import Path

import pytest

from tutor_wrap.core.paths import cache_dir


pytestmark = pytest.mark.tools
REPO = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("build_llamacpp", REPO / "tools" / "build_llamacpp.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_a_truncated_download_is_fetched_again_and_verified(tmp_path):
    b = load_script()
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    good = cache_dir() / "llama.cpp" / "downloads" / b.SDIST  # `make test` builds llama.cpp before the tests
    data = good.read_bytes()
    (downloads / b.SDIST).write_bytes(data[: len(data) // 3])          # cut off mid-download
    (downloads / (b.SDIST + ".part")).write_bytes(data[: len(data) // 5])
    final = b.download(tmp_path)                                      # a real pip download
    assert final == downloads / b.SDIST and b.sha256_of(final) == b.SHA256
    assert not (downloads / (b.SDIST + ".part")).exists()


def test_extraction_lands_whole_or_not_at_all(tmp_path):
    b = load_script()
    tarball = cache_dir() / "llama.cpp" / "downloads" / b.SDIST
    b.extract(tarball, tmp_path)
    src = tmp_path / "src"
    assert (src / "convert_hf_to_gguf.py").is_file() and (src / b.SOURCE_MARKER).is_file()
    assert not list(tmp_path.glob("src.tmp-*"))
    shutil.rmtree(src)


def test_a_build_for_another_cpu_is_rebuilt_and_this_machines_is_kept():
    """The build is native (-march=native) and records the instruction sets it was made with: a record from a CPU
    with another set, from a portable build, or from before the record existed asks for a rebuild; this machine's
    own record does not. A portable build (container images) is kept on any CPU that has its instruction sets."""
    b = load_script()
    here = b.cpu_isa()
    assert b.built_for_here({"cpu_target": "native", "cpu_isa": here}, portable=False)
    assert not b.built_for_here({"cpu_target": "native", "cpu_isa": here + ["amx_fp16_x"]}, portable=False)
    assert not b.built_for_here({"cpu_target": "native", "cpu_isa": here[:-1]}, portable=False)
    assert not b.built_for_here({}, portable=False)
    _, needs, name = b.target(portable=True)
    assert b.built_for_here({"cpu_target": name, "cpu_isa": needs}, portable=True)
    assert not b.built_for_here({"cpu_target": name, "cpu_isa": needs}, portable=False)
    # x86 lists `flags`, ARM `Features`; kernel security bits that merely share a prefix are not instruction sets
    assert b.cpu_isa("flags\t: fpu sse2 avx2 smep smap avx512_bf16 hypervisor\n") == ["avx2", "avx512_bf16", "sse2"]
    assert b.cpu_isa("Features\t: fp asimd asimddp sve i8mm bf16\n") == ["asimd", "asimddp", "bf16", "i8mm", "sve"]


def test_a_software_vulkan_device_does_not_choose_a_vulkan_build():
    """Mesa's lavapipe (installed by `make test` for the Vulkan test) is a Vulkan device of the CPU type: `auto`
    must not build for it (generation on it is 40-60x slower than the CPU build), and ggml skips it anyway."""
    b = load_script()
    if shutil.which("vulkaninfo"):
        assert not [g for g in b.vulkan_gpus() if "llvmpipe" in g]
    name, _, _, why = b.choose_backend("auto")
    assert name != "vulkan" or b.vulkan_gpus(), why
