"""The stack checks are pure: synthetic version dicts in, findings with the exact fix out."""

import pytest

from tutor_wrap.machine import software
from tutor_wrap.machine.software import bnb_backend, check_stack, torchvision_for

pytestmark = pytest.mark.tools

BNB_0502 = ["libbitsandbytes_cpu.so", "libbitsandbytes_cuda118.so", "libbitsandbytes_cuda121.so",
            "libbitsandbytes_cuda124.so", "libbitsandbytes_cuda126.so", "libbitsandbytes_cuda128.so",
            "libbitsandbytes_cuda130.so", "libbitsandbytes_cuda132.so", "libbitsandbytes_rocm64.so",
            "libbitsandbytes_rocm70.so", "libbitsandbytes_rocm71.so", "libbitsandbytes_rocm72.so"]


def good(**over):
    v = {"python": "3.11.9", "torch": "2.13.0+cu128", "torch_cuda": "12.8", "torch_hip": None,
         "axolotl": "0.19.0", "transformers": "5.16.1", "peft": "0.20.0", "accelerate": "1.13.0",
         "bitsandbytes": "0.50.2", "bitsandbytes_libs": BNB_0502, "llama_cpp": "llama.cpp b1234",
         "ollama": "/usr/local/bin/ollama",
         "requires": {"axolotl": ["torch<=2.13.0,>=2.11.0", "transformers==5.16.1", "peft==0.20.0"]}}
    v.update(over)
    return v


def errors(findings):
    return [f for f in findings if f.severity == "error"]


def test_good_stack_has_no_findings():
    assert check_stack(good(), "nvidia") == []


@pytest.mark.parametrize("torch,vision", [("2.13.0", "0.28.0"), ("2.9.1+cu128", "0.24.1"), ("2.0.1", "0.15.2"),
                                          ("2.1.2", "0.16.2"), ("1.13.1", "0.14.1")])
def test_torchvision_table(torch, vision):
    # pytorch/vision README: 2.13->0.28 ... 2.0->0.15, 1.13->0.14; 2.0.1 pairs with 0.15.2 (PyTorch Versions wiki)
    assert torchvision_for(torch) == vision


def test_torchvision_mismatch_is_an_error_with_the_matching_pip_command():
    # The seed's "dependency hell": a torchvision built for torch 2.9 next to another torch.
    findings = check_stack(good(torch="2.13.0+cu128", torchvision="0.24.1+cu128"), "nvidia")
    (f,) = errors(findings)
    assert "torchvision 0.24.1+cu128 does not match torch 2.13.0+cu128" in f.what
    assert f.fix.startswith("pip install --force-reinstall --no-deps torchvision==0.28.0 "
                            "--index-url https://download.pytorch.org/whl/cu128")


def test_torchvision_matching_is_quiet_and_pypi_torch_gets_no_index_url():
    assert check_stack(good(torchvision="0.28.0+cu128"), "nvidia") == []
    (f,) = errors(check_stack(good(torch="2.9.1", torch_cuda="12.8", torchvision="0.23.0", requires={}), "nvidia"))
    assert "--index-url" not in f.fix and "torchvision==0.24.1" in f.fix


def test_torchaudio_rules():
    assert software.torchaudio_ok("2.9.1", "2.9.1")
    assert not software.torchaudio_ok("2.9.1", "2.8.0")
    assert software.torchaudio_ok("2.13.0", "2.11.0")      # TorchAudio 2.11 works with every later torch
    assert not software.torchaudio_ok("2.10.0", "2.11.0")
    (f,) = errors(check_stack(good(torch="2.9.1+cu128", torchaudio="2.8.0+cu128", requires={}), "nvidia"))
    assert "torchaudio==2.9.1 --index-url https://download.pytorch.org/whl/cu128" in f.fix


def test_bitsandbytes_without_gpu_backend_on_an_nvidia_machine():
    findings = check_stack(good(bitsandbytes_libs=["libbitsandbytes_cpu.so"]), "nvidia")
    (f,) = errors(findings)
    assert "bitsandbytes 0.50.2 has no CUDA backend" in f.what
    assert f.fix.startswith("pip install --force-reinstall bitsandbytes")


def test_bitsandbytes_without_rocm_backend_on_an_amd_machine():
    v = good(torch="2.13.0+rocm6.4", torch_cuda=None, torch_hip="6.4.43482",
             bitsandbytes_libs=["libbitsandbytes_cpu.so", "libbitsandbytes_cuda128.so"])
    (f,) = errors(check_stack(v, "amd"))
    assert "no ROCM backend" in f.what


