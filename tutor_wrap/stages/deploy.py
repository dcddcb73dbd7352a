"""Deploy stage: a Modelfile that speaks the training format, validated, then `ollama create` where Ollama exists."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from tutor_wrap import atomic, modelfile
from tutor_wrap.errors import TutorWrapError
from tutor_wrap.prompt_format import for_dataset
from tutor_wrap.recipe import Recipe
from tutor_wrap.stages import Context, StageResult

NAME = "deploy"
DEPENDS = ("export",)


def eos_text(model_dir: Path) -> str | None:
    try:
        cfg = json.loads((model_dir / "tokenizer_config.json").read_text("utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    eos = cfg.get("eos_token")
    return eos.get("content") if isinstance(eos, dict) else eos


def build_spec(recipe: Recipe, gguf_rel: str, eos: str | None) -> modelfile.ModelfileSpec:
    fmt = for_dataset(recipe.dataset.format)
    params: list[tuple[str, object]] = [("num_ctx", recipe.train.sequence_len)]
    params += [(k, v) for k, v in recipe.ollama.parameters.items() if k not in ("num_ctx", "stop")]
    stops = tuple(dict.fromkeys(([eos] if eos else []) + [m for m in fmt.section_markers if "Response" not in m]))
    return modelfile.ModelfileSpec(from_path=gguf_rel, template=fmt.template, system=recipe.ollama.system or fmt.system,
                                   parameters=tuple(params), stops=stops)


def write_modelfile(spec: modelfile.ModelfileSpec, path: Path) -> str:
    text = modelfile.render(spec)
    modelfile.validate(text, path.parent)  # before anything is written
    atomic.write_text(path, text)
    return text


def deploy(modelfile_path: Path, name: str, smoke_prompt: str, console) -> dict:
    create = ["ollama", "create", name, "-f", str(modelfile_path)]
    run = ["ollama", "run", name, smoke_prompt]
    exe = shutil.which("ollama")
    if exe is None:
        console.print("deploy: Ollama is not installed here; ready to create. On the machine with Ollama run:\n  "
                      + " ".join(_q(a) for a in create) + "\n  " + " ".join(_q(a) for a in run))
        return {"status": "ready to create", "commands": [create, run]}
    proc = subprocess.run([exe, *create[1:]], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise TutorWrapError(f"deploy: `ollama create` failed: {proc.stderr.strip()[-800:]}",
                             hint="check the Modelfile with `python -m tutor_wrap deploy RUN_DIR` and Ollama's version")
    smoke = subprocess.run([exe, *run[1:]], capture_output=True, text=True, check=False, timeout=600)
    return {"status": "created", "commands": [create, run], "smoke_output": smoke.stdout[-2000:],
            "smoke_rc": smoke.returncode}


def _q(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


def inputs(ctx: Context) -> dict:
    return {"export": ctx.run.stage("export").get("fingerprint"),
            "ollama": ctx.recipe.ollama.model_dump(mode="json"), "sequence_len": ctx.recipe.train.sequence_len,
            "format": ctx.recipe.dataset.format}


def run(ctx: Context) -> StageResult:
    r = ctx.recipe
    qt = r.export.quant_types[0]
    gguf = ctx.run.artifact("export", f"gguf_{qt}")
    deploy_dir = ctx.run.sub("deploy")
    mf = deploy_dir / "Modelfile"
    rel = os.path.relpath(gguf, deploy_dir)
    spec = build_spec(r, rel if rel.startswith(".") else f"./{rel}", eos_text(ctx.run.artifact("merge", "model")))
    write_modelfile(spec, mf)
    ctx.console.print(f"deploy: wrote {mf}")
    result = deploy(mf, r.ollama.model, "Explain Python lists in one sentence.", ctx.console)
    llama_server = ["llama-server", "-m", str(gguf), "-c", str(r.train.sequence_len), "--port", "8080"]
    ctx.console.print("deploy: the same model through llama.cpp's server: " + " ".join(_q(a) for a in llama_server))
    atomic.write_json(deploy_dir / "deploy.json", {**result, "llama_server": llama_server})
    return StageResult({"modelfile": ctx.run.rel(mf), "deploy_json": ctx.run.rel(deploy_dir / "deploy.json")},
                       info={"status": result["status"], "ollama_model": r.ollama.model})
