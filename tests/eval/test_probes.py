"""Teacher-forced probes (qtarget_jax/problems/probes.py) against independent numpy
recomputations: the pure array functions, the text helpers on real synthetic solutions, and the
model-level probes on the tiny decoder + tiny byte-level tokenizer of conftest.py.

The tiny tokenizer has one token per printable ASCII character (plus the merge "ab") and drops
spaces and newlines, so the expected tokens of a text are its non-whitespace characters."""
import functools
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qtarget_jax.data import synthetic
from qtarget_jax.data.chat import tokenize_conversation
from qtarget_jax.data.records import Message
from qtarget_jax.models import Decoder
from qtarget_jax.problems import (EvalExample, answer_batches, answer_hits, answer_logits,
                                  answer_spans, answer_token_accuracy, kl_from_reference,
                                  kl_rows, memorisation, preference, reference_logprobs,
                                  target_mass, token_accuracy, token_char_spans)
from qtarget_jax.problems import probes


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    z = x - x.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, tokens):
    return nnx.merge(graphdef, state)(tokens)   # default positions arange(T), one segment


WIDTH = 64


def _full_logits(model, ids):
    """Logits [T, V] of ONE row, alone in its batch: the reference the batched probes must
    reproduce. The row is followed by junk tokens in the same segment (one compiled width);
    a causal model's logits at the row's positions cannot depend on them."""
    assert len(ids) <= WIDTH
    tokens = np.full((1, WIDTH), 5, np.int32)
    tokens[0, :len(ids)] = ids
    return np.asarray(_forward(*nnx.split(model), jnp.asarray(tokens))[0, :len(ids)])


def _ids(tokenizer, prompt, response):
    conv = (Message("user", prompt), Message("assistant", response))
    return tokenize_conversation(tokenizer, conv, "test")


# ---------------------------------------------------------------------------------------------
# Pure functions.


def test_token_accuracy_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 7, 11)).astype(np.float32)
    labels = rng.integers(0, 11, size=(3, 7)).astype(np.int32)
    labels[0, :4] = logits[0, :4].argmax(-1)          # some hits
    mask = rng.random((3, 7)) < 0.6
    logits[~mask] = np.nan                             # masked-out positions never count
    correct, total = token_accuracy(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask))
    want = sum(int(np.argmax(logits[b, t]) == labels[b, t])
               for b in range(3) for t in range(7) if mask[b, t])
    assert correct.dtype == jnp.float32 and total.dtype == jnp.float32
    assert float(correct) == want and float(total) == mask.sum()
    assert 0 < want < mask.sum()


def test_preference_matches_numpy():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(5, 6, 9)).astype(np.float32)
    position = rng.integers(0, 6, 5).astype(np.int32)
    preferred = rng.integers(0, 9, 5).astype(np.int32)
    other = (preferred + 1 + rng.integers(0, 8, 5)).astype(np.int32) % 9
    got = np.asarray(preference(jnp.asarray(logits), jnp.asarray(position),
                                jnp.asarray(preferred), jnp.asarray(other)))
    want = [logits[b, position[b], preferred[b]] > logits[b, position[b], other[b]]
            for b in range(5)]
    assert got.dtype == bool and got.tolist() == want
    assert 0 < sum(want) < 5


def test_kl_rows_matches_numpy_and_zero_on_itself():
    from scipy.special import rel_entr
    rng = np.random.default_rng(2)
    ref = _log_softmax(rng.normal(size=(4, 10)) * 2).astype(np.float32)
    model = _log_softmax(rng.normal(size=(4, 10)) * 2).astype(np.float32)
    got = np.asarray(kl_rows(jnp.asarray(ref), jnp.asarray(model)))
    want = rel_entr(np.exp(ref.astype(np.float64)), np.exp(model.astype(np.float64))).sum(-1)
    assert got.shape == (4,) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert (got > 0).all()
    np.testing.assert_array_equal(np.asarray(kl_rows(jnp.asarray(ref), jnp.asarray(ref))), 0.0)