def test_bitsandbytes_backend_selection_follows_its_own_rule():
    assert bnb_backend(BNB_0502, "cuda", "12.8") == "libbitsandbytes_cuda128.so"
    assert bnb_backend(BNB_0502, "cuda", "12.9") == "libbitsandbytes_cuda128.so"   # highest below, same major
    assert bnb_backend(BNB_0502, "cuda", "12.0") == "libbitsandbytes_cuda121.so"   # lowest above, same major
    assert bnb_backend(BNB_0502, "cuda", "10.2") is None                           # never across majors
    assert bnb_backend(BNB_0502, "rocm", "6.4.43482") == "libbitsandbytes_rocm64.so"
    (f,) = errors(check_stack(good(torch_cuda="11.8", bitsandbytes_libs=["libbitsandbytes_cuda121.so"]), "nvidia"))
    assert "no backend for torch's CUDA 11.8" in f.what


def test_bitsandbytes_cpu_only_is_fine_without_a_gpu():
    v = good(torch="2.13.0+cpu", torch_cuda=None, bitsandbytes_libs=["libbitsandbytes_cpu.so"])
    assert errors(check_stack(v, "cpu")) == []


def test_cpu_torch_on_an_nvidia_machine():
    (f,) = errors(check_stack(good(torch="2.13.0+cpu", torch_cuda=None), "nvidia"))
    assert "CPU-only build" in f.what and "--index-url https://download.pytorch.org/whl/cu" in f.fix


def test_flash_attn_built_for_another_torch():
    (f,) = errors(check_stack(good(**{"flash-attn": "2.8.3", "flash_attn_torch": "2.8"}), "nvidia"))
    assert "built for torch 2.8" in f.what
    assert "pip install --no-build-isolation --force-reinstall flash-attn" in f.fix
    assert "flash_attention: false" in f.fix


def test_flash_attn_older_than_torch_is_a_warning():
    fs = check_stack(good(**{"flash-attn": "2.8.3", "flash_attn_older_than_torch": True}), "nvidia")
    assert [f.severity for f in fs] == ["warning"]


def test_requirement_conflict_from_dist_metadata():
    v = good(torch="2.10.0+cu128")
    (f,) = errors(check_stack(v, "nvidia"))
    assert "axolotl 0.19.0 requires torch<=2.13.0,>=2.11.0" in f.what
    assert f.fix == 'pip install "torch<=2.13.0,>=2.11.0" --index-url https://download.pytorch.org/whl/cu128'


def test_local_version_satisfies_upper_bound():
    # 2.13.0+cpu must satisfy <=2.13.0 (PEP 440 ignores the local label there)
    assert errors(check_stack(good(torch="2.13.0+cpu", torch_cuda=None, bitsandbytes_libs=[]), "cpu")) == []


def test_missing_pieces():
    fs = check_stack(good(axolotl=None, llama_cpp=None, ollama=None, bitsandbytes=None), "nvidia")
    sev = {f.what.split(" ")[0]: f.severity for f in fs}
    assert sev["axolotl"] == "error" and sev["llama.cpp"] == "warning" and sev["ollama"] == "info"
    assert sev["bitsandbytes"] == "warning"


def test_collect_reads_this_venv_without_importing_torch():
    import subprocess
    import sys

    v = software.collect()
    assert v["torch"].startswith("2.13.0") and v["axolotl"] == "0.19.0"
    # the build read from files equals what torch itself says (asked in another process: this one stays torch-free)
    says = subprocess.run([sys.executable, "-c", "import torch; print(torch.version.cuda, torch.version.hip)"],
                          capture_output=True, text=True, check=True).stdout.split()
    assert [v["torch_cuda"] or "None", v["torch_hip"] or "None"] == says
    assert "libbitsandbytes_cpu.so" in v["bitsandbytes_libs"]
    assert "torch<=2.13.0,>=2.11.0" in v["requires"]["axolotl"]


@pytest.mark.parametrize("accelerator, backend", [("nvidia", "cuda"), ("amd", "hip")])
def test_a_cpu_only_llamacpp_on_a_gpu_machine_is_named_with_the_build_step(accelerator, backend):
    def about_llamacpp(findings):
        return [f for f in findings if "llama.cpp" in f.what]   # (an AMD machine's torch findings aside)

    (f,) = about_llamacpp(check_stack(good(llama_cpp_backend="cpu"), accelerator))
    assert f.severity == "warning" and "built for the CPU only" in f.what
    assert f.fix.endswith(f"python tools/build_llamacpp.py --backend {backend}")
    # a GPU build, an unknown one (LLAMA_CPP_DIR) or a machine without a GPU: nothing to say
    assert about_llamacpp(check_stack(good(llama_cpp_backend=backend), accelerator)) == []
    assert about_llamacpp(check_stack(good(llama_cpp_backend=None), accelerator)) == []
    assert about_llamacpp(check_stack(good(llama_cpp_backend="cpu", torch="2.13.0+cpu", torch_cuda=None), "cpu")) == []
