"""The synthetic world behind `vitrine generate`: users, items with drawn images, and impression logs
whose clicks depend on the pixels.

Items have a category, a shop and three hidden visual attributes (colour, shape, pattern) that are
drawn into their images and never written as columns of `items.parquet` (only to
`truth/items.parquet`). Users have a profile (gender, age bucket), a sparse taste over categories, a
taste over colours, shapes and patterns, a bias and a skewed activity level. The click probability of
an impression is

    p = sigmoid(b0 + w_cat * taste_cat[u, cat]
                   + w_vis * (taste_color[u, color] + taste_shape[u, shape] + taste_pattern[u, pattern])
                   + w_seq * (state_cat[u, cat] + state_color[u, color] + state_shape[u, shape])
                   + quality[item] + bias[u])

where `state_*` is an exponentially decayed sum of the one-hots of the user's previously clicked
items (decay GAMMA per click): a user who just clicked red stars is more likely to click red and
star-shaped ads. The state is updated in time order and only from clicks with a timestamp strictly
before the impression's (the history rule of docs/DATA.md), so equal timestamps do not see each
other.

With `--extra-fields K` every impression also carries K categorical ID fields `x000 .. x{K-1}`
(`x{i:03d}`), made for measuring the trainer's packing of many small embedding tables (the many-field
setting of the PICASSO paper). They are stable attributes, not per-impression draws: field i is a
column of `users.parquet` when i is even and of `items.parquet` when i is odd, listed in
`source.toml` as user `profile` or item `attributes`, so the pipeline gives each its own vocabulary.
Field i has a cardinality drawn log-uniformly in [EXTRA_CARD_MIN, EXTRA_CARD_MAX] and Zipf-like
values (exponent `--zipf` over a random ranking of its values). The first EXTRA_SIGNAL_FIELDS fields
carry a weak signal: each value has an effect ~ N(0, EXTRA_SIGNAL_SD), centred over the users
(items), that is added to `bias[u]` (user-side fields) or `quality[item]` (item-side fields) in the
formula above; the others are noise. Field i comes from its own random stream, so it is the same
for every K > i, and K = 0 writes tables and images byte-identical to those of the generator before
the option (world.json only gains `settings.extra_fields`). The drawn parameters are in
`truth/extra_fields.parquet`.

Scale worlds (10^6 to 10^7 users and/or items, docs/DATA.md "Scale worlds"): `--impressions N`
sets the total number of impressions (before --scale) whatever the number of users, by setting the
mean impressions per user and day to N / (users x days); most users of a 10^7-user world with a few
million impressions then have none or one. `--drawn-images K` (96 <= K <= items) draws K images
instead of one per item: shared image j shows the colour x shape x pattern combination
j % 96, and every item shows one of the images of its own combination (chosen in turn over a
random order of the combination's items, from its own stream), so the items keep their own hidden
attributes and the click model above is unchanged; only the jitter of the pixels (position, scale,
rotation, noise) is shared by the items of one image. Items name their image in `items.parquet`
(`shared-NNNNNN.png|jpg`), and `world.json` records `images_drawn` and `image_sharing`. Users are
drawn in blocks of USER_BLOCK (2^20) users: the first block is what a world of that many users draws
(so smaller worlds are unchanged), block b from its own stream `users/b`, with the first block's
category preferences of the (gender, age) groups. Neither option changes the formula; at 10^7 users
the per-user arrays (tastes: about 3.6 GB) are what memory holds, never users x items.

Everything random comes from numpy Generators (PCG64) derived from the seed and a purpose name, so
the same config gives byte-identical tables and images. The output layout is the raw source of
docs/DATA.md ("What `vitrine generate` writes").
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import multiprocessing
import os
import sys
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline.synth import draw
from vitrine import metrics
from vitrine.atomic import atomic_dir
from vitrine.errors import UserError
from vitrine.jobs import report_progress

# --- the world's fixed parameters (recorded in world.json under "model") -----------------------
B0 = -3.0  # intercept
W_CAT = 0.7  # weight of the category taste
W_VIS = 0.65  # weight of the visual taste (colour + shape + pattern)
W_SEQ = 0.3  # weight of the recent-behaviour affinity
GAMMA = 0.7  # decay of the behaviour state per click
QUALITY_SD = 0.3  # item quality ~ N(0, sd)
USER_BIAS_SD = 0.35  # user bias ~ N(0, sd)
ACTIVITY_SIGMA = 0.8  # user activity ~ lognormal(-sigma^2/2, sigma), mean 1
ACTIVITY_CAP = 12.0
CATEGORY_ZIPF = 0.8  # category sizes ~ rank^-s
SHOP_ZIPF = 0.8  # shop sizes ~ rank^-s
P_PREFERRED_COLOR = 0.4  # chance an item takes its category's preferred colour
P_TARGETED = 0.30  # share of impressions drawn from the user's liked categories
P_EXPLORE = 0.05  # share drawn uniformly among the items available that day
P_DUP_TIMESTAMP = 0.02  # share of impressions that repeat the previous timestamp of the user-day
MAX_LIKED_CATEGORIES = 4
EXTRA_FIELDS_MAX = 1000  # --extra-fields; names x000 .. x999
EXTRA_CARD_MIN, EXTRA_CARD_MAX = 10, 2000  # cardinality of an extra field, log-uniform
EXTRA_SIGNAL_FIELDS = 4  # x000 .. x003 (two user-side, two item-side) move the click probability
EXTRA_SIGNAL_SD = 0.15  # effect of one value of a signal field on the logit ~ N(0, sd)
GENDERS, AGE_BUCKETS = 2, 6

DAY_MS = 86_400_000
START = _dt.datetime(2026, 1, 1, tzinfo=_dt.timezone.utc)
START_MS = int(START.timestamp() * 1000)
ROWS_PER_PART = 50_000  # impressions per Parquet part (whole users; a part may run a little over)
AUC_MAX_ROWS = 5_000_000  # oracle AUCs use the rows of a random subset of users beyond this
POOL_MIN_ITEMS = 3000  # draw images with a process pool of 2 from this many items on
USER_BLOCK = 1 << 20  # users are drawn in blocks of this many (see _make_users)
COUNT_BLOCK = 1 << 20  # users whose impression counts are drawn at a time
ATTRIBUTE_COMBOS = draw.N_COLORS * draw.N_SHAPES * draw.N_PATTERNS  # 96: the least --drawn-images
FORMATS = ("png", "jpeg", "mixed")

SOURCE_TOML = """\
[impressions]
path = "impressions"
[impressions.columns]
impression_id = "impression_id"
timestamp = "timestamp"
user = "user_id"
item = "item_id"
label = "click"

