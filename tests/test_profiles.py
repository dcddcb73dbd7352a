"""Shipped hardware profiles load, round-trip, and describe the real cards."""

import pytest

from tutor_wrap.planning import preflight
from tutor_wrap.machine import profiles
from tutor_wrap.core.errors import TutorWrapError
from tutor_wrap.core.units import GIB
from tutor_wrap.machine.hardware import Hardware
from tutor_wrap.machine.probe import probe

pytestmark = pytest.mark.unit

SHIPPED = {"rtx3060-12gb", "rtx4090-24gb", "a100-80gb", "h100-80gb", "mi300x-192gb", "radeon-rx7900xtx-24gb",
           "cpu-only", "2x-rtx4090-24gb", "8x-h100-80gb"}


def test_all_shipped_profiles_load():
    assert SHIPPED <= set(profiles.names())
    for name in SHIPPED:
        hw = profiles.load_profile(name)
        assert isinstance(hw, Hardware) and hw.source == name
        assert hw.ram_available_bytes <= hw.ram_total_bytes and hw.swap_free_bytes <= hw.swap_total_bytes


@pytest.mark.parametrize("name,accel,n,cc_or_gfx,vram_mib", [
    ("rtx3060-12gb", "nvidia", 1, "8.6", 12288), ("rtx4090-24gb", "nvidia", 1, "8.9", 24564),
    ("a100-80gb", "nvidia", 1, "8.0", 81920), ("h100-80gb", "nvidia", 1, "9.0", 81559),
    ("2x-rtx4090-24gb", "nvidia", 2, "8.9", 24564), ("8x-h100-80gb", "nvidia", 8, "9.0", 81559),
    ("mi300x-192gb", "amd", 1, "gfx942", 196608), ("radeon-rx7900xtx-24gb", "amd", 1, "gfx1100", 24560),
])
def test_gpu_specs(name, accel, n, cc_or_gfx, vram_mib):
    hw = profiles.load_profile(name)
    assert hw.accelerator == accel and len(hw.gpus) == n
    g = hw.gpus[0]
    assert (g.compute_capability or g.gfx_target) == cc_or_gfx and g.bf16
    assert g.vram_total_bytes == vram_mib * 1024**2


def test_cpu_only():
    hw = profiles.load_profile("cpu-only")
    assert hw.gpus == [] and hw.accelerator == "cpu"


def test_reference_machine_is_wsl_with_default_caps():
    hw = profiles.load_profile("rtx3060-12gb")
    assert hw.wsl and hw.cpu_physical_cores == 8
    assert 7 * GIB < hw.ram_total_bytes <= 8 * GIB           # WSL default: half of 16 GiB
    assert hw.swap_total_bytes == 4 * GIB                     # WSL default: 25% of 16 GB


def test_round_trip_shipped_and_probed(tmp_path):
    from dataclasses import replace

    shipped = profiles.load_profile("2x-rtx4090-24gb")
    with_uuids = replace(shipped, gpus=[replace(g, uuid=f"GPU-{i}abc") for i, g in enumerate(shipped.gpus)])
    for hw in (shipped, with_uuids, probe()):
        path = profiles.save_profile(hw, tmp_path / "mybox.yml")
        assert "GPU-" not in path.read_text()          # a profile does not identify the very cards
        back = profiles.load_profile(path)
        assert back.source == "mybox"
        expected = replace(hw, source="mybox", probe_notes=[], gpus=[replace(g, uuid=None) for g in hw.gpus])
        assert back.to_dict() == expected.to_dict()


def test_sizes_with_units(tmp_path):
    p = tmp_path / "hand.yml"
    p.write_text("cpu_count: 4\nram_total_bytes: 16GiB\nram_available_bytes: 12GiB\nswap_total_bytes: 0\n"
                 "swap_free_bytes: 0\ndisk_free_bytes: 100GiB\n"
                 "gpus: [{vendor: nvidia, name: X, vram_total_bytes: 12288MiB, compute_capability: '8.6', bf16: true}]\n")
    hw = profiles.load_profile(p)
    assert hw.ram_total_bytes == 16 * GIB and hw.gpus[0].vram_total_bytes == 12 * GIB


def test_bad_profiles_are_user_errors(tmp_path):
    with pytest.raises(TutorWrapError, match="unknown hardware profile"):
        profiles.load_profile("rtx9999")
    p = tmp_path / "typo.yml"
    p.write_text("cpu_count: 4\nram_total_bytes: 1\nram_available_bytes: 1\nswap_total_bytes: 0\nswap_free_bytes: 0\n"
                 "disk_free_bytes: 1\nram_totl: 3\n")
    with pytest.raises(TutorWrapError, match="ram_totl"):
        profiles.load_profile(p)


def test_resolve_hardware():
    assert profiles.resolve_hardware("auto").source == "probe"
    assert profiles.resolve_hardware("h100-80gb").source == "h100-80gb"


def test_preflight_on_reference_machine_gives_wslconfig_lines():
    hw = profiles.load_profile("rtx3060-12gb")
    rep = preflight.collect(hw, {"python": "3.11.9", "torch": "2.13.0+cpu", "axolotl": "0.19.0", "transformers": "x",
                                 "peft": "x", "accelerate": "x", "bitsandbytes": None, "llama_cpp": "b1", "ollama": "o"})
    fixes = " ".join(f["fix"] or "" for f in rep["findings"])
    assert "memory=12GB" in fixes and "[wsl2]" in fixes and "wsl --shutdown" in fixes
    # this machine's CPU torch is not judged against the profile's GPU: planning from a laptop is not an error
    assert not any(f["severity"] == "error" for f in rep["findings"]) and rep["ok"] is True
    assert any("not checked against that machine's GPUs" in f["what"] for f in rep["findings"])
