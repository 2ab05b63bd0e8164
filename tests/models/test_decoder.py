"""Behaviour of the Decoder without a reference model: scan == loop, remat == no remat (logits
and grads), causality / segment isolation / sliding window through gradients, KV cache ==
full forward (incl. left padding), hidden states, bf16, call-time errors."""
import re

import chex
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model_helpers import random_model, tiny_config
from qtarget_jax.models import Decoder
from qtarget_jax.models.params import DictSource, export_params, load_params

T = 10


def _tokens(cfg, b=2, t=T, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, cfg.vocab_size, (b, t)),
                       jnp.int32)


def _same_weights(model, cfg):
    """`model`'s weights in a Decoder built from `cfg` (e.g. other scan/remat setting)."""
    return load_params(cfg, DictSource(export_params(model)))


@nnx.jit
def _forward(model, tokens):
    return model(tokens)


def _logits_and_grads(model, tokens):
    """(logits, gradients as a list of arrays) of a fixed random linear function of logits."""
    graphdef, params = nnx.split(model)
    w = jax.random.normal(jax.random.key(1), tokens.shape + (model.cfg.vocab_size,))

    def loss(p):
        logits = nnx.merge(graphdef, p)(tokens)
        return jnp.sum(logits * w), logits

    grads, logits = jax.jit(jax.grad(loss, has_aux=True))(params)
    return logits, jax.tree.leaves(grads)


