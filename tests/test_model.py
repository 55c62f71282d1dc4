"""The DICM and its feature map: shapes per variant, masking, poolings by hand, shared tables,
gradient flow, deterministic init. A hand-written manifest; no dataset needed."""

from __future__ import annotations

import itertools

import pytest
import torch

from trainer.features import Field, FeatureMap
from trainer.layers import AttentionPooling, masked_max, masked_sum
from trainer.model import AGGREGATORS, DICM, FEATURES, ModelConfig
from vitrine.errors import UserError

L = 5
N_IMAGES = 9


def manifest(L: int = L) -> dict:
    def cat(name, size, group, vocab=None):
        return {"name": name, "kind": "categorical", "vocab": vocab or name, "vocab_size": size, "group": group}

    def seq(name, vocab, size):
        return {"name": name, "kind": "sequence", "vocab": vocab, "vocab_size": size, "max_len": L, "group": "behavior"}

    return {"fields": [
        cat("user_id", 10, "user"), cat("gender", 4, "user"),
        cat("item_id", 20, "ad"), cat("category_id", 6, "ad"), cat("shop_id", 5, "ad"), cat("image_id", 20, "ad"),
        cat("hour", 26, "context"),
        seq("hist_item_id", "item_id", 20), seq("hist_category_id", "category_id", 6),
        seq("hist_image_id", "image_id", 20),
        {"name": "ad_image", "kind": "image", "group": "ad"},
        {"name": "hist_image", "kind": "image_sequence", "max_len": L, "group": "behavior"},
    ]}


@pytest.fixture(scope="module")
def fmap() -> FeatureMap:
    return FeatureMap.from_manifest(manifest())


def make_batch(fmap: FeatureMap, B: int = 6, seed: int = 0, image_dim: int = 12,
               dtype: torch.dtype = torch.float32) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """A batch in the loader's format (hist_len covers 0 and L) and matching image embeddings."""
    g = torch.Generator().manual_seed(seed)
    batch: dict[str, torch.Tensor] = {}
    for f in fmap.categorical:
        batch[f.name] = torch.randint(1, f.vocab_size, (B,), generator=g)
    hist_len = torch.randint(0, L + 1, (B,), generator=g)
    hist_len[0], hist_len[-1] = 0, L
    mask = torch.arange(L) < hist_len[:, None]
    for f in fmap.sequences:
        batch[f.name] = torch.randint(1, f.vocab_size, (B, L), generator=g) * mask
    batch["hist_len"] = hist_len
    batch["ad_image"] = torch.randint(1, N_IMAGES, (B,), generator=g)
    batch["hist_image"] = torch.randint(1, N_IMAGES, (B, L), generator=g) * mask
    batch["label"] = torch.randint(0, 2, (B,), generator=g).float()
    batch["group_id"] = torch.arange(B)
    batch["cold_item"] = torch.zeros(B, dtype=torch.bool)
    batch["impression_id"] = torch.arange(B)
    ad = torch.randn(B, image_dim, generator=g, dtype=dtype)
    hist = torch.randn(B, L, image_dim, generator=g, dtype=dtype) * mask[..., None]
    return batch, ad, hist


VARIANTS = [(f, a) for f, a in itertools.product(FEATURES, AGGREGATORS)
            if not (a == "multi_query" and f == "ids+behavior_images")]


def build(fmap, features="ids+images", aggregator="attentive", seed=0, **kw) -> DICM:
    torch.manual_seed(seed)
    return DICM(fmap, ModelConfig(features=features, aggregator=aggregator, **kw))


# -- feature map ----------------------------------------------------------------------------------
def test_feature_map_from_manifest(fmap):
    assert [f.name for f in fmap.categorical] == ["user_id", "gender", "item_id", "category_id", "shop_id",
                                                  "image_id", "hour"]
    assert [f.name for f in fmap.sequences] == ["hist_item_id", "hist_category_id", "hist_image_id"]
    assert fmap.has_images and fmap.max_len == L
    assert fmap.vocabs == {"user_id": 10, "gender": 4, "item_id": 20, "category_id": 6, "shop_id": 5,
                           "image_id": 20, "hour": 26}
    assert fmap["ad_image"] == Field("ad_image", "image", None, 0, "ad")
    assert fmap.ad_field_for(fmap["hist_item_id"]).name == "item_id"