def test_kl_rows_zero_probability_entries_contribute_exactly_zero():
    ref = np.log(np.array([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]], np.float32))   # -inf entries
    model = np.log(np.array([[0.25, 0.25, 0.5], [0.5, 0.5, 0.0]], np.float32))
    got = np.asarray(kl_rows(jnp.asarray(ref), jnp.asarray(model)))
    np.testing.assert_allclose(got, [np.log(2.0), np.log(2.0)], rtol=1e-6)
    assert np.isfinite(got).all()


# ---------------------------------------------------------------------------------------------
# Text helpers.


def _substrings(text):
    return [text[s:e] for s, e in answer_spans(text)]


def test_answer_spans_literal():
    text = "Start: 5 apples.\n5 + 3 = 8\nMultiplying by 2: 8 * 2 = 16.\n#### 16"
    assert answer_spans(text) == [(25, 26), (53, 55), (57, 64)]
    assert _substrings(text) == ["8", "16", "#### 16"]
    assert _substrings("x = -3 and y =1,234.5, z = 7.") == ["-3", "1,234.5", "7"]
    assert _substrings("no answer here: 5 + 3") == []
    assert _substrings("5+3=8.####8") == ["8", "####8"]      # whitespace dropped


@pytest.mark.parametrize("noise", [None, "wrong_step", "wrong_answer"])
def test_answer_spans_on_synthetic_solutions(noise):
    rng = random.Random(7)
    for _ in range(40):
        p = synthetic.sample_problem(rng)
        text = synthetic.solution(p, rng, noise)
        lines = text.split("\n")
        steps = [line.split("= ")[1].split(" ")[0].rstrip(".") for line in lines[1:-1]]
        assert [int(s) for s in steps] != [] and lines[-1].startswith("#### ")
        assert _substrings(text) == steps + [lines[-1]]
        if noise is None:
            assert steps == [str(v) for v in p.values()[1:]] and lines[-1] == f"#### {p.answer}"


def test_token_char_spans_join_back(tokenizer):
    text = "Start: 5 cabs.\n5 + 3 = 8\n#### 8"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    decoded = tokenizer.decode(ids)
    spans = token_char_spans(tokenizer, ids)
    assert len(spans) == len(ids)
    assert "".join(decoded[s:e] for s, e in spans) == decoded
    assert [decoded[s:e] for s, e in spans] == [tokenizer.decode([i]) for i in ids]
    assert "ab" in [decoded[s:e] for s, e in spans]            # the merge is one token


class _Utf8Bytes:
    """A byte-per-token tokenizer: decode is UTF-8 with replacement of incomplete characters."""

    @staticmethod
    def decode(ids):
        return bytes(ids).decode("utf-8", errors="replace")


def test_token_char_spans_multibyte_character_goes_to_its_last_byte():
    ids = list("a€b".encode())                         # a, 3 bytes of the euro sign, b
    assert token_char_spans(_Utf8Bytes(), ids) == [(0, 1), (1, 1), (1, 1), (1, 2), (2, 3)]


# ---------------------------------------------------------------------------------------------
# Model-level probes.

# (reference, the non-whitespace characters that are answer tokens: indexes into the reference
#  with whitespace removed). A step result is followed by a word, so that the dropped newline
#  does not glue it to the next line's first number.
REFERENCES = [
    ("Start: 5.\n5 + 3 = 8.\n#### 8", [12, 14, 15, 16, 17, 18]),
    ("7 - 2 = 5 left\n5 * 3 = 15 now\n#### 15", [4, 13, 14, 18, 19, 20, 21, 22, 23]),
    ("#### 42", [0, 1, 2, 3, 4, 5]),
]


def _examples():
    return [EvalExample(f"ex{k}", [{"role": "user", "content": f"Q{k}: add"}], ref, "0")
            for k, (ref, _) in enumerate(REFERENCES)]


@pytest.fixture(scope="module")
def plain_model(tiny_model):
    """The tiny decoder at its initial scale: its greedy predictions hit some answer tokens of
    REFERENCES (the x10 tiny_model hits none), so the accuracy check is not 0 == 0."""
    return Decoder(tiny_model.cfg, rngs=nnx.Rngs(0))