@pytest.mark.parametrize("family", ["qwen3_qk_norm", "qwen2_bias"])
def test_scan_equals_loop(family):
    loop = random_model(tiny_config(family))
    scan = _same_weights(loop, tiny_config(family, scan_layers=True))
    assert scan.layers.attn.q_proj.shape[0] == 2, "scan params must be stacked on a layers axis"
    tokens = _tokens(loop.cfg)
    chex.assert_trees_all_close(_forward(scan, tokens), _forward(loop, tokens),
                                rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("policy", ["full", "dots_saveable", "dots_with_no_batch_dims_saveable",
                                    "nothing_saveable"])
def test_remat_equals_no_remat(scan, policy):
    base = random_model(tiny_config("llama3_rope_scaling", scan_layers=scan))
    remat = _same_weights(base, base.cfg.replace(remat_policy=policy))
    logits, grads = _logits_and_grads(remat, _tokens(base.cfg))
    want_logits, want_grads = _logits_and_grads(base, _tokens(base.cfg))
    chex.assert_trees_all_close(logits, want_logits, rtol=1e-6, atol=1e-6)
    # Gradients reach |g| ~ 10 here; recomputation may reorder float32 sums.
    chex.assert_trees_all_close(grads, want_grads, rtol=1e-4, atol=1e-4)


def _grad_temp_bytes(model, tokens):
    """Compiled scratch memory (bytes) of the gradient of sum(logits) w.r.t. the params."""
    graphdef, params = nnx.split(model)

    def loss(p):
        return jnp.sum(nnx.merge(graphdef, p)(tokens))

    compiled = jax.jit(jax.grad(loss)).lower(params).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_full_remat_saves_fewer_residuals():
    """Full remat keeps only each layer's input for the backward: less compiled scratch than
    keeping every activation (so the policy is really applied, not just accepted). Scanned
    layout only: unrolled, XLA CPU schedules the tiny model's recomputation so that its
    scratch is not smaller (2.76 MB full vs 2.58 MB none at [4, 64])."""
    base = random_model(tiny_config("llama3_rope_scaling", scan_layers=True))
    tokens = _tokens(base.cfg, b=4, t=64)
    full = _grad_temp_bytes(_same_weights(base, base.cfg.replace(remat_policy="full")), tokens)
    none = _grad_temp_bytes(base, tokens)
    assert full < 0.8 * none, (full, none)


def _embedding_grad_rows(model, tokens):
    """f(segments, t) -> |d sum(logits[0, t]) / d embedding row of the token at each position
    of row 0|, summed over D: a [T] array (tokens must be distinct; one compile per model)."""
    graphdef, params = nnx.split(model)

    @jax.jit
    def grad_at(p, segments, t):
        out = lambda q: jnp.take(nnx.merge(graphdef, q)(tokens, segment_ids=segments)[0],
                                 t, axis=0).sum()
        return jax.grad(out)(p)["embedder"]["embedding"][...]

    return lambda segments, t: np.abs(
        np.asarray(grad_at(params, segments, t))[np.asarray(tokens[0])]).sum(-1)


def test_causality_and_segments():
    cfg = tiny_config("qwen2_bias")                    # untied: the head uses no embedding row
    model = random_model(cfg)
    tokens = jnp.asarray(np.random.default_rng(0).permutation(cfg.vocab_size)[None, :T])
    ones = jnp.ones((1, T), jnp.int32)
    grad_rows = _embedding_grad_rows(model, tokens)
    for t in (0, 4, T - 1):
        rows = grad_rows(ones, t)
        assert (rows[t + 1:] == 0).all(), f"logit at {t} depends on later tokens: {rows}"
        assert (rows[:t + 1] > 0).all(), f"logit at {t} ignores earlier tokens: {rows}"
    segments = jnp.asarray([[1] * 4 + [2] * 6], jnp.int32)
    rows = grad_rows(segments, T - 1)
    assert (rows[:4] == 0).all() and (rows[4:] > 0).all(), f"segments leak: {rows}"


def test_sliding_window_receptive_field():
    cfg = tiny_config("mistral_window")                # window 4, 2 layers: sees t-6 .. t
    model = random_model(cfg)
    tokens = jnp.asarray(np.random.default_rng(0).permutation(cfg.vocab_size)[None, :T])
    rows = _embedding_grad_rows(model, tokens)(jnp.ones((1, T), jnp.int32), T - 1)
    span = 2 * (cfg.sliding_window - 1)
    assert (rows[:T - 1 - span] == 0).all(), f"window leaks: {rows}"
    assert (rows[T - 1 - span:] > 0).all(), f"window too small: {rows}"


@pytest.mark.parametrize("family,scan", [("mistral_window", False), ("qwen2_bias", True)])
def test_cache_equals_full_forward(family, scan):
    """Left-padded prefill then token-by-token decode (jitted) == each row run alone."""
    cfg = tiny_config(family, scan_layers=scan)
    model = random_model(cfg)
    tokens = _tokens(cfg, b=2, t=T, seed=3)
    lengths, n0 = [T, T - 3], 6                        # row 1 is left-padded by 3 slots
    left = np.zeros((2, T), np.int32)
    segs, pos = np.zeros_like(left), np.zeros_like(left)
    for row, n in enumerate(lengths):
        left[row, T - n:] = tokens[row, :n]
        segs[row, T - n:] = 1
        pos[row, T - n:] = np.arange(n)
    step = nnx.jit(lambda m, t, p, s, c: m(t, p, s, cache=c))
    cache = model.init_cache(2, T + 2)                 # two slots stay empty
    logits0, cache = step(model, left[:, :n0], pos[:, :n0], segs[:, :n0], cache)
    outs = [logits0]
    for i in range(n0, T):
        logits_i, cache = step(model, left[:, i:i + 1], pos[:, i:i + 1], segs[:, i:i + 1],
                               cache)
        outs.append(logits_i)
    got = jnp.concatenate(outs, axis=1)
    chex.assert_tree_all_finite(got)
    # Reference: the same rows right-padded, no cache (padding itself is checked against HF).
    right = (np.arange(T)[None] < np.array(lengths)[:, None]).astype(np.int32)
    want = nnx.jit(lambda m, t, s: m(t, segment_ids=s))(model, tokens, right)
    for row, n in enumerate(lengths):
        chex.assert_trees_all_close(got[row, T - n:], want[row, :n], rtol=1e-5, atol=1e-5)
    assert int(cache.index) == T


@pytest.mark.parametrize("scan", [False, True])
def test_explicit_mask_replaces_the_built_one(scan):
    """mask=: the built mask passed explicitly gives the same logits bitwise; a mask that also
    lets segment 2 see segment 1 (a shared prefix) changes segment 2 only; wrong shapes are
    refused (with a cache the mask spans its slots)."""
    from qtarget_jax.models.layers import attention_mask
    cfg = tiny_config("mistral_window", scan_layers=scan)
    model = random_model(cfg)
    tokens = _tokens(cfg, b=1)
    segs = jnp.asarray([[1] * 4 + [2] * (T - 4)], jnp.int32)
    slots = jnp.arange(T, dtype=jnp.int32)[None]
    built = attention_mask(slots, segs, slots, segs, cfg.sliding_window)
    run = nnx.jit(lambda m, t, s, k: m(t, segment_ids=s, mask=k))
    base = nnx.jit(lambda m, t, s: m(t, segment_ids=s))(model, tokens, segs)
    np.testing.assert_array_equal(run(model, tokens, segs, built), base)
    shared = built | ((segs[:, :, None] == 2) & (segs[:, None, :] == 1) & (slots[:, None] < 2))
    got = run(model, tokens, segs, shared)
    np.testing.assert_array_equal(got[:, :4], base[:, :4])
    assert not np.allclose(got[:, 4:6], base[:, 4:6])
    with pytest.raises(ValueError, match=r"mask shape \(1, 10, 9\) != \(1, 10, 10\)"):
        model(tokens, mask=built[:, :, :-1])
    with pytest.raises(ValueError, match=r"mask shape \(1, 10, 10\) != \(1, 10, 12\)"):
        model(tokens, slots, cache=model.init_cache(1, T + 2), mask=built)
    from qtarget_jax.models.cache import with_shared_prefix
    shared_cache = with_shared_prefix(model.init_cache(1, 2), 1, T)
    with pytest.raises(ValueError, match="explicit mask covers the cache's own slots only"):
        model(tokens, slots, cache=shared_cache, mask=built)


@pytest.mark.parametrize("family,scan", [("mistral_window", False), ("qwen2_bias", True)])
def test_shared_prefix_cache_equals_full_forward(family, scan):
    """Prompts prefilled once, each continued by R = 3 rows with different tokens through a
    SharedPrefix cache (with_shared_prefix) == each row's whole sequence run alone, no cache;
    with a left-padded prompt, and the sliding window reaching into the prefix."""
    from qtarget_jax.models.cache import with_shared_prefix
    cfg = tiny_config(family, scan_layers=scan)
    model = random_model(cfg)
    reps, n0, steps = 3, 7, 5
    prompts = np.asarray(_tokens(cfg, b=2, t=n0, seed=4))
    lengths = [n0, n0 - 2]                             # prompt 1 is left-padded by 2 slots
    left, segs, pos = (np.zeros((2, n0), np.int32) for _ in range(3))
    for row, n in enumerate(lengths):
        left[row, n0 - n:], segs[row, n0 - n:] = prompts[row, :n], 1
        pos[row, n0 - n:] = np.arange(n)
    cont = np.asarray(_tokens(cfg, b=2 * reps, t=steps, seed=5))   # row i*R + r's own tokens
    step = nnx.jit(lambda m, t, p, s, c: m(t, p, s, cache=c))
    _, prompt_cache = step(model, left, pos, segs, model.init_cache(2, n0))
    cache = with_shared_prefix(prompt_cache, reps, steps + 1)   # one own slot stays empty
    start = np.repeat(np.asarray(lengths), reps)
    outs = []
    for i in range(steps):
        logits_i, cache = step(model, cont[:, i:i + 1], (start + i)[:, None],
                               np.ones((2 * reps, 1), np.int32), cache)
        outs.append(logits_i)
    got = jnp.concatenate(outs, axis=1)                # [B*R, steps, V]
    chex.assert_tree_all_finite(got)
    assert int(cache.index) == steps and cache.prefix.max_len == n0
    for k in range(2 * reps):
        n = lengths[k // reps]
        row = np.concatenate([prompts[k // reps, :n], cont[k]])[None]
        want = nnx.jit(lambda m, t: m(t))(model, jnp.asarray(row))
        chex.assert_trees_all_close(got[k], want[0, n:], rtol=1e-5, atol=1e-5)


def test_cache_errors():
    cfg = tiny_config("smollm2_tied")
    model = random_model(cfg)
    tokens = _tokens(cfg, b=1, t=4)
    pos = jnp.arange(4)[None]
    with pytest.raises(ValueError, match="positions are required"):
        model(tokens, cache=model.init_cache(1, 8))
    with pytest.raises(ValueError, match="overflow"):
        model(tokens, pos, cache=model.init_cache(1, 3))
    with pytest.raises(ValueError, match=r"positions shape \(1, 3\) != tokens shape \(1, 4\)"):
        model(tokens, pos[:, :3])


def test_hidden_states_and_head():
    cfg = tiny_config("qwen3_qk_norm")
    model = random_model(cfg)
    tokens = _tokens(cfg)
    hidden = nnx.jit(lambda m, t: m(t, return_hidden=True))(model, tokens)
    chex.assert_shape(hidden, (2, T, cfg.hidden_size))
    chex.assert_shape(model.lm_head_kernel(), (cfg.hidden_size, cfg.vocab_size))
    chex.assert_trees_all_close(hidden @ model.lm_head_kernel(), _forward(model, tokens),
                                rtol=1e-5, atol=1e-5)


def test_padding_rows_are_finite():
    cfg = tiny_config("llama3_rope_scaling")
    model = random_model(cfg)
    segments = jnp.asarray([[1] * T, [0] * T], jnp.int32)
    chex.assert_tree_all_finite(nnx.jit(lambda m, t, s: m(t, segment_ids=s))(
        model, _tokens(cfg), segments))


def test_bfloat16_close_to_float32():
    f32 = random_model(tiny_config("qwen2_bias"))
    bf16 = _same_weights(f32, f32.cfg.replace(param_dtype="bfloat16",
                                                        compute_dtype="bfloat16"))
    assert bf16.embedder.embedding[...].dtype == jnp.bfloat16
    tokens = _tokens(f32.cfg)
    got, want = _forward(bf16, tokens), _forward(f32, tokens)
    chex.assert_type(got, jnp.float32)
    chex.assert_tree_all_finite(got)
    assert float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want))) < 5e-2
    chex.assert_type(nnx.jit(lambda m, t: m(t, return_hidden=True))(bf16, tokens), jnp.bfloat16)


@pytest.mark.parametrize("family", ["smollm2_tied", "qwen2_bias", "qwen3_qk_norm"])
def test_mixed_precision_casts_each_param_once(family):
    """float32 params, bfloat16 compute: in the forward's jaxpr every param is converted to
    bfloat16 exactly once (a transpose or reshape may come first), where its layer uses it; an
    untied embedding is only gathered (its rows are cast, not the table). Outputs are float32
    logits from bfloat16 hidden states."""
    cfg = tiny_config(family, num_layers=2, compute_dtype="bfloat16")
    graphdef, params, rest = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
    paths_leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    treedef = jax.tree.structure(params)
    tokens = _tokens(cfg)

    def forward(*leaves, hidden=False):
        model = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves), rest)
        return model(tokens, return_hidden=hidden)
    leaves = [leaf for _, leaf in paths_leaves]
    closed = jax.make_jaxpr(forward)(*leaves)
    assert jax.eval_shape(forward, *leaves).dtype == jnp.float32
    assert jax.eval_shape(lambda *x: forward(*x, hidden=True), *leaves).dtype == jnp.bfloat16

    # Follow each param through layout-only ops; count its converts to bfloat16.
    root = {v: i for i, v in enumerate(closed.jaxpr.invars)}
    casts = [0] * len(root)
    for eqn in closed.jaxpr.eqns:
        src = eqn.invars[0] if eqn.invars else None
        if src is None or isinstance(src, jax.extend.core.Literal) or src not in root:
            continue
        if eqn.primitive.name in ("transpose", "reshape"):
            root[eqn.outvars[0]] = root[src]
        elif (eqn.primitive.name == "convert_element_type"
              and eqn.params["new_dtype"] == jnp.bfloat16):
            casts[root[src]] += 1
    names = [jax.tree_util.keystr(path) for path, _ in paths_leaves]
    want = [0 if ("embedding" in n and not cfg.tie_word_embeddings) else 1 for n in names]
    assert dict(zip(names, casts)) == dict(zip(names, want))


