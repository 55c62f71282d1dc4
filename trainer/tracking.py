"""The training run's MLflow logging, off the training thread.

Step metrics are queued and written by a background thread in `log_batch` calls every second (or
every 500 metrics), so a slow or remote tracking store never stalls a step. Only the coordinator
logs (in single mode that is the one process).
"""

from __future__ import annotations

import json
import queue
import threading
import time
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
        else:
            self.client.update_run(run_id, status="RUNNING")
            self._logged = self._last_steps(run_id)
        self.run_id = run_id
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

    def close(self, status: str = "FINISHED") -> None:
        self._stop.set()
        self._thread.join()
        self._drain()
        self.client.set_terminated(self.run_id, status)
        if self._error is not None:
            raise RuntimeError(f"MLflow logging failed during training: {self._error}")
