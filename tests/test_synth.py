"""The synthetic world generator (pipeline.synth): determinism, the raw-source contract of
docs/DATA.md, cold items, images, hidden visual attributes, click model, popularity skew and the
atomic write."""

from __future__ import annotations

import json
import math
import os
import re
import tomllib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from pipeline.synth import draw, world
from pipeline.synth.world import WorldConfig, generate
from vitrine.errors import UserError

SMALL = dict(users=200, items=100, days=4, cold_days=2, cold_fraction=0.1, seed=3)
SMALL_ROWS_PER_PART = 2000  # the small world (~4.8k rows) comes out in several parts


def _gen(cfg: WorldConfig, out: Path, **kw) -> dict:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(world, "ROWS_PER_PART", SMALL_ROWS_PER_PART)
        return generate(cfg, out, progress=False, **kw)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[WorldConfig, Path, dict]:
    cfg = WorldConfig(**SMALL)
    out = tmp_path_factory.mktemp("small") / "w"
    return cfg, out, _gen(cfg, out)


@pytest.fixture(scope="module")
def default_world(tmp_path_factory) -> tuple[WorldConfig, Path, dict]:
    cfg = WorldConfig()
    out = tmp_path_factory.mktemp("default") / "w"
    return cfg, out, generate(cfg, out, progress=False)


def _impressions(root: Path) -> pa.Table:
    return pq.read_table(root / "impressions")


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- determinism -----------------------------------------------------------------------------------


def test_same_seed_gives_identical_files(small, tmp_path):
    cfg, out, summary = small
    again = tmp_path / "again"
    summary2 = _gen(WorldConfig(**SMALL), again)
    a, b = _files(out), _files(again)
    assert sorted(a) == sorted(b)
    for name in a:
        if name != "world.json":
            assert a[name] == b[name], name
    strip = lambda s: {k: v for k, v in s.items() if k != "elapsed_s"}  # noqa: E731
    assert strip(summary) == strip(summary2)


def test_different_seed_gives_a_different_world(small, tmp_path):
    cfg, out, _ = small
    other = tmp_path / "other"
    _gen(WorldConfig(**{**SMALL, "seed": SMALL["seed"] + 1}), other)
    assert not pq.read_table(out / "items.parquet").equals(pq.read_table(other / "items.parquet"))
    assert not _impressions(out).equals(_impressions(other))
    assert not pq.read_table(out / "truth" / "items.parquet").equals(pq.read_table(other / "truth" / "items.parquet"))
    assert (out / "images" / "000000.png").read_bytes() != (other / "images" / "000000.png").read_bytes()


def test_process_pool_draws_the_same_bytes(tmp_path, monkeypatch):
    cfg = WorldConfig(users=20, items=30, days=2, cold_fraction=0.0, seed=5)
    monkeypatch.setattr(world, "POOL_MIN_ITEMS", 10**9)
    generate(cfg, tmp_path / "serial", progress=False)
    monkeypatch.setattr(world, "POOL_MIN_ITEMS", 10)
    calls = []
    monkeypatch.setattr(world.multiprocessing, "get_context", _spy(world.multiprocessing.get_context, calls))
    generate(cfg, tmp_path / "pool", progress=False)
    assert calls, "the pool was not used"
    a, b = _files(tmp_path / "serial" / "images"), _files(tmp_path / "pool" / "images")
    assert len(a) == 30 and a == b


def _spy(fn, calls):
    def wrapped(*args, **kw):
        calls.append(args)
        return fn(*args, **kw)

    return wrapped


# --- the raw-source contract -----------------------------------------------------------------------

