"""Cached reads of the tracking store, the datasets and the job registry.

Every page reads MLflow through here, with a short time-to-live: a page renders from the cache
(the budget is 2 s with 500 runs in the store) and still shows a new run or metric within seconds.
Small reads use `st.cache_data(ttl=...)`; the run list, whose cost grows with the store, is refreshed
in the background instead (`_RunsCache`).
The tracking URI is an argument of every cached function, so two stores (tests, a switched
`MLFLOW_TRACKING_URI`) never share entries.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st

from vitrine import tracking

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no tqdm bars in the server log
RUNS_TTL_S = 10  # the run list: updated in the background when older than this
FULL_REFRESH_S = 120  # ... and read whole again when older than this
LIVE_TTL_S = 2  # one run's metrics while it trains
EXPERIMENTS = (tracking.PIPELINE_EXPERIMENT, tracking.TRAIN_EXPERIMENT)
MODE_NAMES = {0: "single", 1: "ar", 2: "async", 3: "gba"}

# Columns of the run table that are not metrics.
BASE_COLUMNS = ["run_id", "experiment_id", "job", "name", "status", "start", "start_ms", "end", "duration_s", "dataset",
                "dataset_path", "mode", "features", "aggregator", "epochs", "job_id", "run_dir", "metrics"]


@st.cache_resource(show_spinner=False)
def client(uri: str):
    """One MlflowClient per store; the local SQLite store is created (once, under its lock) if new."""
    from mlflow.tracking import MlflowClient

    if uri == tracking.tracking_uri():
        tracking.setup()
    return MlflowClient(uri)


def _experiments(uri: str) -> dict[str, str]:
    c = client(uri)
    out = {}
    for name in EXPERIMENTS:
        exp = c.get_experiment_by_name(name)
        if exp is not None:
            out[exp.experiment_id] = name
    return out


@st.cache_data(ttl=RUNS_TTL_S, show_spinner=False)
def experiments(uri: str) -> dict[str, str]:
    """{experiment_id: name} of Vitrine's experiments that exist in the store."""
    return _experiments(uri)


def _row(r) -> dict[str, Any]:
    tags, params = r.data.tags, r.data.params
    # Local wall-clock times, as the jobs' own timestamps are shown.
    start = pd.Timestamp.fromtimestamp(r.info.start_time / 1000) if r.info.start_time else pd.NaT
    end = pd.Timestamp.fromtimestamp(r.info.end_time / 1000) if r.info.end_time else pd.NaT
    dataset = tags.get("vitrine.dataset", "")
    return {
        "run_id": r.info.run_id,
        "experiment_id": r.info.experiment_id,
        "job": tags.get("vitrine.job", ""),
        "name": r.info.run_name or tags.get("mlflow.runName", ""),
        "status": r.info.status,
        "start": start,
        "start_ms": int(r.info.start_time or 0),
        "end": end,
        "duration_s": (r.info.end_time - r.info.start_time) / 1000 if r.info.end_time and r.info.start_time else math.nan,
        "dataset": Path(dataset).name if dataset else "",
        "dataset_path": dataset,
        "mode": tags.get("vitrine.mode", params.get("mode", "")),
        "features": params.get("features", ""),
        "aggregator": params.get("aggregator", ""),
        "epochs": params.get("epochs", ""),
        "job_id": tags.get("vitrine.job_id", ""),
        "run_dir": tags.get("vitrine.run_dir", ""),
        "metrics": dict(r.data.metrics),
    }


def _frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=BASE_COLUMNS)
    metrics = pd.DataFrame(list(frame["metrics"]), index=frame.index)
    metrics = metrics[[c for c in metrics.columns if c not in frame.columns]]
    return pd.concat([frame, metrics], axis=1)


def _search(uri: str, exps: list[str], filter_string: str = "") -> list[dict[str, Any]]:
    c = client(uri)
    rows: list[dict[str, Any]] = []
    token = None
    while True:
        page = c.search_runs(exps, filter_string=filter_string, max_results=1000,
                             order_by=["attributes.start_time DESC"], page_token=token)
        rows.extend(_row(r) for r in page)
        token = page.token
        if not token:
            break
    return rows


