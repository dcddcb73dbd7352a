"""Is the model served the way it was trained? Asked of a real llama-server, through the GGUF's own chat template.

For each held-out row: the prompt the server renders from the chat messages (its Jinja engine, the GGUF's
`tokenizer.chat_template`) must be the training prompt byte for byte, and the greedy answer of
/v1/chat/completions must equal the greedy answer to the training prompt sent raw to /completion. Both requests
run with the prompt cache off, one at a time, so nothing but the prompt can make them differ.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from tutor_wrap.backends.llama_server import Server, serve_many, share_out
from tutor_wrap.core.units import duration
from tutor_wrap.data.format import Format
from tutor_wrap.machine.tools import LlamaCpp
from tutor_wrap.planning.generation import generation_seconds


def served_parity(ll: LlamaCpp, gguf: Path, fmt: Format, rows: list, *, n_predict: int, ctx: int, log: Path,
                  servers: int = 1, threads: int | None = None, gpu_layers: int | None = None,
                  note: Callable[[str], None] | None = None) -> dict:
    """Both requests of a row go to the same server (one of `servers`, planning/generation.py's layout)."""
    def check_row(server: Server, row) -> dict:
        messages = fmt.messages(row)
        trained = fmt.prompt(row)
        rendered = server.apply_template(messages)
        chat, _ = server.chat(messages, n_predict=n_predict)
        direct, eos = server.complete(trained, n_predict=n_predict)
        return {"title": fmt.title(row), "template_matches": rendered == trained,
                "answer_matches": chat == direct, "chat_answer": chat, "training_format_answer": direct,
                "stopped_by_eos": eos, **({} if rendered == trained else {"rendered": rendered})}

    t0 = time.monotonic()
    with serve_many(ll, gguf, ctx=ctx, log=log, servers=servers, threads=threads, gpu_layers=gpu_layers) as running:
        started = time.monotonic() - t0
        tps = running[0].speed(ctx)[0]
        est = generation_seconds(2 * len(rows), n_predict, tps, len(running))
        if note and est is not None:
            note(f"{2 * len(rows)} answers of at most {n_predict} tokens, {tps:.0f} tokens/s per server measured: "
                 f"at most {duration(est)}")
        per_row = share_out(running, rows, check_row)
        ports = [s.port for s in running]
    n = len(per_row)
    return {"server": "llama-server", "host": "127.0.0.1", "ports": ports, "gguf": gguf.name, "rows": n,
            "templates_matching": sum(r["template_matches"] for r in per_row),
            "answers_matching": sum(r["answer_matches"] for r in per_row),
            "ok": all(r["template_matches"] and r["answer_matches"] for r in per_row),
            "n_predict": n_predict, "gpu_layers": gpu_layers, "startup_seconds": round(started, 2),
            "warmup_tokens_per_second": round(tps, 2), "estimated_max_seconds": est and round(est, 3),
            "seconds": round(time.monotonic() - t0, 2), "per_row": per_row}


def ollama_parity(name: str, fmt: Format, rows: list) -> dict:
    """Where Ollama is installed: the prompt it renders for each row's chat messages (the Modelfile's TEMPLATE)
    against the training prompt. An Ollama too old to render without generating is recorded as such."""
    from tutor_wrap.backends.ollama import rendered_chat

    per_row = []
    for row in rows:
        rendered = rendered_chat(name, fmt.messages(row))
        if rendered is None:
            return {"supported": False, "why": "this Ollama does not return the rendered prompt (_debug_render_only)"}
        per_row.append({"title": fmt.title(row), "template_matches": rendered == fmt.prompt(row),
                        **({} if rendered == fmt.prompt(row) else {"rendered": rendered})})
    matching = sum(r["template_matches"] for r in per_row)
    return {"supported": True, "rows": len(per_row), "templates_matching": matching, "ok": matching == len(per_row),
            "per_row": per_row}
