"""ID vocabularies: raw ID -> dense index, with the train frequency of every ID kept.

Index 0 is padding (for behaviour sequences), 1 is out-of-vocabulary (never seen in train, or seen
fewer than `min_count` times), known IDs start at 2 in descending train frequency, ties by raw ID.
Frequency order means the hottest rows have the smallest indices, which the trainer's caches use.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

PAD = 0
OOV = 1
FIRST = 2


def build_vocab(counts: pd.Series, min_count: int = 1) -> pd.DataFrame:
    """From `raw id -> train count` to a vocabulary frame (id, index, count)."""
    counts = counts[counts >= max(min_count, 1)]
    frame = pd.DataFrame({"id": counts.index.to_numpy(), "count": counts.to_numpy(dtype=np.int64)})
    frame = frame.sort_values(["count", "id"], ascending=[False, True], kind="stable").reset_index(drop=True)
    frame.insert(1, "index", np.arange(FIRST, FIRST + len(frame), dtype=np.int64))
    return frame


def vocab_size(vocab: pd.DataFrame) -> int:
    return len(vocab) + FIRST


def encode(values, vocab: pd.DataFrame) -> np.ndarray:
    """Raw IDs -> indices; unknown and missing IDs -> OOV."""
    idx = pd.Index(vocab["id"]).get_indexer(pd.Index(values))
    return np.where(idx >= 0, idx + FIRST, OOV).astype(np.int64)


def frequency_summary(vocab: pd.DataFrame) -> dict:
    """How skewed the IDs are: what the top 1% / 10% of IDs serve (for cache sizing)."""
    c = np.sort(vocab["count"].to_numpy())[::-1]
    total = int(c.sum())
    if total == 0:
        return {"ids": 0, "total": 0}

    def top(frac: float) -> float:
        k = max(1, int(np.ceil(len(c) * frac)))
        return round(float(c[:k].sum()) / total, 4)

    return {
        "ids": int(len(c)),
        "total": total,
        "top1pct_share": top(0.01),
        "top10pct_share": top(0.10),
        "max_count": int(c[0]),
        "median_count": float(np.median(c)),
    }
