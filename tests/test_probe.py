"""Probe parsers on recorded outputs (tests/fixtures/README.md cites each source), and the real probe here."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from dataclasses import replace

from tutor_wrap.machine import amd, hardware, host, nvidia, probe, visible

pytestmark = pytest.mark.tools

FIX = Path(__file__).parent / "fixtures"
MIB = 1024**2


def test_nvidia_csv_any_column_order_titanv_rtx5880():
    gpus = nvidia.parse_query_csv((FIX / "nvidia_smi_query_titanv_rtx5880.csv").read_text())
    assert [g.name for g in gpus] == ["NVIDIA TITAN V", "NVIDIA RTX 5880 Ada Generation"]
    assert [g.compute_capability for g in gpus] == ["7.0", "8.9"]
    assert [g.bf16 for g in gpus] == [False, True]          # Volta has no bf16, Ada has
    assert gpus[0].driver == "570.86.15"
    assert gpus[0].vram_total_bytes == 0 and gpus[0].vram_free_bytes is None   # memory was not queried


def test_nvidia_csv_eight_a800_with_memory():
    gpus = nvidia.parse_query_csv((FIX / "nvidia_smi_query_8x_a800.csv").read_text())
    assert len(gpus) == 8
    assert {g.name for g in gpus} == {"NVIDIA A800-SXM4-80GB"}
    assert all(g.vram_total_bytes == 81920 * MIB for g in gpus)
    assert gpus[0].vram_free_bytes == 8404 * MIB and gpus[5].vram_free_bytes == 81148 * MIB
    assert all(g.compute_capability == "8.0" and g.bf16 for g in gpus)


def test_nvidia_csv_blackwell_cc_12():
    (g,) = nvidia.parse_query_csv((FIX / "nvidia_smi_query_rtx5080.csv").read_text())
    assert (g.name, g.vram_total_bytes, g.vram_free_bytes, g.compute_capability, g.bf16) == (
        "NVIDIA GeForce RTX 5080", 16303 * MIB, 10379 * MIB, "12.0", True)


def test_nvidia_csv_unified_memory_na_and_repeated_headers():
    gpus = nvidia.parse_query_csv((FIX / "nvidia_smi_query_gb10_srun.csv").read_text())
    assert len(gpus) == 4                                     # the repeated header rows are not GPUs
    assert all(g.name == "NVIDIA GB10" and g.vram_total_bytes == 0 and g.vram_free_bytes is None for g in gpus)


def test_nvidia_csv_empty():
    assert nvidia.parse_query_csv("") == []


def test_rocm_smi_json_rx7900xt():
    (g,) = amd.parse_rocm_smi_json((FIX / "rocm_smi_rx7900xt.json").read_text())
    assert g.vendor == "amd" and g.name == "Radeon RX 7900 XT"
    assert g.vram_total_bytes == 21458059264
    assert g.vram_free_bytes == 21458059264 - 27856896
    assert g.gfx_target == "gfx1100" and g.bf16 is True


def test_rocm_smi_json_with_leading_warning_lines():
    text = "WARNING: AMD GPU device(s) is/are in a low-power state. Check power control/runtime_status\n\n" + (
        FIX / "rocm_smi_rx7900xt.json").read_text()
    assert amd.parse_rocm_smi_json(text)[0].gfx_target == "gfx1100"


@pytest.mark.parametrize("gfx,bf16", [("gfx942", True), ("gfx90a", True), ("gfx1100", True), ("gfx1201", True),
                                      ("gfx1030", False), ("gfx906", False), (None, False)])
def test_amd_bf16_by_gfx_target(gfx, bf16):
    assert amd.bf16_for(gfx) is bf16


@pytest.mark.parametrize("name", ["proc_version_wsl2_5.4.72.txt", "proc_version_wsl2_4.19.128.txt",
                                  "uname_wsl2_5.15.133.1.txt"])
def test_wsl_detected_from_recorded_kernel_strings(name):
    assert host.is_wsl((FIX / name).read_text())


def test_wsl_osrelease_and_plain_linux():
    assert host.is_wsl("5.15.153.1-microsoft-standard-WSL2")
    assert not host.is_wsl("6.8.0-45-generic")


def test_wslconfig_from_microsoft_docs_example():
    cfg = host.parse_wslconfig((FIX / "wslconfig_msdocs_example.ini").read_text())
    assert cfg["memory"] == "4GB" and cfg["memory_bytes"] == 4 * 1024**3
    assert cfg["swap"] == "8GB" and cfg["swap_bytes"] == 8 * 1024**3


def test_wslconfig_ignores_other_sections():
    assert host.parse_wslconfig("[experimental]\nmemory=4GB\n") == {}


def test_meminfo_parser_matches_proc():
    info = host.parse_meminfo(Path("/proc/meminfo").read_text())
    assert info["MemTotal"] == psutil.virtual_memory().total


def test_cpu_model_from_cpuinfo_line():
    assert host.cpu_model("processor\t: 0\nmodel name\t: AMD Ryzen 7 5700G with Radeon Graphics\n") == \
        "AMD Ryzen 7 5700G with Radeon Graphics"


def _between(value: int, readings: list[int], slack: int = 64 * MIB) -> bool:
    """`value` lies within what the other sources read just before and just after the probe (plus a little slack):
    free RAM and swap move between readings on a busy machine, so one reading with a tight tolerance would not hold."""
    return min(readings) - slack <= value <= max(readings) + slack


def test_real_probe_matches_proc_meminfo_and_statvfs(tmp_path):
    def readings():
        info = host.parse_meminfo(Path("/proc/meminfo").read_text())
        return info, psutil.virtual_memory(), shutil.disk_usage(tmp_path).free

    before = readings()
    hw = probe.probe(tmp_path / "not" / "yet")       # a run dir that does not exist yet: its disk counts
    after = readings()
    (info, vm, _), both = after, (before, after)
    assert hw.source == "probe" and hw.cpu_count == os.cpu_count()
    assert hw.ram_total_bytes == info["MemTotal"] == vm.total
    assert _between(hw.ram_available_bytes, [r[0]["MemAvailable"] for r in both] + [r[1].available for r in both])
    assert hw.swap_total_bytes == info["SwapTotal"]
    assert _between(hw.swap_free_bytes, [r[0]["SwapFree"] for r in both])
    assert _between(hw.disk_free_bytes, [r[2] for r in both])
    assert hw.wsl == host.is_wsl(Path("/proc/sys/kernel/osrelease").read_text())
    assert hw.accelerator == (hw.gpus[0].vendor if hw.gpus else "cpu")   # whatever this machine has
    assert hardware.Hardware.from_dict(hw.to_dict()) == hw


def test_probe_and_preflight_modules_do_not_import_torch():
    code = ("import sys, tutor_wrap.machine.profiles; "
            "import tutor_wrap.machine.probe as h, tutor_wrap.machine.software as s, tutor_wrap.planning.preflight as p; "
            "p.collect(h.probe(), s.collect()); assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def _fake_tool(tmp_path, monkeypatch, name, fixture):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    exe = bin_dir / name
    exe.write_text(f"#!/bin/sh\ncat '{FIX / fixture}'\n")
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def test_nvidia_smi_fallback_runs_the_binary(tmp_path, monkeypatch):
    _fake_tool(tmp_path, monkeypatch, "nvidia-smi", "nvidia_smi_query_8x_a800.csv")
    gpus, why = nvidia.from_nvidia_smi()
    assert why is None and len(gpus) == 8


def test_rocm_smi_fallback_runs_the_binary(tmp_path, monkeypatch):
    # The recorded output of a real RX 7900 XT, replayed by a stand-in rocm-smi on PATH.
    _fake_tool(tmp_path, monkeypatch, "rocm-smi", "rocm_smi_rx7900xt.json")
    gpus, why = amd.from_rocm_smi()
    assert why is None and gpus[0].vendor == "amd" and gpus[0].gfx_target == "gfx1100"


def test_probe_takes_the_first_vendor_that_finds_gpus(tmp_path, monkeypatch):
    """The vendor order decides, whatever GPU this machine has: a vendor that finds nothing passes its notes on."""
    _fake_tool(tmp_path, monkeypatch, "rocm-smi", "rocm_smi_rx7900xt.json")
    no_nvidia = replace(nvidia.VENDOR, probe=lambda: ([], ["NVML: no library"]))
    rocm_smi_only = replace(amd.VENDOR, probe=lambda: (amd.from_rocm_smi()[0], []))
    gpus, notes = probe.probe_gpus([no_nvidia, rocm_smi_only], env={})   # no GPU hidden (the suite hides ROCm's)
    assert [g.gfx_target for g in gpus] == ["gfx1100"] and notes == ["NVML: no library"]
    gpus, notes = probe.probe_gpus([rocm_smi_only, no_nvidia], env={})
    assert gpus[0].vendor == "amd" and notes == []            # the first vendor with GPUs ends the search


def test_cpu_flags_are_read_from_this_machines_cpuinfo():
    from pathlib import Path

    from tutor_wrap.machine.host import CPU_FLAGS, cpu_flags

    line = next(l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("flags"))
    have = set(line.split(":", 1)[1].split())
    assert cpu_flags() == [f for f in CPU_FLAGS if f in have]
    assert cpu_flags("flags\t\t: fpu sse avx2 avx512f amx_tile\n") == ["avx2", "avx512f", "amx_tile"]


def _gpus(n, names=None, uuids=None):
    return [hardware.GPU("nvidia", (names or ["RTX 3060"] * n)[i], 12 << 30, uuid=(uuids or [None] * n)[i])
            for i in range(n)]


@pytest.mark.parametrize("spec, picked", [
    ("", []), ("-1", []),                  # the usual ways to hide every GPU
    ("1", [1]), ("2,0", [2, 0]),           # a subset, in the order given: index 0 of the trainer is GPU 2
    ("0,7,1", [0]),                        # the list ends at the first index past the end
    ("0, 1", [0, 1]), ("1gpu", [1]),       # CUDA reads each entry's leading digits
    ("1,1", []), ("0,7,0", []),            # a GPU named twice, anywhere in the list: none
])
def test_cuda_visible_devices_by_index(spec, picked):
    gpus = _gpus(3, names=["a", "b", "c"])
    got, _ = visible.select(gpus, spec)
    assert [gpus.index(g) for g in got] == picked


def test_cuda_visible_devices_by_uuid_prefix():
    gpus = _gpus(2, uuids=["GPU-4b2c1a9f-8d3e-6f7a-b5c9-2e4d8a1f6c3b", "GPU-9e00aa11-0000-1111-2222-333344445555"])
    assert visible.select(gpus, "GPU-9e00")[0] == [gpus[1]]
    assert visible.select(gpus, "GPU-9e00,GPU-4b2c")[0] == [gpus[1], gpus[0]]
    assert visible.select(gpus, "GPU-ffff")[0] == []           # names no GPU: the list ends there
    assert visible.select(gpus, "GPU-9e00,0")[0] == [gpus[1]]  # the first entry decides: UUIDs, then an index ends it
    assert visible.select(gpus, "0,GPU-9e00")[0] == [gpus[0]]
    assert visible.select(gpus, "GPU-9e00,GPU-9e00aa")[0] == []  # the same GPU twice
    # a source without UUIDs (rocm-smi): the entries are counted, and preflight is told
    got, why = visible.select(_gpus(2), "GPU-4b2c")
    assert len(got) == 1 and "assumed the first 1" in why
    got, why = visible.select(gpus, "MIG-8f2e0c3a-1111,MIG-77aa")  # MIG slices: not probed, one device at most
    assert len(got) == 1 and "MIG slices" in why


def test_rocm_hip_picks_from_what_rocr_left():
    gpus = _gpus(4, names=["g0", "g1", "g2", "g3"])
    amd_v = amd.VENDOR

    def seen(env):
        got, _ = visible.visible(gpus, amd_v.visible_env, env, empty_is_unset=amd_v.visible_empty_is_unset)
        return [g.name for g in got]

    assert seen({"ROCR_VISIBLE_DEVICES": "1,2,3", "HIP_VISIBLE_DEVICES": "0"}) == ["g1"]
    assert seen({"ROCR_VISIBLE_DEVICES": "3,2", "CUDA_VISIBLE_DEVICES": "1"}) == ["g2"]  # HIP honours CUDA_...
    assert seen({"HIP_VISIBLE_DEVICES": "2", "CUDA_VISIBLE_DEVICES": "0"}) == ["g2"]     # HIP_... wins over CUDA_...
    assert seen({"CUDA_VISIBLE_DEVICES": ""}) == ["g0", "g1", "g2", "g3"]     # HIP reads "" as unset
    assert seen({"HIP_VISIBLE_DEVICES": "", "CUDA_VISIBLE_DEVICES": "1"}) == ["g1"]
    assert seen({"ROCR_VISIBLE_DEVICES": ""}) == []                         # ROCr does not
    assert seen({"HIP_VISIBLE_DEVICES": "-1"}) == []                        # what a CPU plan's trainer gets


def test_probe_plans_for_the_gpus_the_trainer_will_see():
    """A GPU hidden with CUDA_VISIBLE_DEVICES is not planned for: the e2e tests hide GPUs this way to train on the
    CPU, and a person picks one card of two the same way."""
    two = replace(nvidia.VENDOR, probe=lambda: (nvidia.parse_query_csv((FIX / "nvidia_smi_query_8x_a800.csv")
                                                                        .read_text())[:2], []))
    gpus, notes = probe.probe_gpus([two], env={"CUDA_VISIBLE_DEVICES": ""})
    assert gpus == [] and notes == ["CUDA_VISIBLE_DEVICES='' hides 2 of 2 GPU(s): planning for the CPU"]
    gpus, notes = probe.probe_gpus([two], env={"CUDA_VISIBLE_DEVICES": "1"})
    assert len(gpus) == 1 and gpus[0].vram_free_bytes == 12549 * MIB and "hides 1 of 2" in notes[0]
    gpus, notes = probe.probe_gpus([two], env={})
    assert len(gpus) == 2 and notes == []
    # hidden NVIDIA cards do not stop the search: the next vendor's visible GPUs are planned for
    rocm = replace(amd.VENDOR, probe=lambda: (amd.parse_rocm_smi_json((FIX / "rocm_smi_rx7900xt.json").read_text()), []))
    gpus, _ = probe.probe_gpus([two, rocm], env={"CUDA_VISIBLE_DEVICES": "", "HIP_VISIBLE_DEVICES": "0"})
    assert [g.vendor for g in gpus] == ["amd"]


def test_gpus_of_different_models_get_the_device_order_note():
    gpus = nvidia.parse_query_csv((FIX / "nvidia_smi_query_titanv_rtx5880.csv").read_text())
    two = replace(nvidia.VENDOR, probe=lambda: (gpus, []))
    _, notes = probe.probe_gpus([two], env={"CUDA_VISIBLE_DEVICES": "0"})
    assert any("CUDA_DEVICE_ORDER=PCI_BUS_ID" in n for n in notes)
    _, notes = probe.probe_gpus([two], env={"CUDA_VISIBLE_DEVICES": "0", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"})
    assert not any("CUDA_DEVICE_ORDER" in n for n in notes)
    rocm = replace(amd.VENDOR, probe=lambda: ([replace(g, vendor="amd") for g in gpus], []))
    _, notes = probe.probe_gpus([rocm], env={"HIP_VISIBLE_DEVICES": "0"})   # no CUDA advice for AMD GPUs
    assert not any("CUDA_DEVICE_ORDER" in n for n in notes)


def test_isa_level_names_the_best_instruction_set_present():
    from tutor_wrap.machine.host import isa_level

    assert isa_level(["avx2", "fma"]) == "AVX2"
    assert isa_level(["avx2", "fma", "avx512f"]) == "AVX-512"
    assert isa_level(["avx2", "fma", "avx512f", "avx512_bf16"]) == "AVX512-BF16"
    assert isa_level(["avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"]) == "AMX"
    assert isa_level(["avx512_bf16"]) == "baseline"   # a level needs all its flags
    assert isa_level([]) == "baseline"


def test_a_profiles_cpu_flags_name_its_level_and_unknown_flags_say_so(tmp_path):
    import yaml

    from tutor_wrap.machine import profiles
    from tutor_wrap.machine.host import isa_level

    # published instruction sets of the shipped machines' CPUs: Tiger Lake has AVX-512 without BF16, Zen 3 AVX2,
    # Sapphire Rapids AMX
    assert isa_level(profiles.load_profile("cpu-only").cpu_flags) == "AVX-512"
    assert isa_level(profiles.load_profile("rtx3060-12gb").cpu_flags) == "AVX2"
    assert isa_level(profiles.load_profile("8x-h100-80gb").cpu_flags) == "AMX"
    data = yaml.safe_load((profiles.PROFILE_DIR / "cpu-only.yml").read_text())
    data.pop("cpu_flags")
    (tmp_path / "noflags.yml").write_text(yaml.safe_dump(data))
    assert isa_level(profiles.load_profile(str(tmp_path / "noflags.yml")).cpu_flags) == "unknown"
    data["cpu_flags"] = ["AVX2", "FMA", "AVX512F", "AVX512_BF16"]   # as people write them
    (tmp_path / "upper.yml").write_text(yaml.safe_dump(data))
    assert isa_level(profiles.load_profile(str(tmp_path / "upper.yml")).cpu_flags) == "AVX512-BF16"
