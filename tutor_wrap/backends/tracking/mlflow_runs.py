"""MLflow: a local SQLite store beside the run dirs by default, or a tracking server.

tutor_wrap opens the MLflow run itself (one per plan, its id kept in the run's manifest), logs the plan's knobs as
params, and hands the trainer MLFLOW_RUN_ID so Axolotl's MLflow integration (transformers' MLflowCallback) writes
its loss curves into that same run; each stage then adds its numbers as `<stage>/<metric>` and its reports as
artifacts under `<stage>/`. The trainer logs no params of its own (MLFLOW_MAX_LOG_PARAMS=0): after an
out-of-memory retry its micro-batch would differ from the first attempt's, and MLflow refuses a changed param.
Credentials for a server come only from the environment (MLFLOW_TRACKING_TOKEN, MLFLOW_TRACKING_USERNAME/PASSWORD),
which the trainer inherits; the URI in the recipe holds none (recipe/secrets.py refuses one that does).
"""

from __future__ import annotations

import importlib.util
import logging
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tutor_wrap.backends.tracking.common import finite, param_value, report_files
from tutor_wrap.core.errors import TutorWrapError
from tutor_wrap.recipe.schema import MlflowSpec, Recipe

NAME = "mlflow"
DEFAULT_DB = "mlflow.db"          # in the folder that holds the run dirs
ARTIFACTS = "mlartifacts"         # beside the SQLite file
PARAM_MAX = 6000                  # MLflow's limit on a param value's length
_SQLITE_MAGIC = b"SQLite format 3\x00"
INSTALL = "pip install 'mlflow-skinny>=3' 'sqlalchemy>=2' 'alembic>=1.13'"


def spec(recipe: Recipe) -> MlflowSpec | None:
    return recipe.tracking.mlflow


def tracking_uri(spec: MlflowSpec, recipe: Recipe, run_dir: Path) -> str:
    """The store's URI with a relative SQLite path made absolute (the recipe's folder), the default beside the
    run dirs."""
    if spec.uri is None:
        return f"sqlite:///{run_dir.parent / DEFAULT_DB}"
    if spec.uri.startswith("sqlite:///"):
        return f"sqlite:///{recipe.resolve(spec.uri.removeprefix('sqlite:///'))}"
    return spec.uri.rstrip("/")


def experiment_name(spec: MlflowSpec, recipe: Recipe) -> str:
    return spec.experiment or recipe.name


def destination(spec: MlflowSpec, recipe: Recipe, run_dir: Path) -> str:
    return f"experiment {experiment_name(spec, recipe)!r} of {tracking_uri(spec, recipe, run_dir)}"


def check(spec: MlflowSpec, recipe: Recipe, run_dir: Path) -> None:
    key = f"{recipe.source}: tracking.mlflow"
    missing = [m for m in ("mlflow", "sqlalchemy", "alembic") if importlib.util.find_spec(m) is None]
    uri = tracking_uri(spec, recipe, run_dir)
    if uri.startswith("sqlite:///"):
        if missing:
            raise TutorWrapError(f"{key}: MLflow with a SQLite store needs {', '.join(missing)}, not installed in "
                                 "this environment", hint=f"{INSTALL}, or remove tracking.mlflow")
        db = Path(uri.removeprefix("sqlite:///"))
        if db.is_dir():
            raise TutorWrapError(f"{key}.uri: {db} is a directory", hint="name a file, e.g. sqlite:///mlruns.db")
        if db.exists():
            with open(db, "rb") as f:
                head = f.read(len(_SQLITE_MAGIC))
            if head and head != _SQLITE_MAGIC:
                raise TutorWrapError(f"{key}.uri: {db} exists and is not an SQLite database",
                                     hint="point the URI at a new file or at an MLflow store")
            try:
                with open(db, "r+b"):
                    pass
            except OSError as exc:
                raise TutorWrapError(f"{key}.uri: {db} cannot be written ({exc.strerror})",
                                     hint="fix its permissions or choose another") from None
        else:
            parent = next(p for p in db.parents if p.exists())
            # Tried, not judged from permission bits: root passes those everywhere, /proc and read-only mounts too.
            try:
                if not parent.is_dir():
                    raise NotADirectoryError(20, "not a directory")
                tempfile.TemporaryFile(dir=parent).close()
            except OSError as exc:
                raise TutorWrapError(f"{key}.uri: cannot create {db}: a file cannot be made in {parent} "
                                     f"({exc.strerror.lower()})", hint="choose a SQLite path in a folder you can write") from None
        return
    if "mlflow" in missing:
        raise TutorWrapError(f"{key}: the mlflow package is not installed in this environment",
                             hint=f"{INSTALL}, or remove tracking.mlflow")
    try:   # the server's own liveness endpoint; no credentials needed, none sent
        with urllib.request.urlopen(f"{uri}/health", timeout=10) as resp:
            ok = resp.status == 200
    except urllib.error.HTTPError as exc:
        raise TutorWrapError(f"{key}.uri: {uri} answered HTTP {exc.code} at /health, as no MLflow tracking server "
                             "does", hint="check that the URI is the MLflow server's (mlflow server prints it)") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TutorWrapError(f"{key}.uri: the MLflow server {uri} does not answer ({reason})",
                             hint="start it (mlflow server --host 127.0.0.1 --port 5000), fix the URI, or use a "
                                  "local store: remove uri for the SQLite default") from None
    if not ok:
        raise TutorWrapError(f"{key}.uri: {uri}/health answered {resp.status}, not 200",
                             hint="check that the URI is an MLflow tracking server")


