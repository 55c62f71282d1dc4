"""The behaviour-sequence builder against the brute-force definition."""

import numpy as np
from hypothesis import given, settings, strategies as st

from pipeline.sequences import build_histories, reference_histories


@st.composite
def logs(draw):
    n = draw(st.integers(0, 60))
    users = draw(st.integers(1, 5))
    span = draw(st.integers(1, 12))  # few distinct timestamps -> many ties
    user = np.array(draw(st.lists(st.integers(0, users - 1), min_size=n, max_size=n)), dtype=np.int64)
    ts = np.array(draw(st.lists(st.integers(0, span), min_size=n, max_size=n)), dtype=np.int64)
    clicked = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=bool)
    key = np.array(draw(st.permutations(list(range(n)))), dtype=np.int64)
    max_len = draw(st.integers(0, 6))
    return user, ts, key, clicked, max_len


def _as_lists(offsets, rows):
    return [rows[offsets[i]:offsets[i + 1]].tolist() for i in range(len(offsets) - 1)]


@settings(max_examples=400, deadline=None)
@given(logs())
def test_matches_brute_force(log):
    user, ts, key, clicked, max_len = log
    offsets, rows = build_histories(user, ts, key, clicked, max_len)
    assert _as_lists(offsets, rows) == reference_histories(user, ts, key, clicked, max_len)


@settings(max_examples=100, deadline=None)
@given(logs(), st.randoms())
def test_row_order_does_not_matter(log, rnd):
    user, ts, key, clicked, max_len = log
    perm = np.array(rnd.sample(range(len(user)), len(user)), dtype=np.int64)
    base = _as_lists(*build_histories(user, ts, key, clicked, max_len))
    offsets, rows = build_histories(user[perm], ts[perm], key[perm], clicked[perm], max_len)
    shuffled = _as_lists(offsets, perm[rows])  # map back to original row numbers
    inverse = np.argsort(perm)
    assert [shuffled[i] for i in inverse] == base


def test_no_look_ahead_at_equal_timestamps():
    # user 0: click at t=5 (key 1), impression+click at t=5 (key 0), impression at t=6.
    user = np.array([0, 0, 0, 0])
    ts = np.array([5, 5, 6, 4])
    key = np.array([1, 0, 2, 3])
    clicked = np.array([True, True, False, True])
    offsets, rows = build_histories(user, ts, key, clicked, 10)
    hist = _as_lists(offsets, rows)
    assert hist[0] == [3] and hist[1] == [3]  # same-instant clicks, including its own, are invisible
    assert hist[2] == [3, 1, 0]  # t=4, then the two t=5 clicks ordered by key (0 before 1)
    assert hist[3] == []


def test_keeps_only_last_l_and_other_users_never_leak():
    user = np.array([0] * 6 + [1])
    ts = np.arange(7)
    clicked = np.ones(7, dtype=bool)
    offsets, rows = build_histories(user, ts, ts, clicked, 3)
    hist = _as_lists(offsets, rows)
    assert hist[5] == [2, 3, 4]
    assert hist[6] == []