def _search_runs(uri: str) -> pd.DataFrame:
    """Every pipeline and training run, newest first, one row each, latest metric values as columns."""
    exps = _experiments(uri)
    return _frame(_search(uri, list(exps))) if exps else pd.DataFrame(columns=BASE_COLUMNS)


def _update_runs(uri: str, prev: pd.DataFrame) -> pd.DataFrame:
    """`prev` brought up to date by reading only what can have changed: runs started since its
    newest one, and the runs it still had as RUNNING (a finished run's record does not change)."""
    exps = list(_experiments(uri))
    newest = int(prev["start_ms"].max())
    rows = _search(uri, exps, f"attributes.start_time >= {newest}")
    running = [r for r in prev.loc[prev["status"] == "RUNNING", "run_id"] if r not in {x["run_id"] for x in rows}]
    for i in range(0, len(running), 100):
        ids = ", ".join(f"'{r}'" for r in running[i:i + 100])
        rows += _search(uri, exps, f"attributes.run_id IN ({ids})")
    if not rows:
        return prev
    fresh = _frame(rows)
    kept = prev[~prev["run_id"].isin(fresh["run_id"])]
    return pd.concat([fresh, kept], ignore_index=True).sort_values("start", ascending=False, ignore_index=True)


class _RunsCache:
    """The run list, kept fresh in the background once it is older than RUNS_TTL_S.

    The search over every run is the one read whose cost grows with the store (about 0.9 s for 500
    runs here), so no page waits for it after the first: a stale list is served while a background
    thread updates it (stale-while-revalidate: at most TTL plus one search old). An update reads only
    new and running runs; the whole store is read again every FULL_REFRESH_S (deleted runs go then)
    and when the experiments change. The server's warm-up fills the cache before the first visitor;
    the Runs page's Refresh button waits for a full read.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[float, float, tuple[str, ...], pd.DataFrame]] = {}
        self._refreshing: set[str] = set()

    def get(self, uri: str) -> pd.DataFrame:
        with self._lock:
            entry = self._entries.get(uri)
            stale = entry is not None and time.monotonic() - entry[0] > RUNS_TTL_S
            if stale and uri not in self._refreshing:
                self._refreshing.add(uri)
                threading.Thread(target=self._background, args=(uri,), name="vitrine-runs-refresh", daemon=True).start()
        return entry[3] if entry is not None else self.refresh(uri)

    def refresh(self, uri: str) -> pd.DataFrame:
        exps = tuple(sorted(_experiments(uri)))
        frame = _search_runs(uri)
        now = time.monotonic()
        with self._lock:
            self._entries[uri] = (now, now, exps, frame)
        return frame

    def _background(self, uri: str) -> None:
        try:
            with self._lock:
                entry = self._entries.get(uri)
            exps = tuple(sorted(_experiments(uri)))
            if (entry is None or entry[3].empty or exps != entry[2]
                    or time.monotonic() - entry[1] > FULL_REFRESH_S):
                self.refresh(uri)
            else:
                frame = _update_runs(uri, entry[3])
                with self._lock:
                    self._entries[uri] = (time.monotonic(), entry[1], exps, frame)
        except Exception:  # noqa: BLE001 - keep serving the old list; the next page view retries
            pass
        finally:
            with self._lock:
                self._refreshing.discard(uri)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


_RUNS = _RunsCache()


def runs(uri: str) -> pd.DataFrame:
    """Every pipeline and training run (see _RunsCache for how fresh). Treat it as read-only."""
    return _RUNS.get(uri)


def clear() -> None:
    """Forget every cached read (the Refresh button, and tests that change the store)."""
    st.cache_data.clear()
    _RUNS.clear()


@st.cache_data(ttl=LIVE_TTL_S, show_spinner=False)
def run_info(uri: str, run_id: str) -> dict[str, Any]:
    r = client(uri).get_run(run_id)
    return {**_row(r), "params": dict(r.data.params), "tags": dict(r.data.tags)}


@st.cache_data(ttl=LIVE_TTL_S, show_spinner=False)
def history(uri: str, run_id: str, key: str) -> pd.DataFrame:
    """One metric's history: step, seconds since the first point, value."""
    ms = client(uri).get_metric_history(run_id, key)
    if not ms:
        return pd.DataFrame(columns=["step", "time", "value"])
    frame = pd.DataFrame({"step": [m.step for m in ms], "timestamp": [m.timestamp for m in ms],
                          "value": [m.value for m in ms]}).sort_values(["step", "timestamp"])
    return frame