def axolotl_keys(spec: MlflowSpec, recipe: Recipe) -> dict[str, Any]:
    # Only the switch: the URI, experiment and run go by environment (Session.env), so the launch config carries
    # no address and a resumed run lands in the same MLflow run.
    return {"use_mlflow": True}


def _quiet() -> None:
    # MLflow and alembic announce every table they create at INFO on our console; mlflow sets its logger's level
    # when it is imported, so this comes after the import.
    import mlflow  # noqa: F401

    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


class Run:
    def __init__(self, uri: str, experiment: str, experiment_id: str, run_id: str):
        from mlflow.tracking import MlflowClient

        self.uri, self.experiment, self.experiment_id, self.run_id = uri, experiment, experiment_id, run_id
        self.client = MlflowClient(uri)

    @property
    def state(self) -> dict:
        return {"uri": self.uri, "experiment": self.experiment, "experiment_id": self.experiment_id,
                "run_id": self.run_id}

    @property
    def where(self) -> str:
        view = (f"mlflow ui --backend-store-uri {self.uri}" if self.uri.startswith("sqlite:") else self.uri)
        return f"run {self.run_id} in experiment {self.experiment!r} of {self.uri} ({view})"

    @property
    def env(self) -> dict[str, str]:
        return {"MLFLOW_TRACKING_URI": self.uri, "MLFLOW_EXPERIMENT_NAME": self.experiment,
                "MLFLOW_RUN_ID": self.run_id, "MLFLOW_MAX_LOG_PARAMS": "0"}

    def log(self, stage: str, step: int, metrics: dict[str, Any], files: list[Path]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        values = [Metric(f"{stage}/{k}", v, now, step) for k, v in finite(metrics).items()]
        if values:
            self.client.log_batch(self.run_id, metrics=values)
        for f in report_files(files):
            self.client.log_artifact(self.run_id, str(f), artifact_path=stage)

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)


def start(spec: MlflowSpec, recipe: Recipe, run_dir: Path, saved: dict | None, params: dict[str, Any],
          name: str) -> Run:
    _quiet()
    from mlflow.entities import Param, RunStatus
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    uri, name = tracking_uri(spec, recipe, run_dir), experiment_name(spec, recipe)
    where = f"MLflow store {uri}"
    try:
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name(name)
        if exp is None:
            location = (Path(uri.removeprefix("sqlite:///")).parent / ARTIFACTS).as_uri() \
                if uri.startswith("sqlite:///") else None
            exp_id = client.create_experiment(name, artifact_location=location)
        elif exp.lifecycle_stage == "deleted":
            raise TutorWrapError(f"{where}: the experiment {name!r} was deleted",
                                 hint=f"restore it (mlflow experiments restore --experiment-id {exp.experiment_id}) "
                                      "or name another with tracking.mlflow.experiment")
        else:
            exp_id = exp.experiment_id
        if saved and saved.get("uri") == uri and saved.get("experiment_id") == exp_id:
            try:
                old = client.get_run(saved["run_id"])
                if old.info.lifecycle_stage == "active":
                    client.update_run(old.info.run_id, status=RunStatus.to_string(RunStatus.RUNNING))
                    return Run(uri, name, exp_id, old.info.run_id)
            except MlflowException:
                pass   # deleted from the store since: a new run below
        created = client.create_run(exp_id, run_name=name,
                                    tags={"tutor_wrap.recipe": recipe.name, "tutor_wrap.run_dir": str(run_dir)})
        run_id = created.info.run_id
        items = [Param(k, param_value(v)[:PARAM_MAX]) for k, v in params.items() if v is not None]
        for i in range(0, len(items), 100):   # MLflow takes 100 params per batch
            client.log_batch(run_id, params=items[i:i + 100])
        return Run(uri, name, exp_id, run_id)
    except MlflowException as exc:
        raise TutorWrapError(f"{where}: {exc.message}", hint="check tracking.mlflow (uri, experiment) and the "
                                                             "server's credentials in the environment") from None
    except Exception as exc:   # noqa: BLE001 - SQLAlchemy's and the HTTP client's errors, by the store's kind
        raise TutorWrapError(f"{where}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}",
                             hint="check tracking.mlflow.uri: the store must be writable (SQLite) or the server "
                                  "reachable with the credentials in the environment") from None
