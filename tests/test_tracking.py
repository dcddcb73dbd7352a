"""The recipe's `tracking:` block: what plan time refuses (each tracker installed, its store writable or
reachable, names W&B takes, no credential in the recipe) and the MLflow run a plan keeps across resumed runs, on a
real SQLite store read back with MlflowClient. The trackers' contents after a whole run: test_e2e.py."""

import socket
from pathlib import Path

import pytest

from tutor_wrap.backends import tracking
from tutor_wrap.backends.tracking import mlflow_runs
from tutor_wrap.core.errors import TutorWrapError
from tutor_wrap.recipe.load import load_recipe
from test_recipe import GOOD   # the smallest valid recipe

pytestmark = pytest.mark.tools



def recipe(tmp_path: Path, extra: str):
    p = tmp_path / "recipe.yml"
    p.write_text(GOOD + extra)
    return load_recipe(p)


def refused(tmp_path: Path, extra: str, run_dir: Path | None = None) -> str:
    with pytest.raises(TutorWrapError) as exc:
        tracking.check(recipe(tmp_path, extra), run_dir or tmp_path / "runs" / "t")
    return str(exc.value)


@pytest.mark.parametrize("extra, expected", [
    ("train:\n  tensorboard: true\n", "train.tensorboard moved to tracking.tensorboard"),
    ("axolotl:\n  use_wandb: true\n", "write `tracking: {wandb: true}`"),
    ("axolotl:\n  mlflow_tracking_uri: sqlite:///x.db\n", "write `tracking: {mlflow: {uri: ...}}`"),
    ("axolotl:\n  use_tensorboard: true\n", "write `tracking: {tensorboard: true}`"),
    ("tracking:\n  mlflow:\n    uri: mlruns\n", "use sqlite:///PATH"),
    ("tracking:\n  mlflow:\n    uri: postgres://db/x\n", "use sqlite:///PATH"),
    ("tracking:\n  mlflow:\n    experiment: ''\n", "tracking.mlflow.experiment"),
    ("tracking:\n  wandb:\n    project: team/proj\n", "tracking.wandb.project"),
    ("tracking:\n  wandb:\n    mode: disabled\n", "tracking.wandb.mode"),
    ("tracking:\n  comet: true\n", "tracking.comet"),
    # a credential in the URI is refused with the variables MLflow reads instead
    ("tracking:\n  mlflow:\n    uri: https://me:s3cretpw@mlflow.example.com\n", "MLFLOW_TRACKING_TOKEN"),
    ("tracking:\n  mlflow:\n    uri: 'https://me:@mlflow.example.com'\n", "MLFLOW_TRACKING_USERNAME"),
    ("tracking:\n  mlflow:\n    uri: 'http://me@127.0.0.1:5000'\n", "MLFLOW_TRACKING_USERNAME"),
    ("tracking:\n  mlflow:\n    uri: 'https://mlflow.example.com:notaport'\n", "write http(s)://HOST:PORT"),
    ("tracking:\n  mlflow:\n    experiment: '   '\n", "spaces only"),
    ("tracking:\n  wandb:\n    project: team/proj\n", "write entity: team and project: proj"),
    ("tracking:\n  wandb:\n    entity: a/b\n", "none of /"),
    ("tracking: yes\n", "write its keys indented under `tracking:`"),
    ("tracking:\n  mlflow: sqlite:///x.db\n", "write `mlflow: {uri: sqlite:///x.db}`"),
    ("axolotl:\n  use_comet: true\n", "tutor_wrap tracks with TensorBoard, MLflow or W&B"),
    ("axolotl:\n  mlflow_run_name: x\n", "names the tracker run after the run dir"),
])
def test_a_bad_tracking_block_is_one_error_naming_the_key(tmp_path, extra, expected):
    with pytest.raises(TutorWrapError) as exc:
        recipe(tmp_path, extra)
    assert expected in str(exc.value) and "recipe.yml" in str(exc.value)
    assert "s3cretpw" not in str(exc.value)


def test_switches_and_defaults(tmp_path):
    r = recipe(tmp_path, "tracking:\n  mlflow: true\n  wandb: true\n  tensorboard: true\n")
    run_dir = tmp_path / "runs" / "t"
    assert mlflow_runs.tracking_uri(r.tracking.mlflow, r, run_dir) == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    assert mlflow_runs.experiment_name(r.tracking.mlflow, r) == "t"
    assert tracking.axolotl_keys(r) == {"use_tensorboard": True, "use_mlflow": True, "use_wandb": True,
                                        "wandb_project": "t", "wandb_mode": "offline"}
    tracking.check(r, run_dir)           # all three installed, the store's folder creatable
    off = recipe(tmp_path, "tracking:\n  mlflow: false\n")
    assert tracking.axolotl_keys(off) == {} and not tracking.Session(off, run_dir, None).on
    rel = recipe(tmp_path, "tracking:\n  mlflow:\n    uri: sqlite:///store/m.db\n")
    assert mlflow_runs.tracking_uri(rel.tracking.mlflow, rel, run_dir) == f"sqlite:///{tmp_path / 'store/m.db'}"