def test_feature_map_rejects_bad_manifests():
    m = manifest()
    m["fields"][0]["kind"] = "numeric"
    with pytest.raises(UserError, match="unknown kind"):
        FeatureMap.from_manifest(m)
    m = manifest()
    m["fields"][7]["vocab_size"] = 21  # hist_item_id disagrees with item_id
    with pytest.raises(UserError, match="disagree"):
        FeatureMap.from_manifest(m)
    with pytest.raises(UserError, match="fields"):
        FeatureMap.from_manifest({})


def test_config_rejects_bad_values():
    with pytest.raises(UserError):
        ModelConfig(features="pixels")
    with pytest.raises(UserError):
        ModelConfig(aggregator="concat")
    with pytest.raises(UserError, match="multi_query"):
        ModelConfig(features="ids+behavior_images", aggregator="multi_query")


def test_images_needed_but_absent():
    m = manifest()
    m["fields"] = [f for f in m["fields"] if f["kind"] not in ("image", "image_sequence")]
    fm = FeatureMap.from_manifest(m)
    assert not fm.has_images
    DICM(fm, ModelConfig(features="ids"))
    with pytest.raises(UserError, match="images"):
        DICM(fm, ModelConfig(features="ids+images"))


# -- shapes and masking ---------------------------------------------------------------------------------
@pytest.mark.parametrize("features,aggregator", VARIANTS)
def test_output_shape_every_variant(fmap, features, aggregator):
    model = build(fmap, features, aggregator)
    assert model.uses_ad_image == (features in ("ids+ad_image", "ids+images"))
    assert model.uses_hist_images == (features in ("ids+behavior_images", "ids+images"))
    batch, ad, hist = make_batch(fmap)
    out = model(batch, ad, hist)
    assert out.shape == (6,) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("aggregator", AGGREGATORS)
def test_image_dim_differs_from_embed_dim(fmap, aggregator):
    for features in ("ids+images", "ids+behavior_images"):
        if aggregator == "multi_query" and features == "ids+behavior_images":
            continue
        model = build(fmap, features, aggregator, image_dim=7)
        batch, ad, hist = make_batch(fmap, image_dim=7)
        assert model(batch, ad, hist).shape == (6,)


def test_missing_or_misshaped_image_embeddings(fmap):
    model = build(fmap, "ids+images")
    batch, ad, hist = make_batch(fmap)
    with pytest.raises(ValueError, match="ad_image_emb"):
        model(batch, None, hist)
    with pytest.raises(ValueError, match="hist_image_emb"):
        model(batch, ad, hist[:, :3])
    assert build(fmap, "ids")(batch).shape == (6,)  # the ID model needs no image embeddings


@pytest.mark.parametrize("features,aggregator", VARIANTS)
def test_padded_positions_do_not_matter(fmap, features, aggregator):
    model = build(fmap, features, aggregator)
    batch, ad, hist = make_batch(fmap, seed=1)
    ref = model(batch, ad, hist)
    pad = torch.arange(L) >= batch["hist_len"][:, None]
    g = torch.Generator().manual_seed(7)
    for f in fmap.sequences:  # one field at a time, then all together below
        b2 = dict(batch)
        b2[f.name] = torch.where(pad, torch.randint(1, f.vocab_size, (6, L), generator=g), batch[f.name])
        assert torch.equal(model(b2, ad, hist), ref), f.name
    b2 = dict(batch)
    for f in fmap.sequences:
        b2[f.name] = torch.where(pad, torch.randint(1, f.vocab_size, (6, L), generator=g), batch[f.name])
    b2["hist_image"] = torch.where(pad, 3, batch["hist_image"])
    junk = torch.where(pad[..., None], torch.full_like(hist, 1e6), hist)
    assert torch.equal(model(b2, ad, junk), ref)
    nan = torch.where(pad[..., None], torch.full_like(hist, float("nan")), hist)
    assert torch.equal(model(b2, ad, nan), ref)


