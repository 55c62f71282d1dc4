"""GBA's token and aggregation rules (vitrine/gba.py) and the image service's gba policy."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from image_service.policy import GBA, Push, Sync, merge_pushes
from vitrine.gba import GBAConfig, GBAState, weighted_mean


def test_each_update_takes_exactly_n_and_a_token_once():
    gba = GBAState(GBAConfig(n=3))
    toks = [gba.issue() for _ in range(4)]
    assert gba.push(toks[0], torch.tensor([1.0])) is None
    with pytest.raises(ValueError, match="already used"):
        gba.push(toks[0], torch.tensor([1.0]))
    assert gba.push(toks[1], torch.tensor([2.0])) is None
    batch = gba.push(toks[2], torch.tensor([6.0]))
    assert [c.token for c in batch] == toks[:3] and gba.step == 1
    assert weighted_mean(batch, 3).item() == pytest.approx(3.0)
    # toks[3] was issued at step 0 and arrives at step 1: staleness 1 <= threshold, full weight.
    assert gba.push(toks[3], torch.tensor([0.0])) is None and gba.pending() == 1


def test_staleness_beyond_the_threshold_is_decayed_or_dropped():
    cfg = GBAConfig(n=1, threshold=2, decay=0.5)
    assert [cfg.weight(s) for s in (0, 2, 3, 5)] == [1.0, 1.0, 0.5, 0.125]
    gba = GBAState(cfg)
    old = gba.issue()
    for _ in range(5):  # five updates from fresh tokens move the global step to 5
        gba.push(gba.issue(), torch.tensor([0.0]))
    (c,) = gba.push(old, torch.tensor([8.0]))
    assert c.staleness == 5 and c.weight == 0.125 and weighted_mean([c], 1).item() == 1.0
    assert gba.stats.decayed == 1
    sync_replicas = GBAState(GBAConfig(n=1, threshold=0, decay=0.0))
    stale = sync_replicas.issue()
    sync_replicas.push(sync_replicas.issue(), torch.tensor([0.0]))
    assert sync_replicas.push(stale, torch.tensor([1.0])) is None and sync_replicas.stats.dropped == 1


def test_a_worker_that_dies_holding_a_token_stalls_nothing():
    gba = GBAState(GBAConfig(n=2))
    lost = gba.issue()  # worker 2 takes a token and dies
    for step in range(3):
        a, b = gba.issue(), gba.issue()
        gba.push(a, torch.tensor([1.0]), worker=0)
        assert gba.push(b, torch.tensor([1.0]), worker=1) is not None
    assert gba.step == 3 and gba.outstanding() == 1 and lost.id not in (a.id, b.id)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 4), events=st.lists(st.tuples(st.booleans(), st.integers(0, 50)), max_size=80),
       threshold=st.integers(0, 3), decay=st.sampled_from([0.0, 0.5, 1.0]))
def test_token_invariants_hold_for_any_interleaving(n, events, threshold, decay):
    gba = GBAState(GBAConfig(n=n, threshold=threshold, decay=decay))
    held, used, applied = [], set(), 0
    for issue, pick in events:
        if issue or not held:
            held.append(gba.issue())
            continue
        tok = held.pop(pick % len(held))
        staleness = gba.step - tok.step
        batch = gba.push(tok, torch.tensor([1.0]))
        assert tok.id not in used
        used.add(tok.id)
        if batch is not None:
            assert len(batch) == n and len({c.token.id for c in batch}) == n
            assert all(c.weight == GBAConfig(n, threshold, decay).weight(c.staleness) > 0 for c in batch)
            applied += n
        if staleness > threshold and decay < 1.0:
            assert gba.stats.decayed + gba.stats.dropped > 0
    s = gba.stats
    assert s.applied == applied == n * s.updates == n * gba.step
    assert s.issued == s.applied + s.dropped + gba.pending() + len(held)


def _push(ids, grads, token, worker=0):
    return Push(torch.tensor(ids), torch.tensor(grads, dtype=torch.float64), token, worker)


def test_image_service_gba_equals_sync_when_fresh_and_decays_stale_pushes():
    g1, g2 = [[1.0, 2.0], [3.0, 4.0]], [[10.0, 20.0]]
    sync = Sync(2)
    assert sync.add(_push([1, 5], g1, 0, 0)) == []
    (want,) = sync.add(_push([5], g2, 0, 1))
    gba = GBA(GBAConfig(n=2))
    assert gba.add(_push([1, 5], g1, 0, 0)) == []
    (got,) = gba.add(_push([5], g2, 0, 1))
    assert torch.equal(got.ids, want.ids) and torch.allclose(got.grads, want.grads)
    # Two more fresh-enough pushes at step 1, then one from step 0 arriving at step 4: decayed by 0.5^2.
    gba.step = 4
    gba.add(_push([1], [[4.0, 4.0]], 4, 0))
    (late,) = gba.add(_push([1], [[4.0, 4.0]], 0, 1))
    ids, grads = merge_pushes([_push([1], [[4.0, 4.0]], 4), _push([1], [[1.0, 1.0]], 0)], scale=0.5)
    assert torch.equal(late.ids, ids) and torch.allclose(late.grads, grads)
    assert gba.stats.decayed == 1 and gba.stats.updates == 2


def test_the_image_service_follows_the_ps_gba_settings_unless_given_its_own():
    from trainer.config import TrainConfig
    from vitrine.errors import UserError

    assert TrainConfig(mode="gba", workers=2, gba_threshold=3, gba_decay=0.25).image_gba() == (3, 0.25)
    own = TrainConfig(mode="gba", workers=2, gba_threshold=3, gba_decay=0.25, image_gba_threshold=1000)
    assert own.image_gba() == (1000, 0.25)
    with pytest.raises(UserError, match="--image-gba-decay"):
        TrainConfig(mode="gba", workers=2, image_gba_decay=2.0).check()
