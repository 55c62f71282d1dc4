"""The Dask pipeline on small hand-made sources: correctness of every output row, bad input, atomicity."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import ROOT, make_raw
from pipeline.build import PipelineConfig, run_pipeline
from pipeline.vocab import OOV
from vitrine.errors import UserError


def _run(raw: Path, out: Path, dask_address: str, **kw) -> dict:
    cfg = PipelineConfig(raw=str(raw), out=str(out), scheduler=dask_address, progress=False, **kw)
    return run_pipeline(cfg)


def _read_split(out: Path, split: str) -> pd.DataFrame:
    return pd.read_parquet(out / split)


def _decode(vocab_path: Path) -> dict:
    v = pd.read_parquet(vocab_path)
    return dict(zip(v["index"], v["id"]))


@pytest.mark.parametrize("join", ["broadcast", "shuffle"])
def test_every_row_matches_the_definition(raw_source, tmp_path, dask_address, join):
    raw, df = raw_source
    out = tmp_path / "out"
    m = _run(raw, out, dask_address, max_behaviors=4, min_count=1, history_join=join)
    rows = pd.concat([_read_split(out, s).assign(split=s) for s in ("train", "valid", "test")], ignore_index=True)
    assert len(rows) == len(df) == m["counts"]["rows_out"]
    assert set(rows.impression_id) == set(df.impression_id)

    # Histories: recompute from the raw log, per user, by the plain definition.
    src = df.assign(ts=df.timestamp.astype("datetime64[ms]").astype("int64")).set_index("impression_id")
    item_of = _decode(out / "vocab" / "item_id.parquet")
    by_user = {u: g for u, g in src[src.click == 1].groupby("user_id")}
    for r in rows.sample(600, random_state=0).itertuples():
        me = src.loc[r.impression_id]
        clicks = by_user.get(me.user_id)
        expect = []
        if clicks is not None:
            prior = clicks[clicks.ts < me.ts].reset_index().sort_values(["ts", "impression_id"])
            expect = prior.item_id.tolist()[-4:]
        got = [item_of[i] for i in r.hist_item_id]
        assert got == expect, (r.impression_id, got, expect)
        assert r.hist_len == len(expect)
        assert r.label == me.click
        assert r.timestamp == me.ts

    # Splits by time: the test split holds the last day, valid the day before, train the rest.
    t_end = rows.timestamp.max()
    assert rows[rows.split == "test"].timestamp.min() >= (t_end // 86_400_000) * 86_400_000
    assert rows[rows.split == "train"].timestamp.max() < rows[rows.split == "valid"].timestamp.min()

    # Vocabulary: frequency order from train only; items unseen in train are OOV and cold.
    vocab = pd.read_parquet(out / "vocab" / "item_id.parquet")
    assert vocab["index"].tolist() == list(range(2, 2 + len(vocab)))
    assert vocab["count"].is_monotonic_decreasing
    train_counts = src[src.ts < pd.Timestamp(m["split_bounds"]["valid_start"]).value // 1_000_000].item_id.value_counts()
    assert dict(zip(vocab["id"], vocab["count"])) == train_counts.to_dict()
    cold = rows[rows.cold_item]
    assert (cold.item_id == OOV).all()
    assert not rows[~rows.cold_item].item_id.eq(OOV).any()

    # Shards are sorted by time and match the manifest.
    for split, info in m["splits"].items():
        for shard in info["shards"]:
            t = pd.read_parquet(out / shard["file"])
            assert len(t) == shard["rows"]
            assert t.timestamp.is_monotonic_increasing

    # The image store: one row per image plus the placeholder; each ad_image row shows that item.
    pixels = np.load(out / "images" / "pixels.npy", mmap_mode="r")
    assert pixels.shape == (26, 64, 64, 3)
    r = rows.iloc[0]
    raw_item = src.loc[r.impression_id].item_id
    assert tuple(pixels[r.ad_image, 32, 32]) == pytest.approx((raw_item * 9 % 256, 100, 200), abs=2)


def test_rerun_is_deterministic_and_existing_output_is_refused(raw_source, tmp_path, dask_address):
    raw, _ = raw_source
    a, b = tmp_path / "a", tmp_path / "b"
    _run(raw, a, dask_address)
    _run(raw, b, dask_address)
    for split in ("train", "valid", "test"):
        pd.testing.assert_frame_equal(_read_split(a, split), _read_split(b, split))
    with pytest.raises(UserError, match="already exists; pass --overwrite"):
        _run(raw, a, dask_address)
    before = (a / "manifest.json").read_text()
    _run(raw, a, dask_address, overwrite=True, max_behaviors=3)
    assert json.loads((a / "manifest.json").read_text())["config"]["max_behaviors"] == 3
    assert before != (a / "manifest.json").read_text()
    assert not list(tmp_path.glob(".a.*"))


def test_bad_rows_are_quarantined_with_reasons(tmp_path, dask_address):
    raw = tmp_path / "raw"
    df = make_raw(raw, n=400, fmt="csv")
    text = (raw / "impressions.csv").read_text().splitlines()
    header, body = text[0], text[1:]
    cols = header.split(",")
    bad = {
        3: ("user_id", ""),
        10: ("item_id", "  "),
        20: ("timestamp", "not-a-date"),
        30: ("click", "2"),
        40: ("click", "yes"),
        50: ("timestamp", ""),
    }
    for row, (col, value) in bad.items():
        fields = body[row].split(",")
        fields[cols.index(col)] = value
        body[row] = ",".join(fields)
    (raw / "impressions.csv").write_text("\n".join([header, *body]) + "\n")

    out = tmp_path / "out"
    m = _run(raw, out, dask_address)
    assert m["counts"]["quarantined"] == len(bad)
    assert m["counts"]["rows_out"] == len(df) - len(bad)
    assert m["counts"]["quarantine_reasons"] == {
        "missing user id": 1, "missing item id": 1, "unparsable timestamp": 2, "label not 0/1": 2,
    }
    q = pd.read_parquet(out / "quarantine" / "impressions").sort_values("source_row")
    assert q.source_row.tolist() == sorted(bad)
    assert q.set_index("source_row").loc[20, "timestamp"] == "not-a-date"
    kept = pd.concat([_read_split(out, s) for s in ("train", "valid", "test")])
    assert not set(kept.impression_id) & set(df.impression_id.iloc[sorted(bad)])


def test_own_column_names_mapped_by_options(tmp_path, dask_address):
    raw = tmp_path / "shop"
    raw.mkdir()
    rng = np.random.default_rng(1)
    n = 500
    pd.DataFrame({
        "when": pd.Timestamp("2026-03-01") + pd.to_timedelta(rng.integers(0, 5 * 86400, n), unit="s"),
        "visitor": [f"u{u}" for u in rng.integers(0, 30, n)],
        "ad": [f"sku-{i}" for i in rng.integers(0, 20, n)],
        "clk": rng.integers(0, 2, n),
    }).to_parquet(raw / "log.parquet", index=False)
    out = tmp_path / "out"
    m = _run(raw, out, dask_address, impressions="log.parquet",
             map=("timestamp=when", "user=visitor", "item=ad", "label=clk"))
    assert m["counts"]["rows_out"] == n
    assert m["images"] is None
    names = {f["name"] for f in m["fields"]}
    assert {"user_id", "item_id", "hour", "hist_item_id"} <= names and "ad_image" not in names
    assert pd.read_parquet(out / "vocab" / "user_id.parquet")["id"].str.startswith("u").all()

    with pytest.raises(UserError, match=r"log.parquet: column 'user_id' for impressions.user not found.*--map user=COLUMN"):
        _run(raw, tmp_path / "x", dask_address, impressions="log.parquet", map=("timestamp=when", "item=ad", "label=clk"))
    with pytest.raises(UserError, match="does not exist"):
        _run(tmp_path / "nowhere", tmp_path / "x", dask_address)


def test_bad_images_get_placeholders_and_are_listed(tmp_path, dask_address):
    raw = tmp_path / "raw"
    make_raw(raw, n=600, items=10)
    images = raw / "images"
    (images / "001.png").unlink()                                    # missing
    (images / "002.png").write_bytes(b"this is not an image")         # corrupt
    data = (images / "003.png").read_bytes()
    (images / "003.png").write_bytes(data[: len(data) // 2])          # truncated
    Image.new("RGB", (400, 400), (1, 2, 3)).save(images / "004.png")  # too many pixels for the limit below
    (tmp_path / "secret.png").write_bytes((images / "005.png").read_bytes())
    items = pd.read_parquet(raw / "items.parquet")
    items.loc[items.item_id == 5, "image"] = "../../secret.png"      # escapes the image folder
    items.to_parquet(raw / "items.parquet", index=False)

    out = tmp_path / "out"
    m = _run(raw, out, dask_address, max_image_pixels=100_000)
    index = pd.read_parquet(out / "images" / "index.parquet").set_index("key")
    assert index.loc["001.png", "status"] == "missing"
    assert index.loc["002.png", "status"] == "corrupt"
    assert index.loc["003.png", "status"] == "corrupt"
    assert index.loc["004.png", "status"] == "too_large"
    assert index.loc["../../secret.png", "status"] == "outside_folder"
    assert m["images"]["status_counts"]["ok"] == 5
    listed = pd.read_parquet(out / "quarantine" / "images.parquet")
    assert set(listed.key) == {"001.png", "002.png", "003.png", "004.png", "../../secret.png"}
    pixels = np.load(out / "images" / "pixels.npy", mmap_mode="r")
    bad_row = int(index.loc["002.png", "image_index"])
    assert (pixels[bad_row] == 128).all()
    assert m["counts"]["rows_out"] == 600  # a bad image never costs its impressions


def test_killed_run_leaves_nothing_half_written(tmp_path):
    raw = tmp_path / "raw"
    make_raw(raw, n=2000)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "vitrine", "pipeline", "--raw", str(raw), "--out", str(out), "--no-progress", "--no-track"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".out.tmp-*")) and time.monotonic() < deadline:
        assert proc.poll() is None, "the pipeline ended before it could be killed"
        time.sleep(0.05)
    assert list(tmp_path.glob(".out.tmp-*")), "no temporary output appeared"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    # The rerun sweeps the dead run's leftovers and completes.
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (out / "manifest.json").exists()
    assert not list(tmp_path.glob(".out.*"))


def test_pipeline_run_is_tracked_in_mlflow(raw_source, tmp_path, dask_address):
    from mlflow.tracking import MlflowClient

    from vitrine import tracking

    raw, df = raw_source
    m = _run(raw, tmp_path / "out", dask_address)
    client = MlflowClient(tracking.tracking_uri())
    run = client.get_run(m["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["max_behaviors"] == "50"
    assert run.data.metrics["rows_in"] == len(df)
    assert run.data.metrics["rows_quarantined"] == 0
    assert run.data.metrics["images_ok"] == 25
    assert run.data.metrics["behavior_image_occurrences"] > run.data.metrics["behavior_unique_images"] > 0
    assert run.data.metrics["events_per_s"] > 0
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"manifest.json", "contact_sheet.png"} <= artifacts
    assert run.info.experiment_id == client.get_experiment_by_name(tracking.PIPELINE_EXPERIMENT).experiment_id


def test_failed_run_is_marked_failed(tmp_path, dask_address):
    from mlflow.tracking import MlflowClient

    from vitrine import tracking

    raw = tmp_path / "raw"
    make_raw(raw, n=200, days=1)  # one day cannot hold train, valid and test
    with pytest.raises(UserError, match="too few for --valid-days"):
        _run(raw, tmp_path / "out", dask_address)
    client = MlflowClient(tracking.tracking_uri())
    exp = client.get_experiment_by_name(tracking.PIPELINE_EXPERIMENT)
    last = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)[0]
    assert last.info.status == "FAILED"
    assert not (tmp_path / "out").exists()
