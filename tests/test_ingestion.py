"""A user's own logs: catalogues without images, a missing images folder, the three ways to split
(days back from the log's last UTC day, fractional days included; a share of the rows in time order;
timestamps) and the warning for a tiny split. Most checks run without a cluster (the source reader,
the split arithmetic); two pipeline runs on the shared LocalCluster check the rest end to end."""

from __future__ import annotations


import numpy as np
import pandas as pd
import pytest

from conftest import make_raw
from pipeline.build import DAY_MS, run_pipeline, split_bounds, split_warnings
from pipeline.config import PipelineConfig
from pipeline.source import load_source
from vitrine.errors import UserError

T0 = pd.Timestamp("2026-01-01").value // 1_000_000  # unix ms of 2026-01-01T00:00Z


def _main(argv: list[str], capsys) -> tuple[int, str]:
    from vitrine.cli import main

    rc = main(argv)
    return rc, capsys.readouterr().err


# -- images ----------------------------------------------------------------------------------------
def test_a_catalogue_may_have_no_images(tmp_path):
    raw = tmp_path / "raw"
    make_raw(raw, n=50, items=5, days=3)
    items = pd.read_parquet(raw / "items.parquet")

    # `--map items.image=` says so, whatever [images] says (even a folder that is not there).
    spec = load_source(raw, maps=["items.image="], images="/no/such/dir")
    assert "image" not in spec.items.columns and spec.images_dir is None
    # A catalogue without an image column and no [images] section: no images, no error.
    items.drop(columns="image").to_parquet(raw / "plain.parquet", index=False)
    (raw / "plain.toml").write_text('[impressions]\npath = "impressions"\n[items]\npath = "plain.parquet"\n')
    spec = load_source(raw, source_file=raw / "plain.toml")
    assert "image" not in spec.items.columns and spec.images_dir is None
    # ... but with an [images] folder the column is expected, and the message says how to do without.
    with pytest.raises(UserError, match=r"column 'image' for items.image not found.*--map items.image= for a "
                                        r"catalogue without images"):
        load_source(raw, maps=[], items="plain.parquet")


def test_a_missing_images_folder_is_an_error_unless_the_source_has_no_images(tmp_path, capsys):
    raw = tmp_path / "raw"
    make_raw(raw, n=50, items=5, days=3)
    with pytest.raises(UserError, match=r"images folder /no/such/dir does not exist.*--map items.image="):
        load_source(raw, images="/no/such/dir")
    text = (raw / "source.toml").read_text().replace('dir = "images"', 'dir = "pictures"')
    (raw / "source.toml").write_text(text)
    with pytest.raises(UserError, match=r"images folder .*/raw/pictures does not exist \(--images, or \[images\] dir"):
        load_source(raw)
    load_source(raw, maps=["items.image="])  # the source says it has no images: fine
    # The command: exit 2 with the message, before any cluster starts.
    rc, err = _main(["pipeline", "--raw", str(raw), "--out", str(tmp_path / "out"), "--no-track"], capsys)
    assert rc == 2 and "pictures does not exist" in err and "Traceback" not in err


# -- the split arithmetic -----------------------------------------------------------------------------
def _log(n_days: int = 10, per_day: int = 100) -> np.ndarray:
    """Timestamps (ms): `per_day` rows a day, evenly spread, with runs of equal timestamps."""
    step = DAY_MS // per_day
    ts = T0 + np.arange(n_days * per_day, dtype=np.int64) * step
    ts[1::7] = ts[0::7][: len(ts[1::7])]  # ties
    return np.sort(ts)


