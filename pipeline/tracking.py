"""The pipeline's MLflow run: opened before any work, closed FINISHED or FAILED.

It uses `MlflowClient` with an explicit run id instead of the fluent API's global active run, so a
pipeline started from a test, the dashboard or another job never picks up someone else's run.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from vitrine import tracking
from vitrine.config import as_params


class PipelineRun:
    def __init__(self, client, run_id: str):
        self.client = client
        self.run_id = run_id

    def finish(self, manifest: dict, dataset_dir: Path) -> None:
        from mlflow.entities import Metric

        counts = manifest["counts"]
        metrics = {
            "rows_in": counts["rows_in"],
            "rows_out": counts["rows_out"],
            "rows_quarantined": counts["quarantined"],
            "users": counts["users"],
            "items": counts["items"],
            "cold_items": counts["cold_items"],
            "elapsed_s": manifest["elapsed_s"],
            "events_per_s": manifest["events_per_s"],
        }
        for name, split in manifest["splits"].items():
            metrics[f"{name}_rows"] = split["rows"]
            metrics[f"{name}_ctr"] = split["positives"] / split["rows"] if split["rows"] else 0.0
        if manifest.get("images"):
            sc = manifest["images"]["status_counts"]
            metrics["images_ok"] = sc.get("ok", 0)
            metrics["images_replaced"] = sum(v for k, v in sc.items() if k not in ("ok", "placeholder"))
        b = manifest.get("behavior_images") or {}
        for key in ("behavior_image_occurrences", "behavior_unique_images", "batch_image_occurrences",
                    "batch_unique_images", "batch_dedup_ratio"):
            if b.get(key) is not None:
                metrics[key] = b[key]
        for reason, n in counts["quarantine_reasons"].items():
            metrics["quarantined_" + reason.replace(" ", "_").replace("/", "_")] = n
        import time

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
        self.client.log_dict(self.run_id, manifest, "manifest.json")
        if manifest.get("warnings"):
            self.client.set_tag(self.run_id, "vitrine.warnings", "\n".join(manifest["warnings"])[:4000])
        sheet = _contact_sheet(dataset_dir)
        if sheet is not None:
            self.client.log_artifact(self.run_id, str(sheet))


def _contact_sheet(dataset_dir: Path) -> Path | None:
    from image_service.store import ImageStore, contact_sheet

    if not (dataset_dir / "images" / "pixels.npy").exists():
        return None
    store = ImageStore(dataset_dir)
    index = store.index
    ok = index[index.status == "ok"].image_index.to_numpy()[:40]
    bad = index[(index.status != "ok") & (index.image_index > 0)].image_index.to_numpy()[:8]
    picks = np.concatenate([ok, bad]).astype(np.int64)
    if not len(picks):
        return None
    labels = [f"{i} {index.status.iloc[i]}" for i in picks]
    path = Path(tempfile.mkdtemp(prefix="vitrine-sheet-")) / "contact_sheet.png"
    contact_sheet(store, picks, path, columns=8, labels=labels)
    return path


def warm_up() -> None:
    """Import MLflow and open the store (schema migrations included) ahead of use."""
    import mlflow.tracking  # noqa: F401

    tracking.setup()


@contextmanager
def pipeline_run(cfg, out: Path) -> Iterator[PipelineRun | None]:
    if not cfg.track:
        yield None
        return
    from mlflow.tracking import MlflowClient
    from mlflow.entities import Param

    uri = tracking.setup()
    client = MlflowClient(uri)
    exp_id = tracking.experiment_id(tracking.PIPELINE_EXPERIMENT)
    tags = {"vitrine.job": "pipeline", "vitrine.dataset": str(out)}
    if os.environ.get("VITRINE_JOB_ID"):
        tags["vitrine.job_id"] = os.environ["VITRINE_JOB_ID"]  # links the run to its job (vitrine/jobs.py)
    run = client.create_run(exp_id, run_name=f"pipeline {out.name}", tags=tags)
    run_id = run.info.run_id
    from vitrine import jobs

    jobs.record_mlflow_run(run_id, uri)  # a killed job's run is ended by the registry (vitrine/jobs.py)
    params = as_params(cfg)
    client.log_batch(run_id, params=[Param(k, v[:6000]) for k, v in params.items()])
    try:
        yield PipelineRun(client, run_id)
    except BaseException as exc:
        client.set_tag(run_id, "vitrine.error", json.dumps(str(exc))[:4000])
        client.set_terminated(run_id, "FAILED" if not isinstance(exc, KeyboardInterrupt) else "KILLED")
        raise
    client.set_terminated(run_id, "FINISHED")