def test_answer_token_accuracy_matches_numpy(plain_model, tokenizer):
    tiny_model = plain_model
    hits = total = 0
    for ex, (ref, answer_chars) in zip(_examples(), REFERENCES):
        compact = "".join(ref.split())
        assert [compact[i] for i in answer_chars] == list(
            "".join("".join(s.split()) for s in _substrings(ref)))
        ids, mask = _ids(tokenizer, ex.prompt[0]["content"], ref)
        start = int(np.flatnonzero(mask)[0])
        assert tokenizer.decode(ids[start:start + len(compact)].tolist()) == compact
        logits = _full_logits(tiny_model, ids[:-1])
        for i in answer_chars:
            hits += int(np.argmax(logits[start + i - 1]) == ids[start + i])
        total += len(answer_chars)
    got = answer_token_accuracy(tiny_model, tokenizer, _examples(), batch_size=2)  # 2 + 1 pad
    assert got == {"answer_token_acc": hits / total, "answer_tokens": float(total)}
    assert 0 < hits < total


def test_answer_token_accuracy_does_not_retrace(tiny_model, tokenizer):
    answer_token_accuracy(tiny_model, tokenizer, _examples(), batch_size=2)
    size = probes._logits_at._cache_size()
    answer_token_accuracy(tiny_model, tokenizer, _examples()[::-1], batch_size=2)
    assert probes._logits_at._cache_size() == size


def test_answer_token_accuracy_bad_input(tiny_model, tokenizer):
    with pytest.raises(ValueError, match="no examples"):
        answer_token_accuracy(tiny_model, tokenizer, [])
    bad = EvalExample("no-nums", [{"role": "user", "content": "Q"}], "I do not know.", "0")
    with pytest.raises(ValueError, match="'no-nums'.*no answer tokens"):
        answer_token_accuracy(tiny_model, tokenizer, _examples() + [bad])
    with pytest.raises(ValueError, match="'none'.*no reference"):
        answer_token_accuracy(tiny_model, tokenizer,
                              [EvalExample("none", [{"role": "user", "content": "Q"}], None, "0")])


def _numpy_target_sft(student, teacher, tokenizer, eta):
    """Per answer token of _examples() (one row at a time, numpy): the student's p(y),
    Target-SFT's Q(y) = p_y + (1 - p_y) pi_tilde(y) with pi_tilde ∝ p^(1-eta) t^eta, and the
    teacher's p(y), as three [N] arrays."""
    p_y, q_y, t_y = [], [], []
    for ex, (ref, answer_chars) in zip(_examples(), REFERENCES):
        ids, mask = _ids(tokenizer, ex.prompt[0]["content"], ref)
        start = int(np.flatnonzero(mask)[0])
        logp = _log_softmax(_full_logits(student, ids[:-1]))
        logt = _log_softmax(_full_logits(teacher, ids[:-1]))
        for i in answer_chars:
            pos, y = start + i - 1, ids[start + i]
            pi = np.exp((1 - eta) * logp[pos] + eta * logt[pos])
            pi /= pi.sum()
            p = np.exp(logp[pos, y])
            p_y.append(p)
            q_y.append(p + (1 - p) * pi[y])
            t_y.append(np.exp(logt[pos, y]))
    return np.asarray(p_y), np.asarray(q_y), np.asarray(t_y)


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_target_mass_matches_numpy(plain_model, tiny_model, tokenizer, eta):
    """gamma = p_y, Q(y) = p_y + (1 - p_y) pi_tilde(y) with pi_tilde ∝ p^(1-eta) t^eta, and
    the teacher's p(y), averaged over the answer tokens found by answer_token_accuracy."""
    from qtarget_jax.targets import get_preset
    student, teacher = plain_model, tiny_model
    p_y, q_y, t_y = _numpy_target_sft(student, teacher, tokenizer, eta)
    batches = answer_batches(tokenizer, _examples(), batch_size=2)
    logits = answer_logits(student, batches)
    got = target_mass(batches, logits, get_preset("target_sft", eta=eta),
                      answer_logits(teacher, batches))
    np.testing.assert_allclose([got["gamma"], got["p_y"], got["q_y"], got["teacher_p_y"]],
                               [np.mean(p_y), np.mean(p_y), np.mean(q_y), np.mean(t_y)],
                               rtol=1e-4)
    assert answer_hits(batches, logits) == answer_token_accuracy(student, tokenizer,
                                                                 _examples(), batch_size=2)
    sft = target_mass(batches, logits, "sft")          # SFT trusts the label fully
    assert sft["gamma"] == pytest.approx(1.0) and sft["q_y"] == pytest.approx(1.0)
    assert "teacher_p_y" not in sft
    with pytest.raises(ValueError, match="needs teacher_logits"):
        target_mass(batches, logits, "target_sft")


