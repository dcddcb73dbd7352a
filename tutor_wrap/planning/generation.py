"""How many llama-servers answer a batch of greedy requests (eval), and with how many threads each."""

from __future__ import annotations

from dataclasses import dataclass

from tutor_wrap.machine.hardware import Hardware
from tutor_wrap.planning.planner import cpu_threads

# More servers than this gain little (they share memory bandwidth) and each holds its own KV cache and buffers.
MAX_SERVERS = 4


@dataclass(frozen=True)
class GenerationLayout:
    servers: int
    threads: int | None     # per server; None: llama.cpp's default
    why: str


def generation_layout(hw: Hardware, requests: int) -> GenerationLayout:
    """On a CPU, several one-slot servers with few threads each rather than one server with all the threads:
    ggml synchronises its threads after every operation, and a small model's operations are too short for that to
    pay (demo model, 2 cores: 2 threads in one server 1.2-1.4x one thread, two one-thread servers 2x; same
    answers, bench/eval_parallel.py). On a GPU, one server: each would hold its own copy of the model in VRAM."""
    if hw.accelerator != "cpu":
        return GenerationLayout(1, None, "one llama-server: a GPU holds one copy of the model")
    cores, why = cpu_threads(hw)
    n = max(1, min(cores, MAX_SERVERS, requests))
    each = max(1, cores // n)
    return GenerationLayout(n, each, f"{n} llama-server(s) of {each} thread(s), one request at a time each: "
                                     + why)
