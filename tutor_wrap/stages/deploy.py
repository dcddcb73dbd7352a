"""Deploy stage: a Modelfile that speaks the training format, validated, then `ollama create` where Ollama exists."""

from __future__ import annotations

import os

from tutor_wrap.backends import ollama
from tutor_wrap.core import atomic
from tutor_wrap.data import formats
from tutor_wrap.stages.base import Context, StageResult

NAME = "deploy"
DEPENDS = ("export",)
SMOKE_PROMPT = "Explain Python lists in one sentence."


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
    spec = ollama.build_spec(formats.get(r.dataset.format), rel if rel.startswith(".") else f"./{rel}",
                             system=r.ollama.system, parameters=r.ollama.parameters, num_ctx=r.train.sequence_len,
                             eos=ollama.eos_text(ctx.run.artifact("merge", "model")))
    ollama.write_modelfile(spec, mf)
    ctx.console.print(f"deploy: wrote {mf}", markup=False)
    result = ollama.create(mf, r.ollama.model, SMOKE_PROMPT)
    if result["status"] != "created":
        create_args, run_args = result["commands"]
        ctx.console.print("deploy: Ollama is not installed here; ready to create. On the machine with Ollama run:\n  "
                          + ollama.quoted(create_args) + "\n  " + ollama.quoted(run_args), markup=False)
    llama_server = ["llama-server", "-m", str(gguf), "-c", str(r.train.sequence_len), "--port", "8080"]
    ctx.console.print("deploy: the same model through llama.cpp's server: " + ollama.quoted(llama_server), markup=False)
    atomic.write_json(deploy_dir / "deploy.json", {**result, "llama_server": llama_server})
    return StageResult({"modelfile": ctx.run.rel(mf), "deploy_json": ctx.run.rel(deploy_dir / "deploy.json")},
                       info={"status": result["status"], "ollama_model": r.ollama.model})
