"""Per-impression behaviour histories without look-ahead.

For every impression, the user's last L clicks whose timestamp is *strictly before* the impression's
timestamp, oldest first; clicks with equal timestamps are ordered by impression id, so the result
does not depend on row order. An impression never sees its own click or any click at the same
instant (a click logged in the same second cannot have influenced what was shown).

The builder is vectorised: one merge of clicks and impressions sorted by (user, time, kind), where
at equal (user, time) impressions sort before clicks. The running click count at an impression is
then exactly the number of that user's clicks strictly before it. O(n log n), no Python loop over
rows, so it runs the same inside a Dask partition or on a whole frame.
"""

from __future__ import annotations

import numpy as np


def build_histories(
    user: np.ndarray,
    timestamp: np.ndarray,
    order_key: np.ndarray,
    clicked: np.ndarray,
    max_len: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Histories as a ragged array: (offsets, rows).

    `user` (integer codes), `timestamp` (int64), `order_key` (tie-breaker, e.g. impression id) and
    `clicked` (bool) describe the same n impressions, in any order. For impression i, the history is
    `rows[offsets[i]:offsets[i+1]]`: positions into the input arrays of the clicks, oldest first.
    """
    n = len(user)
    if max_len < 0:
        raise ValueError("max_len must be >= 0")
    offsets = np.zeros(n + 1, dtype=np.int64)
    if n == 0 or max_len == 0:
        return offsets, np.zeros(0, dtype=np.int64)
    user = np.asarray(user)
    timestamp = np.asarray(timestamp, dtype=np.int64)
    clicked = np.asarray(clicked, dtype=bool)

    click_rows = np.flatnonzero(clicked)
    # Clicks in (user, time, tie-breaker) order: the order histories are read in.
    corder = np.lexsort((order_key[click_rows], timestamp[click_rows], user[click_rows]))
    click_rows = click_rows[corder]
    n_clicks = len(click_rows)
    if n_clicks == 0:
        return offsets, np.zeros(0, dtype=np.int64)

    # Merge: impressions (kind 0) then clicks (kind 1); at equal (user, time) impressions first.
    ev_user = np.concatenate([user, user[click_rows]])
    ev_time = np.concatenate([timestamp, timestamp[click_rows]])
    ev_kind = np.concatenate([np.zeros(n, np.int8), np.ones(n_clicks, np.int8)])
    ev_tie = np.concatenate([np.zeros(n, np.int64), np.arange(n_clicks, dtype=np.int64)])
    order = np.lexsort((ev_tie, ev_kind, ev_time, ev_user))
    is_click = ev_kind[order] == 1
    clicks_before = np.cumsum(is_click) - is_click  # clicks strictly earlier in the merged order
    pos = np.empty(n, dtype=np.int64)
    imp_positions = ~is_click
    pos[order[imp_positions]] = clicks_before[imp_positions]

    # Index of each impression's user's first click in the (user-sorted) click list.
    first = np.searchsorted(user[click_rows], user, side="left")
    lengths = np.clip(pos - first, 0, max_len)
    offsets[1:] = np.cumsum(lengths)
    total = int(offsets[-1])
    starts = pos - lengths
    idx = np.repeat(starts - offsets[:-1], lengths) + np.arange(total, dtype=np.int64)
    return offsets, click_rows[idx]


def reference_histories(user, timestamp, order_key, clicked, max_len) -> list[list[int]]:
    """The obvious O(n^2) definition, kept for tests: for each impression scan every row."""
    out = []
    n = len(user)
    for i in range(n):
        prior = [
            j for j in range(n)
            if clicked[j] and user[j] == user[i] and timestamp[j] < timestamp[i]
        ]
        prior.sort(key=lambda j: (timestamp[j], order_key[j]))
        out.append(prior[-max_len:] if max_len else [])
    return out
