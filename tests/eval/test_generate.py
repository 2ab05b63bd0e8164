"""generate.py: KV-cache decoding against a full-recompute reference, sampling, stops, errors."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qtarget_jax.generate import (SamplingConfig, generate, generate_many, left_pad,
                                  prompt_ids, sample_logits)

PROMPTS = ["ab", "hello there, how are you?", "x", "a much longer prompt than the others ab ab"]


_FORWARD = nnx.jit(lambda m, x: m(x))
WIDTH = 64


def reference_greedy(model, ids, n, eos):
    """Greedy by recomputing the whole row (no cache) each step. The row is right-padded to
    WIDTH (one compile): causal attention keeps logits up to its length independent of that."""
    ids = list(ids)
    out = []
    for _ in range(n):
        row = np.zeros((1, WIDTH), np.int32)
        row[0, :len(ids)] = ids
        logits = np.asarray(_FORWARD(model, jnp.asarray(row)))[0, len(ids) - 1]
        tok = int(logits.argmax())
        if tok in eos:
            break
        out.append(tok)
        ids.append(tok)
    return out


@pytest.mark.parametrize("batch_size", [None, 3])
def test_greedy_equals_full_recompute_with_left_padding(tiny_model, tokenizer, batch_size):
    cfg = SamplingConfig(max_new_tokens=12, pad_multiple=8)
    gens = generate(tiny_model, tokenizer, PROMPTS, cfg, batch_size=batch_size, eos_ids=[2])
    assert len(gens) == len(PROMPTS)
    for prompt, gen in zip(PROMPTS, gens):
        want = reference_greedy(tiny_model, prompt_ids(tokenizer, prompt), 12, {2})
        assert gen.token_ids == want, prompt
        assert gen.finish_reason == ("length" if len(want) == 12 else "eos")
        assert gen.text == tokenizer.decode(want, skip_special_tokens=True)


def test_scan_layers_model_gives_the_same_tokens(tiny_model, tokenizer):
    """The stacked (nnx.scan) layout decodes inside lax.while_loop too, with the same tokens."""
    from qtarget_jax.models import export_params, load_params
    from qtarget_jax.models.params import DictSource

    scanned = load_params(tiny_model.cfg.replace(scan_layers=True),
                          DictSource(export_params(tiny_model)))
    cfg = SamplingConfig(max_new_tokens=6)
    want = generate(tiny_model, tokenizer, PROMPTS[:2], cfg, eos_ids=[2])
    got = generate(scanned, tokenizer, PROMPTS[:2], cfg, eos_ids=[2])
    assert [g.token_ids for g in got] == [g.token_ids for g in want]


def test_eos_stops_a_row(tiny_model, tokenizer):
    """Make the first greedy token an EOS id: the row ends at once with no tokens."""
    first = reference_greedy(tiny_model, prompt_ids(tokenizer, PROMPTS[1]), 1, set())[0]
    gen = generate(tiny_model, tokenizer, [PROMPTS[1]], SamplingConfig(max_new_tokens=5),
                   eos_ids=[first])[0]
    assert (gen.token_ids, gen.finish_reason) == ([], "eos")


def test_stop_string_cuts_text(tiny_model, tokenizer):
    full = generate(tiny_model, tokenizer, [PROMPTS[0]], SamplingConfig(max_new_tokens=10),
                    eos_ids=[2])[0]
    assert len(full.text) >= 4
    stop = full.text[2:4]
    cut = generate(tiny_model, tokenizer, [PROMPTS[0]],
                   SamplingConfig(max_new_tokens=10, stop_strings=(stop,)), eos_ids=[2])[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[:full.text.find(stop)]


def test_left_pad_layout():
    tokens, positions, segments = left_pad([[5, 6, 7], [9]], pad_id=0, width=4)
    np.testing.assert_array_equal(tokens, [[0, 5, 6, 7], [0, 0, 0, 9]])
    np.testing.assert_array_equal(positions, [[0, 0, 1, 2], [0, 0, 0, 0]])
    np.testing.assert_array_equal(segments, [[0, 1, 1, 1], [0, 0, 0, 1]])
    with pytest.raises(ValueError, match="row 0 has 3 tokens"):
        left_pad([[1, 2, 3]], 0, 2)


def test_sampling_follows_softmax_and_top_p():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 4000))
    keys = jax.random.key(0)
    draws = np.asarray(sample_logits(logits, keys, 1.0, 1.0))
    freq = np.bincount(draws, minlength=4) / draws.size
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.03)
    # top_p 0.7: keep {0, 1} (mass before token 2 is 0.8 >= 0.7), renormalised to 5/8, 3/8.
    draws = np.asarray(sample_logits(logits, keys, 1.0, 0.7))
    freq = np.bincount(draws, minlength=4) / draws.size
    np.testing.assert_allclose(freq, [0.625, 0.375, 0, 0], atol=0.03)
    # temperature -> sharper; tiny top_p -> always the argmax.
    assert set(np.asarray(sample_logits(logits, keys, 1.0, 1e-6))) == {0}
    np.testing.assert_array_equal(sample_logits(logits[:2], keys, 0.0, 0.5), [0, 0])


def test_per_row_temperature():
    """A [B] temperature array: rows at 0 take the argmax, the others sample softmax(z / t)."""
    logits = jnp.log(jnp.asarray([[0.2, 0.5, 0.3]] * 6000))
    t = jnp.asarray([0.0, 1.0] * 3000)
    draws = np.asarray(sample_logits(logits, jax.random.key(3), t, 1.0))
    assert set(draws[0::2]) == {1}
    np.testing.assert_allclose(np.bincount(draws[1::2], minlength=3) / 3000, [0.2, 0.5, 0.3],
                               atol=0.03)
    # t = 0.5 squares the probabilities: [0.04, 0.25, 0.09] / 0.38.
    half = np.asarray(sample_logits(logits, jax.random.key(4), jnp.full((6000,), 0.5), 1.0))
    np.testing.assert_allclose(np.bincount(half, minlength=3) / 6000,
                               np.array([0.04, 0.25, 0.09]) / 0.38, atol=0.03)


def test_generate_many_shares_the_prefill(tiny_model, tokenizer):
    """Greedy + samples from one prefill: the greedy copy and a near-zero-temperature copy both
    equal the no-cache reference; samples at t=1 come from the same prompt cache but differ."""
    greedy = SamplingConfig(max_new_tokens=8, pad_multiple=8)
    cold = dataclasses.replace(greedy, temperature=1e-6)
    hot = dataclasses.replace(greedy, temperature=1.0)
    groups = generate_many(tiny_model, tokenizer, PROMPTS, [greedy, cold, hot, hot],
                           batch_size=3, eos_ids=[2], seed=5)
    assert [len(g) for g in groups] == [4] * len(PROMPTS)
    for prompt, (g, c, h1, h2) in zip(PROMPTS, groups):
        want = reference_greedy(tiny_model, prompt_ids(tokenizer, prompt), 8, {2})
        assert g.token_ids == want and c.token_ids == want, prompt
        assert h1.prompt_tokens == g.prompt_tokens
    assert any(h1.token_ids != h2.token_ids for _, _, h1, h2 in groups)
    again = generate_many(tiny_model, tokenizer, PROMPTS, [greedy, cold, hot, hot],
                          batch_size=3, eos_ids=[2], seed=5)
    assert [[x.token_ids for x in g] for g in again] == [[x.token_ids for x in g]
                                                         for g in groups]
    with pytest.raises(ValueError, match="differ only in temperature"):
        generate_many(tiny_model, tokenizer, PROMPTS, [greedy, dataclasses.replace(
            hot, max_new_tokens=4)])


def test_sampled_generation_is_seeded(tiny_model, tokenizer):
    cfg = SamplingConfig(max_new_tokens=8, temperature=1.0, top_p=0.9)
    a = generate(tiny_model, tokenizer, PROMPTS[:2], cfg, seed=1, eos_ids=[2])
    b = generate(tiny_model, tokenizer, PROMPTS[:2], cfg, seed=1, eos_ids=[2])
    c = generate(tiny_model, tokenizer, PROMPTS[:2], cfg, seed=2, eos_ids=[2])
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert [g.token_ids for g in a] != [g.token_ids for g in c]


def test_prompt_longer_than_context_names_the_example(tiny_model, tokenizer):
    with pytest.raises(ValueError, match=r"ex-7: prompt has \d+ tokens \+ max_new_tokens 8 > "
                                         r"context length 40"):
        generate(tiny_model, tokenizer, ["short", "y" * 60], SamplingConfig(max_new_tokens=8),
                 names=["ex-1", "ex-7"], max_len=40)


def test_sharded_batch_gives_the_same_tokens(tiny_model, tokenizer):
    mesh = jax.make_mesh((4, 1, 1), ("data", "fsdp", "tensor"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    cfg = SamplingConfig(max_new_tokens=6)
    plain = generate(tiny_model, tokenizer, PROMPTS, cfg, eos_ids=[2])
    sharded = generate(tiny_model, tokenizer, PROMPTS, cfg, eos_ids=[2], mesh=mesh)
    assert [g.token_ids for g in plain] == [g.token_ids for g in sharded]


@pytest.mark.parametrize("bad", [dict(max_new_tokens=0), dict(temperature=-1.0),
                                 dict(top_p=0.0), dict(cache_dtype="int8"),
                                 dict(stop_strings="###")])
def test_bad_sampling_config(bad):
    with pytest.raises((ValueError, TypeError)):
        SamplingConfig(**bad)


def test_inverse_cdf_follows_the_weights_and_never_draws_a_zero():
    """Two-level inverse CDF over 600 tokens (3 blocks of 256, the last padded): frequencies
    follow the weights; zero-weight tokens (inside, between and after the others) never come,
    even for u next to 0 and 1."""
    from qtarget_jax.generate import inverse_cdf
    w = np.zeros(600, np.float32)
    w[[3, 255, 256, 599]] = [1.0, 2.0, 3.0, 4.0]
    u = np.concatenate([np.linspace(0, 1, 20000, endpoint=False), [0.0, 1 - 2 ** -24]])
    got = np.asarray(inverse_cdf(jnp.broadcast_to(jnp.asarray(w), (len(u), 600)),
                                 jnp.asarray(u, jnp.float32)))
    assert set(got) <= {3, 255, 256, 599}
    np.testing.assert_allclose(np.bincount(got, minlength=600)[[3, 255, 256, 599]] / len(u),
                               [0.1, 0.2, 0.3, 0.4], atol=2e-3)


@pytest.mark.parametrize("v", [1, 7, 256, 600, 49152])
def test_argmax_last_equals_jnp_argmax(v):
    """Two-level argmax == jnp.argmax (first index on ties; -inf rows), and the row maximum,
    for vocabularies that are not a multiple of the block (padded) and one block."""
    from qtarget_jax.generate import argmax_last
    rng = np.random.default_rng(v)
    x = rng.standard_normal((9, v)).astype(np.float32)
    x[1] = 0.0                                            # all tied: index 0
    x[2] = -np.inf                                        # all -inf: index 0
    x[3, v // 2:] = np.round(x[3, v // 2:])               # ties inside and across blocks
    x[3, -1] = x[3, v // 3] = 9.0
    x[4, v - 1] = 50.0                                    # the max in the padded last block
    x[5, :] = -np.inf
    x[5, v // 3] = -1e30                                  # one finite entry among -inf
    x[6] = np.round(rng.standard_normal(v))               # many ties
    got, top = argmax_last(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jnp.argmax(jnp.asarray(x), -1)))
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(top), x.max(-1))


def test_a_rows_sample_does_not_depend_on_the_batching(tiny_model, tokenizer):
    """Keys per row (prompt index, continuation index): the same samples in one batch of 4
    prompts, in batches of 3 (+ filler rows) and of 1."""
    hot = SamplingConfig(max_new_tokens=8, temperature=1.0, pad_multiple=64)
    runs = [[[g.token_ids for g in grp] for grp in generate_many(
        tiny_model, tokenizer, PROMPTS, [hot, hot], batch_size=b, eos_ids=[2], seed=4)]
        for b in (None, 3, 1)]
    assert runs[0] == runs[1] == runs[2]
    assert runs[0][0][0] != runs[0][0][1]
