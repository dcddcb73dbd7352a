"""The whole pipeline on a tiny real Llama: Axolotl trains, merges; llama.cpp converts, quantizes, generates."""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tutor_wrap.backends import llamacpp, modelfile
from tutor_wrap.backends.gguf_export import ExportReport
from tutor_wrap.backends.merge import MergeReport

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
STAGES = ["plan", "train", "merge", "export", "deploy", "eval"]

# One short answer to learn: enough signal that a 2-layer model learns to answer and stop within a few steps.
TRAIN = [{"instruction": f"Say ok to request {i}.", "input": "", "output": "ok"} for i in range(24)]
EVAL = [{"instruction": f"Say ok to request {i}.", "output": "ok"} for i in range(100, 104)]


def make_recipe(tmp: Path, model: Path) -> Path:
    data = tmp / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TRAIN))
    (data / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in EVAL))
    recipe = {
        "name": "tiny",
        "base_model": str(model),
        "dataset": {"path": "data/train.jsonl", "format": "alpaca"},
        "method": "lora",
        "lora": {"r": 8, "alpha": 16},
        "train": {"max_steps": 12, "learning_rate": 0.01, "sequence_len": 256, "batch_size": 4,
                  "micro_batch_size": 4, "save_steps": 6},
        # all three trackers: a SQLite store relative to the recipe, W&B offline (the e2e tests read them back)
        "tracking": {"tensorboard": True, "mlflow": {"uri": "sqlite:///tracking/mlflow.db"}, "wandb": True},
        "export": {"quant_types": ["Q4_K_M"]},
        "ollama": {"model": "tiny-tutor", "system": 'He said "hi" and """ left', "parameters": {"temperature": 0.0}},
        "eval": {"prompts": "data/eval.jsonl", "max_tokens": 12, "primary_metric": "eos_rate",
                 "checks": {"code_runs": True, "answer_match": True}},
    }
    p = tmp / "tiny.yml"
    p.write_text(yaml.safe_dump(recipe))
    return p


# Credentials where they belong, in the environment: the whole run must not write or print any of them.
PLANTED = {"HF_TOKEN": "hf_PLANTEDenvTOKEN0123456789abcdefXYZ", "COMET_API_KEY": "planted-comet-env-key-91c2",
           "WANDB_API_KEY": "planted-wandb-env-key-4d7e", "MLFLOW_TRACKING_PASSWORD": "planted-mlflow-pw-0b3f"}


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tutor_wrap", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=1800, env={**os.environ, "CUDA_VISIBLE_DEVICES": "", **PLANTED})


