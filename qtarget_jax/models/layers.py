"""Building blocks of the decoder: RMSNorm, RoPE, grouped-query attention, SwiGLU, Block.

Layers take explicit sizes (not the whole config) except `Block`, which wires them. Every
parameter is an `nnx.Param` whose `out_sharding` metadata holds its logical axis names
(see models/sharding.py); they are created with `eager_sharding=False`, so building a model
never needs a mesh: shardings are applied where the mesh is known (load_params, train state).
Shapes: see the legend in models/config.py.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qtarget_jax.models.config import ModelConfig, RopeScaling
from qtarget_jax.models.adapter import adapt

_INIT_STD = 0.02


def make_param(rngs: nnx.Rngs | None, shape: tuple[int, ...], axes: tuple[str, ...],
               dtype: jnp.dtype, init: str = "normal") -> nnx.Param:
    """An nnx.Param of `shape` with logical `axes`; init is "normal" (std 0.02), "ones", "zeros"."""
    if len(shape) != len(axes):
        raise ValueError(f"make_param: shape {shape} and axes {axes} differ in rank")
    if init == "normal":
        value = _INIT_STD * jax.random.normal(rngs.params(), shape, jnp.float32)
    elif init == "ones":
        value = jnp.ones(shape, jnp.float32)
    elif init == "zeros":
        value = jnp.zeros(shape, jnp.float32)
    else:
        raise ValueError(f"make_param: unknown init {init!r} (normal, ones, zeros)")
    return nnx.Param(value.astype(dtype), out_sharding=axes, eager_sharding=False)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """HF Llama RMSNorm: normalise in float32, cast back to x.dtype, then multiply by scale.

    x: [..., N] any float dtype; scale: [N]. Returns [..., N] in x.dtype.
    """
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    scale = scale.astype(x.dtype).reshape((1,) * (x.ndim - 1) + scale.shape)
    return scale * normed.astype(x.dtype)


class RMSNorm(nnx.Module):
    """Learned-scale RMSNorm over the last axis (size `dim`, logical axis `axis`)."""

    def __init__(self, dim: int, axis: str, eps: float, *, param_dtype: jnp.dtype,
                 rngs: nnx.Rngs):
        self.scale = make_param(rngs, (dim,), (axis,), param_dtype, init="ones")
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.scale[...], self.eps)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
    """RoPE inverse frequencies [Dh/2] float32, with llama3 scaling when given (as HF computes)."""
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim
    inv_freq = (1.0 / (theta ** exponents)).astype(np.float32)
    if scaling is None:
        return inv_freq
    orig = scaling.original_max_position_embeddings
    low_wavelen = orig / scaling.low_freq_factor
    high_wavelen = orig / scaling.high_freq_factor
    wavelen = (2 * math.pi / inv_freq).astype(np.float32)
    scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (orig / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def rope_sin_cos(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """positions [B, T] int -> (sin, cos), each [B, T, Dh/2] float32."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    return jnp.sin(angles), jnp.cos(angles)


