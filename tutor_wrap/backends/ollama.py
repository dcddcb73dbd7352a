"""Ollama: the Modelfile that speaks the training format, `ollama create`, and a smoke run.

The Modelfile's grammar and quoting live in modelfile.py; this module decides what goes in it.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

from tutor_wrap.backends import modelfile
from tutor_wrap.core import atomic
from tutor_wrap.core.errors import TutorWrapError
from tutor_wrap.data.format import Format
from tutor_wrap.machine import tools


def eos_text(model_dir: Path) -> str | None:
    try:
        cfg = json.loads((model_dir / "tokenizer_config.json").read_text("utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    eos = cfg.get("eos_token")
    return eos.get("content") if isinstance(eos, dict) else eos


def build_spec(fmt: Format, gguf_rel: str, *, system: str | None, parameters: dict, num_ctx: int,
               eos: str | None) -> modelfile.ModelfileSpec:
    """TEMPLATE and SYSTEM from the training format; the user's parameters as given (their num_ctx wins over
    `num_ctx`, the context the model was planned and trained with); stops: EOS and the format's, then the user's
    own (added, never substituted)."""
    params: list[tuple[str, object]] = [("num_ctx", parameters.get("num_ctx", num_ctx))]
    params += [(k, v) for k, v in parameters.items() if k not in ("num_ctx", "stop")]
    user_stops = parameters.get("stop")
    user_stops = [user_stops] if isinstance(user_stops, str) else list(user_stops or [])
    stops = tuple(dict.fromkeys([*fmt.serving_stops(eos), *map(str, user_stops)]))
    return modelfile.ModelfileSpec(from_path=gguf_rel, template=fmt.template, system=system or fmt.system or None,
                                   parameters=tuple(params), stops=stops)


def write_modelfile(spec: modelfile.ModelfileSpec, path: Path) -> str:
    text = modelfile.render(spec)
    modelfile.validate(text, path.parent)  # before anything is written
    atomic.write_text(path, text)
    return text


def quoted(args: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in args)


def create(modelfile_path: Path, name: str, smoke_prompt: str) -> dict:
    """`ollama create` then `ollama run` once where Ollama is installed; else the commands to run, unrun."""
    create_args = ["ollama", "create", name, "-f", str(modelfile_path)]
    run_args = ["ollama", "run", name, smoke_prompt]
    exe = tools.ollama()
    if exe is None:
        why = f"{tools.OLLAMA_ENV} is off" if tools.ollama_off() else "Ollama is not installed here"
        return {"status": "ready to create", "why": why, "commands": [create_args, run_args]}
    proc = subprocess.run([exe, *create_args[1:]], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        said = (proc.stderr.strip() or proc.stdout.strip())[-800:]
        raise TutorWrapError(f"deploy: `{exe} create` exited {proc.returncode}"
                             + (f": {said}" if said else " and printed nothing"),
                             hint="is the Ollama server running (`ollama serve`, OLLAMA_HOST names where)? Check the "
                                  f"Modelfile ({modelfile_path}) and Ollama's version (`ollama --version`)")
    smoke = subprocess.run([exe, *run_args[1:]], capture_output=True, text=True, check=False, timeout=600)
    return {"status": "created", "commands": [create_args, run_args], "smoke_output": smoke.stdout[-2000:],
            "smoke_rc": smoke.returncode}


def server_url() -> str:
    """Where the local Ollama listens: OLLAMA_HOST as Ollama itself reads it, else its default."""
    host = os.environ.get("OLLAMA_HOST") or "127.0.0.1:11434"
    return host if host.startswith(("http://", "https://")) else f"http://{host}"


def rendered_chat(name: str, messages: list[dict]) -> str | None:
    """The prompt Ollama builds for `messages` with the model's TEMPLATE, without generating
    (`_debug_render_only`, recent Ollama versions); None where this Ollama does not report it."""
    body = {"model": name, "messages": messages, "stream": False, "_debug_render_only": True}
    req = urllib.request.Request(server_url() + "/api/chat", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            res = json.loads(r.read().decode("utf-8"))
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise TutorWrapError(f"deploy: asking Ollama at {server_url()} for the rendered prompt failed: {exc}",
                             hint="is `ollama serve` running? (OLLAMA_HOST names where)") from None
    info = res.get("_debug_info") or res.get("debug_info") or {}
    return info.get("rendered_template")
