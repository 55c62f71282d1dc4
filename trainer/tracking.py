"""The training run's MLflow logging, off the training thread.

Step metrics are queued and written by a background thread in `log_batch` calls every second (or
every 500 metrics), so a slow or remote tracking store never stalls a step. Only the coordinator
logs (in single mode that is the one process).

A new run records the processed dataset it reads as an MLflow dataset input (name, digest of its
manifest, schema of its shards, source directory, and the pipeline run that made it), and every run
logs system metrics (`system/cpu_utilization_percentage`, memory, disk, network; GPU where there is
one) with MLflow's monitor, every `MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL` seconds (default 5 here)
and once more at the end, so a short run has at least one sample.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any

from vitrine import tracking
from vitrine.config import as_params


class RunLogger:
    def __init__(self, run_id: str | None, cfg: Any = None, run_name: str | None = None,
                 tags: dict[str, str] | None = None, flush_every_s: float = 1.0):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = tracking.setup()
        self.client = MlflowClient(uri)
        resumed = run_id is not None
        if run_id is None:
            exp = tracking.experiment_id(tracking.TRAIN_EXPERIMENT)
            run = self.client.create_run(exp, run_name=run_name, tags={"vitrine.job": "train", **(tags or {})})
            run_id = run.info.run_id
            if cfg is not None:
                params = as_params(cfg)
                items = [Param(k, v[:6000]) for k, v in params.items()]
                for i in range(0, len(items), 100):
                    self.client.log_batch(run_id, params=items[i:i + 100])
            self._logged: dict[str, int] = {}
            dataset = getattr(cfg, "dataset", None)
            if dataset:
                self.log_dataset(run_id, Path(dataset))
        else:
            self.client.update_run(run_id, status="RUNNING")
            self._logged = self._last_steps(run_id)
        self.run_id = run_id
        self._system = _start_system_metrics(run_id, uri, resumed=resumed)
        self._q: queue.Queue = queue.Queue()
        self._flush_every = flush_every_s
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="mlflow-logger", daemon=True)
        self._thread.start()

    def _last_steps(self, run_id: str) -> dict[str, int]:
        """A resumed run's last logged step per metric: the steps between its checkpoint and the kill are
        trained again, and logging them again would give those steps two values each."""
        keys = self.client.get_run(run_id).data.metrics.keys()
        return {k: max((m.step for m in self.client.get_metric_history(run_id, k)), default=-1) for k in keys}

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        for k, v in metrics.items():
            if int(step) <= self._logged.get(k, -1):
                continue  # logged before the resume
            self._q.put((k, float(v), now, int(step)))

    def set_tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)

    def _drain(self) -> None:
        from mlflow.entities import Metric

        batch = []
        while True:
            try:
                k, v, ts, step = self._q.get_nowait()
            except queue.Empty:
                break
            batch.append(Metric(k, v, ts, step))
            if len(batch) == 500:
                self.client.log_batch(self.run_id, metrics=batch)
                batch = []
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def _loop(self) -> None:
        while not self._stop.wait(self._flush_every):
            try:
                self._drain()
            except BaseException as exc:  # keep training; report at close
                self._error = exc

    def flush(self) -> None:
        self._drain()

    def log_dict(self, d: dict, name: str) -> None:
        self.client.log_text(self.run_id, json.dumps(d, indent=2, default=str), name)

    def log_dataset(self, run_id: str, path: Path) -> None:
        """The processed dataset at `path` as the run's training input (context `train`)."""
        from mlflow.entities import DatasetInput, InputTag

        entity, pipeline_run = dataset_entity(path)
        if entity is None:
            return
        tags = [InputTag("mlflow.data.context", "train")]
        if pipeline_run:
            tags.append(InputTag("vitrine.pipeline_run_id", pipeline_run))
            self.client.set_tag(run_id, "vitrine.pipeline_run_id", pipeline_run)
        self.client.set_tag(run_id, "vitrine.dataset_digest", entity.digest)
        self.client.log_inputs(run_id, datasets=[DatasetInput(entity, tags)])

    def close(self, status: str = "FINISHED") -> None:
        self._stop.set()
        self._thread.join()
        self._drain()
        _finish_system_metrics(self._system)
        self.client.set_terminated(self.run_id, status)
        if self._error is not None:
            raise RuntimeError(f"MLflow logging failed during training: {self._error}")


_LIST_KINDS = ("sequence", "image_sequence")


def dataset_entity(path: Path):
    """(MLflow dataset entity, pipeline run id or None) of the processed dataset at `path`; (None, None)
    when it has no readable manifest. The digest is the manifest's (it lists every shard and its rows,
    so a rebuilt dataset gets a new one); the schema is the shards' columns; the profile has the rows
    per split and the pipeline run."""
    from mlflow.entities import Dataset
    from mlflow.types.schema import Array, ColSpec, Schema

    mpath = Path(path) / "manifest.json"
    try:
        raw = mpath.read_bytes()
        manifest = json.loads(raw)
    except (OSError, ValueError):
        return None, None
    label = manifest.get("label", "label")
    cols = [ColSpec("long", "impression_id"), ColSpec("long", "timestamp"), ColSpec("integer", label),
            ColSpec("long", "group_id"), ColSpec("boolean", "cold_item")]
    fields = manifest.get("fields") or []
    for f in fields:
        cols.append(ColSpec(Array("long") if f.get("kind") in _LIST_KINDS else "long", f["name"]))
    if any(f.get("kind") in _LIST_KINDS for f in fields):
        cols.append(ColSpec("integer", "hist_len"))
    pipeline_run = manifest.get("mlflow_run_id")
    profile = {"rows": {k: v.get("rows") for k, v in (manifest.get("splits") or {}).items()},
               "pipeline_run_id": pipeline_run, "format_version": manifest.get("format_version")}
    entity = Dataset(name=str(manifest.get("name") or Path(path).name),
                     digest=hashlib.sha256(raw).hexdigest()[:12], source_type="local",
                     source=json.dumps({"uri": str(Path(path).resolve())}),
                     schema=json.dumps({"mlflow_colspec": Schema(cols).to_dict()}), profile=json.dumps(profile))
    return entity, pipeline_run


def _start_system_metrics(run_id: str, uri: str, resumed: bool):
    """MLflow's system-metrics monitor for the run (a thread); None when it cannot run (no psutil)."""
    import logging

    os.environ.setdefault("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "5")
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # no start/stop lines on the console
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, resume_logging=resumed, tracking_uri=uri)
        monitor.start()
        return monitor
    except Exception:  # noqa: BLE001 - system metrics are an extra; training goes on without them
        return None


def _finish_system_metrics(monitor) -> None:
    """Stop the monitor and log one last sample (MLflow's loop logs nothing for a run shorter than
    its interval)."""
    if monitor is None:
        return
    try:
        monitor.finish()
        monitor.collect_metrics()
        monitor.publish_metrics(monitor.aggregate_metrics())
        monitor.mlflow_logger.flush()
    except Exception:  # noqa: BLE001
        pass
