"""Packing: every example once, nothing overflows, rows unpack back to the examples."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qtarget_jax.data import chat, packing


def _example(n, seed):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, 100, n).astype(np.int32)
    labels = np.where(rng.random(n) < 0.5, rng.integers(1, 100, n), chat.IGNORE).astype(np.int32)
    return chat.TokenizedExample(tokens, labels)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 16), min_size=1, max_size=40), st.integers(1, 6),
       st.integers(0, 1000))
def test_pack_bins_partition_and_fit(lengths, window, seed):
    lengths = np.array(lengths)
    order = np.random.default_rng(seed).permutation(len(lengths))
    bins = packing.pack_bins(lengths, order, 16, window=window)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[b]) <= 16 for b in bins)
    assert bins == packing.pack_bins(lengths, order, 16, window=window)  # deterministic
    if window == 1:  # next-fit keeps the visiting order
        assert [i for b in bins for i in b] == order.tolist()


def test_pack_bins_first_fit_window():
    # T=10: 6 opens row A, 6 opens row B, 4 fits A, 3 fits B, 5 opens C, emitting A (window 2).
    bins = packing.pack_bins(np.array([6, 6, 4, 3, 5]), np.arange(5), 10, window=2)
    assert bins == [[0, 2], [1, 3], [4]]
    assert packing.packing_efficiency(np.array([6, 6, 4, 3, 5]), bins, 10) == 24 / 30


def test_pack_bins_rejects_overlong():
    with pytest.raises(ValueError, match="example 1 has length 11"):
        packing.pack_bins(np.array([3, 11]), np.arange(2), 10)


def test_build_rows_layout():
    exs = [_example(n, i) for i, n in enumerate([3, 4, 2])]
    rows = packing.build_rows(exs, [[0, 1], [2]], 8)
    assert set(rows) == set(packing.BATCH_KEYS)
    for k in packing.BATCH_KEYS:
        assert rows[k].shape == (2, 8)
    assert rows["loss_mask"].dtype == np.float32
    assert all(rows[k].dtype == np.int32 for k in packing.BATCH_KEYS if k != "loss_mask")
    np.testing.assert_array_equal(rows["segment_ids"],
                                  [[1, 1, 1, 2, 2, 2, 2, 0], [1, 1, 0, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(rows["positions"],
                                  [[0, 1, 2, 0, 1, 2, 3, 0], [0, 1, 0, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(rows["loss_mask"], rows["labels"] != chat.IGNORE)
    assert (rows["labels"][rows["segment_ids"] == 0] == chat.IGNORE).all()
    assert (rows["tokens"][rows["segment_ids"] == 0] == 0).all()


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(1, 12), min_size=1, max_size=30), st.integers(0, 100))
def test_rows_unpack_to_examples(lengths, seed):
    exs = [_example(n, seed + i) for i, n in enumerate(lengths)]
    bins = packing.pack_bins(np.array(lengths), np.arange(len(lengths)), 12, window=3)
    rows = packing.build_rows(exs, bins, 12)
    for r, members in enumerate(bins):
        seg = rows["segment_ids"][r]
        for s, idx in enumerate(members, start=1):
            sel = seg == s
            np.testing.assert_array_equal(rows["tokens"][r][sel], exs[idx].tokens)
            np.testing.assert_array_equal(rows["labels"][r][sel], exs[idx].labels)
            np.testing.assert_array_equal(rows["positions"][r][sel], np.arange(len(exs[idx])))
