"""The dataset checks and the streaming batch loader, on a dataset built by the real pipeline."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import make_raw
from pipeline.build import PipelineConfig, run_pipeline
from trainer.data import BatchLoader, LoaderConfig, pad_lists
from trainer.dataset import open_dataset
from vitrine.errors import UserError


@pytest.fixture(scope="module")
def ds_dir(tmp_path_factory, dask_address) -> Path:
    """One small dataset for the module: several shards per split, histories longer than 5, an oracle."""
    base = tmp_path_factory.mktemp("loader")
    raw = base / "raw"
    df = make_raw(raw, n=3000, users=40, items=25)
    (raw / "truth").mkdir()
    pd.DataFrame({"impression_id": df.impression_id, "p_click": np.linspace(0.01, 0.99, len(df))}).to_parquet(
        raw / "truth" / "impressions.parquet", index=False)
    with open(raw / "source.toml", "a") as f:
        f.write('\n[truth]\npath = "truth/impressions.parquet"\n')
    out = base / "ds"
    run_pipeline(PipelineConfig(raw=str(raw), out=str(out), scheduler=dask_address, progress=False,
                                track=False, partition_rows=500, min_count=1, history_join="shuffle"))
    return out


@pytest.fixture(scope="module")
def ds(ds_dir):
    return open_dataset(ds_dir)


def _split_frame(ds, split: str) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(p) for p in ds.shards(split)], ignore_index=True)


def _batches(loader: BatchLoader, epoch: int = 0, skip: int = 0) -> list[dict[str, torch.Tensor]]:
    return list(loader.epoch(epoch, skip_batches=skip))


def _ids(batches) -> np.ndarray:
    return np.concatenate([b["impression_id"].numpy() for b in batches]) if batches else np.zeros(0, np.int64)


def _same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b)
    )


# ---------------------------------------------------------------------------------------------
# Dataset


def test_dataset_api(ds, ds_dir):
    m = json.loads((ds_dir / "manifest.json").read_text())
    assert ds.dir == ds_dir.resolve() and ds.manifest == m
    for split in ("train", "valid", "test"):
        assert ds.rows(split) == m["splits"][split]["rows"] == len(_split_frame(ds, split))
        assert [p.name for p in ds.shards(split)] == [Path(s["file"]).name for s in m["splits"][split]["shards"]]
    assert len(ds.shards("train")) >= 3  # the tests below need several shards
    oracle = ds.oracle()
    assert list(oracle.columns) == ["impression_id", "p_click"] and len(oracle) == 3000
    with pytest.raises(UserError, match="no split"):
        ds.shards("holdout")


@pytest.fixture
def copy(ds_dir, tmp_path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(ds_dir, dst)
    return dst


def _edit_manifest(path: Path, fn) -> None:
    m = json.loads((path / "manifest.json").read_text())
    fn(m)
    (path / "manifest.json").write_text(json.dumps(m))


def _first_shard(path: Path) -> Path:
    m = json.loads((path / "manifest.json").read_text())
    return path / m["splits"]["train"]["shards"][0]["file"]


def _add_a_row(m: dict) -> None:
    """A shard's row count off by one, the split's total kept consistent (only the footer disagrees)."""
    m["splits"]["train"]["shards"][0]["rows"] += 1
    m["splits"]["train"]["rows"] += 1


def _drop_column(path: Path, column: str) -> None:
    shard = _first_shard(path)
    pq.write_table(pq.read_table(shard).drop_columns([column]), shard)


def _retype_column(path: Path, column: str) -> None:
    shard = _first_shard(path)
    t = pq.read_table(shard)
    i = t.schema.get_field_index(column)
    pq.write_table(t.set_column(i, column, t.column(column).cast(pa.string())), shard)


BREAKAGES = {
    "folder missing": lambda p: shutil.rmtree(p),
    "manifest missing": lambda p: (p / "manifest.json").unlink(),
    "manifest not json": lambda p: (p / "manifest.json").write_text("{not json"),
    "manifest not an object": lambda p: (p / "manifest.json").write_text("[1, 2]"),
    "format version": lambda p: _edit_manifest(p, lambda m: m.update(format_version=2)),
    "no format version": lambda p: _edit_manifest(p, lambda m: m.pop("format_version")),
    "shard deleted": lambda p: _first_shard(p).unlink(),
    "row count": lambda p: _edit_manifest(p, _add_a_row),
    "split total": lambda p: _edit_manifest(p, lambda m: m["splits"]["train"].update(rows=1)),
    "stray parquet": lambda p: shutil.copy(_first_shard(p), p / "valid" / "part-99999.parquet"),
    "column dropped (sequence)": lambda p: _drop_column(p, "hist_item_id"),
    "column dropped (categorical)": lambda p: _drop_column(p, "user_id"),
    "column dropped (label)": lambda p: _drop_column(p, "label"),
    "column wrong type": lambda p: _retype_column(p, "item_id"),
    "shard not parquet": lambda p: _first_shard(p).write_bytes(b"garbage"),
    "image store missing": lambda p: (p / "images" / "pixels.npy").unlink(),
    "image store wrong shape": lambda p: np.save(p / "images" / "pixels.npy", np.zeros((2, 4, 4, 3), np.uint8)),
    "oracle missing": lambda p: shutil.rmtree(p / "oracle"),
    "shard outside dataset": lambda p: _edit_manifest(p, lambda m: m["splits"]["train"]["shards"][0].update(
        file="../elsewhere.parquet")),
    "fields malformed": lambda p: _edit_manifest(p, lambda m: m["fields"].append({"name": "x", "kind": "blob"})),
}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_bad_dataset_is_refused_naming_the_path(copy, breakage):
    open_dataset(copy)  # intact before the edit
    BREAKAGES[breakage](copy)
    with pytest.raises(UserError) as e:
        open_dataset(copy)
    assert str(copy) in str(e.value), str(e.value)


def test_not_a_dataset_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="manifest.json") as e:
        open_dataset(tmp_path / "empty")
    assert str(tmp_path / "empty") in str(e.value)
    with pytest.raises(UserError, match="does not exist"):
        open_dataset(tmp_path / "nowhere")


def test_shard_changed_after_open_is_reported(copy):
    ds = open_dataset(copy)
    shard = _first_shard(copy)
    t = pq.read_table(shard)
    pq.write_table(t.slice(0, len(t) - 1), shard)
    loader = BatchLoader(ds, "train", LoaderConfig(batch_size=64), seed=0, shuffle=False)
    with pytest.raises(UserError, match=str(shard)):
        _batches(loader)


# ---------------------------------------------------------------------------------------------
# Loader: coverage, order, determinism, resume


CFG = LoaderConfig(batch_size=64, shuffle_buffer=200)  # buffer smaller than a split: streaming is exercised


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("split", ["train", "test"])
def test_every_row_exactly_once_per_epoch(ds, shuffle, split):
    frame = _split_frame(ds, split)
    loader = BatchLoader(ds, split, CFG, seed=3, shuffle=shuffle)
    for epoch in (0, 1):
        batches = _batches(loader, epoch)
        assert len(batches) == len(loader) == -(-len(frame) // CFG.batch_size)
        assert all(len(b["label"]) == CFG.batch_size for b in batches[:-1])
        ids = _ids(batches)
        assert len(ids) == len(frame)
        assert np.array_equal(np.sort(ids), np.sort(frame.impression_id.to_numpy()))


def test_without_shuffle_order_is_the_manifest_order(ds):
    frame = _split_frame(ds, "train")
    batches = _batches(BatchLoader(ds, "train", CFG, seed=0, shuffle=False))
    assert np.array_equal(_ids(batches), frame.impression_id.to_numpy())


def test_shuffle_mixes_rows_and_shards(ds):
    frame = _split_frame(ds, "train")
    loader = BatchLoader(ds, "train", LoaderConfig(batch_size=64, shuffle_buffer=10**6), seed=0, shuffle=True)
    ids = _ids(_batches(loader))
    assert not np.array_equal(ids, frame.impression_id.to_numpy())
    # the first batch draws from the whole split when the buffer holds it all
    shard_of = {i: k for k, p in enumerate(ds.shards("train")) for i in pd.read_parquet(p).impression_id}
    assert len({shard_of[i] for i in ids[:64]}) > 1


def test_shard_order_changes_with_the_epoch(ds):
    """With a buffer of one batch, the first batch comes from the first shard read: over epochs,
    different shards come first."""
    shard_of = {i: k for k, p in enumerate(ds.shards("train")) for i in pd.read_parquet(p).impression_id}
    loader = BatchLoader(ds, "train", LoaderConfig(batch_size=16, shuffle_buffer=16), seed=0, shuffle=True)
    firsts = set()
    for epoch in range(12):
        first = next(iter(loader.epoch(epoch)))
        shards = {shard_of[i] for i in first["impression_id"].tolist()}
        assert len(shards) == 1
        firsts |= shards
    assert len(firsts) > 1


def test_same_seed_same_batches_other_epoch_or_seed_other_order(ds):
    a = BatchLoader(ds, "train", CFG, seed=7, shuffle=True)
    b = BatchLoader(ds, "train", CFG, seed=7, shuffle=True)
    assert _same(_batches(a, 0), _batches(b, 0))
    assert _same(_batches(a, 1), _batches(a, 1))
    e0, e1 = _ids(_batches(a, 0)), _ids(_batches(a, 1))
    assert not np.array_equal(e0, e1)
    other_seed = _ids(_batches(BatchLoader(ds, "train", CFG, seed=8, shuffle=True), 0))
    assert not np.array_equal(e0, other_seed)


def test_batches_do_not_depend_on_read_chunking(ds):
    base = _batches(BatchLoader(ds, "train", CFG, seed=1, shuffle=True))
    for read_rows in (1, 37, 100_000):
        other = _batches(BatchLoader(ds, "train", CFG, seed=1, shuffle=True, read_rows=read_rows))
        assert _same(base, other), read_rows


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("drop_last", [False, True])
def test_skip_batches_equals_dropping_the_first_k(ds, shuffle, drop_last):
    loader = BatchLoader(ds, "train", CFG, seed=5, shuffle=shuffle, drop_last=drop_last)
    full = _batches(loader, 2)
    assert len(full) == len(loader)
    for k in (0, 1, 3, len(full) // 2, len(full) - 1, len(full), len(full) + 3):
        assert _same(_batches(loader, 2, skip=k), full[k:]), k


def test_drop_last(ds):
    loader = BatchLoader(ds, "train", CFG, seed=0, shuffle=True, drop_last=True)
    batches = _batches(loader)
    assert len(batches) == len(loader) == ds.rows("train") // CFG.batch_size
    assert all(len(b["label"]) == CFG.batch_size for b in batches)


def test_small_split_and_big_batch(ds):
    # one batch larger than the split: everything in one partial batch, or nothing with drop_last
    cfg = LoaderConfig(batch_size=10**5, shuffle_buffer=0)
    batches = _batches(BatchLoader(ds, "valid", cfg, seed=0, shuffle=True))
    assert len(batches) == 1 and len(batches[0]["label"]) == ds.rows("valid")
    assert _batches(BatchLoader(ds, "valid", cfg, seed=0, shuffle=True, drop_last=True)) == []


def test_memory_is_streamed_not_materialised(ds, monkeypatch):
    """When the first batch comes out, at most buffer + batch + one read chunk rows were decoded."""
    converted = []
    orig = BatchLoader._convert

    def counting(self, rb, shard):
        converted.append(rb.num_rows)
        return orig(self, rb, shard)

    monkeypatch.setattr(BatchLoader, "_convert", counting)
    for shuffle in (False, True):
        converted.clear()
        loader = BatchLoader(ds, "train", CFG, seed=0, shuffle=shuffle, read_rows=50)
        next(iter(loader.epoch(0)))
        limit = (CFG.shuffle_buffer if shuffle else 0) + CFG.batch_size + 50
        assert 0 < sum(converted) <= limit < ds.rows("train")


# ---------------------------------------------------------------------------------------------
# Loader: batch contents


def _expected_lists(lists, L: int) -> np.ndarray:
    out = np.zeros((len(lists), L), dtype=np.int64)
    for i, v in enumerate(lists):
        v = list(v)[-L:] if L else []
        out[i, :len(v)] = v
    return out


@pytest.mark.parametrize("max_len", [None, 5, 0, 60])
def test_batch_format_and_values_match_the_shards(ds, max_len):
    L = ds.max_len if max_len is None else max_len
    frame = _split_frame(ds, "train").set_index("impression_id")
    assert frame.hist_len.max() > 5  # truncation really happens at L=5
    loader = BatchLoader(ds, "train", LoaderConfig(batch_size=64, shuffle_buffer=200, max_len=max_len),
                         seed=0, shuffle=True)
    categorical = [f["name"] for f in ds.fields if f["kind"] == "categorical"]
    sequences = [f["name"] for f in ds.fields if f["kind"] == "sequence"]
    assert sequences and ds.has_images
    expected_keys = set(categorical + sequences) | {"hist_len", "ad_image", "hist_image", "label", "group_id",
                                                     "cold_item", "impression_id"}
    for b in _batches(loader)[:6]:
        assert set(b) == expected_keys
        n = len(b["label"])
        rows = frame.loc[b["impression_id"].numpy()]
        for k in categorical + ["ad_image", "group_id", "hist_len", "impression_id"]:
            assert b[k].dtype == torch.int64 and b[k].shape == (n,), k
        for k in sequences + ["hist_image"]:
            assert b[k].dtype == torch.int64 and b[k].shape == (n, L), k
            assert np.array_equal(b[k].numpy(), _expected_lists(rows[k], L)), k
        assert b["label"].dtype == torch.float32 and b["cold_item"].dtype == torch.bool
        for k in categorical + ["ad_image", "group_id"]:
            assert np.array_equal(b[k].numpy(), rows[k].to_numpy()), k
        assert np.array_equal(b["label"].numpy(), rows["label"].to_numpy().astype(np.float32))
        assert np.array_equal(b["cold_item"].numpy(), rows["cold_item"].to_numpy())
        assert np.array_equal(b["hist_len"].numpy(), np.minimum(rows["hist_len"].to_numpy(), L))
        # hist_len counts exactly the non-padding entries (indices start at 1 for real items)
        assert np.array_equal(b["hist_len"].numpy(), (b["hist_item_id"] != 0).sum(1).numpy())


@settings(max_examples=100, deadline=None)
@given(
    lists=st.lists(st.lists(st.integers(1, 10**12), max_size=12), max_size=20),
    L=st.integers(0, 8),
    start=st.integers(0, 5),
)
def test_pad_lists_keeps_the_last_entries(lists, L, start):
    arr = pa.array(lists, type=pa.list_(pa.int64()))
    start = min(start, len(lists))
    sliced = arr.slice(start)  # a sliced array: offsets do not start at 0
    assert np.array_equal(pad_lists(sliced, L), _expected_lists(lists[start:], L))
    assert np.array_equal(pad_lists(arr, L), _expected_lists(lists, L))


def test_bad_config_is_a_user_error(ds):
    for cfg in (LoaderConfig(batch_size=0), LoaderConfig(shuffle_buffer=-1), LoaderConfig(max_len=-1)):
        with pytest.raises(UserError):
            BatchLoader(ds, "train", cfg, seed=0, shuffle=True)

