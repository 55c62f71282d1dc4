"""What the dashboard is pointed at, read from the environment on every script run.

The server (`app/server.py`) passes its options to the Streamlit process as environment variables,
so the pages, AppTest and a hand-started `streamlit run` all read them the same way:

| variable | meaning |
|---|---|
| `MLFLOW_TRACKING_URI` | the runs to show (else the local store under the data root, as for the jobs) |
| `VITRINE_DATA` | the data root: datasets, job registry, default MLflow store |
| `VITRINE_DASHBOARD_TOKEN` | the access token every session must present (unset: none, loopback only) |
| `VITRINE_MLFLOW_URL` | base URL of an MLflow UI to link runs into (unset: an http tracking URI, else none) |
| `VITRINE_BENCH_RESULTS` | the benchmark JSON folder (default `benchmarks/results` of this checkout) |
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

from vitrine import paths, tracking

ROOT = Path(__file__).resolve().parents[1]
TOKEN_ENV = "VITRINE_DASHBOARD_TOKEN"
MLFLOW_URL_ENV = "VITRINE_MLFLOW_URL"
BENCH_ENV = "VITRINE_BENCH_RESULTS"
MIN_TOKEN_LEN = 8


def tracking_uri() -> str:
    return tracking.tracking_uri()


def data_root() -> Path:
    return paths.data_root()


def token() -> str | None:
    return os.environ.get(TOKEN_ENV) or None


def mlflow_url() -> str | None:
    url = os.environ.get(MLFLOW_URL_ENV)
    if url:
        return url.rstrip("/")
    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        return uri.rstrip("/")
    return None


def mlflow_ui_command() -> str:
    return f".venv/bin/mlflow ui --backend-store-uri {tracking_uri()} --host 127.0.0.1"


def bench_results_dir() -> Path:
    return Path(os.environ.get(BENCH_ENV) or ROOT / "benchmarks" / "results")


def is_loopback(host: str | None) -> bool:
    """127.0.0.0/8, ::1 and `localhost`; None or "" mean every interface (Streamlit's default)."""
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
