"""PICASSO's optimizations: each must leave the model's math unchanged."""

from __future__ import annotations

import pytest
import torch

from test_model import build, make_batch, manifest
from trainer.features import FeatureMap


@pytest.mark.parametrize("features,aggregator", [("ids+images", "attentive"), ("ids", "sum"),
                                                 ("ids+images", "multi_query")])
def test_packed_and_unpacked_models_give_the_same_outputs_and_gradients(features, aggregator):
    fmap = FeatureMap.from_manifest(manifest())
    plain = build(fmap, features, aggregator, seed=1).double()
    packed = build(fmap, features, aggregator, seed=2, packing=True).double()
    assert len(fmap.vocabs) > 2 and len(list(packed.embeddings)) == 0
    packed.pack_state_from(plain)
    batch, ad, hist = make_batch(fmap, B=9, seed=4, dtype=torch.float64)
    outs = []
    for m in (plain, packed):
        a, h = ad.clone().requires_grad_(), hist.clone().requires_grad_()
        y = m(batch, a, h)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype)).sum().backward()
        outs.append((y.detach(), a.grad, h.grad))
    assert torch.allclose(outs[0][0], outs[1][0], rtol=0, atol=1e-12)
    for i in (1, 2):  # the image embeddings' gradients (None when the variant does not use them)
        assert (outs[0][i] is None) == (outs[1][i] is None)
        if outs[0][i] is not None:
            assert torch.allclose(outs[0][i], outs[1][i], rtol=0, atol=1e-12)
    grads = dict(packed.named_parameters())
    for n, p in plain.named_parameters():
        if n.startswith("embeddings."):
            vocab = next(v for v in fmap.vocabs if f"embeddings.{v.replace('.', '_')}.weight" == n)
            start = packed.start[vocab]
            g = grads["packed.weight"].grad[start:start + p.shape[0] - 1]
            assert torch.allclose(g, p.grad[1:], rtol=0, atol=1e-12), n
        else:
            assert torch.allclose(grads[n].grad, p.grad, rtol=0, atol=1e-12), n
    assert not grads["packed.weight"].grad[0].any()  # the shared padding row never trains
    # What a PS worker pulls: the same rows, in the packed table's numbering.
    plain_rows = plain.read_rows(batch)
    mapped = [packed.vocab_rows(v, plain_rows[f"embeddings.{v.replace('.', '_')}.weight"])[1]
              for v in fmap.vocabs if f"embeddings.{v.replace('.', '_')}.weight" in plain_rows]
    assert torch.equal(packed.read_rows(batch)["packed.weight"], torch.unique(torch.cat(mapped)))


def test_cached_rows_are_never_staler_than_the_bound():
    """Steps arrive with the tokens' global steps (repeats and jumps, as under GBA); every row the cache
    serves was read at most `bound` steps before, and a stale cache re-reads every hot row."""
    from trainer.ps.cache import RowCache

    hot = torch.tensor([1, 3, 5])
    cache = RowCache({"t": hot}, bound=2)
    table = torch.zeros(8, 1)  # the PS's rows; row value = the step it was last written
    steps = [0, 0, 1, 1, 2, 3, 3, 4, 7, 7, 8, 9, 12]
    for step in steps:
        table[:] = step
        ids = torch.tensor([1, 2, 3, 6])
        want, refresh = cache.plan({"t": ids}, step)
        pulled = table[want["t"]]
        if refresh:
            cache.refresh({"t": pulled}, want, step)
            assert set(hot.tolist()) <= set(want["t"].tolist())
        else:
            assert want["t"].tolist() == [2, 6]  # only the cold rows travel
            mask, values = cache.read("t", ids)
            assert mask.tolist() == [True, False, True, False]
            assert (step - values).max() <= 2 and cache.fetched is not None and step - cache.fetched <= 2
    assert cache.hits > 0 and 0 < cache.hit_rate() < 1


