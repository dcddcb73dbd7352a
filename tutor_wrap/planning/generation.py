"""Where llama.cpp runs a GGUF (how many layers its build's GPU devices take) and how many llama-servers answer a
batch of greedy requests (serving check, eval), with how many threads each."""

from __future__ import annotations

from dataclasses import dataclass

from tutor_wrap.machine.hardware import Hardware
from tutor_wrap.planning.planner import cpu_threads

# More servers than this gain little (they share memory bandwidth) and each holds its own KV cache and buffers.
MAX_SERVERS = 4


# What a llama.cpp process keeps on the device beside the weights and the KV cache: its compute buffers (the batch's
# activations and logits) and the backend's own. A published round figure, on the safe side: a partial offload is
# counted against the free memory less this, so the last layer moved to the device does not fail to allocate.
DEVICE_MARGIN_BYTES = 512 * 2**20
DEVICE_MARGIN_FRACTION = 0.10      # ... or this share of the weights, when larger


@dataclass(frozen=True)
class Device:
    """A device the llama.cpp build can offload to (llama-server --list-devices)."""
    name: str
    description: str
    total_bytes: int
    free_bytes: int


@dataclass(frozen=True)
class Offload:
    gpu_layers: int          # llama.cpp's -ngl: 0 = all on the CPU; layers + 1 = every layer and the output
    layers: int
    why: str

    @property
    def full(self) -> bool:
        return self.gpu_layers > self.layers


def offload(devices: list[Device], *, model_bytes: int, kv_bytes: int, layers: int,
            backend: str | None = None) -> Offload:
    """How many of a GGUF's layers go to the build's devices: all when the weights, the KV cache and a margin fit
    their free memory together, else as many whole layers (each with its share of weights and cache) as fit, else
    none. llama.cpp spreads offloaded layers over all its devices (split by layer), so their free memory adds up."""
    if not devices:
        return Offload(0, layers, f"llama.cpp runs on the CPU: its build ({backend or 'unknown'} backend) lists no "
                                  "GPU device")
    free = sum(d.free_bytes for d in devices)
    names = ", ".join(f"{d.name} ({d.description})" for d in devices)
    margin = max(DEVICE_MARGIN_BYTES, int(DEVICE_MARGIN_FRACTION * model_bytes))
    need = model_bytes + kv_bytes + margin
    gib = 2**30
    if free >= need or not layers:
        return Offload(layers + 1, layers, f"all {layers} layers on {names}: weights {model_bytes / gib:.2f} GiB + KV "
                                           f"cache {kv_bytes / gib:.2f} GiB + {margin / gib:.2f} GiB margin fit "
                                           f"{free / gib:.2f} GiB free")
    per_layer = (model_bytes + kv_bytes) / layers
    n = max(0, min(layers, int((free - margin) // per_layer)))
    if n == 0:
        return Offload(0, layers, f"on the CPU: {names} has {free / gib:.2f} GiB free, less than one layer "
                                  f"({per_layer / gib:.2f} GiB) and the {margin / gib:.2f} GiB margin")
    return Offload(n, layers, f"{n} of {layers} layers on {names} ({free / gib:.2f} GiB free; the whole model needs "
                              f"{need / gib:.2f} GiB), the rest on the CPU")


@dataclass(frozen=True)
class GenerationLayout:
    servers: int
    threads: int | None     # per server; None: llama.cpp's default
    why: str
    gpu_layers: int = 0     # llama.cpp's -ngl for each server


def generation_layout(hw: Hardware, requests: int, placed: Offload | None = None) -> GenerationLayout:
    """On a CPU, several one-slot servers with few threads each rather than one server with all the threads:
    ggml synchronises its threads after every operation, and a small model's operations are too short for that to
    pay (demo model, 2 cores: 2 threads in one server 1.2-1.4x one thread, two one-thread servers 2x; same
    answers, bench/eval_parallel.py). With layers offloaded to a GPU, one server: each would hold its own copy of
    them in the device's memory. `placed`: where llama.cpp's build puts the model (None: on the CPU)."""
    if placed is not None and placed.gpu_layers:
        return GenerationLayout(1, None, f"one llama-server, {placed.why}", placed.gpu_layers)
    cores, why = cpu_threads(hw)
    n = max(1, min(cores, MAX_SERVERS, requests))
    each = max(1, cores // n)
    return GenerationLayout(n, each, f"{n} llama-server(s) of {each} thread(s), one request at a time each: "
                                     + why + (f" ({placed.why})" if placed is not None and hw.gpus else ""))


def generation_seconds(answers: int, max_tokens: int, tokens_per_second: float, servers: int) -> float | None:
    """The time to generate `answers` greedy answers at most: each running to `max_tokens` (most stop earlier) at
    the measured speed of one server, the servers answering side by side. None without a measured speed."""
    if tokens_per_second <= 0:
        return None
    return answers * max_tokens / (tokens_per_second * max(1, servers))
