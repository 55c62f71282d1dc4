"""The pipeline job: raw impressions, items, users and images in; a processed dataset out.

Stages (each a Dask computation; the driver only ever holds per-ID tables, never the impressions):
1. read + validate every row; bad rows go to the quarantine with their reason (written by the
   worker that found them);
2. split boundaries by time, and train-split ID counts;
3. vocabularies and the per-item / per-user lookup tables (small, built on the driver);
4. shuffle by user, then per partition: behaviour histories (no look-ahead), encoding, and one
   Parquet shard per split; at the same time, image blocks are decoded into the packed store;
5. manifest, quarantine listings, contact sheet, MLflow run; the output directory appears by rename.

See docs/DATA.md for what is written.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from image_service import store as image_store
from pipeline import images as image_decode
from pipeline.config import PipelineConfig
from pipeline.sequences import build_histories
from pipeline.source import SourceSpec, file_format, load_source
from pipeline.validate import validate
from pipeline.vocab import OOV, build_vocab, encode, frequency_summary, vocab_size
from vitrine.atomic import atomic_dir
from vitrine.errors import UserError
from vitrine.jobs import report_progress

FORMAT_VERSION = 1
DAY_MS = 86_400_000
HOUR_MS = 3_600_000
LOOKUP_ITEMS = "lookup/items.parquet"
LOOKUP_USERS = "lookup/users.parquet"
SPLITS = ("train", "valid", "test")
AMS_BATCH = 1024  # batch size at which the per-batch image dedup ratio is reported
AMS_SAMPLE_BATCHES = 8  # batches per partition it is measured on (a statistic, not worth a full pass)


# ---------------------------------------------------------------------------------------------
# Reading tables


def _read_small_table(spec: SourceSpec, table, wanted: list[str], extra: tuple[str, ...] = ()) -> pd.DataFrame:
    """Items / users tables: read on the driver (they are per-ID, not per-event). `wanted` are
    logical names mapped through the spec, `extra` physical columns kept under their own names."""
    files = spec.files(table)
    fmt = file_format(files, f"{table.path}")
    cols = list(dict.fromkeys([table.columns[w] for w in wanted if w in table.columns] + list(extra)))
    if fmt == "parquet":
        frame = pd.concat([pd.read_parquet(f, columns=cols) for f in files], ignore_index=True)
    else:
        frame = pd.concat([pd.read_csv(f, usecols=cols, dtype="string") for f in files], ignore_index=True)
    inverse = {v: k for k, v in table.columns.items() if k in wanted}
    return frame.rename(columns=inverse)


def _align_key(values: pd.Series, like: pd.Series) -> pd.Series:
    """Make a table's key column comparable to the impressions' (CSV text vs Parquet integers)."""
    if pd.api.types.is_string_dtype(like.dtype) or like.dtype == object:
        return values.astype("string").str.strip()
    if pd.api.types.is_integer_dtype(like.dtype):
        num = pd.to_numeric(values, errors="coerce")
        return num.astype("Int64")
    return values


# ---------------------------------------------------------------------------------------------
# Worker-side functions (plain arguments only: they run in Dask worker processes)


def _validate_partition(df: pd.DataFrame, columns: dict, unit: str, qdir: str, partition_info=None):
    i = partition_info["number"] if partition_info else 0
    good, bad = validate(df, columns, unit, 0)
    if len(bad):
        path = Path(qdir) / f"part-{i:05d}.parquet"
        bad.to_parquet(path.with_suffix(".tmp"), index=False)
        os.replace(path.with_suffix(".tmp"), path)
    return good


def _globalise_ids(df: pd.DataFrame, partition: int, offsets: np.ndarray) -> pd.DataFrame:
    """Without an impression id column, the id is the global row number."""
    return df.assign(impression_id=df["impression_id"].to_numpy() + offsets[partition])


def _image_keys(spec: SourceSpec) -> pd.Index:
    """Every distinct image path of the item table, sorted: store row i + 1 holds key i."""
    if spec.items is None or spec.images_dir is None or "image" not in spec.items.columns:
        return pd.Index([])
    keys = _image_column(_read_small_table(spec, spec.items, ["image"])["image"])
    return pd.Index(keys.dropna().unique()).sort_values()


def _image_column(values: pd.Series) -> pd.Series:
    """Image paths as text; a blank one is no image (as a null is)."""
    keys = values.astype("string")
    return keys.where(keys.str.strip() != "")


def _start_images(spec: SourceSpec, cfg: PipelineConfig, tmp: Path, client, image_keys: pd.Index) -> list:
    """Create the packed store and submit its decoding, in blocks, to the cluster."""
    if not len(image_keys):
        return []
    pixels_path = image_store.create_store(tmp, len(image_keys) + 1, cfg.image_size)
    limits = image_decode.ImageLimits(cfg.max_image_bytes, cfg.max_image_pixels, tuple(cfg.image_formats))
    block = 256
    keys_list = [str(k) for k in image_keys]
    tasks = [client.submit(image_decode.decode_block, str(spec.images_dir), keys_list[start:start + block],
                           start + 1, str(pixels_path), cfg.image_size, limits, pure=False)
             for start in range(0, len(keys_list), block)]
    return tasks


def _time_summary(df: pd.DataFrame) -> dict:
    """Rows and clicks, and rows per UTC day (where a split by days or by fraction falls)."""
    return {"rows": len(df), "positives": int(df["label"].sum()),
            "days": (df["timestamp"] // DAY_MS).rename("day").value_counts()}


def _timestamp_counts(df: pd.DataFrame, lo: int, hi: int) -> pd.Series:
    """Rows per timestamp in [lo, hi): the day(s) a split by fraction falls in, to the millisecond."""
    ts = df["timestamp"]
    return ts[(ts >= lo) & (ts < hi)].value_counts()


def _summarize_partition(df: pd.DataFrame, valid_start: int, test_start: int) -> dict:
    """What the driver needs for the vocabularies: counts per (id, in train), and rows per split."""
    ts = df["timestamp"]
    train = (ts < valid_start).rename("train")
    hour = ((ts // HOUR_MS) % 24).rename("hour")
    return {
        "split_rows": [int(train.sum()), int(((ts >= valid_start) & (ts < test_start)).sum()),
                       int((ts >= test_start).sum())],
        "item": df.groupby([df["item"], train]).size(),
        "user": df.groupby([df["user"], train]).size(),
        "hour": df.groupby([hour, train]).size(),
    }


def _sum_counts(parts: list[pd.Series]) -> pd.Series:
    return pd.concat(parts).groupby(level=[0, 1]).sum()


def _partition_clicks(df: pd.DataFrame) -> pd.DataFrame:
    return df.loc[df["label"] == 1, ["user", "timestamp", "impression_id", "item"]]


def _click_table(parts: list[pd.DataFrame], user_table: pd.DataFrame, item_table: pd.DataFrame) -> pd.DataFrame:
    c = pd.concat(parts, ignore_index=True)
    return pd.DataFrame({
        "upos": user_table.index.get_indexer(pd.Index(c["user"])),
        "timestamp": c["timestamp"].to_numpy(dtype=np.int64),
        "impression_id": c["impression_id"].to_numpy(dtype=np.int64),
        "ipos": item_table.index.get_indexer(pd.Index(c["item"])),
    })


def _quarantined_rows(qdir: Path, part: int) -> int:
    path = qdir / f"part-{part:05d}.parquet"
    return pq.ParquetFile(path).metadata.num_rows if path.exists() else 0


def _globalise_quarantine_rows(qdir: Path, offsets: np.ndarray) -> None:
    """Partition-local row numbers of quarantined rows -> row numbers in the whole source."""
    for path in sorted(qdir.glob("part-*.parquet")):
        part = int(path.stem.split("-")[1])
        bad = pd.read_parquet(path)
        bad["source_row"] = bad["source_row"].to_numpy() + offsets[part]
        tmp = path.with_suffix(".tmp")
        bad.to_parquet(tmp, index=False)
        os.replace(tmp, path)


def _ragged_take(offsets: np.ndarray, values: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lengths = (offsets[1:] - offsets[:-1])[rows]
    new_offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=new_offsets[1:])
    starts = offsets[:-1][rows]
    idx = np.repeat(starts - new_offsets[:-1], lengths) + np.arange(int(new_offsets[-1]), dtype=np.int64)
    return new_offsets, values[idx]


def _list_array(offsets: np.ndarray, values: np.ndarray) -> pa.Array:
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values, type=pa.int64()))


def _build_partition(
    df: pd.DataFrame,
    item_table: pd.DataFrame,
    user_table: pd.DataFrame,
    hour_vocab: pd.DataFrame,
    bounds: tuple[int, int],
    max_len: int,
    out_dir: str,
    clicks: pd.DataFrame | None = None,
    partition_info=None,
) -> pd.DataFrame:
    """One partition: histories, encoding, one shard per split. Returns a stats row.

    With `clicks=None` the partition holds whole users (after a shuffle by user), so its own rows
    hold every click its histories need. Otherwise `clicks` is every click of the log (user
    position, timestamp, impression id, item position), broadcast to each partition, and the
    partition's rows are only queries against it.
    """
    part = partition_info["number"] if partition_info else 0
    n = len(df)
    ts = df["timestamp"].to_numpy(dtype=np.int64)
    imp = df["impression_id"].to_numpy(dtype=np.int64)
    label = df["label"].to_numpy(dtype=np.int8)
    ipos = item_table.index.get_indexer(pd.Index(df["item"]))
    upos = user_table.index.get_indexer(pd.Index(df["user"]))
    if n and ((ipos < 0).any() or (upos < 0).any()):
        raise RuntimeError("internal: an impression's item or user is missing from the lookup tables")

    if clicks is None:
        offsets, hist_rows = build_histories(upos, ts, imp, label == 1, max_len)
        hist_ipos = ipos[hist_rows]
    else:
        mine = clicks[np.isin(clicks["upos"].to_numpy(), upos)]
        m = len(mine)
        offsets, hist_rows = build_histories(
            np.concatenate([upos, mine["upos"].to_numpy()]),
            np.concatenate([ts, mine["timestamp"].to_numpy()]),
            np.concatenate([imp, mine["impression_id"].to_numpy()]),
            np.concatenate([np.zeros(n, bool), np.ones(m, bool)]),  # queries never count as clicks
            max_len,
        )
        offsets = offsets[: n + 1]
        hist_ipos = mine["ipos"].to_numpy()[hist_rows[: offsets[-1]] - n]

    columns: dict[str, np.ndarray] = {
        "impression_id": imp,
        "timestamp": ts,
        "label": label,
        "group_id": user_table["group_id"].to_numpy()[upos],
        "cold_item": item_table["cold"].to_numpy()[ipos],
    }
    for col in user_table.columns:
        if col != "group_id":
            columns[col] = user_table[col].to_numpy()[upos]
    for col in item_table.columns:
        if col not in ("cold", "image_row"):
            columns[col] = item_table[col].to_numpy()[ipos]
    hours = (ts // HOUR_MS) % 24
    columns["hour"] = encode(hours, hour_vocab)
    has_images = "image_row" in item_table.columns
    if has_images:
        columns["ad_image"] = item_table["image_row"].to_numpy()[ipos]
    seq_sources = {"hist_item_id": "item_id", "hist_category_id": "category_id", "hist_image_id": "image_id"}
    hist_values = {h: item_table[src].to_numpy()[hist_ipos] for h, src in seq_sources.items() if src in item_table.columns}
    if has_images:
        hist_values["hist_image"] = item_table["image_row"].to_numpy()[hist_ipos]

    split = np.where(ts < bounds[0], 0, np.where(ts < bounds[1], 1, 2))
    order = np.lexsort((imp, ts))
    stats: dict = {"partition": part}
    if has_images:
        stats.update(batch_image_occurrences=0, batch_image_unique=0, hist_image_occurrences=int(len(hist_ipos)),
                     hist_images=_distinct(hist_values["hist_image"]))
    for s, name in enumerate(SPLITS):
        rows = order[split[order] == s]
        stats[f"{name}_rows"] = len(rows)
        stats[f"{name}_positives"] = int(label[rows].sum())
        stats[f"{name}_cold"] = int(columns["cold_item"][rows].sum())
        stats[f"{name}_tmin"] = int(ts[rows].min()) if len(rows) else -1
        stats[f"{name}_tmax"] = int(ts[rows].max()) if len(rows) else -1
        if not len(rows):
            continue
        arrays = {k: pa.array(v[rows]) for k, v in columns.items()}
        sub_offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        sub_values = {}
        for hname, values in hist_values.items():
            sub_offsets, sub_values[hname] = _ragged_take(offsets, values, rows)
            arrays[hname] = _list_array(sub_offsets, sub_values[hname])
        arrays["hist_len"] = pa.array((sub_offsets[1:] - sub_offsets[:-1]).astype(np.int32))
        table = pa.table(arrays)
        path = Path(out_dir) / name / f"part-{part:05d}.parquet"
        tmp = path.with_suffix(".tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, path)
        if name == "train" and has_images:
            occ, uniq = _batch_dedup(columns["ad_image"][rows], sub_offsets, sub_values["hist_image"])
            stats["batch_image_occurrences"] = occ
            stats["batch_image_unique"] = uniq
    return pd.DataFrame([stats])


def _distinct(ids: np.ndarray) -> np.ndarray:
    """Distinct non-negative ints, by a presence mask: linear, unlike np.unique's sort."""
    if not len(ids):
        return ids
    seen = np.zeros(int(ids.max()) + 1, dtype=bool)
    seen[ids] = True
    return np.flatnonzero(seen)