@pytest.fixture(scope="module")
def finished_run(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    recipe = make_recipe(tmp, tiny_model)
    proc = run_cli("run", str(recipe), "--run-dir", str(tmp / "run"), cwd=tmp)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return tmp / "run", proc


def test_manifest_records_every_stage_done(finished_run):
    run, _ = finished_run
    m = json.loads((run / "manifest.json").read_text())
    assert list(m["stages"]) == STAGES
    for name in STAGES:
        rec = m["stages"][name]
        assert rec["status"] == "done", (name, rec)
        for rel in rec["artifacts"].values():
            assert not Path(rel).is_absolute() and (run / rel).exists(), (name, rel)


def test_no_credential_from_the_environment_is_written_or_printed(finished_run):
    """The trainer gets the environment (where trackers read their keys), and nothing tutor_wrap, Axolotl, the
    trackers or the model-written code write under the run dir or into the MLflow store, or print, holds one."""
    run, proc = finished_run
    written = [p for p in (*run.rglob("*"), *(run.parent / "tracking").rglob("*")) if p.is_file()]
    assert any(p.suffix == ".wandb" for p in written) and any(p.name == "mlflow.db" for p in written)
    for name, secret in PLANTED.items():
        assert secret not in proc.stdout + proc.stderr, name
        holding = [str(p) for p in written if secret.encode() in p.read_bytes()]
        assert holding == [], (name, holding)


def test_training_logged_a_falling_loss(finished_run):
    run, _ = finished_run
    rows = [json.loads(l) for l in (run / "train/metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r.get("event") == "log" and "loss" in r]
    assert len(losses) >= 10
    assert losses[-1] < losses[0] * 0.5
    assert (run / "train/loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run / "train/loss.csv").read_text().startswith("step,loss")


def test_training_and_merge_peaks_are_kept_beside_their_predictions(finished_run):
    """The trainer's and the merge verification's measured peaks land in the run's records and in this machine's
    calibration store beside what the plan and the verification predicted (planning/calibration.py)."""
    run, _ = finished_run
    info = json.loads((run / "manifest.json").read_text())["stages"]["train"]["info"]
    rows = [json.loads(l) for l in (run / "train/metrics.jsonl").read_text().splitlines()]
    peak = max(r["cpu_max_rss_bytes"] for r in rows if "cpu_max_rss_bytes" in r)
    tokens = max(r["max_batch_tokens"] for r in rows if "max_batch_tokens" in r)
    plan = json.loads((run / "plan.json").read_text())["plan"]
    # the prediction kept is for the largest batch the run drew, at most the plan's worst case
    assert 0 < tokens <= plan["micro_batch_size"] * plan["sequence_len"] == plan["ram"]["tokens"]
    assert (info["peak_rss_bytes"], info["batch_tokens"]) == (peak, tokens)
    store = json.loads(Path(os.environ["TUTOR_WRAP_CALIBRATION"]).read_text())["records"]
    mine = [r for r in store if Path(r["run"]).resolve() == run.resolve()]
    train = [r for r in mine if r["kind"] == "train-cpu"][0]     # later tests here train this run again
    assert (train["measured_bytes"], train["predicted_bytes"], train["batch_tokens"]) == (
        peak, info["predicted_peak_rss_bytes"], tokens)
    assert (train["method"], train["dtype"]) == (plan["ram"]["method"], plan["ram"]["dtype"])
    report = json.loads((run / "merge/report.json").read_text())
    vpeak = report["verification"]["peak_rss_bytes"]
    assert report["stage_peak_rss_bytes"] == max(vpeak, report["measured_peak_rss_bytes"])
    verify = [r for r in mine if r["kind"] == "merge-verify"][0]
    assert (verify["measured_bytes"], verify["predicted_bytes"]) == (vpeak, report["verification"]["logits_need_bytes"])
    # the converter's and llama-quantize's peaks, each beside its prediction
    files = json.loads((run / "export/report.json").read_text())["files"]
    for kind, step in (("F16", "convert"), ("Q4_K_M", "quantize")):
        peak = files[kind]["made_peak_rss_bytes"]
        assert peak and any(r["kind"] == f"export-{step}" and r["measured_bytes"] == peak for r in mine), kind
    # each eval llama-server's peak: the whole GGUF it maps is resident once it has answered
    served = json.loads((run / "eval/report.json").read_text())["generation"]["server_peaks"]["tuned"]
    assert served["peak_rss_bytes"] > (run / "export/tiny-Q4_K_M.gguf").stat().st_size
    assert any(r["kind"] == "serve" and r["measured_bytes"] == served["peak_rss_bytes"] for r in mine)


def test_tensorboard_holds_the_trainers_curves_and_tutor_wraps_numbers(finished_run):
    """`tracking.tensorboard: true`: Axolotl's event files under train/out/runs and tutor_wrap's own per stage under
    tensorboard/tutor_wrap, read back with TensorBoard's own EventAccumulator."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _ = finished_run
    (trainer,) = {p.parent for p in (run / "train/out/runs").rglob("events.out.tfevents.*")}
    curves = EventAccumulator(str(trainer))
    curves.Reload()
    assert len(curves.Scalars("train/loss")) >= 10
    ours = EventAccumulator(str(run / "tensorboard/tutor_wrap"))
    ours.Reload()
    report = json.loads((run / "eval/report.json").read_text())
    (tuned,) = ours.Scalars("eval/tuned/eos_rate")
    assert tuned.value == pytest.approx(report["tuned"]["eos_rate"]) and tuned.step == STAGES.index("eval")
    info = json.loads((run / "manifest.json").read_text())["stages"]["train"]["info"]
    assert ours.Scalars("train/loss_end_mean")[0].value == pytest.approx(info["loss_end_mean"])
    assert {"merge/peak_rss_gib", "export/Q4_K_M/perplexity", "eval/tuned_vs_base/p_value"} <= set(ours.Tags()["scalars"])


def test_mlflow_run_holds_the_trainers_curves_the_plan_and_tutor_wraps_numbers(finished_run):
    """`tracking.mlflow` with a SQLite store: one MLflow run per plan, read back with MlflowClient: Axolotl's loss
    curve, the plan's knobs as params, each stage's numbers, the reports as artifacts, FINISHED at the end."""
    from mlflow.tracking import MlflowClient

    run, _ = finished_run
    uri = f"sqlite:///{run.parent / 'tracking/mlflow.db'}"
    state = json.loads((run / "manifest.json").read_text())["tracking"]["mlflow"]
    assert state["uri"] == uri and state["experiment"] == "tiny"
    client = MlflowClient(uri)
    (got,) = client.search_runs([state["experiment_id"]])
    assert got.info.run_id == state["run_id"] and got.info.status == "FINISHED"
    losses = client.get_metric_history(got.info.run_id, "loss")   # from the trainer, through transformers
    assert len(losses) >= 10 and max(m.step for m in losses) == 12
    report = json.loads((run / "eval/report.json").read_text())
    assert got.data.metrics["eval/tuned/eos_rate"] == pytest.approx(report["tuned"]["eos_rate"])
    info = json.loads((run / "manifest.json").read_text())["stages"]["train"]["info"]
    assert got.data.metrics["train/loss_end_mean"] == pytest.approx(info["loss_end_mean"])
    plan = json.loads((run / "plan.json").read_text())["plan"]
    assert got.data.params["plan.micro_batch_size"] == str(plan["micro_batch_size"])
    assert got.data.params["method"] == "lora" and got.data.params["lora_r"] == "8"
    assert "per_device_train_batch_size" not in got.data.params   # the trainer logs none (a retry would clash)
    assert {a.path for a in client.list_artifacts(got.info.run_id, "eval")} >= {"eval/report.html", "eval/report.json"}
    assert not [a for a in client.list_artifacts(got.info.run_id, "export") if a.path.endswith(".gguf")]


def _wandb_records(path: Path):
    """The records of a W&B offline run file (run-ID.wandb): a 7-byte header (':W&B', 0xBEE1, version 0), then
    LevelDB-log blocks of 32 KiB whose records (crc32, length, type) carry wandb_internal_pb2.Record messages."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:             # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0 and length == 0:
            continue
        buf += chunk
        if kind in (1, 4):                      # FULL, or LAST of a record split across blocks
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(buf)
            buf = b""
            yield rec


def test_wandb_offline_run_holds_the_trainers_curves_and_tutor_wraps_numbers(finished_run):
    """`tracking.wandb` offline: the trainer's run and tutor_wrap's additions share one run id under RUN/wandb/
    (`wandb sync` uploads them as one run); read back from W&B's own run files."""
    run, _ = finished_run
    state = json.loads((run / "manifest.json").read_text())["tracking"]["wandb"]
    assert state["mode"] == "offline" and state["project"] == "tiny"
    dirs = sorted((run / "wandb").glob(f"offline-run-*-{state['id']}"))
    assert len(dirs) >= 2, dirs      # tutor_wrap's openings and the trainer's, one id
    history, summary, config = [], {}, {}
    for d in dirs:
        for rec in _wandb_records(d / f"run-{state['id']}.wandb"):
            kind = rec.WhichOneof("record_type")
            if kind == "history":
                history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
            elif kind == "summary":
                summary.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.summary.update})
            elif kind in ("run", "config"):           # the config set at init rides on the run record
                items = rec.run.config.update if kind == "run" else rec.config.update
                config.update({i.key: json.loads(i.value_json) for i in items})
    losses = [h["train/loss"] for h in history if "train/loss" in h]
    assert len(losses) >= 10
    report = json.loads((run / "eval/report.json").read_text())
    assert summary["eval/tuned/eos_rate"] == pytest.approx(report["tuned"]["eos_rate"])
    assert config["plan.micro_batch_size"] == json.loads((run / "plan.json").read_text())["plan"]["micro_batch_size"]
    assert any((d / "files/eval/report.html").is_file() for d in dirs)


def test_ggufs_have_the_right_metadata_and_no_fallback(finished_run):
    run, _ = finished_run
    f16 = llamacpp.metadata(run / "export/tiny-F16.gguf")
    q4 = llamacpp.metadata(run / "export/tiny-Q4_K_M.gguf")
    assert f16["architecture"] == q4["architecture"] == "llama"
    assert f16["file_type"] == 1 and q4["file_type"] == 15
    assert q4["tokenizer_model"] == "llama" and q4["eos_token_id"] == 2
    counts = llamacpp.tensor_type_counts(run / "export/tiny-Q4_K_M.gguf")
    assert counts.get("Q4_K", 0) > 0 and "Q5_0" not in counts and "Q8_0" not in counts
    report = json.loads((run / "export/report.json").read_text())
    assert report["files"]["Q4_K_M"]["fallback_tensors"] == 0


def test_export_measures_fidelity_to_the_merged_model(finished_run):
    run, _ = finished_run
    report = json.loads((run / "export/report.json").read_text())
    hf = report["fidelity"]["hf_vs_F16"]
    # The f16 GGUF follows the merged HF model's greedy path: same tokens, stopping at the same place.
    assert hf["prompts"] == len(EVAL) and hf["agree"] == len(EVAL)
    # ... as the merge verification generated it, with the merged model it had loaded anyway.
    assert report["fidelity"]["hf_reference_from"] == "the merge verification"
    greedy = json.loads((run / "merge/report.json").read_text())["verification"]["greedy"]
    assert len(greedy["texts"]) == len(EVAL)
    q4 = report["files"]["Q4_K_M"]
    assert q4["perplexity"] > 0 and report["files"]["F16"]["perplexity"] > 0
    assert abs(q4["perplexity_change_pct"]) < 50
    assert q4["agreement_with_unquantized"]["prompts"] == len(EVAL)
    # the report reads back into its record, and the quant it names is the file on disk
    typed = ExportReport.load(run / "export/report.json")
    assert (run / "export" / typed.files["Q4_K_M"].path).stat().st_size == typed.files["Q4_K_M"].size_bytes
    assert MergeReport.load(run / "merge/report.json").verification["greedy"]["texts"] == greedy["texts"]


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="torch's AVX2 code path is x86's")
def test_the_fidelity_reference_agrees_with_the_gguf_on_torchs_avx2_path(finished_run, tiny_model):
    """The export's HF reference comes from whatever kernels torch picks for this CPU; computed again on the AVX2
    path (ATEN_CPU_CAPABILITY=avx2), it still follows the f16 GGUF's greedy path, as the host's best path did."""
    from tutor_wrap.checks.fidelity import agreement, gguf_continuations

    run, _ = finished_run
    spec = run / "merge/merge.greedy.json"
    proc = subprocess.run([sys.executable, "-m", "tutor_wrap.checks.merge_verify", str(tiny_model), str(run / "train/out"),
                           str(run / "merge/model"), "--json", "--greedy", str(spec)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "ATEN_CPU_CAPABILITY": "avx2"})
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0 and res["status"] == "passed", res
    req = json.loads(spec.read_text())
    tok = run / "merge/model/tokenizer.json"
    f16 = gguf_continuations(llamacpp.locate(), run / "export/tiny-F16.gguf", req["prompts"], req["n"], tok)
    agr = agreement(res["greedy"]["texts"], f16, tok, req["n"])
    assert agr["prompts"] == len(EVAL) and agr["agree"] == len(EVAL), agr


def test_quantized_model_generates_text(finished_run):
    run, _ = finished_run
    # the training prompt of a held-out row: the tune answers with text before its EOS (an EOS-only GGUF fails)
    prompt = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
              f"request.\n\n### Instruction:\n{EVAL[0]['instruction']}\n\n### Response:\n")
    out = llamacpp.complete(llamacpp.locate(), run / "export/tiny-Q4_K_M.gguf", prompt, n_predict=8)
    assert out.text.strip()