def _run(ds, run_dir, *args) -> dict:
    import os
    import subprocess
    import sys

    from conftest import ROOT

    done = subprocess.run([sys.executable, "-m", "vitrine", "train", "--dataset", str(ds), "--run-dir", str(run_dir),
                           "--dtype", "float64", "--optimizer", "sgd", "--lr", "0.05", "--seed", "3", "--threads", "1",
                           "--no-track", "--no-progress", "--epochs", "1", *args],
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return torch.load(run_dir / "checkpoint.pt", weights_only=False)


MODE_ARGS = {"single": ["--batch-size", "256"], "ar": ["--mode", "ar", "--workers", "2", "--global-batch", "256"],
             # GBA with every token held until the previous global step is applied (no staleness): then the
             # prefetch thread's token, pull and image embeddings are the ones the step would have fetched
             # itself, so whatever interleaving costs in a real GBA run is its staleness, not its code.
             "gba": ["--mode", "gba", "--workers", "2", "--global-batch", "256", "--max-staleness", "0"]}


@pytest.mark.parametrize("mode", ["single", "ar", "gba"])
def test_interleaved_training_equals_plain_training(world_dataset, tmp_path, mode):
    """Batches read ahead on a background thread (--interleave 2) change nothing: same seed, same model."""
    args = ["--max-steps", "6", *MODE_ARGS[mode]]
    plain = _run(world_dataset, tmp_path / "plain", *args)
    inter = _run(world_dataset, tmp_path / "inter", *args, "--interleave", "2")
    assert plain["step"] == inter["step"] == 6
    # Equal up to float64 rounding: the image service computes a merged group of requests as one matrix
    # product, and how the workers' requests happen to be grouped changes the last bits.
    for k in plain["model"]:
        assert torch.allclose(plain["model"][k], inter["model"][k], rtol=0, atol=1e-9), k
    for k in plain["service"]["head"]:
        assert torch.allclose(plain["service"]["head"][k], inter["service"]["head"][k], rtol=0, atol=1e-9), k


def test_all_optimizations_in_gba_train_and_report_their_figures(world_dataset, tmp_path):
    """GBA over 2 workers (images on, the service in its own process) with packing, interleaving, a 5%
    row cache and a 20% image cache: the job trains, both caches serve hits, and the result carries the
    traffic and wait figures the benchmark reads, and the image service's own GBA figures (its threshold
    set apart from the shards')."""
    import json

    _run(world_dataset, tmp_path / "all", "--mode", "gba", "--workers", "2", "--global-batch", "256",
         "--max-steps", "12", "--packing", "--interleave", "1", "--cache-rows", "0.05", "--cache-images", "0.2",
         "--image-service", "spawn", "--image-gba-threshold", "5")
    r = json.loads((tmp_path / "all" / "result.json").read_text())
    assert r["steps"] == 12 and 0 < r["cache_hit_rate"] < 1 and r["ps_pulled_row_bytes_per_step"] > 0
    assert 0 < r["image_cache_hit_rate"] < 1
    assert r["wait_prefetch_wait_s_per_step"] >= 0 and "test_auc" in r
    # 12 global steps of N = 2 pushes each on the image side too; its threshold is its own, its decay the PS's.
    assert r["image_gba_updates"] == 12 and r["image_tokens_applied"] == 24 and r["image_tokens_dropped"] == 0
    assert r["image_threshold"] == 5 and r["image_decay"] == 0.5


def test_cached_image_embeddings_are_never_staler_than_the_bound(tmp_path):
    """A real in-process image service whose head moves by 0 to 3 versions between calls: every
    embedding the worker's cache serves was computed by a head at most `bound` versions older than the
    one the same call reported, cold images are always current, and a stale cache is re-read."""
    from image_service.client import LocalClient
    from image_service.descriptor import DescriptorConfig
    from image_service.service import ImageService
    from test_image_service import N_IMAGES, make_dataset
    from trainer.ps.cache import ImageCache

    svc = ImageService(make_dataset(tmp_path), DescriptorConfig())
    client = LocalClient(svc)
    client.cache = ImageCache(torch.tensor([1, 2, 3]), bound=2)
    history = {}  # head version -> every image's embedding at that version
    gen = torch.Generator().manual_seed(0)
    served_stale = 0
    for moves in [0, 1, 1, 0, 2, 1, 3, 0, 1, 1, 1, 4, 0]:
        for _ in range(moves):
            client.backward(torch.tensor([1, 4]), torch.randn(2, svc.out_dim, generator=gen), token=svc.version)
        history[svc.version] = svc.compute(torch.arange(N_IMAGES))[0]
        ids = torch.tensor([1, 2, 5, 1, 7])
        res = client.embed(ids)
        assert res.version == svc.version
        for j, u in enumerate(res.unique_ids.tolist()):
            ages = [res.version - v for v, emb in history.items()
                    if torch.allclose(emb[u], res.embeddings[j], rtol=0, atol=1e-6)]
            assert ages and min(ages) <= 2, (u, ages)
            if u not in (1, 2, 3):
                assert min(ages) == 0  # cold images always come from the current head
            served_stale += min(ages) > 0
    assert served_stale > 0 and 0 < client.cache.hit_rate() < 1
    assert not torch.equal(history[0][1], history[svc.version][1])  # the head did move

    client.cache = None  # evaluation and AR: no cache, always current
    assert torch.allclose(client.embed(ids).embeddings[0], history[svc.version][1], rtol=0, atol=1e-6)
