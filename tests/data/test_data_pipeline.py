"""The trainer-facing iterators: batch contract, epochs, exact resume, sharding, eval pass."""
import json

import numpy as np
import pytest

from qtarget_jax.data import IGNORE, packing, pipeline, records

T = 128


@pytest.fixture(scope="module")
def train_split(prepared, tiny_tokenizer):
    return pipeline.tokenize_split(prepared["path"], tiny_tokenizer, split="train", seq_len=T)


def _iter(data, **kw):
    args = dict(seq_len=T, batch_size=4, seed=0)
    args.update(kw)
    return pipeline.SftIterator(data, **args)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_contract(batch, b, t):
    assert set(batch) == set(packing.BATCH_KEYS)
    for k, v in batch.items():
        assert v.shape == (b, t), k
        assert v.dtype == (np.float32 if k == "loss_mask" else np.int32), k
    lab, seg, pos, tok = (batch[k] for k in ("labels", "segment_ids", "positions", "tokens"))
    np.testing.assert_array_equal(batch["loss_mask"], (lab != IGNORE).astype(np.float32))
    assert (lab[seg == 0] == IGNORE).all() and (pos[seg == 0] == 0).all()
    for r in range(b):
        for s in np.unique(seg[r][seg[r] > 0]):
            idx = np.flatnonzero(seg[r] == s)
            np.testing.assert_array_equal(idx, np.arange(idx[0], idx[0] + len(idx)))
            np.testing.assert_array_equal(pos[r, idx], np.arange(len(idx)))
        # Inside a segment a supervised label is the next input token.
        t_ = np.flatnonzero((lab[r, :-1] != IGNORE) & (seg[r, 1:] == seg[r, :-1]))
        np.testing.assert_array_equal(lab[r, t_], tok[r, t_ + 1])


def test_batch_contract(prepared, tiny_tokenizer):
    it = pipeline.make_sft_iterator(prepared["path"], tiny_tokenizer, seq_len=T, batch_size=4,
                                    seed=0)
    for batch in _take(it, 5):
        _assert_contract(batch, 4, T)
        assert batch["segment_ids"].max() >= 2  # rows are actually packed