def test_modelfile_parses_and_speaks_the_training_format(finished_run):
    run, _ = finished_run
    text = (run / "deploy/Modelfile").read_text()
    cmds = {c.name: c for c in modelfile.validate(text, run / "deploy")}
    assert cmds["from"].args == "../export/tiny-Q4_K_M.gguf"
    assert "### Instruction:\n{{ .Prompt }}\n\n### Response:\n" in cmds["template"].args
    assert cmds["system"].args == 'He said "hi" and """ left'  # cannot break out of its field
    stops = [c.args for c in modelfile.parse(text) if c.key == "stop"]
    assert "</s>" in stops and "### Instruction:" in stops
    params = {c.key: c.args for c in modelfile.parse(text) if c.name == "parameter" and c.key != "stop"}
    # the context the model was planned and trained with (the recipe's 256, shortened to the longest row)
    planned = json.loads((run / "plan.json").read_text())["plan"]["sequence_len"]
    assert params["num_ctx"] == str(planned) and planned < 256


def test_fine_tuned_model_stops_where_the_base_rambles(finished_run):
    run, proc = finished_run
    report = json.loads((run / "eval/report.json").read_text())
    assert report["n_prompts"] == len(EVAL)
    assert report["tuned"]["eos_rate"] > report["base"]["eos_rate"]
    # content checks on the real answers: "ok" has no python to run; the final-answer check ran on every answer
    # (in 12 steps the tiny model's loss on "ok" levels off near 2.1 nats, so whether its greedy answer is " ok" or
    # "k" varies between 2-thread runs; the check itself is tested on crafted answers in test_eval_checks.py)
    assert report["tuned"]["code_runs_rate"] == report["base"]["code_runs_rate"] == 0.0
    assert report["tuned"]["answer_match_rate"] >= report["base"]["answer_match_rate"]
    # ... and judged each answer by its text: it passes exactly when the answer's final answer is the reference's
    from tutor_wrap.answers import math_answer
    for p in report["prompts"]:
        assert p["tuned"]["checks"]["answer_match"] == math_answer.matches(p["tuned"]["text"], "ok"), p["tuned"]
        if not p["tuned"]["checks"]["answer_match"]:
            assert "reference 'ok'" in p["tuned"]["details"]["answer_match"]
    assert all(p["tuned"]["details"]["code_runs"] == "no python block" for p in report["prompts"])
    st = report["stats"]["tuned_vs_base"]
    assert st["n"] == len(EVAL) and st["wins"] + st["losses"] + st["ties"] == len(EVAL) and 0 <= st["p_value"] <= 1
    assert report["tuned"]["heldout_ppl"] > 0 and report["base"]["heldout_ppl"] > 0
    assert (run / "eval/report.html").read_text().count("<tr>") > len(EVAL)
    assert (run / "eval/report.md").read_text().count("### ") >= len(EVAL)
    assert "eos_rate" in proc.stdout
    # "Say ok to request 100." is a near-copy of the trained "Say ok to request 10." (character 5-gram Jaccard 0.84):
    # the report says so beside the verdict, and that no prompt is left without them
    assert report["overlap"]["eval_lines"] == [1, 2, 3, 4] and report["without_overlap"]["n_prompts"] == 0
    assert all(p["overlaps_training"] for p in report["prompts"])
    assert "Overlap with the training data:** 4 of 4 held-out prompts overlap" in (run / "eval/report.md").read_text()


