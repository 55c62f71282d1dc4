"""The image service (AMS in-process): dedup, counters, backward semantics, exactness against plain
autograd, checkpoints, the trunk-feature cache and its errors. A tiny hand-made image store."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import image_service.descriptor as descriptor
from image_service.descriptor import DescriptorConfig, feature_dim
from image_service.service import ImageService, UnknownImageIds
from image_service.store import create_store, write_rows
from tests.test_model import L, make_batch, manifest
from trainer.features import FeatureMap
from trainer.model import DICM, ModelConfig
from vitrine.errors import UserError

N_IMAGES = 9  # tests.test_model draws image rows below this
SIZE = 16


def make_dataset(root: Path, n: int = N_IMAGES, size: int = SIZE, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    pixels = create_store(root, n, size)
    write_rows(pixels, 1, rng.integers(0, 256, (n - 1, size, size, 3), dtype=np.uint8))
    pd.DataFrame({
        "image_index": np.arange(n, dtype=np.int64),
        "key": [""] + [f"{i:03d}.png" for i in range(n - 1)],
        "source": ["placeholder"] + ["images"] * (n - 1),
        "status": ["placeholder"] + ["ok"] * (n - 1),
        "reason": [""] * n,
    }).to_parquet(root / "images" / "index.parquet", index=False)
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("ds"))


def service(dataset: Path, **kw) -> ImageService:
    return ImageService(dataset, DescriptorConfig(**kw))


def test_embed_dedups_and_counts(dataset):
    svc = service(dataset)
    ids = torch.tensor([3, 1, 3, 3, 0, 1, 8])
    res = svc.embed(ids)
    assert res.unique_ids.tolist() == [0, 1, 3, 8]
    assert res.embeddings.shape == (4, 12) and not res.embeddings.requires_grad
    assert res.embeddings.grad_fn is None
    full = res.expand()
    assert torch.equal(full, res.embeddings[res.inverse]) and full.shape == (7, 12)
    assert torch.equal(full[0], full[2]) and torch.equal(full[0], full[3]) and torch.equal(full[1], full[5])
    assert torch.equal(res.unique_ids[res.inverse], ids)
    assert not torch.equal(full[0], full[1])
    c = svc.counters
    assert c["ids_requested"] == 7 and c["unique_ids_computed"] == 4 < c["ids_requested"]
    assert c["requests"] == c["embed_requests"] == 1
    assert c["bytes_in"] == 7 * 8
    assert c["bytes_out"] == 4 * 12 * 4 + 7 * 8 + 4 * 8
    assert res.version == 0
    # numpy and nested lists are accepted; the same ids give the same embeddings
    again = svc.embed(np.array([[8, 3]]))
    assert torch.equal(again.expand(), full[[6, 0]])
    assert svc.embed([]).embeddings.shape == (0, 12)


def test_an_embedding_does_not_depend_on_the_request_it_came_in(dataset):
    """The same bits for an image asked for alone, in a small request or with the whole store: the
    remote service merges concurrent requests, so a request's size is a matter of timing, and a
    matrix product's rounding depends on its number of rows (before the head ran in fixed blocks,
    rows of requests of 1-7 ids differed from the whole store's in the last bits)."""
    svc = service(dataset)
    everything = svc.embed(torch.arange(svc.n_images)).embeddings
    gen = torch.Generator().manual_seed(0)
    for size in (1, 2, 3, 5, 7, 33, svc.n_images - 1):
        ids = torch.randperm(svc.n_images, generator=gen)[:size]
        part = svc.embed(ids)
        assert torch.equal(part.embeddings, everything[part.unique_ids]), f"a request of {size} ids"


def test_unknown_ids_are_named(dataset):
    svc = service(dataset)
    with pytest.raises(UnknownImageIds, match=r"-1, 9, 12") as e:
        svc.embed([2, 9, -1, 12, 9])
    assert isinstance(e.value, UserError)
    with pytest.raises(UnknownImageIds, match="9"):
        svc.backward([9], torch.zeros(1, 12))
    with pytest.raises(TypeError):
        svc.embed(torch.tensor([1.0]))