EXPECTED_SOURCE = {
    "impressions": {
        "path": "impressions",
        "columns": {
            "impression_id": "impression_id",
            "timestamp": "timestamp",
            "user": "user_id",
            "item": "item_id",
            "label": "click",
        },
    },
    "items": {
        "path": "items.parquet",
        "columns": {"item": "item_id", "category": "category_id", "shop": "shop_id", "image": "image"},
    },
    "users": {"path": "users.parquet", "profile": ["gender", "age_bucket"], "columns": {"user": "user_id"}},
    "images": {"dir": "images"},
    "truth": {
        "path": "truth/impressions.parquet",
        "columns": {"impression_id": "impression_id", "p_click": "p_click"},
    },
}

EXPECTED_SCHEMAS = {
    "items.parquet": pa.schema(
        [
            ("item_id", pa.int64()),
            ("category_id", pa.int64()),
            ("shop_id", pa.int64()),
            ("first_day", pa.int32()),
            ("image", pa.string()),
        ]
    ),
    "users.parquet": pa.schema([("user_id", pa.int64()), ("gender", pa.int8()), ("age_bucket", pa.int8())]),
    "truth/impressions.parquet": pa.schema([("impression_id", pa.int64()), ("p_click", pa.float64())]),
    "truth/items.parquet": pa.schema(
        [("item_id", pa.int64()), ("color", pa.int8()), ("shape", pa.int8()), ("pattern", pa.int8())]
    ),
}
IMPRESSION_SCHEMA = pa.schema(
    [
        ("impression_id", pa.int64()),
        ("timestamp", pa.timestamp("ms")),
        ("user_id", pa.int64()),
        ("item_id", pa.int64()),
        ("click", pa.int8()),
    ]
)


def test_source_toml_and_schemas_match_data_md(small):
    cfg, out, summary = small
    source = tomllib.loads((out / "source.toml").read_text())
    assert source == EXPECTED_SOURCE
    for section in source.values():
        assert (out / section.get("path", section.get("dir"))).exists()
    for name, schema in EXPECTED_SCHEMAS.items():
        assert pq.read_schema(out / name).remove_metadata().equals(schema), name
    parts = sorted((out / "impressions").iterdir())
    assert len(parts) == summary["impression_parts"] > 1
    for i, p in enumerate(parts):
        assert p.name == f"part-{i:05d}.parquet"
        assert pq.read_schema(p).remove_metadata().equals(IMPRESSION_SCHEMA), p.name
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["source.toml", "impressions", "items.parquet", "users.parquet", "images", "truth", "world.json"]
    )


def test_tables_are_consistent(small):
    cfg, out, summary = small
    imp = _impressions(out).to_pandas()
    truth = pq.read_table(out / "truth" / "impressions.parquet").to_pandas()
    items = pq.read_table(out / "items.parquet").to_pandas()
    users = pq.read_table(out / "users.parquet").to_pandas()
    assert len(items) == 100 and len(users) == 200
    assert items.item_id.tolist() == list(range(100)) and users.user_id.tolist() == list(range(200))
    assert set(imp.item_id) <= set(items.item_id) and set(imp.user_id) <= set(users.user_id)
    assert imp.impression_id.is_unique and sorted(imp.impression_id) == list(range(len(imp)))
    assert sorted(truth.impression_id) == sorted(imp.impression_id)
    assert truth.p_click.between(0, 1, inclusive="neither").all()
    assert set(imp.click.unique()) <= {0, 1}
    assert users.gender.between(0, 1).all() and users.age_bucket.between(0, 5).all()
    assert items.category_id.between(0, cfg.categories - 1).all() and items.shop_id.between(0, cfg.shops - 1).all()
    assert summary["impressions"] == len(imp) and summary["clicks"] == int(imp.click.sum())
    assert summary["users"] == 200 and summary["items"] == 100
    assert json.loads((out / "world.json").read_text()) == summary
    # each part is in time order, impression ids follow it
    for p in sorted((out / "impressions").iterdir()):
        t = pq.read_table(p).to_pandas()
        assert t.timestamp.is_monotonic_increasing and t.impression_id.is_monotonic_increasing