def test_served_model_formats_prompts_as_trained(finished_run):
    """The GGUF carries the training format's template; llama-server's /v1/chat/completions, which applies it, gives
    the answers the training prompt gives, for every held-out prompt (deploy's serving check)."""
    from tutor_wrap.data.alpaca import ALPACA

    run, _ = finished_run
    meta = llamacpp.metadata(run / "export/tiny-Q4_K_M.gguf")
    assert meta["chat_template"] == ALPACA.chat_template
    assert json.loads((run / "merge/model/tokenizer_config.json").read_text())["chat_template"] == ALPACA.chat_template
    serving = json.loads((run / "deploy/deploy.json").read_text())["serving_check"]
    assert serving["ok"] and serving["host"] == "127.0.0.1" and serving["rows"] == len(EVAL)
    assert serving["templates_matching"] == serving["answers_matching"] == len(EVAL)
    assert all(r["chat_answer"] == r["training_format_answer"] for r in serving["per_row"])


def test_second_run_skips_finished_stages(finished_run, tmp_path):
    run, _ = finished_run
    recipe = run.parent / "tiny.yml"
    proc = run_cli("run", str(recipe), "--run-dir", str(run), cwd=run.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("inputs unchanged; skipped") == len(STAGES)


def _redone(stdout: str) -> list[str]:
    return [s for s in STAGES if f"✓ {s}: done before" not in stdout]


def test_editing_the_recipe_redoes_exactly_the_stages_it_affects(finished_run):
    run, _ = finished_run
    recipe = run.parent / "tiny.yml"
    data = yaml.safe_load(recipe.read_text())
    data["ollama"]["parameters"]["temperature"] = 0.7
    recipe.write_text(yaml.safe_dump(data))
    proc = run_cli("run", str(recipe), "--run-dir", str(run), cwd=run.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _redone(proc.stdout) == ["deploy"]
    assert "PARAMETER temperature 0.7" in (run / "deploy/Modelfile").read_text()


def test_editing_eval_settings_redoes_only_eval(finished_run):
    """Export reads the eval prompts file (fidelity), not the rest of `eval:`: max_tokens redoes eval alone."""
    run, _ = finished_run
    recipe = run.parent / "tiny.yml"
    data = yaml.safe_load(recipe.read_text())
    data["eval"]["max_tokens"] = 10
    recipe.write_text(yaml.safe_dump(data))
    proc = run_cli("run", str(recipe), "--run-dir", str(run), cwd=run.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _redone(proc.stdout) == ["eval"]
    assert json.loads((run / "eval/report.json").read_text())["max_tokens"] == 10


def test_an_eval_file_edited_into_a_training_row_stops_the_run_before_any_stage(finished_run):
    """Plan is not redone for an edited eval file (export, deploy and eval are): the overlap is checked anyway."""
    run, _ = finished_run
    eval_file = run.parent / "data/eval.jsonl"
    before, stages = eval_file.read_text(), json.loads((run / "manifest.json").read_text())["stages"]
    try:
        eval_file.write_text(before + json.dumps({"instruction": "say OK to  request 7.", "output": "ok"}) + "\n")
        proc = run_cli("run", str(run.parent / "tiny.yml"), "--run-dir", str(run), cwd=run.parent)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        assert f"line {len(EVAL) + 1}: the prompt is also in the training rows (eval.jsonl line {len(EVAL) + 1} = " \
               "train.jsonl line 8" in proc.stderr, proc.stderr[-2000:]
        assert json.loads((run / "manifest.json").read_text())["stages"] == stages
    finally:
        eval_file.write_text(before)


def test_a_tracker_named_after_the_run_gets_the_finished_stages_without_retraining(finished_run):
    """Another MLflow experiment named on a finished run: nothing is redone, and the new MLflow run gets every
    finished stage's numbers and reports, with a note that the training curves are not among them."""
    from mlflow.tracking import MlflowClient

    run, _ = finished_run
    recipe = run.parent / "tiny.yml"
    original = recipe.read_text()
    r = yaml.safe_load(original)
    r["tracking"]["mlflow"]["experiment"] = "later"
    recipe.write_text(yaml.safe_dump(r))
    try:
        proc = run_cli("run", str(recipe), "--run-dir", str(run), cwd=run.parent)
    finally:
        recipe.write_text(original)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _redone(proc.stdout) == []
    flat = " ".join(proc.stdout.split())
    assert "started after training finished" in flat and "experiment 'later'" in flat
    client = MlflowClient(f"sqlite:///{run.parent / 'tracking/mlflow.db'}")
    (later,) = client.search_runs([client.get_experiment_by_name("later").experiment_id])
    report = json.loads((run / "eval/report.json").read_text())
    assert later.data.metrics["eval/tuned/eos_rate"] == pytest.approx(report["tuned"]["eos_rate"])
    assert "train/loss_end_mean" in later.data.metrics and "plan/rows" in later.data.metrics
    assert later.data.params["method"] == "lora" and later.info.status == "FINISHED"
    assert "eval/report.html" in {a.path for a in client.list_artifacts(later.info.run_id, "eval")}
    assert not client.get_metric_history(later.info.run_id, "loss")   # the curves only a training writes


def test_new_eval_prompts_redo_export_with_its_own_reference(finished_run):
    """The merge recorded the reference for the old prompts: the export computes it for the new ones itself
    (beside the conversion), and the merge is not redone."""
    run, _ = finished_run
    eval_file = run.parent / "data/eval.jsonl"
    eval_file.write_text(eval_file.read_text() + json.dumps({"instruction": "Say ok to request 107.", "output": "ok"})
                         + "\n")
    proc = run_cli("run", str(run.parent / "tiny.yml"), "--run-dir", str(run), cwd=run.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _redone(proc.stdout) == ["export", "deploy", "eval"]
    fidelity = json.loads((run / "export/report.json").read_text())["fidelity"]
    assert fidelity["hf_reference_from"] == "beside the conversion"
    assert fidelity["hf_vs_F16"]["prompts"] == fidelity["hf_vs_F16"]["agree"] == len(EVAL) + 1


def test_from_stage_redoes_it_and_the_stages_that_read_it(finished_run):
    run, _ = finished_run
    before = (run / "export/tiny-Q4_K_M.gguf").stat().st_mtime_ns
    base_gguf = run / json.loads((run / "eval/report.json").read_text())["base_gguf"]
    base_before = base_gguf.stat().st_mtime_ns
    proc = run_cli("run", str(run.parent / "tiny.yml"), "--run-dir", str(run), "--from", "export", cwd=run.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _redone(proc.stdout) == ["export", "deploy", "eval"]
    assert (run / "export/tiny-Q4_K_M.gguf").stat().st_mtime_ns > before
    # eval redone, but the base model's GGUF is the cached one, not built again
    from tutor_wrap.core.paths import cache_dir

    assert base_gguf.stat().st_mtime_ns == base_before and base_gguf.resolve().is_relative_to(cache_dir())


def test_from_train_trains_again_instead_of_resuming_the_finished_checkpoint(finished_run):
    """`--from train` on a finished run retrains from step 0: the last checkpoint of the finished training is not a
    point to resume from (resuming would train nothing). A killed run does resume (tests/test_train_recovery.py)."""
    run, _ = finished_run
    proc = run_cli("run", str(run.parent / "tiny.yml"), "--run-dir", str(run), "--from", "train", "--until", "train",
                   cwd=run.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (run / "train/train.log").read_text()
    assert "starting fresh: the checkpoints" in log
    rows = [json.loads(line) for line in (run / "train/metrics.jsonl").read_text().splitlines()]
    begin = [r for r in rows if r.get("event") == "begin"][-1]
    assert begin["resumed_from_step"] is None and begin["step"] == 0
    assert len([r for r in rows if r.get("event") == "log" and "loss" in r]) >= 12


def test_the_gguf_half_says_how_long_it_will_take(finished_run):
    """Before export's checks, deploy's serving check and eval: the tokens they will generate (and score), a
    measured warm-up, and the time at most, printed and recorded."""
    run, proc = finished_run
    out = proc.stdout
    timing = json.loads((run / "export/report.json").read_text())["fidelity"]["timing"]
    assert all(t > 0 for t in timing["tokens_per_second"]) and timing["estimated_max_seconds"] > 0
    # the Q4_K_M's agreement with F16: 16 tokens on each of the first five held-out prompts (another test may have
    # added a prompt since the first run)
    rows = len((run.parent / "data/eval.jsonl").read_text().splitlines())
    assert timing["generated_tokens"] == min(5, rows) * 16
    serving = json.loads((run / "deploy/deploy.json").read_text())["serving_check"]
    assert serving["warmup_tokens_per_second"] > 0 and serving["estimated_max_seconds"] > 0
    gen = json.loads((run / "eval/report.json").read_text())["generation"]["timing"]
    assert gen["warmup_tokens_per_second"] > 0 and 0 < gen["estimated_max_seconds"] and gen["seconds"] > 0
    flat = " ".join(out.split())      # the console wraps long lines
    for said in ("export: checks: 64 tokens to generate", "deploy: serving check: 8 answers of at most",
                 f"eval: {len(EVAL) * len(json.loads((run / 'eval/report.json').read_text())['arms'])} answers of "
                 "at most 12 tokens"):
        at = flat.find(said)
        assert at >= 0 and "at most" in flat[at + len(said) - 8:at + 300], said
