"""Decoder: the Flax NNX decoder-only transformer for every ModelConfig family.

    model = Decoder(ModelConfig.smollm2_135m(), rngs=nnx.Rngs(0))
    logits_BTV = model(tokens_BT, positions_BT, segment_ids_BT)

Parameter tree (logical axes in brackets; with scan_layers every `layers.*` param gains a
leading [layers] axis of size L, otherwise `layers` is an nnx.List and paths read layers.<i>.*):
    embedder.embedding [vocab, embed]
    layers.attn_norm.scale [embed]        layers.mlp_norm.scale [embed]
    layers.attn.q_proj [embed, heads, head_dim]     layers.attn.o_proj [heads, head_dim, embed]
    layers.attn.k_proj / v_proj [embed, kv_heads, head_dim]
    layers.attn.q_bias [heads, head_dim], k_bias / v_bias [kv_heads, head_dim]  (attention_bias)
    layers.attn.q_norm.scale / k_norm.scale [head_dim]                          (qk_norm)
    layers.mlp.gate_proj / up_proj [embed, mlp]     layers.mlp.down_proj [mlp, embed]
    final_norm.scale [embed]
    lm_head [embed, vocab]                                            (untied embeddings only)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from qtarget_jax.models.cache import KVCache, check_fits, init_cache
from qtarget_jax.models.config import ModelConfig
from qtarget_jax.models.layers import Block, RMSNorm, attention_mask, make_param, \
    rope_inv_freq, rope_sin_cos

_REMAT_POLICIES = {
    "full": None,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
}


class Embedder(nnx.Module):
    """Token embedding table [V, D]."""

    def __init__(self, vocab_size: int, hidden_size: int, *, param_dtype: jnp.dtype,
                 rngs: nnx.Rngs):
        self.embedding = make_param(rngs, (vocab_size, hidden_size), ("vocab", "embed"),
                                    param_dtype)

    def __call__(self, tokens_BT: jax.Array) -> jax.Array:
        """tokens [B, T] int -> [B, T, D] in the parameter dtype."""
        return jnp.take(self.embedding[...], tokens_BT, axis=0)


def _stacked_blocks(cfg: ModelConfig, rngs: nnx.Rngs) -> Block:
    """One Block whose params carry a leading [layers] axis of size L (for nnx.scan)."""

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def create(rngs: nnx.Rngs) -> Block:
        return Block(cfg, rngs=rngs)

    return create(rngs)


class Decoder(nnx.Module):
    """Decoder-only transformer (Llama / Mistral / Qwen2 / Qwen3 by config)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        pdt = jnp.dtype(cfg.param_dtype)
        self.cfg = cfg
        self.embedder = Embedder(cfg.vocab_size, cfg.hidden_size, param_dtype=pdt, rngs=rngs)
        if cfg.scan_layers:
            self.layers = _stacked_blocks(cfg, rngs)
        else:
            self.layers = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.hidden_size, "embed", cfg.rms_norm_eps, param_dtype=pdt,
                                  rngs=rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head = make_param(rngs, (cfg.hidden_size, cfg.vocab_size),
                                      ("embed", "vocab"), pdt)

    def lm_head_kernel(self) -> jax.Array:
        """The output projection [D, V] (tied: the embedding transposed), parameter dtype."""
        if self.cfg.tie_word_embeddings:
            return self.embedder.embedding[...].T
        return self.lm_head[...]

    def logits(self, h: jax.Array) -> jax.Array:
        """Final-normed hidden states [..., D] (compute dtype) -> logits [..., V] float32."""
        return jnp.einsum("...d,dv->...v", h, self.lm_head_kernel().astype(self.cfg.compute_dtype),
                          preferred_element_type=jnp.float32)

    def init_cache(self, batch: int, max_len: int,
                   dtype: jnp.dtype | str = jnp.float32) -> KVCache:
        """An empty KV cache for `batch` rows and `max_len` slots (see models/cache.py)."""
        return init_cache(self.cfg, batch, max_len, dtype)

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, *, return_hidden: bool = False,
                 cache: KVCache | None = None, mask: jax.Array | None = None):
        """Forward pass.

        Args:
          tokens: [B, T] int32 token ids.
          positions: [B, T] int32 RoPE positions (restart at 0 per packed segment). Default
            arange(T) per row; required when `cache` is given (left-padded rows differ).
          segment_ids: [B, T] int32; 1, 2, ... per packed example, 0 = padding. Attention is
            causal AND same segment AND never to padding keys (AND within sliding_window).
            Default all ones. Padding rows produce finite garbage, never NaN.
          return_hidden: return the final-normed hidden states [B, T, D] (compute dtype)
            instead of logits.
          cache: a KVCache; this call's tokens fill slots [cache.index, cache.index + T).
          mask: [B, T, T] bool (with `cache`: [B, T, S] over its slots), an attention mask
            that replaces the one built from positions and segment_ids (e.g. packed rows that
            all see one shared prefix held in the cache: problems/probes.py). None: built.

        Returns:
          logits [B, T, V] float32 (matmul in compute dtype, accumulated and returned in
          float32) or hidden [B, T, D]; with `cache`, the tuple (that, new_cache).
        """
        cfg = self.cfg
        if tokens.ndim != 2:
            raise ValueError(f"Decoder: tokens must be [B, T], got shape {tokens.shape}")
        b, t = tokens.shape
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        if positions is None:
            if cache is not None:
                raise ValueError("Decoder: positions are required with a cache "
                                 "(each left-padded row has its own)")
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        for name, arr in (("positions", positions), ("segment_ids", segment_ids)):
            if arr.shape != tokens.shape:
                raise ValueError(f"Decoder: {name} shape {arr.shape} != tokens shape "
                                 f"{tokens.shape}")
        sin, cos = rope_sin_cos(positions, rope_inv_freq(cfg.head_dim, cfg.rope_theta,
                                                          cfg.rope_scaling))
        q_index = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        kv = None
        given = mask
        if given is not None:
            want = (b, t, t if cache is None else cache.max_len)
            if given.shape != want:
                raise ValueError(f"Decoder: mask shape {given.shape} != {want}")
        if cache is None:      # among this call's tokens: [B, T, T]
            if given is None:
                mask = attention_mask(q_index, segment_ids, q_index, segment_ids,
                                      cfg.sliding_window)
        else:                  # over the cache slots once this call's tokens are in: [B, T, S]
            if len(cache.k) != cfg.num_layers or cache.k[0].shape[0] != b:
                raise ValueError(f"Decoder: cache has {len(cache.k)} layers of batch "
                                 f"{cache.k[0].shape[0]}; the model has num_layers "
                                 f"{cfg.num_layers} and the batch is {b}")
            check_fits(cache, t)
            zero = jnp.zeros((), jnp.int32)              # int32 under JAX_ENABLE_X64 too
            at = cache.index.astype(jnp.int32)
            segments = jax.lax.dynamic_update_slice(cache.segment_ids,
                                                    segment_ids.astype(jnp.int32), (zero, at))
            k_index = jnp.broadcast_to(jnp.arange(cache.max_len, dtype=jnp.int32),
                                       (b, cache.max_len))
            # The barrier keeps XLA from constant-folding the attention over a cache made
            # inside the same jit (all-empty: a slow fold of [B, K, G, T, S] at compile time).
            if given is None:
                mask = attention_mask(q_index + at, segment_ids, k_index,
                                      jax.lax.optimization_barrier(segments),
                                      cfg.sliding_window)
            kv = (cache.k, cache.v, at, None)
            # sin/cos through an exact identity dot, which XLA cannot fuse: computed once per
            # call instead of inside every layer's RoPE fusions (one per q/k layout per layer).
            eye = jnp.eye(sin.shape[-1], dtype=sin.dtype)
            sin, cos = (jnp.einsum("btf,fg->btg", a, eye, precision="highest")
                        for a in (sin, cos))
            if cache.prefix is not None:  # slots [0, Sp) before the rows' own: offset by Sp
                if given is not None:
                    raise ValueError("Decoder: an explicit mask covers the cache's own slots "
                                     "only; a cache with a shared prefix builds its masks")
                pre = cache.prefix
                p_rows, sp = pre.segment_ids.shape
                if b % p_rows:
                    raise ValueError(f"Decoder: {b} cache rows are not a multiple of the "
                                     f"{p_rows} prompts of the shared prefix")
                pre_segments = jnp.repeat(pre.segment_ids, b // p_rows, axis=0)    # [B, Sp]
                pre_index = jnp.broadcast_to(jnp.arange(sp, dtype=jnp.int32), (b, sp))
                pre_mask = attention_mask(q_index + at + sp, segment_ids, pre_index,
                                          jax.lax.optimization_barrier(pre_segments),
                                          cfg.sliding_window)                     # [B, T, Sp]
                kv = (cache.k, cache.v, at, (pre.k, pre.v, pre_mask))
        x = self.embedder(tokens).astype(cfg.compute_dtype)
        if cfg.scan_layers:
            x, new_kv = self._scan_layers(x, sin, cos, mask, kv)
        else:
            x, new_kv = self._loop_layers(x, sin, cos, mask, kv)
        h = self.final_norm(x)
        out = h if return_hidden else self.logits(h)
        if cache is None:
            return out
        return out, KVCache(k=new_kv[0], v=new_kv[1], segment_ids=segments,
                            index=cache.index + t, prefix=cache.prefix)

    def _block_fn(self):
        """Block application, rematerialised per layer when cfg.remat_policy != "none"."""
        def apply(block, x, sin, cos, mask, kv):
            return block(x, sin, cos, mask, kv)

        if self.cfg.remat_policy == "none":
            return apply
        return nnx.remat(apply, policy=_REMAT_POLICIES[self.cfg.remat_policy])

    def _loop_layers(self, x, sin, cos, mask, kv):
        """Unrolled layers. x [B, T, D]; mask [B, T, T], or [B, T, S] with kv = the cache's
        (k, v) (L arrays [B, K, Dh, S] and [B, K, S, Dh]), its write slot and None or the shared
        prefix (k, v: L arrays [P, K, Dh, Sp] and [P, K, Sp, Dh], mask [B, T, Sp])
        -> (x, the updated (k, v))."""
        apply = self._block_fn()
        new_k, new_v = [], []
        for i, block in enumerate(self.layers):
            layer_kv = None
            if kv is not None:
                pre = None if kv[3] is None else (kv[3][0][i], kv[3][1][i], kv[3][2])
                layer_kv = (kv[0][i], kv[1][i], kv[2], pre)
            x, out_kv = apply(block, x, sin, cos, mask, layer_kv)
            if out_kv is not None:
                new_k.append(out_kv[0])
                new_v.append(out_kv[1])
        if kv is None:
            return x, None
        return x, (tuple(new_k), tuple(new_v))

    def _scan_layers(self, x, sin, cos, mask, kv):
        """nnx.scan over the stacked layers; same arguments and results as _loop_layers (the
        cache is stacked to [L, ...] for the scan and split back: a copy per call)."""
        apply = self._block_fn()
        at = None if kv is None else kv[2]
        pre_mask = None if kv is None or kv[3] is None else kv[3][2]

        @nnx.scan(in_axes=(nnx.Carry, 0, 0), out_axes=(nnx.Carry, 0),
                  transform_metadata={nnx.PARTITION_NAME: "layers"})
        def body(x, block, layer_kv):
            full_kv = None
            if layer_kv is not None:
                k, v, pk, pv = layer_kv
                full_kv = (k, v, at, None if pk is None else (pk, pv, pre_mask))
            return apply(block, x, sin, cos, mask, full_kv)

        stacked = None
        if kv is not None:
            pre = (None, None) if kv[3] is None else (jnp.stack(kv[3][0]), jnp.stack(kv[3][1]))
            stacked = (jnp.stack(kv[0]), jnp.stack(kv[1]), *pre)
        x, new_kv = body(x, self.layers, stacked)
        if kv is None:
            return x, None
        return x, tuple(tuple(jnp.unstack(a)) for a in new_kv)
