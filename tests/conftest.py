"""Shared fixtures: an isolated data root and MLflow store per session, small raw sources made by
hand (so each test controls exactly what is in them), and one LocalCluster for the pipeline tests
that do not test cluster start-up itself."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session", autouse=True)
def isolated_data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("vitrine-data")
    old = {k: os.environ.get(k) for k in ("VITRINE_DATA", "MLFLOW_TRACKING_URI")}
    os.environ["VITRINE_DATA"] = str(root)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield root
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def dask_address():
    """One LocalCluster on loopback shared by the pipeline tests (start-up costs seconds)."""
    import logging

    from distributed import LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                           dashboard_address=None, silence_logs=logging.ERROR)
    yield cluster.scheduler_address
    cluster.close()


def make_raw(
    out: Path,
    n: int = 3000,
    users: int = 40,
    items: int = 25,
    days: int = 6,
    seed: int = 0,
    fmt: str = "parquet",
    tie_share: float = 0.1,
) -> pd.DataFrame:
    """A small raw source in the generator's layout; returns the impressions written.

    A share of rows copies the previous row's user and timestamp, so equal timestamps (ties) are
    common, which is where look-ahead bugs hide.
    """
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    (out / "images").mkdir(exist_ok=True)
    secs = rng.integers(0, days * 86400, n)
    user = rng.integers(0, users, n)
    tie = rng.random(n) < tie_share
    for i in np.flatnonzero(tie):
        if i:
            secs[i] = secs[i - 1]
            user[i] = user[i - 1]
    df = pd.DataFrame({
        "impression_id": rng.permutation(n).astype(np.int64) + 1000,
        "timestamp": pd.Timestamp("2026-01-01") + pd.to_timedelta(secs, unit="s"),
        "user_id": user.astype(np.int64),
        "item_id": rng.zipf(1.5, n).clip(1, items).astype(np.int64) - 1,
        "click": (rng.random(n) < 0.3).astype(np.int8),
    })
    if fmt == "parquet":
        (out / "impressions").mkdir(exist_ok=True)
        half = n // 2
        df.iloc[:half].to_parquet(out / "impressions" / "part-00000.parquet", index=False)
        df.iloc[half:].to_parquet(out / "impressions" / "part-00001.parquet", index=False)
    else:
        df.assign(timestamp=df.timestamp.dt.strftime("%Y-%m-%dT%H:%M:%S")).to_csv(out / "impressions.csv", index=False)
    pd.DataFrame({
        "item_id": np.arange(items, dtype=np.int64),
        "category_id": np.arange(items, dtype=np.int64) % 5,
        "shop_id": np.arange(items, dtype=np.int64) % 3,
        "image": [f"{i:03d}.png" for i in range(items)],
    }).to_parquet(out / "items.parquet", index=False)
    pd.DataFrame({
        "user_id": np.arange(users, dtype=np.int64),
        "gender": (np.arange(users) % 2).astype(np.int8),
        "age_bucket": (np.arange(users) % 4).astype(np.int8),
    }).to_parquet(out / "users.parquet", index=False)
    for i in range(items):
        Image.new("RGB", (24, 24), (i * 9 % 256, 100, 200)).save(out / "images" / f"{i:03d}.png")
    imp_path = "impressions" if fmt == "parquet" else "impressions.csv"
    (out / "source.toml").write_text(f"""
[impressions]
path = "{imp_path}"
[items]
path = "items.parquet"
[users]
path = "users.parquet"
profile = ["gender", "age_bucket"]
[images]
dir = "images"
""")
    return df


@pytest.fixture
def raw_source(tmp_path):
    df = make_raw(tmp_path / "raw")
    return tmp_path / "raw", df


@pytest.fixture(scope="session")
def world_dataset(tmp_path_factory, dask_address):
    from pipeline.build import PipelineConfig, run_pipeline
    from pipeline.synth.world import WorldConfig, generate

    root = tmp_path_factory.mktemp("train-world")
    generate(WorldConfig(users=300, items=150, days=5, seed=5), root / "raw", progress=False)
    run_pipeline(PipelineConfig(raw=str(root / "raw"), out=str(root / "ds"), scheduler=dask_address,
                                progress=False, max_behaviors=20, track=False))
    return root / "ds"