def test_init_shapes_dtypes_and_axes():
    """Decoder's own init: stacked shapes, param dtype and logical axes (abstractly), then one
    small real random init gives finite logits."""
    cfg = tiny_config("qwen2_bias", scan_layers=True, param_dtype="bfloat16")
    model = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    attn = model.layers.attn
    assert attn.q_proj.shape == (2, cfg.hidden_size, cfg.num_heads, cfg.head_dim)
    assert attn.q_proj.get_metadata()["out_sharding"] == ("layers", "embed", "heads", "head_dim")
    assert attn.k_bias.get_metadata()["out_sharding"] == ("layers", "kv_heads", "head_dim")
    assert model.lm_head.get_metadata()["out_sharding"] == ("embed", "vocab")
    for path, var in nnx.to_flat_state(nnx.state(model)):
        assert var.dtype == jnp.bfloat16, path
        assert var.get_metadata().get("out_sharding"), f"{path} has no logical axes"
    small = tiny_config("smollm2_tied", num_layers=1)
    real = Decoder(small, rngs=nnx.Rngs(0))
    chex.assert_tree_all_finite(_forward(real, _tokens(small)))


@pytest.mark.parametrize("scan,policy,remats,scans", [
    (False, "none", 0, 0), (False, "full", 2, 0), (True, "none", 0, 1),
    (True, "dots_saveable", 1, 1)])