def test_timestamps_days_and_ties(small):
    cfg, out, _ = small
    imp = _impressions(out).to_pandas()
    start = np.datetime64("2026-01-01T00:00:00", "ms")
    ts = imp.timestamp.to_numpy().astype("datetime64[ms]")
    assert ts.min() >= start and ts.max() < start + np.timedelta64(cfg.days, "D")
    days = (ts - start) // np.timedelta64(1, "D")
    assert set(np.unique(days)) == set(range(cfg.days))
    dup = imp.duplicated(["user_id", "timestamp"], keep=False)
    assert 0 < dup.mean() < 0.1  # some ties within a user, exercising the history rule


# --- cold items, images, hidden attributes ---------------------------------------------------------


def test_cold_items_appear_only_from_their_first_day(small):
    cfg, out, summary = small
    items = pq.read_table(out / "items.parquet").to_pandas().set_index("item_id")
    imp = _impressions(out).to_pandas()
    start = np.datetime64("2026-01-01T00:00:00", "ms")
    day = (imp.timestamp.to_numpy().astype("datetime64[ms]") - start) // np.timedelta64(1, "D")
    first = items.first_day.loc[imp.item_id].to_numpy()
    assert (day >= first).all()
    cold = items.index[items.first_day > 0]
    assert len(cold) == round(cfg.cold_fraction * cfg.items) == summary["cold_items"]
    assert items.first_day.loc[cold].between(cfg.days - cfg.cold_days, cfg.days - 1).all()
    assert (items.first_day.drop(cold) == 0).all()
    shown = set(imp.item_id[imp.item_id.isin(cold)])
    assert len(shown) >= len(cold) // 2 and summary["cold_items_shown"] == len(shown)


def test_images_decode_to_rgb_of_the_configured_size(small):
    cfg, out, _ = small
    items = pq.read_table(out / "items.parquet").to_pandas()
    formats = set()
    for iid, name in zip(items.item_id, items.image):
        assert re.fullmatch(r"\d{6}\.(png|jpg)", name) and int(name[:6]) == iid
        with Image.open(out / "images" / name) as im:
            im.load()
            formats.add(im.format)
            assert im.format == ("PNG" if name.endswith(".png") else "JPEG")
            assert im.mode == "RGB" and im.size == (cfg.image_size, cfg.image_size)
    assert formats == {"PNG", "JPEG"}  # mixed alternates by item id
    assert len(list((out / "images").iterdir())) == len(items)


def test_image_size_and_single_format(tmp_path):
    cfg = WorldConfig(users=10, items=6, days=2, cold_fraction=0.0, image_size=32, image_format="jpeg")
    out = tmp_path / "w"
    generate(cfg, out, progress=False)
    names = sorted(p.name for p in (out / "images").iterdir())
    assert names == [f"{i:06d}.jpg" for i in range(6)]
    for n in names:
        with Image.open(out / "images" / n) as im:
            assert im.size == (32, 32) and im.format == "JPEG"


def test_visual_attributes_are_hidden_but_drawn(small):
    cfg, out, _ = small
    assert set(pq.read_schema(out / "items.parquet").names) == {
        "item_id", "category_id", "shop_id", "first_day", "image"
    }
    for name in ("items.parquet", "users.parquet"):
        assert not {"color", "shape", "pattern"} & set(pq.read_schema(out / name).names)
    truth = pq.read_table(out / "truth" / "items.parquet").to_pandas()
    items = pq.read_table(out / "items.parquet").to_pandas()
    assert truth["color"].between(0, 7).all() and truth["shape"].between(0, 3).all()
    assert truth["pattern"].between(0, 2).all()
    assert truth["color"].nunique() == 8 and truth["shape"].nunique() == 4 and truth["pattern"].nunique() == 3
    # the colour is in the pixels: the mean hue of the saturated pixels is the colour's hue
    for c, name in zip(truth.color, items.image):
        hsv = np.asarray(Image.open(out / "images" / name).convert("HSV")).reshape(-1, 3).astype(float)
        sel = (hsv[:, 1] > 140) & (hsv[:, 2] > 90)
        assert sel.sum() > 20, name
        hue = np.angle(np.mean(np.exp(1j * hsv[sel, 0] * 2 * np.pi / 256)), deg=True) % 360
        assert abs((hue - c * 45 + 180) % 360 - 180) < 20, (name, c, hue)