def _bounds(ts: np.ndarray, **kw) -> tuple[int, int]:
    day_rows = pd.Series(ts // DAY_MS).value_counts().sort_index()

    def day_timestamps(lo: int, hi: int) -> pd.Series:
        return pd.Series(ts[(ts >= lo) & (ts < hi)]).value_counts()

    return split_bounds(PipelineConfig(**kw), day_rows, day_timestamps=day_timestamps)


def _sizes(ts: np.ndarray, bounds: tuple[int, int]) -> tuple[int, int, int]:
    v, t = bounds
    return int((ts < v).sum()), int(((ts >= v) & (ts < t)).sum()), int((ts >= t).sum())


def test_splits_by_days_back_from_the_last_utc_day_fractions_included():
    ts = _log()
    end = T0 + 10 * DAY_MS  # the end of the log's last UTC day
    assert _bounds(ts) == (end - 2 * DAY_MS, end - DAY_MS)  # the defaults: 1 valid day, 1 test day
    assert _bounds(ts, test_days=2.5, valid_days=0.5) == (end - 3 * DAY_MS, end - 2.5 * DAY_MS)
    train, valid, test = _sizes(ts, _bounds(ts, test_days=2.5, valid_days=0))
    assert abs(train - 750) <= 1 and valid == 0 and train + test == len(ts)


def test_splits_by_share_of_the_rows_in_time_order():
    ts = _log()
    v, t = _bounds(ts, valid_frac=0.1, test_frac=0.2)
    train, valid, test = _sizes(ts, (v, t))
    # The boundary is the timestamp of the first row of the share; rows sharing it go with it.
    assert t == ts[len(ts) - 200] and v == ts[len(ts) - 300]
    assert abs(test - 200) <= 2 and abs(valid - 100) <= 2 and train + valid + test == len(ts)
    assert _bounds(ts, test_frac=0.05)[0] == _bounds(ts, test_frac=0.05)[1]  # no --valid-frac: no valid split


def test_splits_by_timestamps_and_bad_split_settings_name_their_flags():
    ts = _log()
    assert _bounds(ts, valid_from="2026-01-08", test_from="2026-01-09T12:00:00Z") == (
        T0 + 7 * DAY_MS, T0 + 8 * DAY_MS + DAY_MS // 2)
    assert _bounds(ts, test_from=str((T0 + 9 * DAY_MS) // 1000)) == (T0 + 9 * DAY_MS, T0 + 9 * DAY_MS)
    for kw, message in [
        (dict(test_frac=0.1, test_days=2), "--valid-days/--test-days and --valid-frac/--test-frac"),
        (dict(valid_frac=0.6, test_frac=0.5), "--test-frac must be in (0, 1), --valid-frac"),
        (dict(test_days=0), "--test-days must be > 0"),
        (dict(valid_from="2026-01-09", test_from="2026-01-08"), "--valid-from 2026-01-09 is after --test-from"),
        (dict(test_from="next tuesday"), "--test-from 'next tuesday': expected an ISO 8601 time"),
        (dict(valid_frac=0.1), "--valid-frac needs --test-frac"),
    ]:
        with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
            PipelineConfig(**kw).check()


def test_a_tiny_split_is_warned_about_and_an_empty_train_split_refused():
    day_rows = pd.Series([5000, 5000], index=[T0 // DAY_MS, T0 // DAY_MS + 1])
    cfg = PipelineConfig(valid_frac=0.1, test_frac=0.005)
    (w,) = split_warnings(cfg, {"train": 8950, "valid": 1000, "test": 50}, day_rows)
    assert "the test split has only 50 rows (0.50% of 10000)" in w and "--valid-frac/--test-frac" in w
    assert split_warnings(cfg, {"train": 8000, "valid": 1000, "test": 1000}, day_rows) == []
    with pytest.raises(UserError, match=r"too few for --valid-days 1 and --test-days 1 with training rows"):
        split_warnings(PipelineConfig(), {"train": 0, "valid": 0, "test": 10000}, day_rows)


# -- end to end --------------------------------------------------------------------------------------
def test_a_log_without_images_split_by_share_and_image_features_refused(tmp_path, dask_address, capsys):
    raw = tmp_path / "raw"
    df = make_raw(raw, n=3000, items=25, days=6)
    items = pd.read_parquet(raw / "items.parquet")
    items.assign(image=pd.Series([None] * len(items), dtype="string")).to_parquet(raw / "items.parquet", index=False)
    out = tmp_path / "out"
    m = run_pipeline(PipelineConfig(raw=str(raw), out=str(out), scheduler=dask_address, progress=False,
                                    track=False, valid_frac=0.1, test_frac=0.1))
    assert m["images"] is None and not {"ad_image", "hist_image", "image_id"} & {f["name"] for f in m["fields"]}
    assert "ad_image" not in pd.read_parquet(out / "train").columns
    sizes = {k: v["rows"] for k, v in m["splits"].items()}
    assert sum(sizes.values()) == len(df) and abs(sizes["test"] - 300) <= 10 and abs(sizes["valid"] - 300) <= 10
    splits = {s: pd.read_parquet(out / s).timestamp for s in ("train", "valid", "test")}
    assert splits["train"].max() < splits["valid"].min() <= splits["valid"].max() < splits["test"].min()
    assert m["split_bounds"]["rule"].startswith("share of rows")
    assert any("the valid split has only" in w for w in m["warnings"])  # 300 rows < 1000
    assert any("the test split has only" in w for w in m["warnings"])
    assert any("names an image" in w for w in m["warnings"])  # an all-null image column

    # Training it with image features stops at once, naming the flag.
    rc, err = _main(["train", "--dataset", str(out), "--features", "ids+images", "--no-track"], capsys)
    assert rc == 2 and "--features ids+images needs item images" in err and "--features ids" in err