def test_epochs_cover_every_example_once_and_reshuffle(train_split):
    it = _iter(train_split)
    n = len(train_split.examples)
    assert n == 40
    for e in range(3):
        assert sorted(i for b in it.epoch_bins(e) for i in b) == list(range(n))
    assert it.epoch_bins(0) != it.epoch_bins(1)
    assert _iter(train_split).epoch_bins(1) == it.epoch_bins(1)         # same seed, same order
    assert _iter(train_split, seed=1).epoch_bins(0) != it.epoch_bins(0)
    # The stream is epoch 0's rows, then epoch 1's, ... cut into batches of 4 rows.
    rows0, rows1 = it.epoch_bins(0), it.epoch_bins(1)
    stream = rows0 + rows1
    k = (len(stream) // 4) - 1
    got = _take(it, k)
    want = packing.build_rows(train_split.examples, stream[: 4 * k], T)
    for key in packing.BATCH_KEYS:
        np.testing.assert_array_equal(np.concatenate([g[key] for g in got]), want[key])


@pytest.mark.parametrize("pack", [True, False])
@pytest.mark.parametrize("cut", [0, 3, 11])
def test_resume_gives_the_uninterrupted_batches(train_split, pack, cut):
    full = _take(_iter(train_split, pack=pack), 25)  # crosses several epoch boundaries
    it = _iter(train_split, pack=pack)
    _take(it, cut)
    state = json.loads(json.dumps(it.get_state()))  # as a checkpoint would store it
    assert set(state) == {"epoch", "row", "fingerprint"} and len(json.dumps(state)) < 100
    fresh = _iter(train_split, pack=pack)
    fresh.set_state(state)
    for want, got in zip(full[cut:], _take(fresh, 25 - cut)):
        for key in packing.BATCH_KEYS:
            np.testing.assert_array_equal(got[key], want[key])
    assert fresh.epoch >= 2


def test_set_state_rejects_other_configuration(train_split):
    state = _iter(train_split).get_state()
    for other in (_iter(train_split, seed=1), _iter(train_split, pack=False),
                  _iter(train_split, batch_size=8)):
        with pytest.raises(ValueError, match="fingerprint"):
            other.set_state(state)
    with pytest.raises(KeyError, match="needs epoch, row, fingerprint"):
        _iter(train_split).set_state({"epoch": 0})
    with pytest.raises(ValueError, match="out of range"):
        _iter(train_split).set_state({**state, "row": 10_000})


def test_unpacked_rows_hold_one_example(train_split):
    for batch in _take(_iter(train_split, pack=False), 3):
        assert batch["segment_ids"].max() == 1
        assert (batch["segment_ids"][:, 0] == 1).all()


def test_process_shards_are_disjoint_and_cover(prepared, tiny_tokenizer, train_split):
    def key(e):
        return tuple(e.tokens.tolist())

    shards = [pipeline.tokenize_split(prepared["path"], tiny_tokenizer, split="train", seq_len=T,
                                      process_index=p, process_count=3) for p in range(3)]
    assert [len(s.examples) for s in shards] == [14, 13, 13]
    keys = [key(e) for s in shards for e in s.examples]
    assert sorted(keys) == sorted(key(e) for e in train_split.examples)
    its = [pipeline.SftIterator(s, seq_len=T, batch_size=6, seed=0, process_index=p,
                                process_count=3) for p, s in enumerate(shards)]
    for it in its:
        _assert_contract(next(it), 2, T)
    assert its[0].get_state()["fingerprint"] != its[1].get_state()["fingerprint"]
    with pytest.raises(ValueError, match="multiple of process_count=3"):
        pipeline.make_sft_iterator(prepared["path"], tiny_tokenizer, seq_len=T, batch_size=4,
                                   seed=0, process_index=0, process_count=3)
    with pytest.raises(ValueError, match="process_index=3 outside"):
        pipeline.tokenize_split(prepared["path"], tiny_tokenizer, split="train", seq_len=T,
                                process_index=3, process_count=3)


@pytest.mark.parametrize("process_count,batch,expect", [(1, 4, [(4, 0), (3, 1)]),
                                                        (2, 4, [(2, 0), (2, 0)]),
                                                        (1, 7, [(7, 0)])])
def test_eval_one_pass_padded_not_dropped(prepared, tiny_tokenizer, process_count, batch,
                                          expect):
    seen = 0
    for p in range(process_count):
        it = pipeline.make_eval_iterator(prepared["path"], tiny_tokenizer, seq_len=T,
                                         batch_size=batch, process_index=p,
                                         process_count=process_count)
        batches = list(it)
        assert len(batches) == len(it) == it.num_batches
        if p == 0:
            real_pad = [(int((b["segment_ids"][:, 0] > 0).sum()),
                         int((b["segment_ids"].max(axis=1) == 0).sum())) for b in batches]
            assert real_pad == expect
        for b in batches:
            _assert_contract(b, batch // process_count, T)
            assert b["segment_ids"].max() <= 1
        again = list(it)
        for a, b in zip(batches, again):
            np.testing.assert_array_equal(a["tokens"], b["tokens"])
        seen += it.num_examples
    assert seen == 7


def test_too_long_rows_error_skip_truncate(prepared, tiny_tokenizer):
    kw = dict(split="train", seq_len=40)
    with pytest.raises(records.BadRow, match=r"train\.jsonl:\d+: too_long"):
        pipeline.tokenize_split(prepared["path"], tiny_tokenizer, **kw)
    skipped = pipeline.tokenize_split(prepared["path"], tiny_tokenizer, policy="skip", **kw)
    n_long = skipped.policy.counts["too_long"]
    assert 0 < n_long < 40 and len(skipped.examples) == 40 - n_long
    cut = pipeline.tokenize_split(prepared["path"], tiny_tokenizer, truncate=True, **kw)
    assert cut.num_truncated == n_long and len(cut.examples) == 40
    assert cut.lengths.max() == 40


def test_worker_processes_give_the_serial_result(tmp_path, tiny_tokenizer, monkeypatch):
    """num_workers=2 (spawned processes, 3 chunks): the same examples, order and skip counts,
    and under "error" the same first bad row, as one process."""
    from data_helpers import chat_row, write_jsonl

    from qtarget_jax.data import builder

    rows = [chat_row(f"q{i}", f"a {i}") for i in range(9)]
    rows[4] = chat_row("q", "x " * 200)                       # too long at T=128
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    ds, _ = builder.prepare_dataset({"train": [path]}, str(tmp_path / "o"), "w")
    monkeypatch.setattr(pipeline, "_TOKENIZE_CHUNK", 4)
    kw = dict(split="train", seq_len=T, policy="skip")
    one = pipeline.tokenize_split(ds, tiny_tokenizer, **kw)
    two = pipeline.tokenize_split(ds, tiny_tokenizer, num_workers=2, **kw)
    assert dict(one.policy.counts) == dict(two.policy.counts) == {"too_long": 1}
    assert len(one.examples) == len(two.examples) == 8
    for a, b in zip(one.examples, two.examples):
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_array_equal(a.labels, b.labels)
    with pytest.raises(records.BadRow, match=r"d\.jsonl:5: too_long"):
        pipeline.tokenize_split(ds, tiny_tokenizer, split="train", seq_len=T, num_workers=2)