def test_jaxpr_has_remat_per_layer_and_one_scan(scan, policy, remats, scans):
    """remat wraps each layer (once inside the scan body); scan_layers gives one scan."""
    model = random_model(tiny_config("qwen2_bias", scan_layers=scan, remat_policy=policy))
    graphdef, params = nnx.split(model)
    closed = jax.make_jaxpr(lambda p: nnx.merge(graphdef, p)(jnp.zeros((1, 4), jnp.int32)))(
        params)
    assert (_layer_remats(closed.jaxpr), str(closed).count("scan[")) == (remats, scans)


def _sub_jaxprs(eqn):
    for v in eqn.params.values():
        for x in (v if isinstance(v, (tuple, list)) else (v,)):
            if hasattr(x, "eqns"):
                yield x
            elif hasattr(x, "jaxpr") and hasattr(x.jaxpr, "eqns"):
                yield x.jaxpr


def _is_remat(eqn) -> bool:
    return eqn.primitive.name in ("checkpoint", "remat", "remat2")


def _layer_remats(jaxpr) -> int:
    """Remat equations that hold another remat: a layer's remat holds the jax.checkpoint of the
    attention core and of the SwiGLU that every layer has (those two hold none)."""
    def has_remat(j):
        return any(_is_remat(e) or any(has_remat(s) for s in _sub_jaxprs(e)) for e in j.eqns)

    return sum((_is_remat(e) and any(has_remat(s) for s in _sub_jaxprs(e)))
               + sum(_layer_remats(s) for s in _sub_jaxprs(e)) for e in jaxpr.eqns)