def histories(uri: str, run_ids: list[str], keys: list[str], start_ms: dict[str, int] | None = None) -> pd.DataFrame:
    """Long frame (run_id, metric, step, wall_s, value) of the metrics each run has."""
    parts = []
    for rid in run_ids:
        present = set(run_info(uri, rid)["metrics"])
        for key in keys:
            if key not in present:
                continue
            h = history(uri, rid, key)
            if h.empty:
                continue
            t0 = (start_ms or {}).get(rid, int(h["timestamp"].min()))
            parts.append(h.assign(run_id=rid, metric=key, wall_s=(h["timestamp"] - t0) / 1000.0))
    if not parts:
        return pd.DataFrame(columns=["run_id", "metric", "step", "wall_s", "value", "timestamp"])
    return pd.concat(parts, ignore_index=True)


@st.cache_data(ttl=RUNS_TTL_S, show_spinner=False)
def runs_with_model(uri: str) -> set[str]:
    """Runs that logged a model (one search over MLflow's logged models, not one listing per run)."""
    exps = [e for e, name in experiments(uri).items() if name == tracking.TRAIN_EXPERIMENT]
    if not exps:
        return set()
    c = client(uri)
    found: set[str] = set()
    token = None
    while True:
        page = c.search_logged_models(exps, max_results=1000, page_token=token)
        found.update(m.source_run_id for m in page if m.source_run_id)
        token = page.token
        if not token:
            break
    return found


@st.cache_data(ttl=LIVE_TTL_S, show_spinner=False)
def runs_for_job(uri: str, job_id: str) -> list[str]:
    """MLflow runs tagged with this job id (the jobs tag their runs `vitrine.job_id`), newest first."""
    exps = experiments(uri)
    if not exps or not job_id.replace("-", "").replace("_", "").replace(".", "").isalnum():
        return []
    found = client(uri).search_runs(list(exps), filter_string=f"tags.`vitrine.job_id` = '{job_id}'",
                                    max_results=10, order_by=["attributes.start_time DESC"])
    return [r.info.run_id for r in found]


@st.cache_data(ttl=60, show_spinner=False)
def json_artifact(uri: str, run_id: str, path: str) -> Any | None:
    """A JSON artifact of a run (e.g. model_layout.json), or None when the run has none."""
    c = client(uri)
    try:
        names = {a.path for a in c.list_artifacts(run_id, str(Path(path).parent) if "/" in path else None)}
    except Exception:  # noqa: BLE001 - an unreachable artifact store reads as "none"
        return None
    if path not in names:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        local = c.download_artifacts(run_id, path, tmp)
        return json.loads(Path(local).read_text())


def run_link(run: dict[str, Any] | pd.Series, base: str | None) -> str | None:
    if not base:
        return None
    return f"{base}/#/experiments/{run['experiment_id']}/runs/{run['run_id']}"


# -- datasets --------------------------------------------------------------------------------------
def processed_datasets(root: Path) -> list[Path]:
    """Processed datasets under DATA/processed (directories with a manifest), newest first."""
    base = root / "processed"
    if not base.is_dir():
        return []
    found = [p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / "manifest.json").is_file()]
    return sorted(found, key=lambda p: (p / "manifest.json").stat().st_mtime, reverse=True)


def raw_sources(root: Path) -> list[Path]:
    base = root / "raw"
    if not base.is_dir():
        return []
    found = [p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


@st.cache_data(ttl=30, show_spinner=False)
def manifest(path: str, mtime: float) -> dict[str, Any]:
    """A dataset's manifest (`mtime` in the key: a rebuilt dataset is read again)."""
    return json.loads((Path(path) / "manifest.json").read_text())


def load_manifest(path: Path) -> dict[str, Any]:
    mpath = path / "manifest.json"
    return manifest(str(path), mpath.stat().st_mtime)

