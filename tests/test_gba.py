"""GBA's token and aggregation rules (vitrine/gba.py) and the image service's gba policy."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from image_service.policy import GBA, Push, Sync, merge_pushes
from vitrine.gba import Aggregator, GBAConfig, may_issue, staleness


def _mean(batch, n):
    """sum(weight * gradient) / n: what a shard or the service applies for a complete batch."""
    return sum(w * g for w, _, g in batch) / n


def test_each_update_takes_exactly_n_gradients_weighted_by_staleness():
    agg = Aggregator(GBAConfig(n=3))
    assert agg.add(0, 1.0) == (1.0, None) and agg.add(1, 2.0) == (1.0, None)
    w, batch = agg.add(2, 6.0)
    assert w == 1.0 and [g for _, _, g in batch] == [1.0, 2.0, 6.0] and _mean(batch, 3) == pytest.approx(3.0)
    assert agg.pending() == 0 and agg.stats.updates == 1 and agg.stats.applied == 3


def test_staleness_beyond_the_threshold_is_decayed_or_dropped():
    cfg = GBAConfig(n=1, threshold=2, decay=0.5)
    assert [cfg.weight(s) for s in (0, 2, 3, 5)] == [1.0, 1.0, 0.5, 0.125]
    assert staleness(step=5, token_step=0) == 5
    agg = Aggregator(cfg)
    w, batch = agg.add(staleness(5, 0), 8.0)
    assert w == 0.125 and _mean(batch, 1) == 1.0 and agg.stats.decayed == 1
    sync_replicas = Aggregator(GBAConfig(n=1, threshold=0, decay=0.0))  # TensorFlow's SyncReplicasOptimizer
    assert sync_replicas.add(1, 1.0) == (0.0, None) and sync_replicas.stats.dropped == 1


def test_bounded_staleness_holds_a_token_back_until_the_step_catches_up():
    assert may_issue(batch=3, step=3, max_staleness=0) and not may_issue(batch=4, step=3, max_staleness=0)
    assert may_issue(batch=5, step=3, max_staleness=2) and not may_issue(batch=6, step=3, max_staleness=2)
    assert may_issue(batch=10**6, step=0, max_staleness=-1)


def test_a_worker_that_dies_holding_a_token_loses_no_batch():
    """Shard 0's token book: a lost worker's token, never pushed, goes to the next worker that asks (its
    global batch still gets N gradients); one whose gradient arrived is not handed out twice."""
    from trainer.ps.shard import ParameterShard
    from trainer.ps.tokens import TokenBook

    shard = ParameterShard(0, 1)
    book = TokenBook(shard, world=3)
    book.start(step=0, first_batch=0, end_batch=10, n=3, max_staleness=-1, straggler=(-1, 0.0, 1.0))
    held = {r: book.request(r, f"w{r}", 0.0, None, 0)["id"] for r in range(3)}
    assert sorted(held.values()) == [0, 1, 2]
    book.mark_lost(2)  # worker 2 dies holding its token, unpushed
    again = book.request(0, "w0", 0.0, None, 0)
    assert again["id"] == held[2] and again["batch"] == 0 and again["slice"] == held[2] % 3
    assert book.request(1, "w1", 0.0, None, 0)["id"] == 3  # then the next batch, as before
    # At the end of the data a worker is told "done" only once no token is out: worker 1 dies holding
    # the last one, and the others wait until it is found lost and its token handed out again.
    book.start(step=0, first_batch=0, end_batch=1, n=3, max_staleness=-1, straggler=(-1, 0.0, 1.0))
    last = [book.request(r, f"w{r}", 0.0, None, 0)["id"] for r in range(3)]
    assert book.request(0, "w0", 0.0, None, 0, wait_s=0.05)["kind"] == "wait"  # workers 1 and 2 hold tokens
    book.request(2, "w2", 0.0, None, 0, wait_s=0.05)
    book.mark_lost(1)
    assert book.request(0, "w0", 0.0, None, 0)["id"] == last[1]
    assert book.request(2, "w2", 0.0, None, 0, wait_s=0.05)["kind"] == "wait"  # worker 0 holds it now
    assert book.request(0, "w0", 0.0, None, 0)["kind"] == "done"


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 4), arrivals=st.lists(st.integers(0, 6), max_size=80),
       threshold=st.integers(0, 3), decay=st.sampled_from([0.0, 0.5, 1.0]))
def test_aggregation_invariants_hold_for_any_staleness(n, arrivals, threshold, decay):
    cfg = GBAConfig(n=n, threshold=threshold, decay=decay)
    agg = Aggregator(cfg)
    applied = 0
    for s in arrivals:
        w, batch = agg.add(s, 1.0)
        assert w == cfg.weight(s)
        if batch is not None:
            assert len(batch) == n and all(bw == cfg.weight(bs) > cfg.drop_below for bw, bs, _ in batch)
            applied += n
    st_ = agg.stats
    assert st_.applied == applied == n * st_.updates
    assert len(arrivals) == st_.applied + st_.dropped + agg.pending()


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
