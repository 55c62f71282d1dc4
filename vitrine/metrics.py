"""Evaluation metrics: AUC, GAUC (per-user AUC weighted by impressions), log loss, cold-item AUC.

GAUC follows the DICM paper (docs: /work/shared/PAPERS.md): the AUC of each group (user) weighted
by the group's number of impressions, skipping groups whose labels are all equal. It is computed
for all groups at once: one sort by (group, score), tie-averaged ranks within each group, and the
Mann-Whitney statistic per group from sums over the sorted arrays (no Python loop over groups).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

EPS = 1e-7  # predictions are clipped to [EPS, 1 - EPS] for the log loss


def _arr(x: Any, dtype=None) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu().numpy()
    a = np.asarray(x, dtype=dtype).reshape(-1)
    return a


def _check(y: np.ndarray, p: np.ndarray, *others: np.ndarray) -> None:
    if any(len(o) != len(y) for o in (p, *others)):
        raise ValueError(f"lengths differ: {[len(y), len(p), *[len(o) for o in others]]}")
    if not np.isfinite(p).all():
        raise ValueError(f"{int((~np.isfinite(p)).sum())} predictions are NaN or infinite")


def auc(y: Any, p: Any) -> float:
    """ROC AUC; nan when y holds one class or none."""
    y, p = _arr(y, np.float64), _arr(p, np.float64)
    _check(y, p)
    if len(y) == 0 or np.all(y == y[0]):
        return math.nan
    from sklearn.metrics import roc_auc_score  # imported here: sklearn costs ~0.7 s to import

    return float(roc_auc_score(y, p))


def logloss(y: Any, p: Any) -> float:
    """Mean binary cross-entropy with p clipped to [EPS, 1 - EPS]; nan for no rows."""
    y, p = _arr(y, np.float64), _arr(p, np.float64)
    _check(y, p)
    if len(y) == 0:
        return math.nan
    from sklearn.metrics import log_loss

    return float(log_loss(y, np.clip(p, EPS, 1 - EPS), labels=[0, 1]))


def group_aucs(y: Any, p: Any, groups: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per group: (group key, AUC, impressions), for the groups holding both classes only."""
    y = _arr(y, np.float64) > 0.5
    p = _arr(p, np.float64)
    g = _arr(groups)
    _check(y, p, g)
    if len(y) == 0:
        return g[:0], np.zeros(0), np.zeros(0, dtype=np.int64)
    # Sort by (group, score): an unstable (SIMD) sort by score, then a stable sort by group. Faster
    # than np.lexsort; the order among equal scores does not matter (tied rows share their rank).
    order = np.argsort(p)
    order = order[np.argsort(g[order], kind="stable")]
    g, p, y = g[order], p[order], y[order]
    n = len(g)
    new_group = np.empty(n, dtype=bool)
    new_group[0] = True
    np.not_equal(g[1:], g[:-1], out=new_group[1:])
    new_block = new_group.copy()  # a block = equal (group, score): tied rows share their mean rank
    new_block[1:] |= p[1:] != p[:-1]
    gstart = np.flatnonzero(new_group)
    gid = np.cumsum(new_group) - 1
    bstart = np.flatnonzero(new_block)
    bend = np.append(bstart[1:], n)
    pos = np.arange(n, dtype=np.float64) - gstart[gid]  # 0-based position within the group
    # mean 1-based rank of each block, spread to its rows
    block_rank = (pos[bstart] + pos[bend - 1]) / 2 + 1
    rank = np.repeat(block_rank, bend - bstart)
    n_g = np.diff(np.append(gstart, n))
    n_pos = np.bincount(gid, weights=y, minlength=len(gstart))
    rank_pos = np.bincount(gid, weights=rank * y, minlength=len(gstart))
    n_neg = n_g - n_pos
    ok = (n_pos > 0) & (n_neg > 0)
    auc_g = (rank_pos[ok] - n_pos[ok] * (n_pos[ok] + 1) / 2) / (n_pos[ok] * n_neg[ok])
    return g[gstart][ok], auc_g, n_g[ok]


def gauc(y: Any, p: Any, groups: Any) -> float:
    """Impression-weighted mean of per-group AUCs over groups with both classes; nan if none."""
    _, a, w = group_aucs(y, p, groups)
    if len(a) == 0:
        return math.nan
    return float(np.dot(a, w) / w.sum())


def evaluate(y: Any, p: Any, groups: Any, cold_mask: Any, oracle_p: Any = None) -> dict[str, float]:
    """auc, gauc, logloss, cold_auc (AUC on the cold-item rows), n, cold_n, ctr, and oracle_auc
    (the true click probabilities' AUC on the same rows) when `oracle_p` is given."""
    y_ = _arr(y, np.float64)
    p_ = _arr(p, np.float64)
    cold = _arr(cold_mask).astype(bool)
    _check(y_, p_, cold)
    out: dict[str, float] = {
        "auc": auc(y_, p_),
        "gauc": gauc(y_, p_, groups),
        "logloss": logloss(y_, p_),
        "cold_auc": auc(y_[cold], p_[cold]),
        "n": int(len(y_)),
        "cold_n": int(cold.sum()),
        "ctr": float(y_.mean()) if len(y_) else math.nan,
    }
    if oracle_p is not None:
        out["oracle_auc"] = auc(y_, _arr(oracle_p, np.float64))
    return out