def test_target_mass_by_confidence_matches_numpy_buckets(plain_model, tiny_model, tokenizer):
    """Per bucket of the student's p_y: the tokens in it, and over them mean gamma, p_y, Q(y),
    the teacher's p(y), Q(y) - p_y and its sum over SFT's sum of 1 - p_y; an empty bucket
    has None; the buckets weighted by size give target_mass back."""
    from qtarget_jax.targets import get_preset
    spec = get_preset("target_sft", eta=0.5)
    p_y, q_y, t_y = _numpy_target_sft(plain_model, tiny_model, tokenizer, 0.5)
    ranked = np.sort(p_y)                    # an edge halfway between two tokens' p_y
    mid = float(ranked[len(ranked) // 2 - 1] + ranked[len(ranked) // 2]) / 2
    edges = (0.0, mid, 0.999, 1.0)           # the last bucket is empty for this tiny model
    assert p_y.max() < 0.999

    batches = answer_batches(tokenizer, _examples(), batch_size=2)
    logits, teacher = answer_logits(plain_model, batches), answer_logits(tiny_model, batches)
    got = probes.target_mass_by_confidence(batches, logits, spec, teacher, edges)
    assert [(b["lo"], b["hi"]) for b in got] == [(0.0, mid), (mid, 0.999), (0.999, 1.0)]
    for b, inside in zip(got, (p_y < mid, (p_y >= mid) & (p_y < 0.999))):
        assert b["tokens"] == inside.sum() > 0 and b["share"] == pytest.approx(inside.mean())
        np.testing.assert_allclose(
            [b["gamma"], b["p_y"], b["q_y"], b["teacher_p_y"], b["pull"], b["pull_vs_sft"]],
            [p_y[inside].mean(), p_y[inside].mean(), q_y[inside].mean(), t_y[inside].mean(),
             (q_y - p_y)[inside].mean(), (q_y - p_y)[inside].sum() / (1 - p_y[inside]).sum()],
            rtol=1e-4)
    assert got[2]["tokens"] == 0 and got[2]["q_y"] is None and got[2]["pull_vs_sft"] is None
    whole = target_mass(batches, logits, spec, teacher)
    for name in ("gamma", "q_y", "teacher_p_y"):
        assert sum(b[name] * b["tokens"] for b in got[:2]) / p_y.size == \
            pytest.approx(whole[name], rel=1e-5)

    sft = probes.target_mass_by_confidence(batches, logits, "sft", edges=(0.0, 1.0))
    assert sft[0]["pull_vs_sft"] == pytest.approx(1.0) and "teacher_p_y" not in sft[0]
    with pytest.raises(ValueError, match=r"edges must increase within \[0, 1\], got \[0.0, 0.5, 0.5"):
        probes.target_mass_by_confidence(batches, logits, "sft", edges=(0.0, 0.5, 0.5, 1.0))
    with pytest.raises(ValueError, match="needs teacher_logits"):
        probes.target_mass_by_confidence(batches, logits, spec)


PAIRS = [("p0", "Q0", "5 + 3 = 9\n#### 9", "5 + 3 = 8\n#### 8"),
         ("p1", "Q1 more", "2 * 3 = 6\n#### 7", "2 * 3 = 6\n#### 6"),
         ("p2", "Q2", "#### 13", "#### 12"),
         ("p3", "Q3", "1 + 1 = 3\n3 + 1 = 4\n#### 4", "1 + 1 = 2\n2 + 1 = 3\n#### 3")]


def _manual_memorised(model, tokenizer, prompt, shown, clean):
    """Corrupted position found on the text: the first differing non-whitespace character."""
    a, b = "".join(shown.split()), "".join(clean.split())
    i = next(k for k in range(len(a)) if a[k] != b[k])
    ids, mask = _ids(tokenizer, prompt, shown)
    j = int(np.flatnonzero(mask)[0]) + i
    logits = _full_logits(model, ids[:-1])
    return bool(logits[j - 1, tokenizer.convert_tokens_to_ids(a[i])]
                > logits[j - 1, tokenizer.convert_tokens_to_ids(b[i])])


def test_memorisation_matches_manual_comparison(plain_model, tokenizer):
    # plain_model: its preference differs between the corrupted token's position and the one
    # after it on some pairs, so comparing at the wrong position fails here (tiny_model's
    # does not).
    tiny_model = plain_model
    want = [_manual_memorised(tiny_model, tokenizer, *pair[1:]) for pair in PAIRS]
    got = memorisation(tiny_model, tokenizer, PAIRS, batch_size=3)   # rows 3 + 1 and 2 pad
    assert got == {"memorisation": sum(want) / len(PAIRS), "memorisation_n": 4.0}
    assert 0 < sum(want) < len(PAIRS)
    for pair, w in zip(PAIRS, want):   # per pair: 3 copies fill a batch of 3 (no new compile)
        assert memorisation(tiny_model, tokenizer, [pair] * 3, batch_size=3)["memorisation"] == w


def test_memorisation_flips_when_shown_and_clean_swap(tiny_model, tokenizer):
    # The prefix before the corrupted token is the same in both orders (causal model), so the
    # compared logits are the same and the preference must flip.
    # Three copies of one pair: the share is that pair's 0 or 1.
    for pid, prompt, shown, clean in PAIRS:
        a = memorisation(tiny_model, tokenizer, [(pid, prompt, shown, clean)] * 3, batch_size=3)
        b = memorisation(tiny_model, tokenizer, [(pid, prompt, clean, shown)] * 3, batch_size=3)
        assert {a["memorisation"], b["memorisation"]} == {0.0, 1.0}


def test_memorisation_bad_input(tiny_model, tokenizer):
    with pytest.raises(ValueError, match="no pairs"):
        memorisation(tiny_model, tokenizer, [])
    with pytest.raises(ValueError, match="'same'.*identical"):
        memorisation(tiny_model, tokenizer, [("same", "Q", "#### 4", "#### 4")])
    with pytest.raises(ValueError, match="'spaces'.*identical"):   # whitespace is dropped
        memorisation(tiny_model, tokenizer, [("spaces", "Q", "#### 4", "####4")])
    with pytest.raises(ValueError, match=r"pairs\[0\]"):
        memorisation(tiny_model, tokenizer, [("x", "Q", "#### 4")])
    with pytest.raises(ValueError, match=r"'y'.*prompt\[0\] must be a Message"):
        memorisation(tiny_model, tokenizer, [("y", [{"role": "user"}], "#### 4", "#### 5")])


PROMPTS = ["Tell me a fact.", [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "Name a colour."}], "Count: 1 2 3"]
RESPONSES = ["Cats sleep a lot.", "Blue", "4 5 6 7"]


def _perturbed(model, scale=0.05, seed=3):
    """A copy of `model` with N(0, scale^2) noise on every parameter (drawn with numpy)."""
    rng = np.random.default_rng(seed)
    out = nnx.clone(model)
    params = nnx.state(out, nnx.Param)
    nnx.update(out, jax.tree.map(
        lambda x: jnp.asarray(np.asarray(x) + scale * rng.standard_normal(x.shape), x.dtype),
        params))
    return out


def test_kl_from_reference_zero_on_itself_and_matches_numpy(tiny_model, tokenizer):
    ref = reference_logprobs(tiny_model, tokenizer, PROMPTS, RESPONSES, batch_size=2)
    assert ref.logp.dtype == np.float32 and len(ref.tokens) == 2
    got = kl_from_reference(tiny_model, ref)
    assert got["kl_ref"] == pytest.approx(0.0, abs=1e-6)

    other = _perturbed(tiny_model)
    ref_rows, kls = [], []
    for prompt, response in zip(PROMPTS, RESPONSES):
        conv = ([Message("user", prompt)] if isinstance(prompt, str)
                else [Message(**m) for m in prompt]) + [Message("assistant", response)]
        ids, mask = tokenize_conversation(tokenizer, tuple(conv), "test")
        at = np.flatnonzero(mask[1:])                   # positions predicting a response token
        p = _log_softmax(_full_logits(tiny_model, ids[:-1])[at])
        q = _log_softmax(_full_logits(other, ids[:-1])[at])
        ref_rows.append(p)
        kls.append((np.exp(p) * (p - q)).sum(-1))
    kls = np.concatenate(kls)
    np.testing.assert_allclose(ref.logp, np.concatenate(ref_rows), atol=1e-5)
    assert ref.num_tokens == len(kls) == got["kl_ref_tokens"]
    far = kl_from_reference(other, ref)
    assert far["kl_ref"] > 1e-3
    assert far["kl_ref"] == pytest.approx(kls.mean(), rel=1e-4)
    assert far["kl_ref_tokens"] == float(len(kls))


def test_reference_logprobs_bad_input(tiny_model, tokenizer):
    with pytest.raises(ValueError, match="no prompts"):
        reference_logprobs(tiny_model, tokenizer, [], [])
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        reference_logprobs(tiny_model, tokenizer, ["a", "b"], ["c"])
    with pytest.raises(ValueError, match="row 1: response must be non-empty"):
        reference_logprobs(tiny_model, tokenizer, ["a", "b"], ["c", " "])


def test_each_probe_call_compiles_the_forward_at_most_once(tiny_model, tokenizer):
    """Rows of very different lengths in batches of one: every batch of a call is padded to
    the call's one width and one K, so a call adds at most one compiled forward, a repeated
    call none, and kl_from_reference reuses reference_logprobs' shape (no trace to read V).
    Padding each batch to its own width compiled once per distinct width (3 here)."""
    lengths = [1, 40, 80]
    pairs = [(f"q{n}", "Q" + "w" * n, "5 + 3 = 9\n#### 9", "5 + 3 = 8\n#### 8")
             for n in lengths]
    prompts = ["P" + "w" * n for n in lengths]
    responses = ["Cats sleep a lot."] * len(lengths)
    size = probes._logits_at._cache_size()
    memorisation(tiny_model, tokenizer, pairs, batch_size=1)
    assert probes._logits_at._cache_size() <= size + 1
    memorisation(tiny_model, tokenizer, pairs[::-1], batch_size=1)
    size = probes._logits_at._cache_size()
    ref = reference_logprobs(tiny_model, tokenizer, prompts, responses, batch_size=1)
    assert len({t.shape for t in ref.tokens}) == 1
    assert probes._logits_at._cache_size() <= size + 1
    size = probes._logits_at._cache_size()
    kl_from_reference(_perturbed(tiny_model), ref)
    kl_from_reference(tiny_model, ref)
    assert probes._logits_at._cache_size() == size


# ---------------------------------------------------------------------------------------------
# EpochProbes: the three probes packed into one forward (the experiment's per-epoch path) give
# the values of the three functions above, which the numpy checks above pin down.


def test_pack_rows_keeps_every_row_and_read():
    rng = np.random.default_rng(0)
    prefix = [7, 8, 9, 10]
    rows = [np.asarray(prefix + list(rng.integers(20, 99, n)), np.int32) for n in (3, 11, 5, 9, 2)]
    reads = [np.asarray([len(r) - 1]) for r in rows]
    reads[1] = np.asarray([5, 4, 12])                        # any order, kept
    packed = probes.pack_rows(rows, reads, width=16)
    assert packed.prefix.tolist() == prefix
    assert packed.tokens.shape == (2, 16)                    # 11 + 5 | 9 + 3 + 2: first fit
    flat_tokens = packed.tokens.reshape(-1)
    assert flat_tokens[packed.flat].tolist() == [int(r[i]) for r, rd in zip(rows, reads)
                                                 for i in rd]
    assert packed.positions.reshape(-1)[packed.flat].tolist() == [int(i) for rd in reads
                                                                  for i in rd]
    seen = []
    for b in range(packed.tokens.shape[0]):                  # each row whole in one segment
        for s in set(packed.segment_ids[b].tolist()) - {0}:
            at = packed.segment_ids[b] == s
            seen.append(prefix + packed.tokens[b, at].tolist())
            assert packed.positions[b, at].tolist() == list(range(4, 4 + int(at.sum())))
    assert sorted(seen) == sorted(r.tolist() for r in rows)
    assert probes.pack_rows(rows, [np.asarray([2])] + reads[1:]).prefix.tolist() == [7, 8]


@pytest.fixture(scope="module")
def ref(tiny_model, tokenizer):
    return reference_logprobs(tiny_model, tokenizer, PROMPTS, RESPONSES, batch_size=2)


def _separate(model, tokenizer, ref):
    return {**answer_token_accuracy(model, tokenizer, _examples(), batch_size=2),
            **memorisation(model, tokenizer, PAIRS, batch_size=3),
            **kl_from_reference(model, ref)}


@pytest.mark.parametrize("width", [256, 16])     # one packed sequence, several
def test_epoch_probes_equal_the_three_probes(plain_model, tiny_model, tokenizer, ref, width):
    """Accuracy and memorisation (argmax and logit comparisons, no tie within 1e-4 here) are
    equal exactly; KL to rel 1e-5: both are float32 sums of the same terms whose logits differ
    by rounding only (packed shapes, the prefix computed apart; ~1e-6 relative on this model)."""
    ep = probes.EpochProbes(tokenizer, _examples(), PAIRS, ref, width=width)
    assert len(ep.packed.prefix) > 0
    for model in (plain_model, tiny_model, _perturbed(tiny_model)):
        want, got = _separate(model, tokenizer, ref), ep(model)
        assert list(got) == list(want)
        kl_want, kl_got = want.pop("kl_ref"), got.pop("kl_ref")
        assert got == want
        assert kl_got == pytest.approx(kl_want, rel=1e-5, abs=1e-6)
    assert ep(tiny_model)["kl_ref"] == pytest.approx(0.0, abs=1e-6)
    assert 0 < ep(plain_model)["answer_token_acc"] < 1
    assert 0 < ep(plain_model)["memorisation"] < 1


def test_epoch_probes_with_a_sliding_window(tokenizer, tiny_config):
    """A window shorter than the rows: the prefix is hidden from late tokens as in the
    unpacked rows (a window the prefix ignored would change the logits)."""
    from qtarget_jax.models import ModelConfig
    model = Decoder(ModelConfig(**{**tiny_config, "sliding_window": 6}), rngs=nnx.Rngs(1))
    ref = reference_logprobs(model, tokenizer, PROMPTS, RESPONSES, batch_size=2)
    other = _perturbed(model)
    ep = probes.EpochProbes(tokenizer, _examples(), PAIRS, ref)
    assert len(ep.packed.prefix) > 0
    want, got = _separate(other, tokenizer, ref), ep(other)
    assert got.pop("kl_ref") == pytest.approx(want.pop("kl_ref"), rel=1e-5)
    assert got == want


def test_epoch_probes_subsets_compile_once_and_check_input(tiny_model, tokenizer, ref,
                                                           tiny_config):
    ep = probes.EpochProbes(tokenizer, pairs=PAIRS)
    assert ep(tiny_model) == memorisation(tiny_model, tokenizer, PAIRS)
    only_kl = probes.EpochProbes(tokenizer, reference=ref)
    assert list(only_kl(tiny_model)) == ["kl_ref", "kl_ref_tokens"]
    size = probes._epoch_metrics._cache_size()
    only_kl(_perturbed(tiny_model))                         # new weights, same program
    assert probes._epoch_metrics._cache_size() == size
    with pytest.raises(ValueError, match="no examples, pairs or reference"):
        probes.EpochProbes(tokenizer)
    with pytest.raises(ValueError, match="'same'.*identical"):
        probes.EpochProbes(tokenizer, pairs=[("same", "Q", "#### 4", "#### 4")])
    from qtarget_jax.models import ModelConfig
    big = Decoder(ModelConfig(**{**tiny_config, "vocab_size": 256}), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="vocabulary 256 != reference 128"):
        only_kl(big)
