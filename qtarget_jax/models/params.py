"""HF checkpoint names <-> Decoder params: one declarative table, plus load and export.

Each `Rule` says: HF tensor `hf` (with `{i}` = layer) of HF shape `hf_shape` becomes our param
`ours` of shape `our_shape` by (transpose if `transpose`) then reshape; export is the exact
inverse. Shapes are tuples of ModelConfig attribute names. Each template's regex is derived
from it (`{i}` -> `([0-9]+)`), e.g.
    r"model\\.layers\\.([0-9]+)\\.self_attn\\.q_proj\\.weight" -> "layers.\\1.attn.q_proj".
With cfg.scan_layers, `layers.{i}.X` is row i of the stacked param `layers.X`.

`TensorSource` is what the file readers (hf_io.py, gguf_io.py) implement; a dict of numpy arrays
wrapped in `DictSource` is one.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Iterable, Mapping, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from qtarget_jax.models.config import ModelConfig
from qtarget_jax.models.decoder import Decoder
from qtarget_jax.models.sharding import LOGICAL_RULES, Rules, param_shardings


class TensorSource(Protocol):
    """Read-only access to named tensors (a safetensors folder, a GGUF file, a dict).

    A source may also define `read_slice(name, index: tuple[slice, ...]) -> np.ndarray`
    (`tensor[index]` without reading the rest); load_params with a mesh then reads only each
    shard's slice.
    """

    def keys(self) -> Iterable[str]: ...

    def shape(self, name: str) -> tuple: ...

    def read(self, name: str) -> np.ndarray: ...


class DictSource:
    """TensorSource over an in-memory mapping name -> array (numpy or torch-converted)."""

    def __init__(self, tensors: Mapping[str, np.ndarray]):
        self._tensors = {k: np.asarray(v) for k, v in tensors.items()}

    def keys(self) -> Iterable[str]:
        return self._tensors.keys()

    def shape(self, name: str) -> tuple:
        return tuple(self._tensors[name].shape)

    def read(self, name: str) -> np.ndarray:
        return self._tensors[name]


@dataclasses.dataclass(frozen=True)
class Rule:
    hf: str                      # HF name template, "{i}" = layer index
    ours: str                    # our param path template
    hf_shape: tuple[str, ...]    # ModelConfig attributes giving the HF shape
    our_shape: tuple[str, ...]   # ModelConfig attributes giving our shape
    transpose: bool = False      # HF tensor is transposed before the reshape

    @property
    def pattern(self) -> re.Pattern:
        return re.compile(re.escape(self.hf).replace(r"\{i\}", "([0-9]+)") + r"\Z")


_D, _V, _F = "hidden_size", "vocab_size", "intermediate_size"
_H, _K, _DH = "num_heads", "num_kv_heads", "head_dim"
_L = "model.layers.{i}."
RULES: tuple[Rule, ...] = (
    Rule("model.embed_tokens.weight", "embedder.embedding", (_V, _D), (_V, _D)),
    Rule(_L + "input_layernorm.weight", "layers.{i}.attn_norm.scale", (_D,), (_D,)),
    Rule(_L + "self_attn.q_proj.weight", "layers.{i}.attn.q_proj", ("q_dim", _D), (_D, _H, _DH),
         transpose=True),
    Rule(_L + "self_attn.k_proj.weight", "layers.{i}.attn.k_proj", ("kv_dim", _D),
         (_D, _K, _DH), transpose=True),
    Rule(_L + "self_attn.v_proj.weight", "layers.{i}.attn.v_proj", ("kv_dim", _D),
         (_D, _K, _DH), transpose=True),
    Rule(_L + "self_attn.o_proj.weight", "layers.{i}.attn.o_proj", (_D, "q_dim"), (_H, _DH, _D),
         transpose=True),
    Rule(_L + "self_attn.q_proj.bias", "layers.{i}.attn.q_bias", ("q_dim",), (_H, _DH)),
    Rule(_L + "self_attn.k_proj.bias", "layers.{i}.attn.k_bias", ("kv_dim",), (_K, _DH)),
    Rule(_L + "self_attn.v_proj.bias", "layers.{i}.attn.v_bias", ("kv_dim",), (_K, _DH)),
    Rule(_L + "self_attn.q_norm.weight", "layers.{i}.attn.q_norm.scale", (_DH,), (_DH,)),
    Rule(_L + "self_attn.k_norm.weight", "layers.{i}.attn.k_norm.scale", (_DH,), (_DH,)),
    Rule(_L + "post_attention_layernorm.weight", "layers.{i}.mlp_norm.scale", (_D,), (_D,)),
    Rule(_L + "mlp.gate_proj.weight", "layers.{i}.mlp.gate_proj", (_F, _D), (_D, _F),
         transpose=True),
    Rule(_L + "mlp.up_proj.weight", "layers.{i}.mlp.up_proj", (_F, _D), (_D, _F),
         transpose=True),
    Rule(_L + "mlp.down_proj.weight", "layers.{i}.mlp.down_proj", (_D, _F), (_F, _D),
         transpose=True),
    Rule("model.norm.weight", "final_norm.scale", (_D,), (_D,)),
    Rule("lm_head.weight", "lm_head", (_V, _D), (_D, _V), transpose=True),
)
# HF tensors that carry no parameter (recomputed buffers in old checkpoints).
IGNORED = (re.compile(r"model\.layers\.[0-9]+\.self_attn\.rotary_emb\.inv_freq\Z"),)
_TIED_HEAD = "lm_head.weight"


def _dims(cfg: ModelConfig, names: tuple[str, ...]) -> tuple[int, ...]:
    return tuple(int(getattr(cfg, n)) for n in names)


def hf_to_ours(rule: Rule, cfg: ModelConfig, x: np.ndarray) -> np.ndarray:
    """HF array -> our layout (transpose, reshape); shapes are checked by the caller."""
    return (x.T if rule.transpose else x).reshape(_dims(cfg, rule.our_shape))


def ours_to_hf(rule: Rule, cfg: ModelConfig, x: np.ndarray) -> np.ndarray:
    """Our array -> HF layout, the exact inverse of hf_to_ours."""
    hf_shape = _dims(cfg, rule.hf_shape)
    if rule.transpose:
        return np.ascontiguousarray(x.reshape(hf_shape[::-1]).T)
    return x.reshape(hf_shape)


def match(name: str) -> tuple[Rule, int | None] | None:
    """(rule, layer index or None) for an HF tensor name, or None when no rule matches."""
    for rule in RULES:
        m = rule.pattern.match(name)
        if m:
            return rule, (int(m.group(1)) if m.groups() else None)
    return None


def _our_path(rule: Rule, layer: int | None, cfg: ModelConfig) -> tuple[str, int | None]:
    """(param path string, row in the stacked layers axis or None)."""
    if layer is None:
        return rule.ours, None
    if cfg.scan_layers:
        return rule.ours.replace(".{i}", ""), layer
    return rule.ours.replace("{i}", str(layer)), None


def _path_str(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def _plan(cfg: ModelConfig, source: TensorSource, params: dict[str, jax.ShapeDtypeStruct]
          ) -> dict[str, dict[int | None, tuple[str, Rule]]]:
    """our path -> {layer row (None if unstacked): (HF name, rule)}; raises listing problems."""
    plan: dict[str, dict[int | None, tuple[str, Rule]]] = {}
    unexpected, bad_shapes = [], []
    for name in sorted(source.keys()):
        if any(p.match(name) for p in IGNORED):
            continue
        found = match(name)
        if found is None:
            unexpected.append(name)
            continue
        rule, layer = found
        if name == _TIED_HEAD and cfg.tie_word_embeddings:
            continue  # checked against the embedding in load_params
        path, row = _our_path(rule, layer, cfg)
        if path not in params or (layer is not None and layer >= cfg.num_layers):
            unexpected.append(name)
            continue
        want, got = _dims(cfg, rule.hf_shape), tuple(source.shape(name))
        if want != got:
            bad_shapes.append(f"{name}: checkpoint shape {got} != expected {want}")
            continue
        plan.setdefault(path, {})[row] = (name, rule)
    rows_needed = {p: ([None] if not (cfg.scan_layers and p.startswith("layers."))
                       else list(range(cfg.num_layers))) for p in params}
    missing = []
    for path, rows in rows_needed.items():
        for row in rows:
            if row not in plan.get(path, {}):
                missing.append(path if row is None else f"{path}[layer {row}]")
    if unexpected or missing or bad_shapes:
        parts = []
        if bad_shapes:
            parts.append("shape mismatches:\n  " + "\n  ".join(bad_shapes))
        if missing:
            parts.append("missing (our params with no tensor):\n  " + "\n  ".join(missing))
        if unexpected:
            parts.append("unexpected tensors:\n  " + "\n  ".join(unexpected))
        raise ValueError(f"load_params ({cfg.model_type}, {cfg.num_layers} layers): "
                         + "\n".join(parts))
    return plan


def _read(source: TensorSource, cfg: ModelConfig, entries, rows, dtype) -> np.ndarray:
    """Our-layout value for the given stacked `rows` (or the whole unstacked param)."""
    if rows is None:
        name, rule = entries[None]
        return hf_to_ours(rule, cfg, np.asarray(source.read(name))).astype(dtype)
    return np.stack([hf_to_ours(entries[r][1], cfg, np.asarray(source.read(entries[r][0])))
                     for r in rows]).astype(dtype)


def load_params(cfg: ModelConfig, source: TensorSource, *, mesh: Mesh | None = None,
                rules: Rules = LOGICAL_RULES, param_dtype: str | None = None) -> Decoder:
    """A Decoder whose params are read from `source` (HF names).

    Builds the model abstractly (no random init), maps every tensor through RULES, checks
    shapes, and raises one ValueError listing every shape mismatch, missing param and
    unexpected tensor. Tied embeddings: `lm_head.weight` may be absent; if present it must
    equal `model.embed_tokens.weight`. With `mesh`, each param is created straight into its
    NamedSharding (LOGICAL_RULES) via jax.make_array_from_callback: each device receives only
    its slice; a source with `read_slice` is asked only for the slices shards need, others
    read each tensor once.
    """
    if param_dtype is not None:
        cfg = cfg.replace(param_dtype=param_dtype)
    abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    flat = list(nnx.to_flat_state(state))
    shapes = {_path_str(p): v for p, v in flat}
    plan = _plan(cfg, source, shapes)
    if cfg.tie_word_embeddings and _TIED_HEAD in set(source.keys()):
        head, emb = source.read(_TIED_HEAD), source.read("model.embed_tokens.weight")
        if not np.array_equal(np.asarray(head), np.asarray(emb)):
            raise ValueError("load_params: tie_word_embeddings=True but lm_head.weight differs "
                             "from model.embed_tokens.weight")
    dtype = np.dtype(jnp.dtype(cfg.param_dtype))
    shardings = None
    if mesh is not None:
        shardings = {_path_str(p): s for p, s in
                     nnx.to_flat_state(param_shardings(state, mesh, rules))}
    new_flat = []
    for path, var in flat:
        key = _path_str(path)
        entries = plan[key]
        stacked = None not in entries
        if shardings is None:
            rows = sorted(entries) if stacked else None
            value = jnp.asarray(_read(source, cfg, entries, rows, dtype))
        else:
            value = _make_sharded(source, cfg, entries, stacked, tuple(var.shape), dtype,
                                  shardings[key])
        new_flat.append((path, var.replace(value)))
    return nnx.merge(graphdef, nnx.from_flat_state(new_flat))


def _hf_slice(rule: Rule, cfg: ModelConfig, index: tuple[slice, ...]
              ) -> tuple[slice, ...] | None:
    """The HF-layout slice holding our `index` (one layer), or None if it is not one box.

    Our dims group into HF dims (e.g. [D, H, Dh] <- transposed [H*Dh, D]); a group of several
    dims is one contiguous HF range only when every dim after its first is unsliced.
    """
    ours = _dims(cfg, rule.our_shape)
    hf_t = _dims(cfg, rule.hf_shape)[::-1] if rule.transpose else _dims(cfg, rule.hf_shape)
    bounds = [sl.indices(n)[:2] for sl, n in zip(index, ours)]
    out, d = [], 0
    for size in hf_t:
        group, prod = [], 1
        while d < len(ours) and (prod < size or not group):
            group.append(d)
            prod *= ours[d]
            d += 1
        if prod != size or any(bounds[g] != (0, ours[g]) for g in group[1:]):
            return None
        inner = math.prod(ours[g] for g in group[1:])
        out.append(slice(bounds[group[0]][0] * inner, bounds[group[0]][1] * inner))
    if d != len(ours):
        return None
    return tuple(out[::-1]) if rule.transpose else tuple(out)


def _make_sharded(source, cfg, entries, stacked, shape, dtype, sharding) -> jax.Array:
    """jax.make_array_from_callback for one param.

    With `source.read_slice`, each distinct shard reads only its slice; otherwise each HF
    tensor is read whole, at most once, and sliced per device.
    """
    cache: dict = {}
    slicing = hasattr(source, "read_slice")

    def one_layer(row, index):
        name, rule = entries[row]
        hf_index = _hf_slice(rule, cfg, index) if slicing else None
        if hf_index is None:
            if row not in cache:
                cache[row] = hf_to_ours(rule, cfg, np.asarray(source.read(name))).astype(dtype)
            return cache[row][index]
        key = (row, tuple((s.start, s.stop) for s in hf_index))
        if key not in cache:
            x = np.asarray(source.read_slice(name, hf_index))
            x = x.T if rule.transpose else x
            lengths = tuple(len(range(*sl.indices(n)))
                            for sl, n in zip(index, _dims(cfg, rule.our_shape)))
            cache[key] = x.reshape(lengths).astype(dtype)
        return cache[key]

    def callback(index: tuple[slice, ...]) -> np.ndarray:
        if not stacked:
            return one_layer(None, index)
        rows = range(*index[0].indices(shape[0]))
        return np.stack([one_layer(r, index[1:]) for r in rows])

    return jax.make_array_from_callback(shape, sharding, callback)


def _hf_layout(cfg: ModelConfig, paths) -> list[tuple[str, Rule, str, int | None]]:
    """(HF name, rule, our path, stacked row) for every HF tensor a model with `paths` has."""
    out = []
    for rule in RULES:
        layers = range(cfg.num_layers) if "{i}" in rule.hf else [None]
        for layer in layers:
            path, row = _our_path(rule, layer, cfg)
            if path in paths:
                name = rule.hf if layer is None else rule.hf.replace("{i}", str(layer))
                out.append((name, rule, path, row))
    return out


def expected_hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape that a checkpoint of `cfg` holds (tied: no lm_head.weight)."""
    abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    paths = {_path_str(p) for p, _ in nnx.to_flat_state(nnx.state(abstract))}
    return {name: _dims(cfg, rule.hf_shape) for name, rule, _, _ in _hf_layout(cfg, paths)}


def export_params(model: Decoder, cfg: ModelConfig | None = None) -> dict[str, np.ndarray]:
    """HF-named numpy arrays of `model` (the exact inverse of load_params; bit-exact for fp32).

    Tied models export no `lm_head.weight` (as HF safetensors do).
    """
    cfg = model.cfg if cfg is None else cfg
    values = {_path_str(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model))}
    out: dict[str, np.ndarray] = {}
    used: set[str] = set()
    for name, rule, path, row in _hf_layout(cfg, values):
        used.add(path)
        out[name] = ours_to_hf(rule, cfg, values[path] if row is None else values[path][row])
    leftover = sorted(set(values) - used)
    if leftover:
        raise ValueError(f"export_params: params with no HF rule: {leftover}")
    return out


def num_params(cfg: ModelConfig) -> int:
    """Total parameter count of a Decoder built from `cfg` (no allocation)."""
    abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    return sum(math.prod(v.shape) for _, v in nnx.to_flat_state(nnx.state(abstract)))