def test_attention_and_swiglu_are_recomputed_in_backward(capsys):
    """Gradients keep no float [B, K, G, T, S] attention scores/probabilities nor SwiGLU
    intermediates alive: per layer only gate, up and silu(gate) * up are [B, T, F] residuals
    (without the jax.checkpoint of the attention core and SwiGLU: 3 score-sized and 6
    [B, T, F] residuals per layer)."""
    from jax.ad_checkpoint import print_saved_residuals
    cfg = tiny_config("smollm2_tied", num_layers=1)
    graphdef, params = nnx.split(random_model(cfg))
    b, t = 2, 7                                     # t differs from every model size
    tokens = jnp.asarray(np.arange(b * t).reshape(b, t) % cfg.vocab_size, jnp.int32)
    capsys.readouterr()
    print_saved_residuals(lambda p: nnx.merge(graphdef, p)(tokens).sum(), params)
    lines = capsys.readouterr().out.splitlines()
    floats = [tuple(int(d) for d in m.group(1).split(",") if d)
              for m in (re.match(r"\s*(?:f32|bf16|f16)\[([\d,]*)\]", ln) for ln in lines) if m]
    assert floats, lines                            # the printout was parsed
    assert not [sh for sh in floats if sh[-2:] == (t, t)], floats
    assert sum(sh == (b, t, cfg.intermediate_size) for sh in floats) == 3, floats


def test_scan_program_size_flat_in_depth():
    """With scan_layers the traced program does not grow with num_layers (compile time flat)."""
    def size(scan, layers):
        model = random_model(tiny_config("qwen3_qk_norm", scan_layers=scan, num_layers=layers))
        graphdef, params = nnx.split(model)
        jaxpr = jax.make_jaxpr(lambda p: nnx.merge(graphdef, p)(jnp.zeros((1, 4), jnp.int32)))
        return len(str(jaxpr(params)).splitlines())

    assert size(True, 2) == size(True, 6)
    assert size(False, 6) > 2 * size(False, 2) - size(True, 2)