@pytest.mark.parametrize("features,aggregator", VARIANTS)
def test_empty_history_is_finite(fmap, features, aggregator):
    model = build(fmap, features, aggregator)
    batch, ad, hist = make_batch(fmap)
    batch["hist_len"] = torch.zeros(6, dtype=torch.long)
    for f in fmap.sequences:
        batch[f.name] = torch.zeros_like(batch[f.name])
    hist = torch.zeros_like(hist).requires_grad_()
    out = model(batch, ad, hist)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    if hist.grad is not None:
        assert torch.equal(hist.grad, torch.zeros_like(hist))


# -- poolings by hand -------------------------------------------------------------------------------
def test_masked_sum_and_max_by_hand():
    values = torch.tensor([
        [[1.0, -2.0], [3.0, 5.0], [-7.0, 0.5]],
        [[-1.0, -4.0], [9.0, 9.0], [9.0, 9.0]],
        [[2.0, 2.0], [3.0, 3.0], [4.0, 4.0]],
    ])
    hist_len = torch.tensor([3, 1, 0])
    mask = torch.arange(3) < hist_len[:, None]
    assert torch.equal(masked_sum(values, mask), torch.tensor([[-3.0, 3.5], [-1.0, -4.0], [0.0, 0.0]]))
    assert torch.equal(masked_max(values, mask), torch.tensor([[3.0, 5.0], [-1.0, -4.0], [0.0, 0.0]]))
    v = values.clone().requires_grad_()
    masked_max(v, mask).sum().backward()
    expect = torch.zeros_like(values)
    expect[0, 1, 0] = expect[0, 1, 1] = 1.0  # arg-max of row 0
    expect[1, 0, :] = 1.0  # the single real position of row 1
    assert torch.equal(v.grad, expect)


def test_sum_and_max_aggregators_feed_the_mlp(fmap):
    """The aggregated behaviour-image vector is exactly the hand-pooled one (read at the MLP input)."""
    for agg, pool in (("sum", masked_sum), ("max", masked_max)):
        model = build(fmap, "ids+behavior_images", agg)
        batch, ad, hist = make_batch(fmap, seed=3)
        seen = {}
        model.mlp.register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0]))
        model(batch, None, hist)
        mask = torch.arange(L) < batch["hist_len"][:, None]
        hand = torch.zeros(6, 12)
        for b in range(6):
            n = int(batch["hist_len"][b])
            if n:
                hand[b] = hist[b, :n].sum(0) if agg == "sum" else hist[b, :n].max(0).values
        assert torch.allclose(seen["x"][:, -12:], hand, atol=1e-6)
        assert torch.equal(seen["x"][:, -12:], pool(hist, mask))


def test_attention_pooling_by_hand():
    torch.manual_seed(0)
    att = AttentionPooling(3, (4,))
    att.record_weights = True
    q = torch.randn(2, 3)
    k = torch.randn(2, 4, 3)
    mask = torch.tensor([[True, True, False, False], [False, False, False, False]])
    out = att(q, k, mask)
    for j in range(2):
        qq = q[0]
        w = att.mlp(torch.cat([qq, k[0, j], qq - k[0, j], qq * k[0, j]]))
        assert torch.allclose(att.last_weights[0, j], w[0])
    hand = sum(att.last_weights[0, j] * k[0, j] for j in range(2))
    assert torch.allclose(out[0], hand, atol=1e-6)
    assert torch.equal(out[1], torch.zeros(3))
    assert torch.equal(att.last_weights[:, 2:], torch.zeros(2, 2))


