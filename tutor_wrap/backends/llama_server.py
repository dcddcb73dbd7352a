"""llama.cpp's `llama-server`: the same GGUF served as consumers see it, the chat template applied by its own Jinja
engine from the GGUF's `tokenizer.chat_template`.

`serve` starts it on loopback, on a free port, and always stops it: on return, on an error and on Ctrl-C (the
child also dies with its parent, see core/proc.die_with_parent). Requests go through urllib on 127.0.0.1 only.
Greedy comparisons send `cache_prompt: false`: reusing a cached prefix changes near-ties (field notes).
"""

from __future__ import annotations

import json
import queue
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from tutor_wrap.core.errors import TutorWrapError
from tutor_wrap.core.proc import LoggedProcess, start_logged, tail
from tutor_wrap.backends.llamacpp import placement
from tutor_wrap.machine.tools import LlamaCpp

HOST = "127.0.0.1"
# With layers on a GPU, the log says where they went ("offloaded 33/33 layers to GPU", each device's buffers):
# llama-server prints those lines only at its debug verbosity.
OFFLOAD_LOG = ("-lv", "4")


def free_port() -> int:
    """A port nothing listens on now (the kernel's pick for port 0, released for the server to take)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Server:
    port: int
    pid: int | None = None

    def peak_rss_bytes(self) -> int | None:
        """The server's peak RSS so far (the kernel's high-water mark), while it runs; the weights it maps count as
        they are read."""
        try:
            status = Path(f"/proc/{self.pid}/status").read_text()
        except (OSError, TypeError):
            return None
        kib = next((line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")), None)
        return int(kib) * 1024 if kib else None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def _post(self, path: str, body: dict, timeout: float = 600) -> dict:
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.loads(r.read().decode("utf-8"))
        except urllib.error.HTTPError as exc:
            raise TutorWrapError(f"llama-server {path}: HTTP {exc.code}: {exc.read().decode('utf-8', 'replace')[:500]}") from None

    def apply_template(self, messages: list[dict]) -> str:
        """The prompt the server builds from `messages` with the GGUF's chat template (generation prompt added)."""
        return self._post("/apply-template", {"messages": messages})["prompt"]

    def chat(self, messages: list[dict], *, n_predict: int, seed: int = 0) -> tuple[str, bool]:
        """/v1/chat/completions at temperature 0, prompt cache off, as an OpenAI-style client asks:
        (text, stopped by itself rather than by the token limit)."""
        res = self._post("/v1/chat/completions", {"messages": messages, "temperature": 0, "max_tokens": n_predict,
                                                  "cache_prompt": False, "seed": seed})
        choice = res["choices"][0]
        return choice["message"].get("content") or "", choice.get("finish_reason") == "stop"

    def speed(self, ctx: int, n_predict: int = 16) -> tuple[float, float]:
        """(generation, prompt) tokens per second, measured: one short request to absorb the first request's one-off
        costs (weights paged in, a GPU backend's kernels compiled), then one the server times itself, with a prompt
        of up to 64 tokens and `n_predict` generated whatever the model would stop at, within the slot's `ctx`."""
        words = max(1, min(64, ctx - n_predict - 8))      # a word of "The ..." is one or two tokens
        body = {"prompt": "The " * (words // 2), "temperature": 0, "n_predict": n_predict, "cache_prompt": False,
                "ignore_eos": True}
        self._post("/completion", {**body, "n_predict": 2})
        t = self._post("/completion", body).get("timings") or {}
        return float(t.get("predicted_per_second") or 0.0), float(t.get("prompt_per_second") or 0.0)

    def complete(self, prompt: str, *, n_predict: int, seed: int = 0) -> tuple[str, bool]:
        """/completion of a raw prompt (no template), greedy, prompt cache off: (text, stopped by EOS)."""
        res = self._post("/completion", {"prompt": prompt, "temperature": 0, "n_predict": n_predict,
                                         "cache_prompt": False, "seed": seed})
        return res["content"], res.get("stop_type") == "eos"


def answer_all(servers: Server | list[Server], requests: list, *, n_predict: int, seed: int = 0, chat: bool = False,
               in_flight: int = 1, done=None) -> list[tuple[str, bool]]:
    """Greedy answers to every request, in order: raw prompts to /completion, or messages to /v1/chat/completions,
    shared out over `servers` (`share_out`). `done()` is called after each answer (a progress bar)."""
    def one(server: Server, req):
        res = (server.chat(req, n_predict=n_predict, seed=seed) if chat
               else server.complete(req, n_predict=n_predict, seed=seed))
        if done is not None:
            done()
        return res

    return share_out(servers, requests, one, in_flight=in_flight)


def share_out(servers: Server | list[Server], items: list, work: Callable[[Server, Any], Any], *,
              in_flight: int = 1) -> list:
    """`work(server, item)` for every item, results in the items' order. Each server takes the next waiting item
    as soon as it is done with one, `in_flight` at a time (its slot count). Servers with one slot each give every
    item what a lone server would: a greedy answer never depends on which server took it or what else ran."""
    lanes = [s for s in ([servers] if isinstance(servers, Server) else servers) for _ in range(in_flight)]
    if len(lanes) == 1:
        return [work(lanes[0], item) for item in items]
    todo: queue.SimpleQueue = queue.SimpleQueue()
    for pair in enumerate(items):
        todo.put(pair)
    out: list = [None] * len(items)
    failed: list[BaseException] = []

    def lane(server: Server) -> None:
        while not failed:
            try:
                i, item = todo.get_nowait()
            except queue.Empty:
                return
            try:
                out[i] = work(server, item)
            except BaseException as exc:   # noqa: BLE001 - re-raised in the caller's thread
                failed.append(exc)

    # Daemon threads: on Ctrl-C the caller's `serve` blocks stop the servers, which ends any request in flight.
    workers = [threading.Thread(target=lane, args=(s,), daemon=True) for s in lanes]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    if failed:
        raise failed[0]
    return out


def _wait_ready(proc: LoggedProcess, server: Server, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise TutorWrapError(f"llama-server exited (code {proc.returncode}) before it was ready; log: {log}\n"
                                 + tail(log, 15))
        try:
            with urllib.request.urlopen(server.url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise TutorWrapError(f"llama-server did not answer /health within {timeout:.0f} s; log: {log}\n" + tail(log, 15))


@contextmanager
def serve(ll: LlamaCpp, gguf: Path, *, ctx: int, log: Path, ready_timeout: float = 120,
          slots: int = 1, threads: int | None = None, gpu_layers: int | None = None) -> Iterator[Server]:
    """llama-server for `gguf` on 127.0.0.1:<free port>; stopped when the block ends, however it ends.

    `slots` requests are decoded together (continuous batching), each with `ctx` tokens of context. One slot
    answers requests one after another, so a greedy answer cannot depend on what else is in flight; with several,
    batch composition changes the arithmetic slightly and a near-tie can flip (bench/eval_parallel.py measures it).
    `threads`: llama.cpp's math threads (its default when None). ggml gives each output row to one thread, so the
    count changes speed, not results.
    `gpu_layers`: llama.cpp's -ngl, always passed (a GPU build's own default would offload whatever it likes);
    None: as many as fit the build's devices (llamacpp.placement).
    """
    if gpu_layers is None:
        gpu_layers = placement(ll, gguf, ctx * slots).gpu_layers
    server = Server(free_port())
    args = [str(ll.tool("llama-server")), "-m", str(gguf), "--host", HOST, "--port", str(server.port),
            "-c", str(ctx * slots), "-np", str(slots), "--jinja", "--no-webui", "--no-warmup",
            "-ngl", str(gpu_layers), *(OFFLOAD_LOG if gpu_layers else ())]
    if threads:
        args += ["-t", str(threads), "-tb", str(threads)]
    proc = start_logged(args, log, env=ll.env())
    server = Server(server.port, proc.pid)
    try:
        _wait_ready(proc, server, log, ready_timeout)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def serve_many(ll: LlamaCpp, gguf: Path, *, ctx: int, log: Path, servers: int,
               threads: int | None = None, gpu_layers: int | None = None) -> Iterator[list[Server]]:
    """`servers` llama-servers for one GGUF, one slot each (`answer_all` shares the requests out); the kernel maps
    the weights once for all of them. Each logs to its own file (`log`, then log-1, log-2...); all are stopped
    when the block ends, however it ends."""
    with ExitStack() as stack:
        yield [stack.enter_context(serve(ll, gguf, ctx=ctx, threads=threads, gpu_layers=gpu_layers,
                                         log=log if i == 0 else log.with_name(f"{log.stem}-{i}{log.suffix}")))
               for i in range(servers)]