[items]
path = "items.parquet"
{item_attributes}[items.columns]
item = "item_id"
category = "category_id"
shop = "shop_id"
image = "image"

[users]
path = "users.parquet"
profile = {user_profile}
[users.columns]
user = "user_id"

[images]
dir = "images"

[truth]
path = "truth/impressions.parquet"
[truth.columns]
impression_id = "impression_id"
p_click = "p_click"
"""

IMPRESSION_SCHEMA = pa.schema(
    [
        ("impression_id", pa.int64()),
        ("timestamp", pa.timestamp("ms")),
        ("user_id", pa.int64()),
        ("item_id", pa.int64()),
        ("click", pa.int8()),
    ]
)
TRUTH_SCHEMA = pa.schema([("impression_id", pa.int64()), ("p_click", pa.float64())])


@dataclass
class WorldConfig:
    users: int = field(default=2000, metadata={"help": "number of users (before --scale)"})
    items: int = field(default=1000, metadata={"help": "number of items, each with one image (before --scale)"})
    days: int = field(default=8, metadata={"help": "days of impression logs"})
    categories: int = field(default=20, metadata={"help": "number of item categories"})
    shops: int = field(default=50, metadata={"help": "number of shops"})
    impressions_per_user_day: float = field(
        default=6.0, metadata={"help": "mean impressions per user and day (activity is lognormal)"}
    )
    zipf: float = field(default=1.05, metadata={"help": "Zipf exponent of item popularity"})
    cold_fraction: float = field(
        default=0.1, metadata={"help": "share of items that first appear in the last --cold-days days"}
    )
    cold_days: int = field(default=2, metadata={"help": "the last days in which cold items appear"})
    image_size: int = field(default=64, metadata={"help": "side of the drawn images in pixels"})
    image_format: str = field(
        default="mixed",
        metadata={"help": "image files: png, jpeg, or mixed (alternating by item id)", "choices": FORMATS},
    )
    scale: float = field(
        default=1.0, metadata={"help": "multiplies users and items (10 gives about 1M impressions)"}
    )
    impressions: int = field(
        default=0,
        metadata={
            "help": "target number of impressions (before --scale), whatever the number of users: sets the "
            "mean impressions per user and day to impressions / (users x days); 0 = use "
            "--impressions-per-user-day"
        },
    )
    drawn_images: int = field(
        default=0,
        metadata={
            "help": "draw only this many images (at least 96, at most the items) and let items share them: an "
            "item shows one of the drawn images of its own colour, shape and pattern; 0 = one image per item"
        },
    )
    extra_fields: int = field(
        default=0,
        metadata={
            "help": "extra categorical ID fields per impression (x000, x001, ...: half user-side, half "
            "item-side; a few carry a weak signal), for measuring embedding packing; 0 = none"
        },
    )
    seed: int = field(default=0, metadata={"help": "random seed; the same seed gives the same world"})


# --- helpers ---------------------------------------------------------------------------------------


def _rng(seed: int, purpose: str, *extra: int) -> np.random.Generator:
    """An independent random stream per purpose (and chunk), derived from the seed only."""
    key = [int(seed) & 0xFFFFFFFFFFFFFFFF, zlib.crc32(purpose.encode()), *[int(e) for e in extra]]
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(key)))


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _zipf_weights(n: int, s: float) -> np.ndarray:
    w = np.arange(1, n + 1, dtype=np.float64) ** (-s)
    return w / w.sum()


def _defined(value: float) -> float | None:
    """JSON has no NaN: an undefined metric (one class only) is written as null."""
    return None if math.isnan(value) else float(value)


def _validate(cfg: WorldConfig) -> tuple[int, int]:
    def bad(msg: str) -> UserError:
        return UserError(f"bad world setting: {msg}")

    if cfg.scale <= 0 or not math.isfinite(cfg.scale):
        raise bad(f"--scale must be > 0, got {cfg.scale}")
    n_users = int(round(cfg.users * cfg.scale))
    n_items = int(round(cfg.items * cfg.scale))
    if n_users < 1:
        raise bad(f"need at least 1 user, got users={cfg.users} x scale={cfg.scale}")
    if n_items < 2:
        raise bad(f"need at least 2 items, got items={cfg.items} x scale={cfg.scale}")
    if cfg.days < 1:
        raise bad(f"--days must be >= 1, got {cfg.days}")
    if cfg.categories < 1 or cfg.shops < 1:
        raise bad("--categories and --shops must be >= 1")
    if not (cfg.impressions_per_user_day > 0 and math.isfinite(cfg.impressions_per_user_day)):
        raise bad(f"--impressions-per-user-day must be > 0, got {cfg.impressions_per_user_day}")
    if not (cfg.zipf >= 0 and math.isfinite(cfg.zipf)):
        raise bad(f"--zipf must be >= 0, got {cfg.zipf}")
    if not (0.0 <= cfg.cold_fraction < 1.0):
        raise bad(f"--cold-fraction must be in [0, 1), got {cfg.cold_fraction}")
    if cfg.cold_fraction > 0 and not (1 <= cfg.cold_days < cfg.days):
        raise bad(f"--cold-days must be in [1, days) = [1, {cfg.days}), got {cfg.cold_days}")
    if not (16 <= cfg.image_size <= 1024):
        raise bad(f"--image-size must be in [16, 1024], got {cfg.image_size}")
    if cfg.image_format not in FORMATS:
        raise bad(f"--image-format must be one of {', '.join(FORMATS)}, got {cfg.image_format!r}")

    def count(value: Any) -> bool:
        return not isinstance(value, bool) and isinstance(value, (int, np.integer))

    if not count(cfg.impressions) or cfg.impressions < 0:
        raise bad(f"--impressions must be an integer >= 0, got {cfg.impressions!r}")
    k = cfg.drawn_images
    if not count(k) or not (k == 0 or ATTRIBUTE_COMBOS <= k <= n_items):
        raise bad(f"--drawn-images must be 0 (one image per item) or an integer in [{ATTRIBUTE_COMBOS}, items] = "
                  f"[{ATTRIBUTE_COMBOS}, {n_items}] (at least one image per colour x shape x pattern), got {k!r}")
    k = cfg.extra_fields
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not (0 <= k <= EXTRA_FIELDS_MAX):
        raise bad(f"--extra-fields must be an integer in [0, {EXTRA_FIELDS_MAX}], got {k!r}")
    return n_users, n_items


def _rate(cfg: WorldConfig, n_users: int) -> float:
    """Mean impressions per user and day: from --impressions when given, else the setting."""
    if cfg.impressions:
        return cfg.impressions * cfg.scale / (n_users * cfg.days)
    return cfg.impressions_per_user_day


def _write_table(table: pa.Table, path: Path) -> None:
    pq.write_table(table, path, compression="snappy")


# --- the world -------------------------------------------------------------------------------------


@dataclass
class _World:
    n_users: int
    n_items: int
    # items
    category: np.ndarray
    shop: np.ndarray
    color: np.ndarray
    shape: np.ndarray
    pattern: np.ndarray
    quality: np.ndarray
    first_day: np.ndarray
    popularity: np.ndarray
    preferred_color: np.ndarray  # per category
    # users
    gender: np.ndarray
    age_bucket: np.ndarray
    activity: np.ndarray
    bias: np.ndarray
    taste_cat: np.ndarray  # (U, C)
    taste_color: np.ndarray  # (U, 8)
    taste_shape: np.ndarray  # (U, 4)
    taste_pattern: np.ndarray  # (U, 3)
    liked: np.ndarray  # (U, MAX_LIKED_CATEGORIES), -1 padded
    n_liked: np.ndarray
    # E[visual taste | category] for the no-pixel oracle, computed per row from these
    color_mean: np.ndarray
    shape_mean: np.ndarray
    pattern_mean: np.ndarray


def _make_items(cfg: WorldConfig, n_items: int) -> dict[str, np.ndarray]:
    rng = _rng(cfg.seed, "items")
    C = cfg.categories
    category = rng.choice(C, size=n_items, p=_zipf_weights(C, CATEGORY_ZIPF))
    shop = rng.choice(cfg.shops, size=n_items, p=_zipf_weights(cfg.shops, SHOP_ZIPF))
    preferred = rng.integers(0, draw.N_COLORS, size=C)
    color = np.where(
        rng.random(n_items) < P_PREFERRED_COLOR,
        preferred[category],
        rng.integers(0, draw.N_COLORS, size=n_items),
    )
    shape = rng.integers(0, draw.N_SHAPES, size=n_items)
    pattern = rng.integers(0, draw.N_PATTERNS, size=n_items)
    quality = rng.normal(0.0, QUALITY_SD, size=n_items)
    # popularity: Zipf over a random ranking of the items
    rank = rng.permutation(n_items)
    popularity = (rank + 1.0) ** (-cfg.zipf)
    first_day = np.zeros(n_items, dtype=np.int32)
    n_cold = int(round(cfg.cold_fraction * n_items)) if cfg.cold_fraction > 0 else 0
    n_cold = min(n_cold, n_items - 1)
    if n_cold:
        cold = rng.choice(n_items, size=n_cold, replace=False)
        first_day[cold] = cfg.days - cfg.cold_days + rng.integers(0, cfg.cold_days, size=n_cold)
    return dict(
        category=category.astype(np.int64),
        shop=shop.astype(np.int64),
        color=color.astype(np.int8),
        shape=shape.astype(np.int8),
        pattern=pattern.astype(np.int8),
        quality=quality,
        first_day=first_day,
        popularity=popularity,
        preferred_color=preferred.astype(np.int64),
    )


def _signed_taste(rng: np.random.Generator, n: int, k: int, n_like: int, n_dislike: int,
                  like: float, dislike: float) -> np.ndarray:
    """Per user: `n_like` random attributes get about +like, `n_dislike` others about -dislike."""
    order = np.argsort(rng.random((n, k)), axis=1)
    strength = rng.uniform(0.7, 1.3, size=(n, k))
    t = np.zeros((n, k), dtype=np.float64)
    rows = np.arange(n)[:, None]
    if n_like:
        t[rows, order[:, :n_like]] = like * strength[:, :n_like]
    if n_dislike:
        t[rows, order[:, n_like : n_like + n_dislike]] = -dislike * strength[:, n_like : n_like + n_dislike]
    return t


def _make_users(cfg: WorldConfig, n_users: int) -> dict[str, np.ndarray]:
    """Users in blocks of USER_BLOCK: the first block draws from `_rng(seed, "users")` exactly as a
    world of at most USER_BLOCK users always has (so such worlds are unchanged), block b > 0 from
    `_rng(seed, "users", b)` with the first block's category preferences of the (gender, age)
    groups. Every array is filled in place, so a 10^7-user world peaks at its per-user arrays plus
    one block's temporaries."""
    first, group_pref = _user_block(_rng(cfg.seed, "users"), min(n_users, USER_BLOCK), cfg.categories, None)
    if n_users <= USER_BLOCK:
        return first
    out = {k: np.empty((n_users, *v.shape[1:]), dtype=v.dtype) for k, v in first.items()}
    for start in range(0, n_users, USER_BLOCK):
        stop = min(start + USER_BLOCK, n_users)
        block = first if start == 0 else _user_block(
            _rng(cfg.seed, "users", start // USER_BLOCK), stop - start, cfg.categories, group_pref)[0]
        for k, v in block.items():
            out[k][start:stop] = v
        del block
    return out


def _user_block(rng: np.random.Generator, n_users: int, C: int,
                group_pref: np.ndarray | None) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """`n_users` users from `rng`; `group_pref` is drawn here (between the ages and the liked
    categories, as always) when not given."""
    gender = rng.integers(0, GENDERS, size=n_users)
    age = rng.choice(AGE_BUCKETS, size=n_users, p=np.array([0.10, 0.25, 0.27, 0.20, 0.12, 0.06]))
    # liked categories: each (gender, age) group prefers its own mixture of categories, so the
    # profile carries some signal
    if group_pref is None:
        groups = GENDERS * AGE_BUCKETS
        group_pref = 0.5 * rng.dirichlet(np.full(C, 0.6), size=groups) + 0.5 * _zipf_weights(C, CATEGORY_ZIPF)
    g = gender * AGE_BUCKETS + age
    n_liked = np.minimum(1 + rng.poisson(1.0, size=n_users), min(MAX_LIKED_CATEGORIES, C))
    gumbel = -np.log(-np.log(rng.random((n_users, C)) + 1e-300) + 1e-300)
    keys = np.log(group_pref[g]) + gumbel
    top = np.argsort(-keys, axis=1, kind="stable")[:, :MAX_LIKED_CATEGORIES]
    if top.shape[1] < MAX_LIKED_CATEGORIES:
        top = np.pad(top, ((0, 0), (0, MAX_LIKED_CATEGORIES - top.shape[1])), constant_values=-1)
    liked = np.where(np.arange(MAX_LIKED_CATEGORIES)[None, :] < n_liked[:, None], top, -1)
    taste_cat = np.zeros((n_users, C), dtype=np.float64)
    strength = rng.uniform(0.6, 1.4, size=(n_users, MAX_LIKED_CATEGORIES))
    rows = np.repeat(np.arange(n_users), MAX_LIKED_CATEGORIES).reshape(n_users, -1)
    m = liked >= 0
    taste_cat[rows[m], liked[m]] = strength[m]
    taste_color = _signed_taste(rng, n_users, draw.N_COLORS, 2, 2, 1.0, 1.0)
    taste_shape = _signed_taste(rng, n_users, draw.N_SHAPES, 1, 1, 1.0, 0.8)
    taste_pattern = _signed_taste(rng, n_users, draw.N_PATTERNS, 1, 1, 0.6, 0.6)
    z = rng.normal(0.0, ACTIVITY_SIGMA, size=n_users)
    activity = np.minimum(np.exp(z - ACTIVITY_SIGMA**2 / 2), ACTIVITY_CAP)
    bias = rng.normal(0.0, USER_BIAS_SD, size=n_users)
    return dict(
        gender=gender.astype(np.int8),
        age_bucket=age.astype(np.int8),
        activity=activity,
        bias=bias,
        taste_cat=taste_cat,
        taste_color=taste_color,
        taste_shape=taste_shape,
        taste_pattern=taste_pattern,
        liked=liked.astype(np.int64),
        n_liked=n_liked.astype(np.int64),
        color_mean=taste_color.mean(axis=1),
        shape_mean=taste_shape.mean(axis=1),
        pattern_mean=taste_pattern.mean(axis=1),
    ), group_pref


def extra_field_name(i: int) -> str:
    return f"x{i:03d}"


def _make_extra(cfg: WorldConfig, n_users: int, n_items: int) -> dict[str, Any]:
    """The --extra-fields attributes (see the module docstring): per field its side, cardinality
    and one value per user or item; plus the logit offsets of the signal fields, per user and per item.

    Field i draws from its own stream `_rng(seed, "extra_fields", i)`, so the streams of the rest of
    the world are untouched and field i does not depend on K. Per field: O(rows + cardinality)
    numpy work (inverse-CDF sampling), so K = 1000 costs well under a second on the default world.
    """
    user_cols: dict[str, np.ndarray] = {}
    item_cols: dict[str, np.ndarray] = {}
    user_offset = np.zeros(n_users)
    item_offset = np.zeros(n_items)
    rows = []
    lo, hi = math.log(EXTRA_CARD_MIN), math.log(EXTRA_CARD_MAX)
    for i in range(cfg.extra_fields):
        rng = _rng(cfg.seed, "extra_fields", i)
        name = extra_field_name(i)
        user_side = i % 2 == 0
        n = n_users if user_side else n_items
        card = min(int(round(math.exp(rng.uniform(lo, hi)))), EXTRA_CARD_MAX)
        cum = np.cumsum(_zipf_weights(card, cfg.zipf))
        rank = np.minimum(np.searchsorted(cum, rng.random(n) * cum[-1], side="right"), card - 1)
        values = rng.permutation(card)[rank].astype(np.int32)  # value ids do not follow frequency
        signal = i < EXTRA_SIGNAL_FIELDS
        if signal:  # centred over the rows, so the signal fields leave the mean logit alone
            effect = rng.normal(0.0, EXTRA_SIGNAL_SD, size=card)[values]
            offset = user_offset if user_side else item_offset
            offset += effect - effect.mean()
        (user_cols if user_side else item_cols)[name] = values
        rows.append((name, "user" if user_side else "item", card, signal))
    names, sides, cards, signals = (list(c) for c in zip(*rows)) if rows else ([], [], [], [])
    info = pa.table(
        {
            "field": pa.array(names, pa.string()),
            "side": pa.array(sides, pa.string()),
            "cardinality": pa.array(cards, pa.int32()),
            "signal": pa.array(signals, pa.bool_()),
        }
    )
    return dict(user_cols=user_cols, item_cols=item_cols, user_offset=user_offset, item_offset=item_offset,
                info=info)


def _source_toml(user_extra: list[str], item_extra: list[str]) -> str:
    """SOURCE_TOML, listing the extra fields as user profile columns and item attributes."""
    attrs = f"attributes = {json.dumps(item_extra)}\n" if item_extra else ""
    return SOURCE_TOML.format(user_profile=json.dumps(["gender", "age_bucket", *user_extra]),
                              item_attributes=attrs)


class _DaySampler:
    """Samples ad items for one day: Zipf popularity among available items, targeted (popularity
    within a given category) or uniform exploration among available items."""

    def __init__(self, w: _World, day: int, like: "_DaySampler | None" = None):
        avail = w.first_day <= day
        weights = np.where(avail, w.popularity, 0.0)
        self.cum = np.cumsum(weights)
        self.avail_ids = np.flatnonzero(avail)
        if like is not None:  # the items by category do not depend on the day
            self.by_cat, self.cat_start, self.cat_end = like.by_cat, like.cat_start, like.cat_end
        else:
            self.by_cat = np.argsort(w.category, kind="stable")
            cat_sorted = w.category[self.by_cat]
            C = int(w.taste_cat.shape[1])
            self.cat_start = np.searchsorted(cat_sorted, np.arange(C), side="left")
            self.cat_end = np.searchsorted(cat_sorted, np.arange(C), side="right")
        self.cum_cat = np.cumsum(weights[self.by_cat])
        ext = np.r_[0.0, self.cum_cat]
        self.cat_base = ext[self.cat_start]
        self.cat_total = ext[self.cat_end] - self.cat_base

    def popular(self, u: np.ndarray) -> np.ndarray:
        total = self.cum[-1]
        idx = np.searchsorted(self.cum, u * total * (1 - 1e-12), side="right")
        return np.minimum(idx, self.cum.size - 1)

    def targeted(self, cats: np.ndarray, u: np.ndarray, fallback_u: np.ndarray) -> np.ndarray:
        tot = self.cat_total[cats]
        ok = tot > 0
        target = self.cat_base[cats] + u * tot * (1 - 1e-12)
        j = np.searchsorted(self.cum_cat, target, side="right")
        j = np.clip(j, self.cat_start[cats], np.maximum(self.cat_end[cats] - 1, self.cat_start[cats]))
        j = np.minimum(j, self.by_cat.size - 1)
        items = self.by_cat[j]
        if not ok.all():
            items = np.where(ok, items, self.popular(fallback_u))
        return items

    def explore(self, u: np.ndarray) -> np.ndarray:
        return self.avail_ids[np.minimum((u * self.avail_ids.size).astype(np.int64), self.avail_ids.size - 1)]


def _day_samplers(w: _World, days: int) -> list[_DaySampler]:
    """One sampler per day; days on which no item first appears share the previous day's (they would
    be equal), so a world of 10^7 items holds cold_days + 1 samplers, not one per day."""
    out: list[_DaySampler] = []
    for d in range(days):
        if out and not (w.first_day == d).any():
            out.append(out[-1])
        else:
            out.append(_DaySampler(w, d, out[-1] if out else None))
    return out


def _simulate_chunk(
    cfg: WorldConfig, w: _World, samplers: list[_DaySampler], u0: int, counts: np.ndarray, chunk: int
) -> dict[str, np.ndarray]:
    """Impressions of users u0 .. u0+len(counts)-1. Rows come back in time order."""
    rng = _rng(cfg.seed, "impressions", chunk)
    n, days = counts.shape
    tot = counts.sum(axis=1)
    N = int(tot.sum())
    if N == 0:
        z = np.zeros(0, dtype=np.int64)
        f = np.zeros(0, dtype=np.float64)
        return dict(ts=z, user=z, item=z, click=z.astype(np.int8), p=f, p_novis=f, p_noseq=f, day=z)
    row_u = np.repeat(np.arange(n), tot)
    row_day = np.repeat(np.tile(np.arange(days, dtype=np.int64), n), counts.ravel())
    t_in_day = rng.integers(0, DAY_MS, size=N)
    order = np.argsort(row_u.astype(np.int64) * (days * DAY_MS) + row_day * DAY_MS + t_in_day, kind="stable")
    row_day, t_in_day = row_day[order], t_in_day[order]
    ts = row_day * DAY_MS + t_in_day  # ms since START, non-decreasing per user
    first_of_ud = np.r_[True, (row_u[1:] != row_u[:-1]) | (row_day[1:] != row_day[:-1])]
    dup = (rng.random(N) < P_DUP_TIMESTAMP) & ~first_of_ud
    src = np.where(dup, 0, np.arange(N))
    ts = ts[np.maximum.accumulate(src)]

    # ad items
    mix = rng.random(N)
    u_item = rng.random(N)
    u_aux = rng.random(N)
    gu = u0 + row_u
    item = np.empty(N, dtype=np.int64)
    for d in range(days):
        rows = np.flatnonzero(row_day == d)
        if rows.size == 0:
            continue
        s = samplers[d]
        m = mix[rows]
        pop = rows[m >= P_TARGETED + P_EXPLORE]
        item[pop] = s.popular(u_item[pop])
        exp = rows[(m >= P_TARGETED) & (m < P_TARGETED + P_EXPLORE)]
        item[exp] = s.explore(u_item[exp])
        tgt = rows[m < P_TARGETED]
        if tgt.size:
            k = np.minimum((u_aux[tgt] * w.n_liked[gu[tgt]]).astype(np.int64), w.n_liked[gu[tgt]] - 1)
            cats = w.liked[gu[tgt], k]
            item[tgt] = s.targeted(cats, u_item[tgt], u_aux[tgt])
    if not (w.first_day[item] <= row_day).all():
        raise AssertionError("sampled an item before its first day")

    cat, col, shp, pat = w.category[item], w.color[item], w.shape[item], w.pattern[item]
    base = B0 + W_CAT * w.taste_cat[gu, cat] + w.quality[item] + w.bias[gu]
    z_static = base + W_VIS * (w.taste_color[gu, col] + w.taste_shape[gu, shp] + w.taste_pattern[gu, pat])
    # the best a model without pixels (and without item identity) can know of the visual terms:
    # their expectation given the category
    pref = w.preferred_color[cat]
    e_vis = (
        P_PREFERRED_COLOR * w.taste_color[gu, pref]
        + (1 - P_PREFERRED_COLOR) * w.color_mean[gu]
        + w.shape_mean[gu]
        + w.pattern_mean[gu]
    )
    z_novis_static = base + W_VIS * e_vis

    # clicks, in time order: all users' k-th impression together
    u_click = rng.random(N)
    click = np.zeros(N, dtype=np.int8)
    p = np.empty(N, dtype=np.float64)
    p_novis = np.empty(N, dtype=np.float64)
    p_noseq = _sigmoid(z_static)
    perm = np.argsort(-tot, kind="stable")  # users by impressions, descending
    offs = (np.cumsum(tot) - tot)[perm]
    tot_sorted_asc = np.sort(tot)
    C = w.taste_cat.shape[1]
    # state by position in `perm`: only the first n_active users (those with impressions) ever have one
    n_active = int(np.count_nonzero(tot))
    s_cat = np.zeros((n_active, C))
    s_col = np.zeros((n_active, draw.N_COLORS))
    s_shp = np.zeros((n_active, draw.N_SHAPES))
    grp_start = np.zeros(n_active, dtype=np.int64)  # k at which the user's current equal-timestamp run began
    pos_all = np.arange(n_active)
    maxk = int(tot.max()) if n else 0

    def apply_clicks(users: np.ndarray, rows: np.ndarray) -> None:
        hit = click[rows] == 1
        users, rows = users[hit], rows[hit]
        if users.size == 0:
            return
        s_cat[users] *= GAMMA
        s_col[users] *= GAMMA
        s_shp[users] *= GAMMA
        s_cat[users, cat[rows]] += 1.0
        s_col[users, col[rows]] += 1.0
        s_shp[users, shp[rows]] += 1.0

    for k in range(maxk):
        m = n - int(np.searchsorted(tot_sorted_asc, k, side="right"))  # users with > k impressions
        pos = pos_all[:m]
        rows = offs[:m] + k
        if k > 0:
            flush = np.flatnonzero(ts[rows] != ts[rows - 1])  # a new timestamp: earlier clicks count now
            if flush.size:
                pending = k - grp_start[flush]
                for j in range(int(pending.max())):
                    us = flush[pending > j]
                    apply_clicks(us, offs[us] + grp_start[us] + j)
                grp_start[flush] = k
        a_cat = s_cat[pos, cat[rows]]
        a_vis = s_col[pos, col[rows]] + s_shp[pos, shp[rows]]
        pk = _sigmoid(z_static[rows] + W_SEQ * (a_cat + a_vis))
        p[rows] = pk
        p_novis[rows] = _sigmoid(z_novis_static[rows] + W_SEQ * a_cat)
        click[rows] = u_click[rows] < pk

    # time order within the chunk (ties: user, then the user's own order)
    order = np.lexsort((np.arange(N), ts))
    return dict(
        ts=ts[order],
        user=gu[order],
        item=item[order],
        click=click[order],
        p=p[order],
        p_novis=p_novis[order],
        p_noseq=p_noseq[order],
        day=row_day[order],
    )


def _shared_images(cfg: WorldConfig, w: _World) -> tuple[np.ndarray, np.ndarray]:
    """--drawn-images K: (the shared image of every item, the shared images some item shows).

    Shared image j shows attribute combination j % ATTRIBUTE_COMBOS (colour, shape, pattern: every
    combination has ceil((K - c) / ATTRIBUTE_COMBOS) images). The items of one combination, in a
    random order of their own stream, take that combination's images in turn, so each is shown by
    about as many items, and every one is used where the combination has as many items as images."""
    k = cfg.drawn_images
    combo = (w.color.astype(np.int64) * draw.N_SHAPES + w.shape) * draw.N_PATTERNS + w.pattern
    perm = _rng(cfg.seed, "drawn_images").permutation(w.n_items)
    c = combo[perm]
    order = np.argsort(c, kind="stable")
    c = c[order]
    rank = np.arange(w.n_items) - np.searchsorted(c, np.arange(ATTRIBUTE_COMBOS), side="left")[c]
    per_combo = -(-(k - np.arange(ATTRIBUTE_COMBOS)) // ATTRIBUTE_COMBOS)
    image = np.empty(w.n_items, dtype=np.int64)
    image[perm[order]] = c + ATTRIBUTE_COMBOS * (rank % per_combo[c])
    return image, np.flatnonzero(np.bincount(image, minlength=k))


def _combo_attributes(images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Colour, shape and pattern of shared images (image j shows combination j % ATTRIBUTE_COMBOS)."""
    c = images % ATTRIBUTE_COMBOS
    return c // (draw.N_SHAPES * draw.N_PATTERNS), (c // draw.N_PATTERNS) % draw.N_SHAPES, c % draw.N_PATTERNS


def _render_images(cfg: WorldConfig, ids: np.ndarray, color: np.ndarray, shape: np.ndarray, pattern: np.ndarray,
                   images_dir: Path, progress: bool, shared: bool = False) -> None:
    """Draw images `ids` (items, or shared images with `shared`) with these attributes."""
    batch = 256
    batches = [
        (
            cfg.seed,
            ids[i : i + batch].tolist(),
            color[i : i + batch].tolist(),
            shape[i : i + batch].tolist(),
            pattern[i : i + batch].tolist(),
            cfg.image_size,
            cfg.image_format,
            str(images_dir),
            shared,
        )
        for i in range(0, len(ids), batch)
    ]
    bar = tqdm(total=len(ids), desc="images", unit="img", disable=not progress, file=sys.stderr)
    try:
        if len(ids) >= POOL_MIN_ITEMS and (os.cpu_count() or 1) > 1:
            # fork where there is one: workers need no re-import, so a caller's script without a
            # `__main__` guard works too; they only run numpy and Pillow, which are fork-safe
            methods = multiprocessing.get_all_start_methods()
            ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
            with ctx.Pool(2) as pool:
                for done in pool.imap(_render_batch, batches):
                    bar.update(done)
        else:
            for b in batches:
                bar.update(_render_batch(b))
    finally:
        bar.close()


def _render_batch(args: tuple) -> int:
    return draw.render_items(*args)


def _build(cfg: WorldConfig, root: Path, n_users: int, n_items: int, progress: bool) -> dict[str, Any]:
    it = _make_items(cfg, n_items)
    us = _make_users(cfg, n_users)
    extra = _make_extra(cfg, n_users, n_items)
    if cfg.extra_fields:  # the signal fields' effects join the item quality and the user bias
        it["quality"] = it["quality"] + extra["item_offset"]
        us["bias"] = us["bias"] + extra["user_offset"]
    w = _World(n_users=n_users, n_items=n_items, **it, **us)
    item_ids = np.arange(n_items, dtype=np.int64)

    (root / "truth").mkdir()
    (root / "impressions").mkdir()
    (root / "images").mkdir()
    if cfg.drawn_images:
        item_image, drawn = _shared_images(cfg, w)
        names = pa.array([draw.shared_image_name(j, cfg.image_format) for j in range(cfg.drawn_images)],
                         pa.string()).take(pa.array(item_image))
    else:
        names = pa.array([draw.image_name(i, cfg.image_format) for i in range(n_items)], pa.string())
        drawn = np.arange(n_items)
    _write_table(
        pa.table(
            {
                "item_id": pa.array(item_ids),
                "category_id": pa.array(w.category, pa.int64()),
                "shop_id": pa.array(w.shop, pa.int64()),
                "first_day": pa.array(w.first_day, pa.int32()),
                "image": names,
                **{k: pa.array(v, pa.int32()) for k, v in extra["item_cols"].items()},
            }
        ),
        root / "items.parquet",
    )
    _write_table(
        pa.table(
            {
                "item_id": pa.array(item_ids),
                "color": pa.array(w.color, pa.int8()),
                "shape": pa.array(w.shape, pa.int8()),
                "pattern": pa.array(w.pattern, pa.int8()),
            }
        ),
        root / "truth" / "items.parquet",
    )
    _write_table(
        pa.table(
            {
                "user_id": pa.array(np.arange(n_users, dtype=np.int64)),
                "gender": pa.array(w.gender, pa.int8()),
                "age_bucket": pa.array(w.age_bucket, pa.int8()),
                **{k: pa.array(v, pa.int32()) for k, v in extra["user_cols"].items()},
            }
        ),
        root / "users.parquet",
    )
    if cfg.extra_fields:
        _write_table(extra["info"], root / "truth" / "extra_fields.parquet")
    (root / "source.toml").write_text(_source_toml(list(extra["user_cols"]), list(extra["item_cols"])))

    report_progress(1, 4, stage="images", text=f"drawing {drawn.size} images")
    if cfg.drawn_images:
        _render_images(cfg, drawn, *_combo_attributes(drawn), root / "images", progress, shared=True)
    else:
        _render_images(cfg, drawn, w.color, w.shape, w.pattern, root / "images", progress)

    # impressions per user and day, then whole users grouped into parts of ~ROWS_PER_PART rows;
    # drawn for COUNT_BLOCK users at a time from one stream (the same numbers as one call: numpy
    # draws an array's elements in order)
    rate = _rate(cfg, n_users)
    count_rng = _rng(cfg.seed, "counts")
    counts = np.empty((n_users, cfg.days), dtype=np.int32)
    for a in range(0, n_users, COUNT_BLOCK):
        b = min(a + COUNT_BLOCK, n_users)
        counts[a:b] = count_rng.poisson(w.activity[a:b, None] * rate, size=(b - a, cfg.days))
    per_user = counts.sum(axis=1, dtype=np.int64)
    total = int(per_user.sum())
    part_of_user = (np.cumsum(per_user) - per_user) // ROWS_PER_PART
    bounds = np.r_[0, np.flatnonzero(np.diff(part_of_user)) + 1, n_users]

    samplers = _day_samplers(w, cfg.days)
    # oracle metrics keep ~21 bytes a row: above AUC_MAX_ROWS, only the rows of a random subset of
    # users (whole users, so that the GAUC stays unbiased)
    keep_user = _rng(cfg.seed, "oracle").random(n_users) < min(1.0, AUC_MAX_ROWS / max(total, 1))
    ps, pnv, pns, clicks, users_all = [], [], [], [], []
    n_clicks, sum_p = 0, 0.0
    shown_cold = np.zeros(n_items, dtype=bool)
    cold_mask = w.first_day > 0
    next_id = 0
    truth_writer = pq.ParquetWriter(root / "truth" / "impressions.parquet", TRUTH_SCHEMA, compression="snappy")
    report_progress(2, 4, stage="impressions", text=f"simulating {total} impressions")
    bar = tqdm(total=total, desc="impressions", unit="row", unit_scale=True, disable=not progress, file=sys.stderr)
    try:
        for part, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            r = _simulate_chunk(cfg, w, samplers, int(a), counts[a:b], part)
            nrow = r["ts"].size
            imp_id = np.arange(next_id, next_id + nrow, dtype=np.int64)
            next_id += nrow
            _write_table(
                pa.table(
                    {
                        "impression_id": pa.array(imp_id),
                        "timestamp": pa.array((START_MS + r["ts"]).astype("datetime64[ms]")),
                        "user_id": pa.array(r["user"].astype(np.int64)),
                        "item_id": pa.array(r["item"]),
                        "click": pa.array(r["click"], pa.int8()),
                    },
                    schema=IMPRESSION_SCHEMA,
                ),
                root / "impressions" / f"part-{part:05d}.parquet",
            )
            truth_writer.write_table(
                pa.table({"impression_id": pa.array(imp_id), "p_click": pa.array(r["p"])}, schema=TRUTH_SCHEMA)
            )
            keep = keep_user[r["user"]]
            ps.append(r["p"][keep])
            pnv.append(r["p_novis"][keep].astype(np.float32))
            pns.append(r["p_noseq"][keep].astype(np.float32))
            clicks.append(r["click"][keep])
            users_all.append(r["user"][keep].astype(np.int32))
            n_clicks += int(r["click"].sum(dtype=np.int64))
            sum_p += float(r["p"].sum())
            shown_cold[r["item"][cold_mask[r["item"]]]] = True
            bar.update(nrow)
        n_parts = len(bounds) - 1
        if n_parts == 0:  # no impressions at all: one empty part keeps the layout readable
            _write_table(IMPRESSION_SCHEMA.empty_table(), root / "impressions" / "part-00000.parquet")
            n_parts = 1
    finally:
        bar.close()
        truth_writer.close()

    report_progress(3, 4, stage="oracle", text="oracle metrics")
    p = np.concatenate(ps) if ps else np.zeros(0)
    p_nv = np.concatenate(pnv) if pnv else np.zeros(0, np.float32)
    p_ns = np.concatenate(pns) if pns else np.zeros(0, np.float32)
    y = np.concatenate(clicks) if clicks else np.zeros(0, np.int8)
    g = np.concatenate(users_all) if users_all else np.zeros(0, np.int32)
    return {
        "users": n_users,
        "items": n_items,
        "categories": cfg.categories,
        "shops": cfg.shops,
        "days": cfg.days,
        "impressions": total,
        "impressions_per_user_day": rate,
        "clicks": n_clicks,
        "ctr": n_clicks / total if total else None,
        "mean_p_click": sum_p / total if total else None,
        "oracle_rows": int(y.size),
        "oracle_auc": _defined(metrics.auc(y, p)),
        "oracle_auc_without_visual": _defined(metrics.auc(y, p_nv)),
        "oracle_auc_without_sequence": _defined(metrics.auc(y, p_ns)),
        "oracle_gauc": _defined(metrics.gauc(y, p, g)),
        "oracle_gauc_without_visual": _defined(metrics.gauc(y, p_nv, g)),
        "cold_items": int(cold_mask.sum()),
        "cold_items_shown": int(np.count_nonzero(shown_cold)),
        "images_drawn": int(drawn.size),
        **({"image_sharing": {
            "drawn_images": cfg.drawn_images,
            "files": "images/shared-NNNNNN.(png|jpg); items.parquet's image column names each item's",
            "rule": f"shared image j shows colour x shape x pattern combination j % {ATTRIBUTE_COMBOS}; an item "
                    "shows one of the images of its own combination (its hidden attributes are its own, as "
                    "without sharing), so items with the same attributes share pixels",
            "items_per_image": round(n_items / max(drawn.size, 1), 3),
        }} if cfg.drawn_images else {}),
        "impression_parts": n_parts,
        "start": START.isoformat().replace("+00:00", "Z"),
        "model": {
            "b0": B0,
            "w_cat": W_CAT,
            "w_vis": W_VIS,
            "w_seq": W_SEQ,
            "gamma": GAMMA,
            "quality_sd": QUALITY_SD,
            "user_bias_sd": USER_BIAS_SD,
            "activity_sigma": ACTIVITY_SIGMA,
            "p_targeted": P_TARGETED,
            "p_explore": P_EXPLORE,
            "p_preferred_color": P_PREFERRED_COLOR,
            "p_dup_timestamp": P_DUP_TIMESTAMP,
            "colors": list(draw.COLOR_NAMES),
            "shapes": list(draw.SHAPE_NAMES),
            "patterns": list(draw.PATTERN_NAMES),
            "oracle_without_visual": "visual taste replaced by its expectation given the category; "
            "colour and shape dropped from the behaviour state",
            **({"extra_fields": {
                "count": cfg.extra_fields,
                "user_side": "even i (users.parquet, source.toml users.profile)",
                "item_side": "odd i (items.parquet, source.toml items.attributes)",
                "cardinality_range": [EXTRA_CARD_MIN, EXTRA_CARD_MAX],
                "signal_fields": [extra_field_name(i) for i in range(min(cfg.extra_fields, EXTRA_SIGNAL_FIELDS))],
                "signal_sd": EXTRA_SIGNAL_SD,
                "parameters": "truth/extra_fields.parquet",
            }} if cfg.extra_fields else {}),
        },
    }


def drawn_with(out: Path, cfg: WorldConfig) -> bool:
    """Whether `out` holds a world generated with exactly these settings (its world.json says so), so
    a caller can reuse it instead of drawing it again. The settings go through JSON as `generate`
    writes them, so a tuple and the list it became compare equal."""
    meta = Path(out) / "world.json"
    if not meta.exists():
        return False
    return json.loads(meta.read_text()).get("settings") == json.loads(json.dumps(asdict(cfg), default=str))


def generate(cfg: WorldConfig, out: Path, overwrite: bool = False, progress: bool = True) -> dict:
    """Write a synthetic world's raw source (docs/DATA.md) into `out`; return the summary that is
    also written to `out/world.json`. Built in a sibling temp dir and renamed into place at the end;
    an existing `out` is replaced only with `overwrite`, and only once the new one is complete."""
    t0 = time.perf_counter()
    n_users, n_items = _validate(cfg)
    out = Path(out).absolute()
    with atomic_dir(out, overwrite=overwrite, what="world") as tmp:
        report_progress(0, 4, stage="tables", text="items and users")
        summary: dict[str, Any] = {"format_version": 1, "generator": "pipeline.synth", "settings": asdict(cfg)}
        summary.update(_build(cfg, tmp, n_users, n_items, progress))
        summary["elapsed_s"] = round(time.perf_counter() - t0, 3)
        (tmp / "world.json").write_text(json.dumps(summary, indent=2) + "\n")
    report_progress(4, 4, stage="done", text=f"world written to {out}")
    return summary
