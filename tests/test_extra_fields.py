"""`vitrine generate --extra-fields K`: K extra categorical ID fields (half user-side, half item-side)
for measuring embedding packing. K = 0 leaves the world as it was; the fields reach the processed
dataset with their own vocabularies, and the model embeds them with no trainer change."""

from __future__ import annotations

import hashlib
import json
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.build import PipelineConfig, run_pipeline
from pipeline.source import load_source
from pipeline.synth import world
from pipeline.synth.world import WorldConfig, generate
from pipeline.vocab import OOV, encode
from trainer.data import BatchLoader, LoaderConfig
from trainer.dataset import open_dataset
from trainer.features import FeatureMap
from trainer.model import DICM, ModelConfig
from vitrine.errors import UserError

SMALL = dict(users=200, items=100, days=4, seed=3)
K = 5
NAMES = [f"x{i:03d}" for i in range(K)]
BASE_CATEGORICAL = {"user_id", "gender", "age_bucket", "item_id", "category_id", "shop_id", "image_id", "hour"}
# Values (not file bytes, which depend on the Parquet writer) of the SMALL world, as written by the
# generator before --extra-fields existed. If a numpy upgrade ever changes its random streams, this
# changes too: regenerate it with the code of a commit before the option.
DIGEST_BEFORE_THE_OPTION = "ec4ffc2dfff8273fe7217a513952747a0fc485834b0c71d3bf9b0b9c4b835c03"


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for name in ("impressions", "truth/impressions.parquet", "items.parquet", "users.parquet", "truth/items.parquet"):
        t = pq.read_table(root / name)
        for col in t.column_names:
            a = t.column(col).to_numpy()
            h.update(col.encode())
            h.update("\n".join(a).encode() if a.dtype == object else np.ascontiguousarray(a).tobytes())
    h.update((root / "source.toml").read_bytes())
    return h.hexdigest()


def _table(root: Path, name: str) -> pd.DataFrame:
    return pq.read_table(root / name).to_pandas()


@pytest.fixture(scope="module")
def worlds(tmp_path_factory) -> dict[int, Path]:
    base = tmp_path_factory.mktemp("extra")
    out = {}
    for k in (0, K):
        out[k] = base / f"k{k}"
        generate(WorldConfig(**SMALL, extra_fields=k), out[k], progress=False)
    return out


# --- the world -------------------------------------------------------------------------------------


def test_zero_extra_fields_is_the_world_before_the_option(worlds):
    root = worlds[0]
    assert _digest(root) == DIGEST_BEFORE_THE_OPTION
    assert not (root / "truth" / "extra_fields.parquet").exists()
    summary = json.loads((root / "world.json").read_text())
    assert summary["settings"]["extra_fields"] == 0 and "extra_fields" not in summary["model"]


def test_extra_fields_are_stable_user_and_item_attributes(worlds):
    k0, k5 = worlds[0], worlds[K]
    info = _table(k5, "truth/extra_fields.parquet")
    assert info.field.tolist() == NAMES
    assert info.side.tolist() == ["user", "item", "user", "item", "user"]
    assert info.cardinality.between(world.EXTRA_CARD_MIN, world.EXTRA_CARD_MAX).all()
    assert info.signal.tolist() == [i < world.EXTRA_SIGNAL_FIELDS for i in range(K)]
    users, items = _table(k5, "users.parquet"), _table(k5, "items.parquet")
    for r in info.itertuples():
        col = (users if r.side == "user" else items)[r.field]
        assert col.dtype == np.int32 and col.between(0, r.cardinality - 1).all(), r.field
        assert col.nunique() > 1
    # Zipf-like: the commonest value of a wide field is far above its uniform share
    wide = info[info.cardinality >= 50]
    for r in wide.itertuples():
        col = (users if r.side == "user" else items)[r.field]
        assert col.value_counts().iloc[0] / len(col) > 3 / r.cardinality, r.field

    # the rest of the world is untouched: same columns, images, ad items and timestamps
    assert users.drop(columns=NAMES[0::2]).equals(_table(k0, "users.parquet"))
    assert items.drop(columns=NAMES[1::2]).equals(_table(k0, "items.parquet"))
    assert _table(k5, "truth/items.parquet").equals(_table(k0, "truth/items.parquet"))
    for name in ("000000.png", "000001.jpg"):
        assert (k5 / "images" / name).read_bytes() == (k0 / "images" / name).read_bytes()
    a, b = _table(k5, "impressions"), _table(k0, "impressions")
    cols = ["impression_id", "timestamp", "user_id", "item_id"]
    assert a[cols].equals(b[cols])
    # ... but the signal fields move the click probability
    pa_, pb = _table(k5, "truth/impressions.parquet"), _table(k0, "truth/impressions.parquet")
    assert not np.allclose(pa_.p_click, pb.p_click)

    source = tomllib.loads((k5 / "source.toml").read_text())
    assert source["users"]["profile"] == ["gender", "age_bucket", *NAMES[0::2]]
    assert source["items"]["attributes"] == NAMES[1::2]
    summary = json.loads((k5 / "world.json").read_text())
    assert summary["model"]["extra_fields"]["signal_fields"] == NAMES[: world.EXTRA_SIGNAL_FIELDS]


