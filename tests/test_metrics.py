"""Metrics against sklearn and a brute-force per-group GAUC."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import log_loss, roc_auc_score

from trainer.metrics import EPS, auc, evaluate, gauc, group_aucs, logloss


def _brute_gauc(y, p, g) -> float:
    num = den = 0.0
    for k in np.unique(g):
        m = g == k
        if len(np.unique(y[m])) == 2:
            num += roc_auc_score(y[m], p[m]) * m.sum()
            den += m.sum()
    return num / den if den else math.nan


def _random(seed: int, n: int = 2000, groups: int = 50, ties: bool = True):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(np.int64)
    p = rng.random(n) * 0.8 + 0.2 * y
    if ties:
        p = np.round(p, 1)
    g = rng.integers(0, groups, n) * 7919 - 10**12  # arbitrary (negative, sparse) group keys
    return y, p, g


def test_auc_and_logloss_equal_sklearn():
    y, p, _ = _random(0)
    assert auc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert logloss(y, p) == pytest.approx(log_loss(y, np.clip(p, EPS, 1 - EPS)), abs=1e-12)


def test_logloss_is_clipped_and_finite():
    y = np.array([1, 0, 1, 0])
    p = np.array([0.0, 1.0, 1.0, 0.0])  # two certain mistakes
    v = logloss(y, p)
    assert math.isfinite(v)
    assert v == pytest.approx(-np.log(EPS) / 2, rel=1e-6)


def test_auc_nan_on_one_class_or_empty():
    assert math.isnan(auc([1, 1, 1], [0.1, 0.2, 0.3]))
    assert math.isnan(auc([], []))
    assert math.isnan(logloss([], []))


def test_nan_predictions_raise():
    with pytest.raises(ValueError, match="NaN"):
        auc([0, 1], [0.5, float("nan")])
    with pytest.raises(ValueError, match="lengths"):
        gauc([0, 1], [0.5, 0.2], [1])


@settings(max_examples=150, deadline=None)
@given(
    data=st.lists(
        st.tuples(st.integers(0, 6), st.integers(0, 1), st.integers(0, 4)),  # group, label, score level
        min_size=1, max_size=120,
    ),
    continuous=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_gauc_equals_brute_force(data, continuous, seed):
    g = np.array([d[0] for d in data]) * 1_000_003
    y = np.array([d[1] for d in data])
    p = np.array([d[2] for d in data], dtype=np.float64) / 4  # many ties
    if continuous:
        p = p + np.random.default_rng(seed).random(len(p)) * 1e-3
    expect = _brute_gauc(y, p, g)
    got = gauc(y, p, g)
    if math.isnan(expect):
        assert math.isnan(got)
    else:
        assert got == pytest.approx(expect, abs=1e-12)


def test_gauc_larger_random_equals_brute_force():
    for seed, ties in ((1, True), (2, False)):
        y, p, g = _random(seed, n=5000, groups=80, ties=ties)
        assert gauc(y, p, g) == pytest.approx(_brute_gauc(y, p, g), abs=1e-12)


def test_single_class_groups_are_skipped():
    # group 1: mixed (AUC 1.0, 4 rows); group 2: all clicks; group 3: no clicks; group 4: mixed (AUC 0, 2 rows)
    g = np.array([1, 1, 1, 1, 2, 2, 2, 3, 3, 4, 4])
    y = np.array([0, 0, 1, 1, 1, 1, 1, 0, 0, 1, 0])
    p = np.array([.1, .2, .8, .9, .5, .5, .5, .3, .3, .1, .9])
    assert gauc(y, p, g) == pytest.approx((1.0 * 4 + 0.0 * 2) / 6)
    keys, aucs, weights = group_aucs(y, p, g)
    assert sorted(keys.tolist()) == [1, 4]
    assert dict(zip(keys.tolist(), weights.tolist())) == {1: 4, 4: 2}
    assert math.isnan(gauc([1, 1, 0], [0.1, 0.2, 0.3], [1, 1, 2]))  # no group has both classes
    assert math.isnan(gauc([], [], []))


def test_gauc_ties_count_half():
    # one group, every score equal: AUC 0.5 exactly
    assert gauc([0, 1, 0, 1], [0.3] * 4, [5] * 4) == pytest.approx(0.5)


def test_evaluate_keys_and_cold_subset():
    y, p, g = _random(3, n=3000)
    rng = np.random.default_rng(1003)
    cold = rng.random(len(y)) < 0.2
    oracle = np.clip(p + rng.normal(0, 0.05, len(p)), 0, 1)
    m = evaluate(y, p, g, cold, oracle_p=oracle)
    assert set(m) == {"auc", "gauc", "logloss", "cold_auc", "n", "cold_n", "ctr", "oracle_auc"}
    assert m["auc"] == pytest.approx(roc_auc_score(y, p))
    assert m["gauc"] == pytest.approx(_brute_gauc(y, p, g))
    assert m["cold_auc"] == pytest.approx(roc_auc_score(y[cold], p[cold]))
    assert m["cold_auc"] != pytest.approx(m["auc"])
    assert m["oracle_auc"] == pytest.approx(roc_auc_score(y, oracle))
    assert m["n"] == len(y) and m["cold_n"] == int(cold.sum())
    assert m["ctr"] == pytest.approx(y.mean())
    assert "oracle_auc" not in evaluate(y, p, g, cold)


def test_evaluate_cold_auc_nan_when_one_class_or_none():
    y = np.array([0, 1, 0, 1, 1])
    p = np.array([.1, .9, .2, .8, .7])
    g = np.zeros(5, dtype=np.int64)
    assert math.isnan(evaluate(y, p, g, np.zeros(5, bool))["cold_auc"])
    m = evaluate(y, p, g, np.array([0, 1, 0, 1, 1], bool))  # cold rows are all clicks
    assert math.isnan(m["cold_auc"]) and m["cold_n"] == 3


def test_accepts_torch_tensors():
    y, p, g = _random(4, n=500)
    m = evaluate(torch.tensor(y, dtype=torch.float32), torch.tensor(p), torch.tensor(g), torch.tensor(g % 2 == 0))
    assert m["auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-6)
    assert m["gauc"] == pytest.approx(_brute_gauc(y, p, g), abs=1e-6)