def test_draw_is_deterministic_and_jittered():
    a = np.asarray(draw.draw_item(2, 3, 1, 64, draw.item_rng(0, 7)))
    b = np.asarray(draw.draw_item(2, 3, 1, 64, draw.item_rng(0, 7)))
    c = np.asarray(draw.draw_item(2, 3, 1, 64, draw.item_rng(0, 8)))
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert (a == b).all()
    assert np.abs(a.astype(int) - c.astype(int)).mean() > 5  # same attributes, different jitter
    with pytest.raises(ValueError):
        draw.draw_item(8, 0, 0, 64, draw.item_rng(0, 0))


# --- the click model -------------------------------------------------------------------------------


def test_default_world_ctr_and_oracle_auc(default_world):
    cfg, out, s = default_world
    assert 80_000 <= s["impressions"] <= 120_000
    assert 0.10 <= s["ctr"] <= 0.15
    assert 0.75 <= s["oracle_auc"] <= 0.82
    assert s["oracle_auc_without_visual"] <= s["oracle_auc"] - 0.04  # pixels carry real signal
    assert s["oracle_auc_without_sequence"] < s["oracle_auc"]  # so does recent behaviour
    assert s["oracle_gauc_without_visual"] < s["oracle_gauc"] < s["oracle_auc"]
    assert s["impression_parts"] >= 2 and s["elapsed_s"] < 60
    assert abs(s["mean_p_click"] - s["ctr"]) < 0.01


def test_summary_auc_matches_the_files(small):
    cfg, out, s = small
    imp = _impressions(out).to_pandas()
    truth = pq.read_table(out / "truth" / "impressions.parquet").to_pandas()
    m = imp.merge(truth, on="impression_id")
    assert s["oracle_auc"] == pytest.approx(roc_auc_score(m.click, m.p_click), abs=1e-12)
    assert 0.03 <= s["ctr"] <= 0.3
    assert s["oracle_auc"] > s["oracle_auc_without_visual"]
    assert s["oracle_rows"] == s["impressions"]


def test_oracle_metrics_on_a_user_sample_when_large(tmp_path, monkeypatch):
    monkeypatch.setattr(world, "AUC_MAX_ROWS", 1000)
    s = generate(WorldConfig(**SMALL), tmp_path / "w", progress=False)
    assert 0 < s["oracle_rows"] < s["impressions"]
    assert 0.5 < s["oracle_auc"] < 1 and 0.5 < s["oracle_gauc"] < 1
    assert s["clicks"] == int(_impressions(tmp_path / "w").column("click").to_numpy().sum())