def _batch_dedup(ad_image: np.ndarray, offsets: np.ndarray, hist_image: np.ndarray) -> tuple[int, int]:
    """Image occurrences vs unique images per batch of AMS_BATCH rows (what AMS's merge saves),
    over AMS_SAMPLE_BATCHES batches spread evenly over the partition's (time-ordered) train rows."""
    occ = uniq = 0
    n_batches = -(-len(ad_image) // AMS_BATCH)
    for b in np.unique(np.linspace(0, n_batches - 1, min(n_batches, AMS_SAMPLE_BATCHES)).astype(np.int64)):
        start, stop = int(b) * AMS_BATCH, min((int(b) + 1) * AMS_BATCH, len(ad_image))
        ids = np.concatenate([ad_image[start:stop], hist_image[offsets[start]:offsets[stop]]])
        occ += len(ids)
        uniq += len(np.unique(ids))
    return occ, uniq


# ---------------------------------------------------------------------------------------------
# The split (docs/DATA.md, "Splits")

TINY_SPLIT_ROWS = 1000  # a valid or test split below this many rows, or below TINY_SPLIT_SHARE of the
TINY_SPLIT_SHARE = 0.01  # rows, gets a warning: its AUC is too noisy to compare models by


def rank_timestamp(day_rows: pd.Series, rank: int, day_timestamps) -> int:
    """The timestamp of the row at 0-based `rank` in time order. `day_rows` is rows per UTC day
    (sorted); `day_timestamps(lo, hi)` returns rows per timestamp in [lo, hi) (sorted or not)."""
    cum = day_rows.cumsum().to_numpy()
    i = int(np.searchsorted(cum, rank, side="right"))
    day = int(day_rows.index[i])
    before = int(cum[i - 1]) if i else 0
    per_ts = day_timestamps(day * DAY_MS, (day + 1) * DAY_MS).sort_index()
    j = int(np.searchsorted(per_ts.cumsum().to_numpy(), rank - before, side="right"))
    return int(per_ts.index[j])


def split_bounds(cfg: PipelineConfig, day_rows: pd.Series, client=None, part_futures=None,
                 day_timestamps=None) -> tuple[int, int]:
    """(valid_start, test_start) in unix ms: train is before valid_start, valid before test_start, test
    from it on. Rows sharing a timestamp are never split apart. `day_rows` is rows per UTC day."""
    kind, valid, test = cfg.split_rule()
    if kind == "days":
        last_day = int(day_rows.index.max())
        test_start = (last_day + 1) * DAY_MS - int(round(test * DAY_MS))
        valid_start = test_start - int(round(valid * DAY_MS))
    elif kind == "time":
        valid_start, test_start = int(valid), int(test)
    else:
        if day_timestamps is None:
            def day_timestamps(lo: int, hi: int) -> pd.Series:
                parts = client.gather(client.map(_timestamp_counts, part_futures, lo=lo, hi=hi))
                return pd.concat(parts).groupby(level=0).sum()
        n = int(day_rows.sum())
        k_test = max(1, int(round(n * test)))
        k_valid = int(round(n * valid)) if valid else 0
        if k_test + k_valid >= n:
            raise UserError(f"--valid-frac {valid} and --test-frac {test} leave no rows of the {n} to train on")
        test_start = rank_timestamp(day_rows, n - k_test, day_timestamps)
        valid_start = rank_timestamp(day_rows, n - k_test - k_valid, day_timestamps) if k_valid else test_start
    return valid_start, test_start


def _split_text(cfg: PipelineConfig) -> str:
    kind, valid, test = cfg.split_rule()
    if kind == "days":
        return f"days: test = the last {test:g} UTC days of the log, valid = the {valid:g} days before"
    if kind == "frac":
        return f"share of rows in time order: test = the latest {test:g}, valid = the {valid:g} before"
    return f"time: valid from {_iso(int(valid))}, test from {_iso(int(test))}"


def split_warnings(cfg: PipelineConfig, split_rows: dict[str, int], day_rows: pd.Series) -> list[str]:
    """A line per valid / test split too small to compare models by (and the error for no train rows)."""
    n = sum(split_rows.values())
    kind, valid, test = cfg.split_rule()
    if split_rows["train"] == 0:
        what = {"days": f"--valid-days {valid:g} and --test-days {test:g}",
                "time": f"--valid-from {cfg.valid_from or cfg.test_from} and --test-from {cfg.test_from}",
                "frac": f"--valid-frac {valid:g} and --test-frac {test:g}"}[kind]
        first_day, last_day = int(day_rows.index.min()), int(day_rows.index.max())
        raise UserError(f"the log spans {last_day - first_day + 1} calendar days ({_iso(first_day * DAY_MS)[:10]} to "
                        f"{_iso(last_day * DAY_MS)[:10]}, UTC), too few for {what} with training rows before them "
                        f"({split_rows['valid']} valid and {split_rows['test']} test rows of {n}); lower them, or "
                        "split by share of the rows (--valid-frac 0.1 --test-frac 0.1)")
    out = []
    for name in ("valid", "test"):
        k = split_rows[name]
        if name == "valid" and k == 0:
            continue  # asked for: no valid split (--valid-days 0, --valid-frac 0 or no --valid-from)
        if k < TINY_SPLIT_ROWS or k < TINY_SPLIT_SHARE * n:
            hint = {"days": "--valid-days/--test-days", "time": "--valid-from/--test-from",
                    "frac": "--valid-frac/--test-frac"}[kind]
            out.append(f"the {name} split has only {k} rows ({100 * k / max(n, 1):.2f}% of {n}): its metrics will "
                       f"be noisy; widen it with {hint}, or split by share of the rows (--valid-frac 0.1 "
                       "--test-frac 0.1)")
    return out


# ---------------------------------------------------------------------------------------------
# Driver


class _Stages:
    """Prints the stage being run and records how long each took (logged with the run)."""

    def __init__(self, progress: bool):
        self.progress = progress
        self.seconds: dict[str, float] = {}
        self._name: str | None = None
        self._t = time.perf_counter()

    def __call__(self, n: int, name: str, text: str) -> None:
        self.stop()
        self._name, self._t = name, time.perf_counter()
        report_progress(n - 1, 5, stage=name, text=text)
        if self.progress:
            print(f"[{n}/5] {text}", flush=True)

    def stop(self) -> None:
        if self._name is not None:
            self.seconds[self._name] = round(time.perf_counter() - self._t, 3)
            self._name = None


def _wait(client, futures, progress: bool):
    if progress:
        from distributed import progress as dask_progress

        dask_progress(futures)
        print(flush=True)
    return client.gather(futures)


def run_pipeline(cfg: PipelineConfig) -> dict:
    """Run the job; returns the manifest. Raises UserError for anything the user can fix."""
    cfg.check()
    t0 = time.perf_counter()
    spec = load_source(Path(cfg.raw), Path(cfg.source) if cfg.source else None, cfg.map,
                       cfg.impressions, cfg.items, cfg.users, cfg.images)
    out = Path(cfg.out).resolve()
    if out.exists() and not cfg.overwrite:
        raise UserError(f"output {out} already exists; pass --overwrite to replace it")
    from pipeline.cluster import dask_client
    from pipeline.tracking import pipeline_run, warm_up

    # MLflow takes a second or two to import and open its store; do that while the cluster's
    # worker processes start, instead of one after the other.
    warming = threading.Thread(target=warm_up, name="mlflow-warm-up", daemon=True)
    if cfg.track:
        warming.start()
    t_cluster = time.perf_counter()
    with dask_client(cfg.scheduler, cfg.workers, cfg.threads_per_worker) as client:
        cluster_s = time.perf_counter() - t_cluster
        if cfg.track:
            warming.join()
        with pipeline_run(cfg, out) as run, atomic_dir(out, overwrite=cfg.overwrite, what="output") as tmp:
            manifest = _run(cfg, spec, out, tmp, client, run)
            manifest["stage_seconds"] = {"cluster_start": round(cluster_s, 3), **manifest["stage_seconds"]}
            manifest["elapsed_s"] = round(time.perf_counter() - t0, 3)
            manifest["events_per_s"] = round(manifest["counts"]["rows_in"] / max(manifest["elapsed_s"], 1e-9), 1)
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
            if run is not None:
                run.finish(manifest, tmp)
    report_progress(5, 5, stage="done", text=f"dataset written to {out}")
    return manifest


def _run(cfg: PipelineConfig, spec: SourceSpec, out: Path, tmp: Path, client, run) -> dict:
    import dask
    import dask.dataframe as dd

    progress = cfg.progress
    stage = _Stages(progress)
    for d in ("quarantine/impressions", "vocab", "images", *SPLITS):
        (tmp / d).mkdir(parents=True, exist_ok=True)

    # Image keys come from the item table alone; decoding is submitted with the shards (stage 4):
    # submitted earlier, it delays the impressions' critical path more than it overlaps (measured).
    image_keys = _image_keys(spec)
    n_images = len(image_keys)

    # 1. read + validate ------------------------------------------------------------------
    stage(1, "validate", "reading and validating impressions")
    imp_files = spec.files(spec.impressions)
    fmt = file_format(imp_files, str(spec.impressions.path))
    cols = list(dict.fromkeys(spec.impressions.columns.values()))
    if fmt == "parquet":
        raw = dd.read_parquet([str(f) for f in imp_files], columns=cols)
    else:
        raw = dd.read_csv([str(f) for f in imp_files], usecols=cols, dtype="string", blocksize="64MB")
    qdir = tmp / "quarantine" / "impressions"
    meta_good, _ = validate(raw._meta, spec.impressions.columns, spec.timestamp_unit, 0)
    # Row numbers are partition-local here; they are made global below, once partition sizes are
    # known, so the source is read only once.
    good = raw.map_partitions(
        _validate_partition, dict(spec.impressions.columns), spec.timestamp_unit, str(qdir), meta=meta_good,
    )
    good = client.persist(good)
    if progress:
        from distributed import progress as dask_progress

        dask_progress(good)
        print(flush=True)

    # 2. time split and ID counts, over the persisted rows ----------------------------------
    stage(2, "count", "splitting by time and counting IDs")
    # Per-partition summaries reduced on the driver: far cheaper than dask.dataframe groupbys for
    # these small results (measured: 0.2 s against 1.2 s at 1M rows). First rows per day (where the
    # split falls), then, once the split is known, the train-split counts per ID.
    part_futures = client.compute(good.to_delayed())
    summaries = client.gather(client.map(_time_summary, part_futures))
    good_lens = [int(s["rows"]) for s in summaries]
    n_pos = sum(s["positives"] for s in summaries)
    bad_lens = [_quarantined_rows(qdir, i) for i in range(len(good_lens))]
    offsets = np.concatenate([[0], np.cumsum(np.add(good_lens, bad_lens))[:-1]]).astype(np.int64)
    rows_in = int(sum(good_lens) + sum(bad_lens))
    rows_ok = int(sum(good_lens))
    if rows_in == 0:
        raise UserError(f"{spec.impressions.path}: the impression log is empty")
    _globalise_quarantine_rows(qdir, offsets)
    if "impression_id" not in spec.impressions.columns:
        part_futures = client.map(_globalise_ids, part_futures, range(len(part_futures)), offsets=offsets)
    if rows_ok == 0:
        raise UserError(f"every row of {spec.impressions.path} was quarantined; see {out}/quarantine after fixing the columns")
    day_rows = pd.concat([s["days"] for s in summaries]).groupby(level=0).sum().sort_index()
    valid_start, test_start = split_bounds(cfg, day_rows, client, part_futures)
    counts = client.gather(client.map(_summarize_partition, part_futures, valid_start=valid_start, test_start=test_start))
    split_rows = {name: int(sum(c["split_rows"][i] for c in counts)) for i, name in enumerate(SPLITS)}
    warnings = split_warnings(cfg, split_rows, day_rows)
    if not n_images and spec.images_dir is not None and spec.items is not None and "image" in spec.items.columns:
        warnings.append(f"no item of {spec.items.path} names an image (the column "
                        f"{spec.items.columns['image']!r} is empty): the dataset has no images, train it with "
                        "--features ids")
    for w in warnings:
        print(f"vitrine pipeline: warning: {w}", file=sys.stderr, flush=True)
    item_s, user_s, hour_s = (_sum_counts([c[k] for c in counts]) for k in ("item", "user", "hour"))

    def train_counts(by_split: pd.Series) -> pd.Series:
        return by_split[by_split.index.get_level_values("train")].groupby(level=0).sum()

    item_all = item_s.groupby(level=0).sum()
    item_train = train_counts(item_s)
    user_train = train_counts(user_s)
    hour_train = train_counts(hour_s)
    user_keys = pd.Index(user_s.index.get_level_values(0).unique())

    # 3. vocabularies and lookup tables ---------------------------------------------------
    stage(3, "vocab", "building vocabularies")
    vocabs: dict[str, pd.DataFrame] = {}
    item_keys = pd.Index(item_all.index)
    items = None
    if spec.items is not None:
        items = _read_small_table(spec, spec.items, ["item", "category", "shop", "image"], spec.item_attributes)
        items["item"] = _align_key(items["item"], good._meta["item"])
        dup = int(items["item"].duplicated().sum())
        items = items.dropna(subset=["item"]).drop_duplicates("item", keep="first")
        item_keys = item_keys.union(pd.Index(items["item"].dropna())) if len(items) else item_keys
    else:
        dup = 0
    item_table = pd.DataFrame(index=item_keys)
    vocabs["item_id"] = build_vocab(item_train, cfg.min_count)
    item_table["item_id"] = encode(item_table.index, vocabs["item_id"])
    train_counts = item_train.reindex(item_table.index, fill_value=0)
    item_table["cold"] = train_counts.to_numpy() == 0
    if items is not None:
        attrs = items.set_index("item").reindex(item_table.index)
        for logical in ("category", "shop"):
            if logical in attrs.columns:
                name = f"{logical}_id"
                counts = train_counts.groupby(attrs[logical].to_numpy()).sum()
                vocabs[name] = build_vocab(counts[counts > 0], cfg.min_count)
                item_table[name] = encode(attrs[logical], vocabs[name])
        for name in spec.item_attributes:  # extra categorical item columns, each its own vocabulary
            counts = train_counts.groupby(attrs[name].to_numpy()).sum()
            vocabs[name] = build_vocab(counts[counts > 0], cfg.min_count)
            item_table[name] = encode(attrs[name], vocabs[name])
        if "image" in attrs.columns and spec.images_dir is not None and n_images:
            keys = _image_column(attrs["image"])
            counts = train_counts.groupby(keys.to_numpy()).sum()
            vocabs["image_id"] = build_vocab(counts[counts > 0], cfg.min_count)
            item_table["image_id"] = encode(keys, vocabs["image_id"])
            row = image_keys.get_indexer(pd.Index(keys))
            item_table["image_row"] = np.where(row >= 0, row + 1, 0).astype(np.int64)

    user_table = pd.DataFrame(index=user_keys)
    vocabs["user_id"] = build_vocab(user_train, cfg.min_count)
    user_table["user_id"] = encode(user_table.index, vocabs["user_id"])
    user_train_counts = user_train.reindex(user_table.index, fill_value=0)
    if spec.users is not None and spec.user_profile:
        users = _read_small_table(spec, spec.users, ["user"], spec.user_profile)
        users["user"] = _align_key(users["user"], good._meta["user"])
        users = users.dropna(subset=["user"]).drop_duplicates("user").set_index("user").reindex(user_table.index)
        for prof in spec.user_profile:
            counts = user_train_counts.groupby(users[prof].to_numpy()).sum()
            vocabs[prof] = build_vocab(counts[counts > 0], cfg.min_count)
            user_table[prof] = encode(users[prof], vocabs[prof])
    user_table["group_id"] = pd.util.hash_array(user_table.index.to_numpy()).view(np.int64)
    vocabs["hour"] = build_vocab(hour_train, 1)

    for name, frame in vocabs.items():
        frame.to_parquet(tmp / "vocab" / f"{name}.parquet", index=False)
    # Raw ID -> encoded attributes of every item and user: a scoring service maps the raw IDs of a
    # request (and its behaviour items) with these, as the shards were built (docs/DATA.md).
    (tmp / "lookup").mkdir(exist_ok=True)
    item_table.rename_axis("id").reset_index().to_parquet(tmp / LOOKUP_ITEMS, index=False)
    user_table.drop(columns="group_id").rename_axis("id").reset_index().to_parquet(tmp / LOOKUP_USERS, index=False)

    # 4. histories + shards, and the image store, in one computation ------------------------
    stage(4, "shards_and_images", f"building behaviour sequences and shards; finishing {n_images} images")
    # Partitioning depends on the data only, never on the cluster, so any cluster writes the same shards.
    # Histories need each user's clicks next to the user's impressions. When the clicks fit in a
    # worker's memory they are broadcast to every partition (a map-side join: no shuffle of the
    # impressions at all); otherwise the impressions are shuffled by user. Either way the rows and
    # their histories are the same; only the split of rows into shards differs.
    join = cfg.history_join
    if join == "auto":
        join = "broadcast" if n_pos <= cfg.broadcast_clicks_max else "shuffle"
    item_f, user_f, hour_f = client.scatter([item_table, user_table, vocabs["hour"]], broadcast=True)
    bounds = (valid_start, test_start)
    if join == "broadcast":
        # Every click of the log, gathered on one worker and shipped worker-to-worker to each task;
        # the driver never holds it.
        click_parts = client.map(_partition_clicks, part_futures)
        clicks_f = client.submit(_click_table, click_parts, user_f, item_f)
        build = [client.submit(_build_partition, pf, item_f, user_f, hour_f, bounds, cfg.max_behaviors, str(tmp),
                               clicks_f, partition_info={"number": i}, pure=False)
                 for i, pf in enumerate(part_futures)]
    else:
        # Partitioning depends on the data only, never on the cluster, so any cluster writes the same shards.
        frames = dd.from_delayed(part_futures, meta=good._meta, verify_meta=False)
        parts = frames.shuffle(on="user", npartitions=max(2, int(np.ceil(rows_ok / cfg.partition_rows))))
        build = [client.compute(dask.delayed(_build_partition)(p, item_f, user_f, hour_f, bounds, cfg.max_behaviors,
                                                               str(tmp), None, partition_info={"number": i}))
                 for i, p in enumerate(parts.to_delayed())]
    image_tasks = _start_images(spec, cfg, tmp, client, image_keys)
    results = _wait(client, [*build, *image_tasks], progress)
    stats_df = pd.concat(results[:len(build)], ignore_index=True)
    image_frames = results[len(build):]
    del good, part_futures, build, image_tasks  # release the rows held on the workers

    # 5. manifest and listings -------------------------------------------------------------
    stage(5, "manifest", "writing manifest")
    qparts = sorted(qdir.glob("part-*.parquet"))
    reasons = (pd.concat([pd.read_parquet(p, columns=["reason"]) for p in qparts])["reason"].value_counts()
               if qparts else pd.Series(dtype="int64"))
    image_info = None
    if n_images:
        index = pd.concat(
            [pd.DataFrame({"image_index": [0], "key": [""], "source": [""], "status": ["placeholder"],
                           "reason": ["shown where an item has no image"]}), *image_frames],
            ignore_index=True,
        )
        index.to_parquet(tmp / image_store.INDEX, index=False)
        bad_images = index[(index.status != "ok") & (index.image_index > 0)]
        bad_images.to_parquet(tmp / "quarantine" / "images.parquet", index=False)
        image_info = {
            "path": image_store.PIXELS, "index": image_store.INDEX,
            "shape": [n_images + 1, cfg.image_size, cfg.image_size, 3], "dtype": "uint8",
            "status_counts": {str(k): int(v) for k, v in index.status.value_counts().items()},
        }
    oracle = _copy_oracle(spec, tmp)

    splits = {}
    for name in SPLITS:
        shards = [
            {"file": f"{name}/part-{int(r.partition):05d}.parquet", "rows": int(getattr(r, f'{name}_rows'))}
            for r in stats_df.sort_values("partition").itertuples() if getattr(r, f"{name}_rows") > 0
        ]
        tmins = stats_df[f"{name}_tmin"][stats_df[f"{name}_tmin"] >= 0]
        tmaxs = stats_df[f"{name}_tmax"][stats_df[f"{name}_tmax"] >= 0]
        splits[name] = {
            "rows": int(stats_df[f"{name}_rows"].sum()),
            "positives": int(stats_df[f"{name}_positives"].sum()),
            "cold_item_rows": int(stats_df[f"{name}_cold"].sum()),
            "start": _iso(int(tmins.min())) if len(tmins) else None,
            "end": _iso(int(tmaxs.max())) if len(tmaxs) else None,
            "shards": shards,
        }
    images_summary = {}
    if n_images:
        occ = int(stats_df["hist_image_occurrences"].sum())
        unique = int(len(_distinct(np.concatenate(list(stats_df["hist_images"])))))
        b_occ = int(stats_df["batch_image_occurrences"].sum())
        b_uniq = int(stats_df["batch_image_unique"].sum())
        images_summary = {
            "behavior_image_occurrences": occ,
            "behavior_unique_images": unique,
            "batch_size": AMS_BATCH,
            "batch_image_occurrences": b_occ,
            "batch_unique_images": b_uniq,
            "batch_dedup_ratio": round(b_occ / b_uniq, 3) if b_uniq else None,
        }

    fields = _fields(vocabs, spec, cfg, n_images > 0)
    quarantined = int(reasons.sum()) if len(reasons) else 0
    manifest = {
        "format_version": FORMAT_VERSION,
        "name": out.name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": spec.describe(),
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        "fields": fields,
        "label": "label",
        "splits": splits,
        "split_bounds": {"rule": _split_text(cfg), "valid_start": _iso(valid_start), "test_start": _iso(test_start)},
        "warnings": warnings,
        "images": image_info,
        "behavior_images": images_summary,
        "frequency": {name: frequency_summary(v) for name, v in vocabs.items()},
        "counts": {
            "rows_in": rows_in,
            "rows_out": int(sum(s["rows"] for s in splits.values())),
            "quarantined": quarantined,
            "quarantine_reasons": {str(k): int(v) for k, v in reasons.items()},
            "items_in_log_without_item_row": int(len(item_keys.difference(pd.Index(items["item"])))) if items is not None else None,
            "duplicate_item_rows": dup,
            "users": int(len(user_table)),
            "items": int(len(item_table)),
            "cold_items": int(item_table["cold"].sum()),
        },
        "oracle": oracle,
        "lookup": {"items": LOOKUP_ITEMS, "users": LOOKUP_USERS},
        "mlflow_run_id": run.run_id if run is not None else None,
    }
    stage.stop()
    manifest["stage_seconds"] = stage.seconds
    if manifest["counts"]["rows_out"] + quarantined != rows_in:
        raise RuntimeError(f"internal: {rows_in} rows in but {manifest['counts']['rows_out']} out + {quarantined} quarantined")
    return manifest


def _copy_oracle(spec: SourceSpec, tmp: Path) -> dict:
    """Ground truth (synthetic worlds only) goes beside the shards, never into them."""
    if spec.truth is None:
        return {"available": False}
    files = spec.files(spec.truth)
    cols = spec.truth.columns
    (tmp / "oracle").mkdir(exist_ok=True)
    writer = None
    rows = 0
    try:
        for f in files:
            pf = pq.ParquetFile(f) if f.suffix == ".parquet" else None
            batches = (pf.iter_batches(columns=[cols["impression_id"], cols["p_click"]]) if pf is not None else
                       [pa.RecordBatch.from_pandas(pd.read_csv(f, usecols=[cols["impression_id"], cols["p_click"]]), preserve_index=False)])
            for b in batches:
                t = pa.table({"impression_id": b.column(0).cast(pa.int64()), "p_click": b.column(1).cast(pa.float64())})
                if writer is None:
                    writer = pq.ParquetWriter(tmp / "oracle" / "p_click.parquet", t.schema)
                writer.write_table(t)
                rows += len(t)
    finally:
        if writer is not None:
            writer.close()
    return {"available": True, "path": "oracle/p_click.parquet", "rows": rows}


def _fields(vocabs: dict[str, pd.DataFrame], spec: SourceSpec, cfg: PipelineConfig, images: bool) -> list[dict]:
    def cat(name: str, group: str, vocab: str | None = None) -> dict:
        v = vocab or name
        return {"name": name, "kind": "categorical", "vocab": v, "vocab_size": vocab_size(vocabs[v]), "group": group}

    def seq(name: str, vocab: str) -> dict:
        return {"name": name, "kind": "sequence", "vocab": vocab, "vocab_size": vocab_size(vocabs[vocab]),
                "max_len": cfg.max_behaviors, "group": "behavior"}

    fields = [cat("user_id", "user")]
    fields += [cat(p, "user") for p in spec.user_profile if p in vocabs]
    fields += [cat(n, "ad") for n in ("item_id", "category_id", "shop_id", "image_id") if n in vocabs]
    fields += [cat(a, "ad") for a in spec.item_attributes if a in vocabs]
    fields.append(cat("hour", "context"))
    fields += [seq(f"hist_{n}", n) for n in ("item_id", "category_id", "image_id") if n in vocabs]
    if images:
        fields.append({"name": "ad_image", "kind": "image", "group": "ad"})
        fields.append({"name": "hist_image", "kind": "image_sequence", "max_len": cfg.max_behaviors, "group": "behavior"})
    return fields


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat(timespec="seconds")