def test_noise_fields_leave_the_clicks_alone_and_do_not_depend_on_k(worlds, tmp_path, monkeypatch):
    monkeypatch.setattr(world, "EXTRA_SIGNAL_FIELDS", 0)
    out = tmp_path / "k3"
    generate(WorldConfig(**SMALL, extra_fields=3), out, progress=False)
    for name in ("impressions/part-00000.parquet", "truth/impressions.parquet"):
        assert (out / name).read_bytes() == (worlds[0] / name).read_bytes(), name
    # field i comes from its own stream: the same in a K=3 and a K=5 world
    users3, users5 = _table(out, "users.parquet"), _table(worlds[K], "users.parquet")
    items3, items5 = _table(out, "items.parquet"), _table(worlds[K], "items.parquet")
    assert users3[["x000", "x002"]].equals(users5[["x000", "x002"]])
    assert items3[["x001"]].equals(items5[["x001"]])


@pytest.mark.parametrize("bad", [-1, world.EXTRA_FIELDS_MAX + 1, 2.5, True])
def test_bad_extra_fields_are_user_errors(tmp_path, bad):
    with pytest.raises(UserError, match="--extra-fields"):
        generate(WorldConfig(**SMALL, extra_fields=bad), tmp_path / "w", progress=False)
    assert not (tmp_path / "w").exists()


# --- the pipeline and the model --------------------------------------------------------------------


@pytest.fixture(scope="module")
def dataset(worlds, tmp_path_factory, dask_address) -> Path:
    out = tmp_path_factory.mktemp("extra-ds") / "ds"
    run_pipeline(PipelineConfig(raw=str(worlds[K]), out=str(out), scheduler=dask_address, progress=False,
                                max_behaviors=10, track=False))
    return out


def test_pipeline_gives_each_extra_field_its_own_vocabulary(worlds, dataset):
    manifest = json.loads((dataset / "manifest.json").read_text())
    fmap = FeatureMap.from_manifest(manifest)
    names = [f.name for f in fmap.categorical]
    assert set(names) == BASE_CATEGORICAL | set(NAMES) and len(names) == len(BASE_CATEGORICAL) + K

    raw = worlds[K]
    users = _table(raw, "users.parquet").set_index("user_id")
    items = _table(raw, "items.parquet").set_index("item_id")
    imp = _table(raw, "impressions").set_index("impression_id")
    rows = pd.concat([pd.read_parquet(dataset / s) for s in ("train", "valid", "test")], ignore_index=True)
    raw_rows = imp.loc[rows.impression_id]
    for i, name in enumerate(NAMES):
        f = fmap[name]
        user_side = i % 2 == 0
        assert f.vocab == name and f.group == ("user" if user_side else "ad")
        vocab = pd.read_parquet(dataset / "vocab" / f"{name}.parquet")
        assert f.vocab_size == len(vocab) + 2 == fmap.vocabs[name]
        values = rows[name].to_numpy()
        assert values.min() >= OOV and values.max() < f.vocab_size
        # each row holds the encoded attribute of its own user or ad item
        table, key = (users, raw_rows.user_id) if user_side else (items, raw_rows.item_id)
        expect = encode(table[name].loc[key.to_numpy()].to_numpy(), vocab)
        assert (values == expect).all(), name
        assert set(vocab["id"]) <= set(table[name])
        assert (values > OOV).mean() > 0.9  # train-frequent values dominate


def test_the_model_embeds_the_extra_fields(dataset):
    ds = open_dataset(dataset)
    fmap = FeatureMap.from_manifest(ds.manifest)
    torch.manual_seed(0)
    model = DICM(fmap, ModelConfig(features="ids"))
    batch = next(iter(BatchLoader(ds, "train", LoaderConfig(batch_size=256, shuffle_buffer=0), seed=0,
                                  shuffle=False).epoch(0)))
    loss = torch.nn.functional.binary_cross_entropy_with_logits(model(batch), batch["label"])
    loss.backward()
    for name in NAMES:
        table = model.table(fmap[name])
        assert table.num_embeddings == fmap[name].vocab_size
        assert table.weight.grad is not None and table.weight.grad.abs().sum() > 0, name


# --- the source file -------------------------------------------------------------------------------


def test_item_attributes_in_source_toml_are_checked(worlds, tmp_path):
    import shutil

    raw = tmp_path / "raw"
    shutil.copytree(worlds[K], raw)
    text = (raw / "source.toml").read_text()
    spec = load_source(raw)
    assert spec.item_attributes == tuple(NAMES[1::2]) and spec.user_profile[2:] == tuple(NAMES[0::2])
    for bad, match in [('attributes = ["nope"]', "item attribute column 'nope' not found"),
                       ('attributes = ["hour"]', "clash"),
                       ('attributes = ["x000"]', "clash"),  # already a user profile column
                       ('attributes = ["image"]', "already mapped"),
                       ('attributes = "x001"', "list of column names")]:
        (raw / "source.toml").write_text(text.replace('attributes = ["x001", "x003"]', bad))
        with pytest.raises(UserError, match=match):
            load_source(raw)
