"""Where llama.cpp runs a GGUF (planning/generation.offload): the whole model on the build's devices when it fits
their free memory, else as many whole layers as fit, else none; one server when layers are on a GPU."""

import pytest
from hypothesis import given, strategies as st

from tutor_wrap.machine.hardware import Hardware
from tutor_wrap.planning.generation import Device, Offload, generation_layout, offload

pytestmark = pytest.mark.unit

GIB = 2**30


def dev(free_gib: float, name: str = "CUDA0") -> Device:
    return Device(name, "NVIDIA GeForce RTX 3060", 12 * GIB, int(free_gib * GIB))


@given(free=st.floats(0, 48), model=st.floats(0.05, 40), kv=st.floats(0, 8), layers=st.integers(1, 128))
def test_what_is_offloaded_fits_and_one_more_layer_would_not(free, model, kv, layers):
    o = offload([dev(free)], model_bytes=int(model * GIB), kv_bytes=int(kv * GIB), layers=layers)
    per_layer = (model + kv) * GIB / layers
    margin = max(512 * 2**20, 0.1 * model * GIB)
    if o.full:
        assert free * GIB >= (model + kv) * GIB + margin - 2
    else:
        assert 0 <= o.gpu_layers < layers
        if o.gpu_layers:
            assert o.gpu_layers * per_layer + margin <= free * GIB + 1        # what goes there fits
        assert (o.gpu_layers + 1) * per_layer + margin > free * GIB - 1       # one more would not
    more = offload([dev(free + 4)], model_bytes=int(model * GIB), kv_bytes=int(kv * GIB), layers=layers)
    assert more.gpu_layers >= o.gpu_layers                                   # more free memory never offloads less


def test_the_reference_users_model_on_a_3060_and_on_a_busy_one():
    """Llama 3 8B Q4_K_M (4.58 GiB, 32 layers, 8 KV heads of 128) with 4608 tokens of f16 KV cache (0.56 GiB)."""
    kv = 4608 * 32 * 2 * 8 * 128 * 2
    whole = offload([dev(11.5)], model_bytes=int(4.58 * GIB), kv_bytes=kv, layers=32)
    assert whole.full and whole.gpu_layers == 33 and "all 32 layers on CUDA0" in whole.why
    busy = offload([dev(3.0)], model_bytes=int(4.58 * GIB), kv_bytes=kv, layers=32)
    assert 0 < busy.gpu_layers < 32 and f"{busy.gpu_layers} of 32 layers" in busy.why
    assert offload([dev(0.4)], model_bytes=int(4.58 * GIB), kv_bytes=kv, layers=32).gpu_layers == 0
    # two cards: llama.cpp splits the layers between them, so their free memory adds up
    assert offload([dev(2.5), dev(2.5, "CUDA1")], model_bytes=int(4.58 * GIB), kv_bytes=kv, layers=32).gpu_layers > \
        busy.gpu_layers


def test_no_device_means_the_cpu_and_several_cpu_servers():
    hw = Hardware(source="test", cpu_count=4, ram_total_bytes=16 * GIB, ram_available_bytes=12 * GIB,
                  swap_total_bytes=0, swap_free_bytes=0, disk_free_bytes=100 * GIB, cpu_physical_cores=4)
    cpu = offload([], model_bytes=GIB, kv_bytes=0, layers=30, backend="cpu")
    assert cpu == Offload(0, 30, cpu.why) and "lists no GPU device" in cpu.why
    layout = generation_layout(hw, 30, cpu)
    assert layout.gpu_layers == 0 and layout.servers >= 1
    on_gpu = generation_layout(hw, 30, offload([dev(8)], model_bytes=GIB, kv_bytes=0, layers=30))
    assert (on_gpu.servers, on_gpu.threads, on_gpu.gpu_layers) == (1, None, 31)