def test_p_click_follows_the_documented_model(small):
    """Recompute p_click impression by impression from the files, the world's tastes and the rule of
    docs/DATA.md (history = clicks strictly before the impression; equal timestamps ordered by
    impression_id); the vectorised generator must agree exactly."""
    cfg, out, _ = small
    it = world._make_items(cfg, 100)
    us = world._make_users(cfg, 200)
    imp = _impressions(out).to_pandas().merge(
        pq.read_table(out / "truth" / "impressions.parquet").to_pandas(), on="impression_id"
    )
    imp = imp.sort_values(["user_id", "timestamp", "impression_id"])
    cat, col, shp, pat = it["category"], it["color"], it["shape"], it["pattern"]
    ties = 0
    for u, g in imp.groupby("user_id", sort=False):
        s_cat, s_col, s_shp = np.zeros(cfg.categories), np.zeros(8), np.zeros(4)
        for _, grp in g.groupby("timestamp", sort=True):
            ties += len(grp) > 1
            for i, y, p in zip(grp.item_id, grp.click, grp.p_click):
                z = (
                    world.B0
                    + world.W_CAT * us["taste_cat"][u, cat[i]]
                    + world.W_VIS
                    * (us["taste_color"][u, col[i]] + us["taste_shape"][u, shp[i]] + us["taste_pattern"][u, pat[i]])
                    + world.W_SEQ * (s_cat[cat[i]] + s_col[col[i]] + s_shp[shp[i]])
                    + it["quality"][i]
                    + us["bias"][u]
                )
                assert p == pytest.approx(1 / (1 + math.exp(-z)), rel=1e-9, abs=1e-12)
            for i, y in zip(grp.item_id, grp.click):  # this timestamp's clicks count from the next one
                if y:
                    s_cat *= world.GAMMA
                    s_col *= world.GAMMA
                    s_shp *= world.GAMMA
                    s_cat[cat[i]] += 1
                    s_col[col[i]] += 1
                    s_shp[shp[i]] += 1
    assert ties > 0


def test_item_popularity_is_skewed(small):
    cfg, out, _ = small
    counts = _impressions(out).to_pandas().item_id.value_counts().reindex(range(cfg.items), fill_value=0)
    top = np.sort(counts.to_numpy())[::-1]
    assert top[: cfg.items // 10].sum() / top.sum() > 0.3  # top 10% of items: well over 10%


def test_user_activity_is_skewed(small):
    cfg, out, _ = small
    per_user = _impressions(out).to_pandas().user_id.value_counts()
    assert per_user.max() > 3 * per_user.median()


# --- settings and the atomic write -----------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        dict(cold_days=4),  # must be < days
        dict(image_format="gif"),
        dict(users=0),
        dict(scale=-1.0),
        dict(cold_fraction=1.0),
        dict(image_size=8),
    ],
)
def test_bad_settings_are_user_errors(tmp_path, bad):
    with pytest.raises(UserError):
        generate(WorldConfig(**{**SMALL, **bad}), tmp_path / "w", progress=False)
    assert not (tmp_path / "w").exists()


def test_config_fields_have_help():
    import dataclasses

    for f in dataclasses.fields(WorldConfig):
        assert f.metadata.get("help"), f.name


def test_atomic_write_and_overwrite(tmp_path, monkeypatch):
    cfg = WorldConfig(users=20, items=10, days=2, cold_fraction=0.0, seed=1)
    out = tmp_path / "w"
    stale = tmp_path / ".w.tmp-999999999"  # left by a killed run
    stale.mkdir()
    (stale / "junk").write_text("x")
    generate(cfg, out, progress=False)
    assert not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"]  # no temp dir left
    before = _files(out)

    with pytest.raises(UserError, match="--overwrite"):
        generate(WorldConfig(**{**cfg.__dict__, "seed": 2}), out, progress=False)
    assert _files(out) == before

    # a failure while building leaves the old world untouched and no temp dir
    def boom(*a, **k):
        raise RuntimeError("disk full")

    with monkeypatch.context() as mp:
        mp.setattr(world, "_render_images", boom)
        with pytest.raises(RuntimeError):
            generate(WorldConfig(**{**cfg.__dict__, "seed": 2}), out, overwrite=True, progress=False)
    assert _files(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"]

    s = generate(WorldConfig(**{**cfg.__dict__, "seed": 2}), out, overwrite=True, progress=False)
    assert s["settings"]["seed"] == 2 and json.loads((out / "world.json").read_text())["settings"]["seed"] == 2
    assert _files(out)["items.parquet"] != before["items.parquet"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"]


def test_temp_dir_of_a_live_run_is_left_alone(tmp_path):
    live = tmp_path / f".w.tmp-{os.getppid()}"  # our parent is alive
    live.mkdir()
    generate(WorldConfig(users=5, items=4, days=2, cold_fraction=0.0), tmp_path / "w", progress=False)
    assert live.exists()