def test_a_store_that_cannot_be_used_is_refused_at_plan_time(tmp_path):
    (tmp_path / "adir.db").mkdir()
    assert "is a directory" in refused(tmp_path, "tracking:\n  mlflow:\n    uri: sqlite:///adir.db\n")
    (tmp_path / "notes.db").write_text("not a database\n")
    assert "not an SQLite database" in refused(tmp_path, "tracking:\n  mlflow:\n    uri: sqlite:///notes.db\n")
    (tmp_path / "afile").write_text("x")
    assert "a file cannot be made in" in refused(tmp_path, "tracking:\n  mlflow:\n    uri: sqlite:///afile/sub/m.db\n")


def test_a_folder_that_cannot_be_written_is_refused_even_as_root(tmp_path):
    """Tried, not judged from permission bits (root passes those on /proc and read-only mounts)."""
    assert "a file cannot be made in /proc" in refused(tmp_path, "tracking:\n  mlflow:\n    uri: sqlite:////proc/tw.db\n")


def test_a_server_that_is_not_mlflow_is_named_as_such(tmp_path):
    import http.server
    import threading

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        msg = refused(tmp_path, f"tracking:\n  mlflow:\n    uri: http://127.0.0.1:{port}\n")
        assert "answered HTTP 404 at /health" in msg
    finally:
        server.shutdown()
        server.server_close()


def test_an_mlflow_server_that_does_not_answer_is_refused_at_plan_time(tmp_path):
    with socket.socket() as s:          # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    msg = refused(tmp_path, f"tracking:\n  mlflow:\n    uri: http://127.0.0.1:{port}\n")
    assert f"http://127.0.0.1:{port} does not answer" in msg and "mlflow server" in msg


def test_wandb_online_needs_a_key_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))          # no ~/.netrc entry either
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    assert "no W&B key is set" in refused(tmp_path, "tracking:\n  wandb:\n    mode: online\n")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    tracking.check(recipe(tmp_path, "tracking:\n  wandb:\n    mode: online\n"), tmp_path / "runs" / "t")


def test_one_mlflow_run_per_plan_taken_up_again_by_a_resumed_run(tmp_path):
    """A resumed `run` writes into the run its plan started; a new plan (another experiment) gets a new one; a
    run deleted from the store since is replaced, not an error."""
    from mlflow.tracking import MlflowClient

    r = recipe(tmp_path, "tracking:\n  mlflow: true\n")
    run_dir = tmp_path / "runs" / "t"
    first = tracking.Session(r, run_dir, None)
    first.start("plan-A", {"method": "lora", "plan.micro_batch_size": 4})
    assert first.fresh == ["mlflow"] and first.where()[0].startswith("mlflow: run ")
    saved = first.keep("plan-A")
    first.log("train", 1, {"loss_end_mean": 0.5, "nan": float("nan"), "flag": True}, [])
    first.close("FINISHED")
    run_id = saved["mlflow"]["run_id"]
    client = MlflowClient(saved["mlflow"]["uri"])
    assert client.get_run(run_id).data.metrics == {"train/loss_end_mean": 0.5}   # NaN and booleans are not numbers
    assert client.get_run(run_id).data.params == {"method": "lora", "plan.micro_batch_size": "4"}
    # the store's artifacts beside its SQLite file, not in an mlruns/ wherever tutor_wrap was started from
    assert client.get_experiment_by_name("t").artifact_location == (tmp_path / "runs" / "mlartifacts").as_uri()

    again = tracking.Session(r, run_dir, saved)
    again.start("plan-A", {"method": "lora", "plan.micro_batch_size": 2})   # params of a resumed run stay
    assert again.fresh == []
    assert again.keep("plan-A")["mlflow"]["run_id"] == run_id
    assert again.env["MLFLOW_RUN_ID"] == run_id and again.env["MLFLOW_MAX_LOG_PARAMS"] == "0"
    assert client.get_run(run_id).info.status == "RUNNING"
    again.close("FAILED")
    assert client.get_run(run_id).info.status == "FAILED"

    other = tracking.Session(r, run_dir, saved)
    other.start("plan-B", {"method": "qlora"})
    assert other.keep("plan-B")["mlflow"]["run_id"] != run_id
    other.close("FINISHED")

    client.delete_run(run_id)
    gone = tracking.Session(r, run_dir, saved)
    gone.start("plan-A", {})
    assert gone.keep("plan-A")["mlflow"]["run_id"] != run_id
    gone.close("FINISHED")

    client.delete_experiment(client.get_experiment_by_name("t").experiment_id)
    with pytest.raises(TutorWrapError, match="experiment 't' was deleted"):
        tracking.Session(r, run_dir, None).start("plan-C", {})
