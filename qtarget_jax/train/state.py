"""TrainState: the plain pytree the step transforms, created already sharded.

The student is split once: `graphdef` (static) + trainable `params` (pure dict of arrays) +
`rest` (non-Param model state, carried unchanged). The teacher is a model of its own (any width,
depth, heads or family our Decoder supports): its own `teacher_graphdef`, frozen `teacher`
params in their own dtype and `teacher_rest`. It has no optimizer state and never gets a
gradient. Every array is placed by the one rules table (models/sharding.py) on the same mesh.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import Mesh

from qtarget_jax.models.sharding import LOGICAL_RULES, param_shardings
from qtarget_jax.train import mesh as mesh_lib

# init_state(teacher=INITIAL): the frozen initial student, copied on device (not on the host).
INITIAL = "initial"


@struct.dataclass
class TrainState:
    step: jax.Array  # i32[]: optimizer steps taken
    params: Any  # pure dict of trainable arrays, sharded by the logical rules
    opt_state: Any  # optax state; param-shaped leaves sharded like params
    rng: jax.Array  # u32[2] raw PRNG key data, advanced every step
    teacher: Optional[Any] = None  # frozen teacher params (its own tree and dtype) or None
    rest: Any = None  # non-Param student state (not trained)
    teacher_rest: Any = None  # non-Param teacher state

    @staticmethod
    def checkpoint_keys() -> tuple[str, ...]:
        """The fields a checkpoint holds; the teacher and `rest` are rebuilt from their source."""
        return ("step", "params", "opt_state", "rng")

    def checkpoint_items(self) -> dict:
        """What a checkpoint holds: {step, params, opt_state, rng}."""
        return {k: getattr(self, k) for k in self.checkpoint_keys()}

    def replace_checkpoint_items(self, items: Mapping[str, Any]) -> "TrainState":
        return self.replace(**{k: items[k] for k in self.checkpoint_keys()})


@struct.dataclass
class Built:
    state: TrainState
    shardings: TrainState  # same structure, NamedSharding leaves
    graphdef: Any = struct.field(pytree_node=False)
    teacher_graphdef: Any = struct.field(pytree_node=False, default=None)


def abstract_checkpoint_items(params: Any, tx: optax.GradientTransformation,
                              sharding: Any = None) -> dict:
    """ShapeDtypeStructs of `TrainState.checkpoint_items()` for `params` (a pure dict of arrays
    or ShapeDtypeStructs): the layout a checkpoint of this model and optimizer has. `sharding`
    (one Sharding for every leaf) is attached when given."""
    items = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params,
             "opt_state": jax.eval_shape(tx.init, params),
             "rng": jax.ShapeDtypeStruct((2,), jnp.uint32)}
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                        items)


def opt_state_shardings(tx: optax.GradientTransformation, params: Any, param_shardings: Any,
                        mesh: Mesh) -> Any:
    """Param-shaped optimizer leaves sharded like their params, the rest (counts) replicated."""
    abstract = jax.eval_shape(tx.init, params)
    rep = mesh_lib.replicated(mesh)
    return optax.tree_utils.tree_map_params(
        tx, lambda _, s: s, abstract, param_shardings, transform_non_params=lambda _: rep)


def place(tree: Any, shardings: Any, consume: bool = False) -> Any:
    """Arrays -> global arrays placed per `shardings`, without a whole host copy when possible.

    A jax.Array already in its sharding is kept when `consume` (the caller gives its buffers
    up: the step donates the state), else copied on device shard by shard; one sharded
    otherwise is resharded on device;
    host values (numpy, or single-device arrays identical on every process) are cut per shard
    by `jax.make_array_from_callback` (each process fills only its addressable shards).
    """
    leaves, treedef = jax.tree.flatten(tree)
    targets = treedef.flatten_up_to(shardings)
    same = [isinstance(x, jax.Array) and x.sharding == s for x, s in zip(leaves, targets)]
    if not consume and any(same):  # one jitted copy of all of them
        copies = iter(frozen_copy([x for x, m in zip(leaves, same) if m],
                                  [s for s, m in zip(targets, same) if m]))
        leaves = [next(copies) if m else x for x, m in zip(leaves, same)]

    def put(x, sharding, kept):
        if kept:
            return x
        if isinstance(x, jax.Array) and (not x.is_fully_addressable
                                         or len(x.sharding.device_set) > 1):
            return jax.device_put(x, sharding)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])
    return treedef.unflatten([put(x, s, m) for x, s, m in zip(leaves, targets, same)])


def _rest_shardings(rest: nnx.State, mesh: Mesh, rules) -> Any:
    """Shardings of the untrained state: by the logical rules where a variable has logical
    axis names (the frozen base weights of a LoRA model), replicated otherwise."""
    from jax.sharding import NamedSharding

    from qtarget_jax.models.sharding import spec_for
    flat = []
    for path, var in nnx.to_flat_state(rest):
        axes = var.get_metadata().get("out_sharding")
        name = ".".join(str(p) for p in path)
        flat.append((path, mesh_lib.replicated(mesh) if axes is None else NamedSharding(
            mesh, spec_for(name, tuple(var.shape), axes, mesh, rules))))
    return nnx.from_flat_state(flat).to_pure_dict()


def _split_params(model: nnx.Module, mesh: Mesh, rules):
    """(graphdef, params pure dict, rest pure dict, param shardings, rest shardings).

    The params are what the optimizer trains: every nnx.Param, or only the adapters
    (nnx.LoRAParam) of a LoRA model, whose frozen base weights are then part of `rest`.
    """
    from qtarget_jax.models.lora import trainable_filter
    graphdef, params_state, rest = nnx.split(model, trainable_filter(model), ...)
    p_shard = param_shardings(params_state, mesh, rules).to_pure_dict()
    rest_pure = rest.to_pure_dict()
    rest_shard = _rest_shardings(rest, mesh, rules)
    return graphdef, params_state.to_pure_dict(), rest_pure, p_shard, rest_shard


def frozen_copy(params: Any, shardings: Any, dtype: Any = None) -> Any:
    """A device copy of `params` (cast to `dtype` when given) in the same shardings: the frozen
    initial student as teacher, made without a second host copy of the weights."""
    def copy(x):
        y = x.astype(dtype) if dtype is not None and jnp.issubdtype(x.dtype, jnp.floating) else x
        # A fresh buffer even when nothing is cast: the student's buffers are donated each step.
        return y + jnp.zeros((), y.dtype)
    return jax.jit(lambda p: jax.tree.map(copy, p), out_shardings=shardings)(params)


def init_state(model: nnx.Module, tx: optax.GradientTransformation, mesh: Mesh,
               rules: Any = LOGICAL_RULES, seed: int = 0,
               teacher: Union[None, str, nnx.Module] = None,
               teacher_dtype: Any = None, consume: bool = False) -> Built:
    """Splits `model`, places params by the logical rules and initialises optax sharded.

    Args:
      model: the student; params already sharded on `mesh` (load_model(mesh=...),
        `build.init_model`) are copied on device, shard by shard, or with `consume=True` used
        as they are (the step donates the state, so `model` and `teacher` must not be used
        afterwards: the loop's choice, saving a transient second copy); host params are cut
        per shard.
      rules: logical axis name -> mesh axes (default the one table, LOGICAL_RULES).
      teacher: None (no teacher), INITIAL (a frozen device copy of the initial student; for
        a LoRA student, its frozen base weights with the adapters off: no copy, the teacher
        graphdef is a `lora.BaseTeacher` and `state.teacher` is {}), or a frozen nnx.Module of
        any architecture sharing the student's vocabulary.
      teacher_dtype: param dtype of the INITIAL teacher copy (None: the student's); a teacher
        Module keeps its own param dtype.
    Returns:
      Built(state, shardings, graphdef, teacher_graphdef), state placed per `shardings`.
    """
    from qtarget_jax.models.lora import BaseTeacher, base_graphdef, has_lora
    graphdef, params, rest, p_shard, rest_shard = _split_params(model, mesh, rules)
    params = place(params, p_shard, consume)
    o_shard = opt_state_shardings(tx, params, p_shard, mesh)
    opt_state = jax.jit(tx.init, out_shardings=o_shard)(params)
    rep = mesh_lib.replicated(mesh)
    t_graphdef = t_params = t_shard = t_rest = t_rest_shard = None
    if isinstance(teacher, str):
        if teacher != INITIAL:
            raise ValueError(f"init_state: teacher={teacher!r}; expected {INITIAL!r}, a "
                             "Module or None")
        if has_lora(model):  # the frozen base in `rest` is the initial model: no copy
            t_graphdef, t_params, t_shard = BaseTeacher(base_graphdef(model)), {}, {}
        else:
            t_graphdef, t_shard, t_rest_shard = graphdef, p_shard, rest_shard
            t_params = frozen_copy(params, p_shard, teacher_dtype)
            t_rest = place(rest, rest_shard, consume)
    elif teacher is not None:
        t_graphdef, t_params, t_rest, t_shard, t_rest_shard = _split_params(teacher, mesh, rules)
        t_params = place(t_params, t_shard, consume)
        t_rest = place(t_rest, t_rest_shard, consume)
    state = TrainState(
        step=place(jnp.zeros((), jnp.int32), rep), params=params, opt_state=opt_state,
        rng=place(jax.random.key_data(jax.random.PRNGKey(seed)), rep),
        teacher=t_params, rest=place(rest, rest_shard, consume), teacher_rest=t_rest)
    shardings = TrainState(step=rep, params=p_shard, opt_state=o_shard, rng=rep,
                           teacher=t_shard, rest=rest_shard, teacher_rest=t_rest_shard)
    return Built(state=state, shardings=shardings, graphdef=graphdef,
                 teacher_graphdef=t_graphdef)