def test_backward_changes_only_the_head(dataset):
    svc = service(dataset)
    feats = svc.trunk_features(range(N_IMAGES))
    head0 = copy.deepcopy(svc.head_module().state_dict())
    before = svc.embed([1, 2]).embeddings
    svc.backward([1, 2, 1], torch.randn(3, 12), token=17)
    assert svc.version == 1 and svc.last_token == 17
    assert torch.equal(svc.trunk_features(range(N_IMAGES)), feats)  # the frozen trunk's output is untouched
    head1 = svc.head_module().state_dict()
    assert all(not torch.equal(head0[k], head1[k]) for k in head0)  # every head tensor moved (Adam)
    after = svc.embed([1, 2])
    assert after.version == 1 and not torch.equal(after.embeddings, before)
    c = svc.counters
    assert c["backward_ids"] == 3 and c["backward_unique_ids"] == 2 and c["backward_requests"] == 1
    assert c["bytes_in"] == 2 * 8 + 2 * 8 + (3 * 8 + 3 * 12 * 4)
    svc.backward([], torch.zeros(0, 12))  # empty: no step
    assert svc.version == 1
    with pytest.raises(ValueError, match="shape"):
        svc.backward([1, 2], torch.zeros(3, 12))
    with pytest.raises(ValueError, match="non-finite"):
        svc.backward([1], torch.full((1, 12), float("nan")))
    assert svc.version == 1


def test_embed_at_reads_the_head_of_a_past_step_and_names_a_missing_one(dataset):
    """The evaluation path of an asynchronous job: the head goes on training after the epoch's last step,
    and `embed_at` must answer with that step's head, not the live one."""
    from image_service.policy import make_policy
    from vitrine.snapshots import SnapshotMissing

    svc = service(dataset)
    svc.set_policy(make_policy("immediate", workers=2, step=4))  # 2 pushes per global step, from step 4
    svc.keep_snapshots(every=5)
    ids = [1, 2, 5]
    for _ in range(2):  # step 5
        svc.backward([1, 2], torch.randn(2, 12))
    at5 = svc.embed(ids).embeddings
    for _ in range(3):  # 1.5 steps more: the head moves on
        svc.backward([1, 5], torch.randn(2, 12))
    assert svc.policy.step == 6 and svc.version == 5
    assert not torch.equal(svc.embed(ids).embeddings, at5)
    assert torch.equal(svc.embed_at(ids, 5).embeddings, at5)
    with pytest.raises(SnapshotMissing, match="no snapshot of its head at step 6"):
        svc.embed_at(ids, 6, wait_s=0.01)
    with pytest.raises(SnapshotMissing, match="at step 7.*it is at step 6"):
        svc.embed_at(ids, 7, wait_s=0.01)  # not reached: waits, then says where it is
    # A coordinator more than an epoch behind: the heads of steps 10 and 15 both wait to be asked for.
    heads = {}
    for _ in range(2):
        while svc.policy.step % 5 or svc.policy.step in heads or svc.policy.step < 10:
            svc.backward([2, 5], torch.randn(2, 12))
        heads[svc.policy.step] = svc.embed(ids).embeddings
    assert sorted(heads) == [10, 15]
    assert torch.equal(svc.embed_at(ids, 10).embeddings, heads[10])
    assert torch.equal(svc.embed_at(ids, 15).embeddings, heads[15])
    with pytest.raises(SnapshotMissing, match="kept: step 15"):
        svc.embed_at(ids, 10, wait_s=0.01)


def test_flush_applies_a_partial_gba_batch_and_keeps_the_policy(dataset):
    from image_service.policy import make_policy

    svc = service(dataset)
    svc.set_policy(make_policy("gba", workers=2, step=3))
    svc.backward([1, 2], torch.randn(2, 12), token=3)  # one push of two: held back
    assert svc.version == 0 and svc.policy.pending() == 1
    assert svc.flush() == 1 and svc.policy.step == 4 and svc.policy.pending() == 0
    assert svc.policy.describe()["policy"] == "gba" and svc.policy.describe()["tokens_applied"] == 1


