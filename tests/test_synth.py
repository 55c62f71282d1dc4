"""The synthetic world generator (pipeline.synth): determinism, the raw-source contract of
docs/DATA.md, cold items, images, hidden visual attributes, click model, popularity skew and the
atomic write."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
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


# --- scale worlds: shared images, an impression target, users in blocks ---------------------------

SHARED = dict(users=150, items=1200, days=3, cold_days=1, image_size=16, impressions=1500, seed=4)


@pytest.fixture(scope="module")
def shared_pair(tmp_path_factory) -> tuple[Path, dict, Path, dict]:
    """The same world with one image per item and with 120 shared images."""
    root = tmp_path_factory.mktemp("shared")
    own = generate(WorldConfig(**SHARED), root / "own", progress=False)
    shared = generate(WorldConfig(**SHARED, drawn_images=120), root / "shared", progress=False)
    return root / "own", own, root / "shared", shared


def test_drawn_images_are_shared_by_items_of_the_same_attributes(shared_pair):
    _, _, out, summary = shared_pair
    items = pq.read_table(out / "items.parquet").to_pandas()
    truth = pq.read_table(out / "truth" / "items.parquet").to_pandas()
    files = sorted(p.name for p in (out / "images").iterdir())
    assert len(files) == 120 and set(items.image) == set(files)  # every image drawn is used, and exists
    assert all(re.fullmatch(r"shared-\d{6}\.(png|jpg)", f) for f in files)
    assert {int(f[7:13]) for f in files} == set(range(120))
    # image j shows combination j % 96, which is the item's own (hidden) colour, shape and pattern
    j = items.image.str.slice(7, 13).astype(int).to_numpy()
    col, shp, pat = (truth[k].to_numpy().astype(int) for k in ("color", "shape", "pattern"))
    combo = (col * draw.N_SHAPES + shp) * draw.N_PATTERNS + pat
    assert (j % world.ATTRIBUTE_COMBOS == combo).all()
    # the items of a combination take its images in turn: as many items each, give or take one
    per_image = pd.Series(j).value_counts()
    spread = per_image.groupby(per_image.index % world.ATTRIBUTE_COMBOS).agg(lambda c: c.max() - c.min())
    assert spread.max() <= 1 and (per_image.index >= world.ATTRIBUTE_COMBOS).sum() == 24
    # and its pixels are drawn from those attributes with the shared image's own stream
    png = next(f for f in files if f.endswith(".png"))
    n = int(png[7:13])
    c = n % world.ATTRIBUTE_COMBOS
    expect = draw.draw_item(c // 12, (c // 3) % 4, c % 3, 16, draw.shared_rng(SHARED["seed"], n))
    assert (np.asarray(Image.open(out / "images" / png)) == np.asarray(expect)).all()

    meta = json.loads((out / "world.json").read_text())
    assert meta["settings"]["drawn_images"] == 120 and meta["images_drawn"] == 120 == summary["images_drawn"]
    assert meta["image_sharing"]["drawn_images"] == 120 and "share" in meta["image_sharing"]["rule"]
    assert meta["image_sharing"]["items_per_image"] == 10.0


def test_drawn_images_change_nothing_but_the_images(shared_pair):
    own, s_own, shared, s_shared = shared_pair
    assert s_own["images_drawn"] == 1200 and "image_sharing" not in s_own
    assert len(list((own / "images").iterdir())) == 1200
    for name in ("impressions", "users.parquet", "truth/items.parquet", "truth/impressions.parquet"):
        assert pq.read_table(own / name).equals(pq.read_table(shared / name)), name
    a, b = pq.read_table(own / "items.parquet"), pq.read_table(shared / "items.parquet")
    assert a.drop(["image"]).equals(b.drop(["image"])) and not a.column("image").equals(b.column("image"))
    own_only = ("elapsed_s", "settings", "images_drawn", "image_sharing")
    assert {k: v for k, v in s_own.items() if k not in own_only} == {
        k: v for k, v in s_shared.items() if k not in own_only}


def test_impressions_target_is_independent_of_the_users(tmp_path):
    from vitrine.config import add_dataclass_args, from_args
    import argparse

    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, WorldConfig)
    cfg = from_args(WorldConfig, parser.parse_args(["--users", "3000", "--items", "50", "--days", "4",
                                                    "--impressions", "2000", "--scale", "2"]))
    assert cfg.impressions == 2000 and cfg.drawn_images == 0
    for users in (3000, 12000):
        s = generate(WorldConfig(**{**cfg.__dict__, "users": users}), tmp_path / f"u{users}", progress=False)
        assert abs(s["impressions"] - 4000) < 300, s["impressions"]  # the target is scaled like users and items
        assert s["impressions_per_user_day"] == pytest.approx(4000 / (2 * users * 4))
        assert s["users"] == 2 * users


def test_users_are_drawn_in_blocks(small, tmp_path, monkeypatch):
    cfg, out, _ = small
    first = world._make_users(cfg, 64)
    monkeypatch.setattr(world, "USER_BLOCK", 64)
    blocks = world._make_users(cfg, 200)
    for k, v in first.items():  # the first block is the world of 64 users
        assert blocks[k].shape == (200, *v.shape[1:]) and v.dtype == blocks[k].dtype, k
        assert (v == blocks[k][:64]).all(), k
    # block b from its own stream, with the first block's preferences of the (gender, age) groups
    _, group_pref = world._user_block(world._rng(cfg.seed, "users"), 64, cfg.categories, None)
    for b, (lo, hi) in enumerate([(64, 128), (128, 192), (192, 200)], start=1):
        want, _ = world._user_block(world._rng(cfg.seed, "users", b), hi - lo, cfg.categories, group_pref)
        for k, v in want.items():
            assert (blocks[k][lo:hi] == v).all(), (b, k)
    assert not (blocks["taste_color"][64:128] == blocks["taste_color"][128:192]).all()
    # the impression counts come out the same whatever the block they are drawn in
    monkeypatch.setattr(world, "USER_BLOCK", 1 << 20)
    monkeypatch.setattr(world, "COUNT_BLOCK", 7)
    _gen(cfg, tmp_path / "w")
    assert _impressions(tmp_path / "w").equals(_impressions(out))


def test_days_without_new_items_share_a_sampler(small):
    cfg, _, _ = small
    w = world._World(n_users=cfg.users, n_items=cfg.items, **world._make_items(cfg, cfg.items),
                     **world._make_users(cfg, cfg.users))
    samplers = world._day_samplers(w, cfg.days)
    assert len({id(s) for s in samplers}) == cfg.cold_days + 1
    u = np.random.default_rng(0).random(500)
    cats = np.random.default_rng(1).integers(0, cfg.categories, 500)
    for d, s in enumerate(samplers):
        fresh = world._DaySampler(w, d)
        assert (s.popular(u) == fresh.popular(u)).all() and (s.explore(u) == fresh.explore(u)).all()
        assert (s.targeted(cats, u, u[::-1]) == fresh.targeted(cats, u, u[::-1])).all()


def test_worlds_without_the_new_options_are_unchanged(small):
    """The small world's ids, times and clicks are those the generator wrote before --impressions,
    --drawn-images and the blocked draws existed (a digest of the integer columns). Update the digest
    only for a change meant to alter every world."""
    _, out, _ = small
    imp, items = _impressions(out), pq.read_table(out / "items.parquet")
    h = hashlib.sha256()
    for c in ("impression_id", "timestamp", "user_id", "item_id", "click"):
        h.update(imp.column(c).to_numpy().astype(np.int64).tobytes())
    for c in ("category_id", "shop_id", "first_day"):
        h.update(items.column(c).to_numpy().astype(np.int64).tobytes())
    assert h.hexdigest()[:16] == "c0dc74254e3d703c"


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
        dict(drawn_images=95),  # fewer than the 96 attribute combinations
        dict(drawn_images=101),  # more than the items
        dict(drawn_images=-1),
        dict(drawn_images=True),
        dict(impressions=-5),
        dict(impressions=2.5),
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