def apply_rope(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
    """Rotate-half RoPE (HF layout). x [B, T, N, Dh]; sin, cos [B, T, Dh/2] -> [B, T, N, Dh]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    sin = sin[:, :, None, :].astype(x.dtype)
    cos = cos[:, :, None, :].astype(x.dtype)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def attention_mask(q_index: jax.Array, q_segment: jax.Array, k_index: jax.Array,
                   k_segment: jax.Array, sliding_window: int | None) -> jax.Array:
    """Boolean mask [B, T, S]: causal AND same segment AND key not padding AND in window.

    q_index [B, T], k_index [B, S]: slot index of each query / key (causality and the sliding
    window use slot distance, equal to position distance inside one contiguous segment).
    q_segment [B, T], k_segment [B, S] int: 0 = padding (such keys are never attended).
    """
    qi, ki = q_index[:, :, None], k_index[:, None, :]
    mask = (ki <= qi) & (q_segment[:, :, None] == k_segment[:, None, :])
    mask &= k_segment[:, None, :] != 0
    if sliding_window is not None:
        mask &= qi - ki < sliding_window
    return mask


def _attend(q_BKGTH: jax.Array, keys: list[jax.Array], values: list[jax.Array],
            masks: list[jax.Array], *, layouts: tuple[str, ...], dtype: jnp.dtype,
            key_layouts: tuple[str, ...] | None = None) -> jax.Array:
    """Softmax attention of q [B, K, G, T, Dh] over the concatenated key parts.

    keys / values: per part [B, K, S_i, Dh] (layout "bksh") or [B, S_i, K, Dh] ("bskh");
    keys may instead be [B, K, Dh, S_i] ("bkhs", the KV cache's key layout) where
    `key_layouts` says so (default: the same layouts as the values).
    masks: per part [B, T, S_i] bool. Scores and probabilities are float32 [B, K, G, T, S].
    Returns [B, K, G, T, Dh] in `dtype`. The caller wraps it in jax.checkpoint: the backward
    recomputes the scores from q, k, v (one [T, S] matmul per head) instead of keeping three
    [B, K, G, T, S] float32 residuals per layer alive from the forward to the backward.
    """
    dh = q_BKGTH.shape[-1]
    # A finite minimum (not -inf): a query with no visible key (padding) gets a uniform
    # softmax instead of NaN.
    key_layouts = layouts if key_layouts is None else key_layouts
    logits = jnp.concatenate([
        jnp.where(m[:, None, None], jnp.einsum(f"bkgth,{lay}->bkgts", q_BKGTH, kk,
                                               preferred_element_type=jnp.float32)
                  * (dh ** -0.5), jnp.finfo(jnp.float32).min)
        for kk, m, lay in zip(keys, masks, key_layouts)], axis=-1)
    probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
    outs, start = [], 0
    for vv, lay in zip(values, layouts):  # probs over [cache slots | this call's tokens]
        width = vv.shape[1] if lay == "bskh" else vv.shape[2]
        outs.append(jnp.einsum(f"bkgts,{lay}->bkgth", probs[..., start:start + width], vv))
        start += width
    return sum(outs[1:], outs[0])


def _attend_shared(q_BKGTH: jax.Array, k_BKHS: jax.Array, v_BKSH: jax.Array, mask_BTS: jax.Array,
                   pk_PKHS: jax.Array, pv_PKSH: jax.Array, pmask_BTS: jax.Array, *,
                   dtype: jnp.dtype) -> jax.Array:
    """Softmax attention of q [B, K, G, T, Dh] over a shared prefix, then the rows' own slots.

    pk [P, K, Dh, Sp], pv [P, K, Sp, Dh]: the prefix of P prompts, each continued by the
    R = B / P consecutive rows of q (models/cache.py SharedPrefix); pmask [B, T, Sp] bool.
    k [B, K, Dh, S], v [B, K, S, Dh], mask [B, T, S]: each row's own slots.
    The prefix is read once per prompt: its matmuls take the R rows' queries together
    ([P, K, R*G*T, Dh]). One softmax over [prefix | own] in float32, as `_attend` does over
    concatenated parts. Returns [B, K, G, T, Dh] in `dtype`.
    """
    b, kh, g, t, dh = q_BKGTH.shape
    p, sp = pk_PKHS.shape[0], pk_PKHS.shape[-1]
    r = b // p
    scale, low = dh ** -0.5, jnp.finfo(jnp.float32).min
    q_PKMH = q_BKGTH.reshape(p, r, kh, g, t, dh).transpose(0, 2, 1, 3, 4, 5).reshape(
        p, kh, r * g * t, dh)
    pre = jnp.einsum("pkmh,pkhs->pkms", q_PKMH, pk_PKHS, preferred_element_type=jnp.float32)
    pre = pre.reshape(p, kh, r, g, t, sp).transpose(0, 2, 1, 3, 4, 5).reshape(b, kh, g, t, sp)
    own = jnp.einsum("bkgth,bkhs->bkgts", q_BKGTH, k_BKHS, preferred_element_type=jnp.float32)
    logits = jnp.concatenate([jnp.where(pmask_BTS[:, None, None], pre * scale, low),
                              jnp.where(mask_BTS[:, None, None], own * scale, low)], axis=-1)
    probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
    p_pre = probs[..., :sp].reshape(p, r, kh, g, t, sp).transpose(0, 2, 1, 3, 4, 5).reshape(
        p, kh, r * g * t, sp)
    out_pre = jnp.einsum("pkms,pksh->pkmh", p_pre, pv_PKSH)
    out_pre = out_pre.reshape(p, kh, r, g, t, dh).transpose(0, 2, 1, 3, 4, 5).reshape(
        b, kh, g, t, dh)
    return out_pre + jnp.einsum("bkgts,bksh->bkgth", probs[..., sp:], v_BKSH)


def _swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """silu(gate) * up, elementwise; wrapped in jax.checkpoint by MLP so only gate and up (the
    matmul outputs) are kept for the backward, not silu's intermediates."""
    return jax.nn.silu(gate) * up


class Attention(nnx.Module):
    """Grouped-query attention with RoPE, optional q/k/v bias (Qwen2) and q/k RMSNorm (Qwen3)."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, *,
                 use_bias: bool, qk_norm: bool, norm_eps: float, param_dtype: jnp.dtype,
                 compute_dtype: jnp.dtype, rngs: nnx.Rngs):
        if num_heads % num_kv_heads:
            raise ValueError(f"Attention: num_heads ({num_heads}) must be divisible by "
                             f"num_kv_heads ({num_kv_heads})")
        d, h, k, dh = hidden_size, num_heads, num_kv_heads, head_dim
        self.q_proj = make_param(rngs, (d, h, dh), ("embed", "heads", "head_dim"), param_dtype)
        self.k_proj = make_param(rngs, (d, k, dh), ("embed", "kv_heads", "head_dim"),
                                 param_dtype)
        self.v_proj = make_param(rngs, (d, k, dh), ("embed", "kv_heads", "head_dim"),
                                 param_dtype)
        self.o_proj = make_param(rngs, (h, dh, d), ("heads", "head_dim", "embed"), param_dtype)
        self.use_bias, self.qk_norm = use_bias, qk_norm
        if use_bias:
            self.q_bias = make_param(rngs, (h, dh), ("heads", "head_dim"), param_dtype, "zeros")
            self.k_bias = make_param(rngs, (k, dh), ("kv_heads", "head_dim"), param_dtype,
                                     "zeros")
            self.v_bias = make_param(rngs, (k, dh), ("kv_heads", "head_dim"), param_dtype,
                                     "zeros")
        if qk_norm:
            self.q_norm = RMSNorm(dh, "head_dim", norm_eps, param_dtype=param_dtype, rngs=rngs)
            self.k_norm = RMSNorm(dh, "head_dim", norm_eps, param_dtype=param_dtype, rngs=rngs)
        self.num_kv_heads, self.head_dim, self.compute_dtype = k, dh, compute_dtype

    def _project(self, x_BTD: jax.Array, kernel: nnx.Param, bias: nnx.Param | None) -> jax.Array:
        out = jnp.einsum("btd,dnk->btnk", x_BTD, kernel[...].astype(self.compute_dtype))
        if bias is not None:
            out = out + bias[...].astype(self.compute_dtype)[None, None]
        return out

    def __call__(self, x_BTD: jax.Array, sin: jax.Array, cos: jax.Array, mask_BTT: jax.Array,
                 kv: tuple | None = None
                 ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """x [B, T, D] (compute dtype); sin, cos [B, T, Dh/2]; mask [B, T, T] bool among this
        call's tokens (without kv).

        kv: None, or (k_cache [B, K, Dh, S], v_cache [B, K, S, Dh], index int32[], prefix):
        this call's keys/values are written into the cache at slots [index, index + T) first,
        then the queries attend over the whole cache where `mask_BTT` (then [B, T, S]) allows:
        written then read, so a cache carried through a decode loop is updated in place.
        prefix: None, or a shared prefix attended before the cache, (k [P, K, Dh, Sp],
        v [P, K, Sp, Dh], mask [B, T, Sp] bool) for P prompts of B / P rows each
        (models/cache.py SharedPrefix); a 3-tuple kv means no prefix.
        Returns (y [B, T, D], the updated (k_cache, v_cache), or None).
        """
        q = self._project(x_BTD, self.q_proj, self.q_bias if self.use_bias else None)
        k = self._project(x_BTD, self.k_proj, self.k_bias if self.use_bias else None)
        v = self._project(x_BTD, self.v_proj, self.v_bias if self.use_bias else None)
        # LoRA adapters (models/adapter.py), when the model has them: + (alpha/r) x A B.
        q = adapt(self, "q_proj", x_BTD, q, self.compute_dtype)
        k = adapt(self, "k_proj", x_BTD, k, self.compute_dtype)
        v = adapt(self, "v_proj", x_BTD, v, self.compute_dtype)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, sin, cos), apply_rope(k, sin, cos)
        b, t, h, dh = q.shape
        kh, g = self.num_kv_heads, h // self.num_kv_heads
        # Head-major [B, N, T, Dh] (head n = kv head n // G, group n % G): every attention matmul
        # then has its batch axes (b, k) leading and its contraction last or first, so XLA runs
        # it without transposing the [B, K, G, T, S] scores or their gradients.
        q_BKGTH = q.transpose(0, 2, 1, 3).reshape(b, kh, g, t, dh)
        k_BKTH, v_BKTH = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        new_kv = None
        parts = [(k_BKTH, v_BKTH, mask_BTT, "bksh")]
        key_layouts = ("bksh",)
        prefix = None
        if kv is not None:
            k_cache, v_cache, at = kv[:3]
            prefix = kv[3] if len(kv) > 3 else None
            zero = jnp.zeros((), jnp.int32)
            # Keys are stored transposed, [B, K, Dh, S] (models/cache.py): slots last.
            new_kv = (jax.lax.dynamic_update_slice(
                          k_cache, k_BKTH.transpose(0, 1, 3, 2).astype(k_cache.dtype),
                          (zero, zero, zero, at)),
                      jax.lax.dynamic_update_slice(v_cache, v_BKTH.astype(v_cache.dtype),
                                                   (zero, zero, at, zero)))
            # Read back in the cache dtype, as a later step will read these keys.
            cd = self.compute_dtype
            parts = [(new_kv[0].astype(cd), new_kv[1].astype(cd), mask_BTT, "bksh")]
            key_layouts = ("bkhs",)
        layouts = tuple(lay for *_, lay in parts)
        if prefix is not None:
            cd = self.compute_dtype
            out = jax.checkpoint(functools.partial(_attend_shared, dtype=cd))(
                q_BKGTH, parts[0][0], parts[0][1], mask_BTT, prefix[0].astype(cd),
                prefix[1].astype(cd), prefix[2])
        else:
            out = jax.checkpoint(functools.partial(_attend, layouts=layouts,
                                                   key_layouts=key_layouts,
                                                   dtype=self.compute_dtype))(
                q_BKGTH, [p[0] for p in parts], [p[1] for p in parts], [p[2] for p in parts])
        out = out.reshape(b, h, t, dh).transpose(0, 2, 1, 3)            # [B, T, N, Dh]
        y = jnp.einsum("bthk,hkd->btd", out,
                       self.o_proj[...].astype(self.compute_dtype))
        return adapt(self, "o_proj", out, y, self.compute_dtype), new_kv


class MLP(nnx.Module):
    """SwiGLU: down(silu(x @ gate) * (x @ up))."""

    def __init__(self, hidden_size: int, intermediate_size: int, *, param_dtype: jnp.dtype,
                 compute_dtype: jnp.dtype, rngs: nnx.Rngs):
        d, f = hidden_size, intermediate_size
        self.gate_proj = make_param(rngs, (d, f), ("embed", "mlp"), param_dtype)
        self.up_proj = make_param(rngs, (d, f), ("embed", "mlp"), param_dtype)
        self.down_proj = make_param(rngs, (f, d), ("mlp", "embed"), param_dtype)
        self.compute_dtype = compute_dtype

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        """x [B, T, D] -> [B, T, D]."""
        gate = adapt(self, "gate_proj", x_BTD,
                     x_BTD @ self.gate_proj[...].astype(self.compute_dtype), self.compute_dtype)
        up = adapt(self, "up_proj", x_BTD, x_BTD @ self.up_proj[...].astype(self.compute_dtype),
                   self.compute_dtype)
        hidden = jax.checkpoint(_swiglu)(gate, up)
        return adapt(self, "down_proj", hidden,
                     hidden @ self.down_proj[...].astype(self.compute_dtype), self.compute_dtype)


class Block(nnx.Module):
    """Pre-norm decoder layer: x + attn(norm(x)), then + mlp(norm(.))."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        pdt, dt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.compute_dtype)
        self.attn_norm = RMSNorm(cfg.hidden_size, "embed", cfg.rms_norm_eps, param_dtype=pdt,
                                 rngs=rngs)
        self.attn = Attention(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                              use_bias=cfg.attention_bias, qk_norm=cfg.qk_norm,
                              norm_eps=cfg.rms_norm_eps, param_dtype=pdt, compute_dtype=dt,
                              rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.hidden_size, "embed", cfg.rms_norm_eps, param_dtype=pdt,
                                rngs=rngs)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, param_dtype=pdt,
                       compute_dtype=dt, rngs=rngs)

    def __call__(self, x_BTD: jax.Array, sin: jax.Array, cos: jax.Array, mask_BTT: jax.Array,
                 kv: tuple | None = None
                 ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """Same arguments and results as Attention.__call__."""
        y, new_kv = self.attn(self.attn_norm(x_BTD), sin, cos, mask_BTT, kv)
        x_BTD = x_BTD + y
        return x_BTD + self.mlp(self.mlp_norm(x_BTD)), new_kv