def test_repeated_ids_equal_presummed_grads(dataset):
    a = service(dataset, dtype="float64")
    b = service(dataset, dtype="float64")
    g = torch.randn(5, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for _ in range(3):  # Adam: several steps, so moments matter too
        a.backward([4, 2, 4, 7, 4], g)
        b.backward([2, 4, 7], torch.stack([g[1], g[0] + g[2] + g[4], g[3]]))
    ha, hb = a.head_module().state_dict(), b.head_module().state_dict()
    for k in ha:
        assert torch.allclose(ha[k], hb[k], rtol=0, atol=1e-12), k
    assert a.version == b.version == 3


def test_service_step_equals_end_to_end_autograd(dataset):
    """embed -> DICM -> loss -> grads -> backward == one autograd graph through head and model (SGD)."""
    lr = 0.5
    svc = service(dataset, dtype="float64", optimizer="sgd", lr=lr)
    fmap = FeatureMap.from_manifest(manifest())
    torch.manual_seed(0)
    model = DICM(fmap, ModelConfig(features="ids+images", aggregator="multi_query")).double()
    ref_model = copy.deepcopy(model)
    ref_head = copy.deepcopy(svc.head_module())
    head0 = copy.deepcopy(svc.head_module().state_dict())
    feats = svc.trunk_features(range(N_IMAGES))
    batch, _, _ = make_batch(fmap, B=6, seed=11)
    B = 6
    ids = torch.cat([batch["ad_image"], batch["hist_image"].reshape(-1)])

    # Through the service.
    res = svc.embed(ids)
    emb = res.embeddings.clone().requires_grad_()
    full = emb[res.inverse]
    loss = F.binary_cross_entropy_with_logits(model(batch, full[:B], full[B:].view(B, L, 12)), batch["label"])
    loss.backward()
    svc.backward(res.unique_ids, emb.grad)

    # One graph, plain autograd, SGD by hand.
    full_ref = ref_head(feats[ids])
    loss_ref = F.binary_cross_entropy_with_logits(
        ref_model(batch, full_ref[:B], full_ref[B:].view(B, L, 12)), batch["label"])
    loss_ref.backward()
    with torch.no_grad():
        for p in ref_head.parameters():
            p -= lr * p.grad

    assert abs(loss.item() - loss_ref.item()) < 1e-12
    for (n, p), (_, q) in zip(model.named_parameters(), ref_model.named_parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=0, atol=1e-9), n
    head = svc.head_module().state_dict()
    for k, v in ref_head.state_dict().items():
        assert torch.allclose(head[k], v, rtol=0, atol=1e-9), k
    assert svc.version == 1
    # The step did move the head, so the comparison is not vacuous.
    assert max((head[k] - head0[k]).abs().max().item() for k in head) > 1e-4


def test_state_dict_round_trip(dataset):
    a = service(dataset)
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        a.backward([1, 5, 5], torch.randn(3, 12, generator=g))
    saved = a.state_dict()
    torch.save(saved, dataset / "svc.pt")
    b = service(dataset)
    assert not torch.equal(a.embed([1, 5]).embeddings, b.embed([1, 5]).embeddings)
    b.load_state_dict(torch.load(dataset / "svc.pt", weights_only=False))
    assert b.version == a.version == 2
    assert torch.equal(a.embed([1, 5]).embeddings, b.embed([1, 5]).embeddings)
    step = torch.randn(2, 12, generator=g)
    a.backward([3, 6], step)
    b.backward([3, 6], step)  # the optimizer state came back too: the next Adam step matches
    for (k, x), (_, y) in zip(a.head_module().state_dict().items(), b.head_module().state_dict().items()):
        assert torch.equal(x, y), k
    with pytest.raises(UserError, match="out_dim"):
        service(dataset, out_dim=8).load_state_dict(saved)


def test_trunk_feature_cache_is_reused(tmp_path, monkeypatch):
    ds = make_dataset(tmp_path / "ds")
    first = service(ds)
    assert not first.trunk.from_cache
    cached = sorted(p.name for p in (ds / "cache").iterdir())
    assert len(cached) == 3 and not any(n.startswith(".") for n in cached)  # no temp files left
    info = json.loads(next((ds / "cache").glob("*.json")).read_text())
    assert info["weights"] == "random-seed0" and info["store_shape"] == [N_IMAGES, SIZE, SIZE, 3]

    def boom(*a, **k):
        raise AssertionError("the trunk ran again although its features are cached")

    monkeypatch.setattr(descriptor, "extract_features", boom)
    second = service(ds)
    assert second.trunk.from_cache
    assert torch.equal(first.trunk_features(range(N_IMAGES)), second.trunk_features(range(N_IMAGES)))
    assert torch.equal(first.embed([1, 2]).embeddings, second.embed([1, 2]).embeddings)  # same request
    with pytest.raises(AssertionError, match="ran again"):  # another seed is another trunk
        service(ds, seed=1)
    monkeypatch.undo()
    # A different index (other images) is another key, too.
    idx = pd.read_parquet(ds / "images" / "index.parquet")
    idx.loc[1, "key"] = "changed.png"
    idx.to_parquet(ds / "images" / "index.parquet", index=False)
    assert not service(ds).trunk.from_cache
    # A custom cache_dir is honoured.
    other = ImageService(ds, DescriptorConfig(), cache_dir=tmp_path / "elsewhere")
    assert not other.trunk.from_cache and len(list((tmp_path / "elsewhere").glob("*.npy"))) == 2


def test_features_are_standardised(dataset):
    svc = service(dataset)
    f = svc.trunk_features(range(N_IMAGES)).double()
    assert f.shape == (N_IMAGES, feature_dim("resnet18", "stages"))
    assert torch.allclose(f.mean(0), torch.zeros(f.shape[1], dtype=torch.float64), atol=1e-4)
    live = svc.trunk.std != 1.0
    assert torch.allclose(f.std(0, correction=0)[torch.from_numpy(live)], torch.ones(int(live.sum()),
                                                                                      dtype=torch.float64), atol=1e-3)


def test_weights_file_errors(dataset, tmp_path):
    with pytest.raises(UserError, match="nope.pth"):
        service(dataset, weights=str(tmp_path / "nope.pth"))
    bad = tmp_path / "linear.pth"
    torch.save(torch.nn.Linear(3, 2).state_dict(), bad)
    with pytest.raises(UserError, match="linear.pth"):
        service(dataset, weights=str(bad))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="junk.pth"):
        service(dataset, weights=str(junk))


def test_weights_file_loads_and_keys_the_cache(dataset, tmp_path):
    import torchvision

    torch.manual_seed(3)
    good = tmp_path / "mnv3.pth"
    torch.save(torchvision.models.mobilenet_v3_small(weights=None).state_dict(), good)
    svc = ImageService(dataset, DescriptorConfig(trunk="mobilenet_v3_small", weights=str(good)),
                       cache_dir=tmp_path / "c")
    assert svc.trunk.info["weights"].startswith("sha256:")
    assert svc.embed([1]).embeddings.shape == (1, 12)
    rnd = ImageService(dataset, DescriptorConfig(trunk="mobilenet_v3_small"), cache_dir=tmp_path / "c")
    assert rnd.trunk.key != svc.trunk.key


def test_descriptor_config_rejects_bad_values():
    with pytest.raises(UserError):
        DescriptorConfig(trunk="vgg16")
    with pytest.raises(UserError):
        DescriptorConfig(optimizer="rmsprop")
    with pytest.raises(UserError):
        DescriptorConfig(pooling="gem")
