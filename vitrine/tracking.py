"""One place that decides where MLflow runs go.

`MLFLOW_TRACKING_URI` wins when set (a shared server for a team or a cluster). Otherwise runs go to an
embedded SQLite store under the data root, `data/mlflow/mlflow.db`, with artifacts beside it in
`data/mlflow/artifacts`. SQLite copes with the few processes that log at once (MLflow sets a 20 s
busy timeout); what it does not cope with is several processes creating the schema at the same
moment, so the first use is serialised with a file lock. Experiments are created with an explicit
artifact location, so artifacts never land in whatever directory a process happened to start in.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from vitrine.paths import data_root

PIPELINE_EXPERIMENT = "vitrine-pipeline"
TRAIN_EXPERIMENT = "vitrine-train"


def local_store_dir() -> Path:
    return data_root() / "mlflow"


def tracking_uri() -> str:
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{local_store_dir() / 'mlflow.db'}"


def _is_local_default(uri: str) -> bool:
    return uri.startswith("sqlite:///") and uri.endswith(str(local_store_dir() / "mlflow.db"))


@contextmanager
def _init_lock() -> Iterator[None]:
    store = local_store_dir()
    store.mkdir(parents=True, exist_ok=True)
    with open(store / ".init.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def setup() -> str:
    """Point MLflow at the resolved URI and make sure the store exists; returns the URI."""
    import mlflow

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    if _is_local_default(uri):
        with _init_lock():
            # Creating the client store runs the schema migrations; under the lock only one
            # process does it.
            mlflow.tracking.MlflowClient(uri).search_experiments(max_results=1)
    return uri


def experiment_id(name: str) -> str:
    """The id of experiment `name`, created on first use with artifacts under the data root."""
    import mlflow

    uri = setup()
    client = mlflow.tracking.MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    artifact_location = _local_artifacts(uri, name)
    with _init_lock() if _is_local_default(uri) else _nullcontext():
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        return client.create_experiment(name, artifact_location=artifact_location)


def _local_artifacts(uri: str, name: str) -> str | None:
    """Artifacts of a local SQLite store go beside the database file; left to MLflow, they would land
    in `./mlruns` of whatever directory the process started in. A server decides for itself (None)."""
    if _is_local_default(uri):
        return (local_store_dir() / "artifacts" / name).as_uri()
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).resolve().parent / "artifacts" / name).as_uri()
    return None


@contextmanager
def _nullcontext() -> Iterator[None]:
    yield


def start_run(experiment: str, run_name: str | None = None, tags: dict[str, str] | None = None):
    """`mlflow.start_run` in the named experiment of the resolved store."""
    import mlflow

    exp_id = experiment_id(experiment)
    return mlflow.start_run(experiment_id=exp_id, run_name=run_name, tags=tags)