# -- tables, gradients, init ------------------------------------------------------------------------------
def test_shared_tables_and_padding(fmap):
    model = build(fmap)
    assert model.table(fmap["hist_item_id"]) is model.table(fmap["item_id"])
    assert model.table(fmap["hist_item_id"]).weight is model.table(fmap["item_id"]).weight
    assert model.table(fmap["hist_image_id"]) is model.table(fmap["image_id"])
    assert len(model.embeddings) == len(fmap.vocabs)
    assert sum(isinstance(m, torch.nn.Embedding) for m in model.modules()) == len(fmap.vocabs)
    for name, t in model.embeddings.items():
        assert t.weight.shape == (fmap.vocabs[name], 12)
        assert torch.equal(t(torch.tensor([0])), torch.zeros(1, 12))


@pytest.mark.parametrize("features,aggregator", VARIANTS)
def test_gradients_reach_only_what_the_variant_uses(fmap, features, aggregator):
    model = build(fmap, features, aggregator)
    batch, ad, hist = make_batch(fmap, seed=2)
    batch["category_id"][0] = 0  # a missing value: the padding row, a zero vector that never trains
    ad.requires_grad_()
    hist.requires_grad_()
    logits = model(batch, ad, hist)
    torch.nn.functional.binary_cross_entropy_with_logits(logits, batch["label"]).backward()
    # Image embeddings get a gradient only when the variant uses them...
    assert (ad.grad is not None) == model.uses_ad_image
    assert (hist.grad is not None) == model.uses_hist_images
    if hist.grad is not None:
        pad = torch.arange(L) >= batch["hist_len"][:, None]
        assert torch.equal(hist.grad[pad], torch.zeros_like(hist.grad[pad]))
        assert hist.grad[~pad].abs().sum() > 0
    if ad.grad is not None:
        assert ad.grad.abs().sum() > 0
    # ...and every parameter the model built is used (no dead weights: DDP-safe).
    for name, p in model.named_parameters():
        assert p.grad is not None, name
    for t in model.embeddings.values():
        assert torch.equal(t.weight.grad[0], torch.zeros(12))  # padding row never trains
    names = {n for n, _ in model.named_parameters()}
    assert any(n.startswith("image_attention.") for n in names) == (
        model.uses_hist_images and aggregator in ("attentive", "multi_query"))
    assert any(n.startswith("image_attention_cat.") for n in names) == (
        model.uses_hist_images and aggregator == "multi_query")


def test_image_attention_queries(fmap):
    """attentive: the ad image, or the ad category without one; multi_query: one channel each."""
    batch, ad, hist = make_batch(fmap, seed=4)
    cat = lambda m: m.table(fmap["category_id"])(batch["category_id"])  # noqa: E731
    seen: dict = {}

    def spy(name):
        return lambda m, args: seen.__setitem__(name, args[0])

    model = build(fmap, "ids+behavior_images", "attentive")
    assert model.query_field.name == "category_id"
    model.image_attention.register_forward_pre_hook(spy("q"))
    model(batch, None, hist)
    assert torch.equal(seen["q"], cat(model))

    model = build(fmap, "ids+images", "attentive")
    model.image_attention.register_forward_pre_hook(spy("q"))
    model(batch, ad, hist)
    assert torch.equal(seen["q"], ad)

    model = build(fmap, "ids+images", "multi_query")
    model.image_attention.register_forward_pre_hook(spy("q1"))
    model.image_attention_cat.register_forward_pre_hook(spy("q2"))
    model(batch, ad, hist)
    assert torch.equal(seen["q1"], ad) and torch.equal(seen["q2"], cat(model))


def test_init_is_deterministic(fmap):
    a, b, c = build(fmap, seed=5), build(fmap, seed=5), build(fmap, seed=6)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_float64(fmap):
    model = build(fmap).double()
    batch, ad, hist = make_batch(fmap, dtype=torch.float64)
    assert model(batch, ad, hist).dtype == torch.float64
