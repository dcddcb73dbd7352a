"""Deploy stage: a Modelfile that speaks the training format, validated; `ollama create` where Ollama exists; and
always a real serving check: llama-server with the GGUF's own chat template must give the training-format answers.
"""

from __future__ import annotations

import os

from rich.markup import escape

from tutor_wrap.backends import llamacpp, modelfile, ollama
from tutor_wrap.checks.serving import ollama_parity, served_parity
from tutor_wrap.core import atomic
from tutor_wrap.core.errors import TutorWrapError
from tutor_wrap.planning.generation import generation_layout
from tutor_wrap.planning.preflight import Verdict
from tutor_wrap.stages.base import Context, Pre, StageResult

NAME = "deploy"
DEPENDS = ("export",)
SMOKE_PROMPT = "Explain Python lists in one sentence."
SERVE_TOKENS = 64          # greedy tokens compared per held-out prompt


def check(pre: Pre) -> list[Verdict]:
    """The Modelfile deploy will write, rendered now: a misspelt Ollama parameter or a system text Ollama cannot
    quote fails before training, not after it."""
    r = pre.recipe
    fmt = pre.inputs.fmt if pre.inputs else None
    if fmt is None:
        return []
    spec = ollama.build_spec(fmt, "./model.gguf", system=r.ollama.system, parameters=r.ollama.parameters,
                             num_ctx=r.train.sequence_len, eos=None)
    try:
        modelfile.render(spec)
    except modelfile.ModelfileError as exc:
        what = exc.problem.replace("ModelfileSpec.parameters[", "ollama.parameters[").replace(
            "ModelfileSpec.system", "ollama.system").replace("ModelfileSpec.stops", "ollama.parameters.stop")
        raise TutorWrapError(f"{r.source}: {what}", hint=exc.hint) from None
    num_ctx = r.ollama.parameters.get("num_ctx")
    config = pre.inputs.config
    limit = config.get("max_position_embeddings")
    if isinstance(num_ctx, int) and isinstance(limit, int) and num_ctx > limit and not config.get("rope_scaling"):
        raise TutorWrapError(f"{r.source}: ollama.parameters.num_ctx {num_ctx} is past the base model's {limit} "
                             "positions (max_position_embeddings): the model cannot use that context, and Ollama "
                             "would reserve memory for all of it", hint=f"set num_ctx to {limit} or less, or remove "
                             "it (the default is the context the model is trained with)")
    longest = pre.inputs.longest_eval_prompt
    if isinstance(num_ctx, int) and longest and num_ctx <= longest:
        raise TutorWrapError(f"{r.source}: ollama.parameters.num_ctx {num_ctx} leaves no room for an answer: the "
                             f"longest eval prompt is {longest} tokens, and Ollama would cut the prompt to fit",
                             hint=f"raise num_ctx above {longest} plus the answer's tokens, or remove it (the "
                                  "default is the context the model is trained with)")
    return []


def inputs(ctx: Context) -> dict:
    r = ctx.recipe
    return {"export": ctx.run.stage("export").get("fingerprint"), "ollama": r.ollama.model_dump(mode="json"),
            "format": r.dataset.format, "eval_prompts_sha256": ctx.resolved.eval_sha256}


def run(ctx: Context) -> StageResult:
    r = ctx.recipe
    fmt = ctx.resolved.fmt
    qt = r.export.quant_types[0]
    gguf = ctx.run.artifact("export", f"gguf_{qt}")
    # The context the model was planned and trained with (the plan may have shortened the recipe's).
    trained_ctx = ctx.plan().sequence_len
    deploy_dir = ctx.run.sub("deploy")
    mf = deploy_dir / "Modelfile"
    rel = os.path.relpath(gguf, deploy_dir)
    spec = ollama.build_spec(fmt, rel if rel.startswith(".") else f"./{rel}", system=r.ollama.system,
                             parameters=r.ollama.parameters, num_ctx=trained_ctx,
                             eos=ollama.eos_text(ctx.run.artifact("merge", "model")))
    ollama.write_modelfile(spec, mf)
    ctx.console.print(f"deploy: wrote {escape(str(mf))}")
    result = ollama.create(mf, r.ollama.model, SMOKE_PROMPT)
    if result["status"] != "created":
        create_args, run_args = result["commands"]
        ctx.console.print(f"deploy: {result['why']}; ready to create. On the machine with Ollama run:\n  "
                          + ollama.quoted(create_args) + "\n  " + ollama.quoted(run_args), markup=False)
    serving = {"skipped": "the recipe has no eval prompts to serve"}
    rows = ctx.resolved.eval_rows
    if rows is not None:
        ctx.console.print(f"deploy: serving check: {len(rows)} held-out prompts through llama-server's "
                          "/v1/chat/completions (the GGUF's chat template) vs the training prompt")
        ll = llamacpp.locate()
        layout = generation_layout(ctx.hardware, len(rows), llamacpp.placement(ll, gguf, trained_ctx + SERVE_TOKENS))
        ctx.console.print(f"deploy: {escape(layout.why)}")
        serving = served_parity(ll, gguf, fmt, rows, n_predict=SERVE_TOKENS,
                                ctx=trained_ctx + SERVE_TOKENS, log=deploy_dir / "llama-server.log",
                                servers=layout.servers, threads=layout.threads, gpu_layers=layout.gpu_layers,
                                note=lambda msg: ctx.console.print(f"deploy: serving check: {escape(msg)}"))
    if result["status"] == "created" and rows is not None:
        result["ollama_render_check"] = ollama_parity(r.ollama.model, fmt, rows)
        if result["ollama_render_check"].get("ok") is False:
            atomic.write_json(deploy_dir / "deploy.json", {**result, "serving_check": serving})
            raise TutorWrapError(f"deploy: Ollama renders a prompt different from the training prompt (details: "
                                 f"{deploy_dir / 'deploy.json'})", hint="check the Modelfile's TEMPLATE and Ollama's version")
    llama_server = ["llama-server", "-m", str(gguf), "-c", str(trained_ctx), "--jinja", "--port", "8080"]
    atomic.write_json(deploy_dir / "deploy.json", {**result, "serving_check": serving, "llama_server": llama_server})
    if "ok" in serving:
        ctx.console.print(f"deploy: llama-server rendered the training prompt for {serving['templates_matching']}/"
                          f"{serving['rows']} prompts and gave the training-format answer for "
                          f"{serving['answers_matching']}/{serving['rows']} ({serving['seconds']:.0f} s)")
        if not serving["ok"]:
            raise TutorWrapError(
                f"deploy: the served model does not answer as trained: templates {serving['templates_matching']}/"
                f"{serving['rows']}, answers {serving['answers_matching']}/{serving['rows']} "
                f"(details: {deploy_dir / 'deploy.json'})",
                hint="re-run `--from merge` so the merged model and its GGUF carry the training format's template")
    ctx.console.print("deploy: the same model through llama.cpp's server (OpenAI API, the training format built "
                      "in): " + ollama.quoted(llama_server), markup=False)
    return StageResult({"modelfile": ctx.run.rel(mf), "deploy_json": ctx.run.rel(deploy_dir / "deploy.json")},
                       info={"status": result["status"], "ollama_model": r.ollama.model,
                             "serving_ok": serving.get("ok")})
