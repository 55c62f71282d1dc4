"""The tracking helper: URI resolution and several processes logging to the local store at once."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import ROOT

from vitrine import tracking

_LOGGER = """
import sys
from vitrine import tracking
from mlflow.tracking import MlflowClient
exp = tracking.experiment_id("concurrency")
client = MlflowClient(tracking.tracking_uri())
run = client.create_run(exp, run_name=f"proc {sys.argv[1]}")
for step in range(20):
    client.log_metric(run.info.run_id, "loss", 1.0 / (step + 1), step=step)
client.set_terminated(run.info.run_id)
print(run.info.run_id)
"""


def test_env_var_wins(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert tracking.tracking_uri() == "http://127.0.0.1:5999"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.setenv("VITRINE_DATA", str(tmp_path))
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"


def test_processes_log_at_once_to_a_fresh_store(tmp_path):
    """Four processes create the store, the experiment and their runs at the same moment."""
    env = {**os.environ, "VITRINE_DATA": str(tmp_path), "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    procs = [subprocess.Popen([sys.executable, "-c", _LOGGER, str(i)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(4)]
    outs = [p.communicate(timeout=180) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}")
    exps = [e for e in client.search_experiments() if e.name == "concurrency"]
    assert len(exps) == 1
    assert exps[0].artifact_location.startswith((tmp_path / "mlflow" / "artifacts").as_uri())
    runs = client.search_runs([exps[0].experiment_id])
    assert len(runs) == 4
    for r in runs:
        assert len(client.get_metric_history(r.info.run_id, "loss")) == 20


def test_a_sqlite_store_elsewhere_keeps_its_artifacts_beside_it(tmp_path, monkeypatch):
    """Not in ./mlruns of the current directory (MLflow's default for a store without a location)."""
    from vitrine import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}")
    (tmp_path / "store").mkdir()
    monkeypatch.chdir(tmp_path)
    import mlflow

    exp = mlflow.tracking.MlflowClient(tracking.setup()).get_experiment(tracking.experiment_id("vitrine-x"))
    assert exp.artifact_location == (tmp_path / "store" / "artifacts" / "vitrine-x").as_uri()
