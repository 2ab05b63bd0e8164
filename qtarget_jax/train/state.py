"""TrainState: the plain pytree the step transforms, created already sharded.

The model is split once: `graphdef` (static) + trainable `params` (pure dict of arrays) + `rest`
(non-Param model state, carried unchanged). The step merges them back inside the loss.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh

from qtarget_jax.train import mesh as mesh_lib


@struct.dataclass
class TrainState:
    step: jax.Array  # i32[]: optimizer steps taken
    params: Any  # pure dict of trainable arrays, sharded by the logical rules
    opt_state: Any  # optax state; param-shaped leaves sharded like params
    rng: jax.Array  # u32[2] raw PRNG key data, advanced every step
    teacher: Optional[Any] = None  # frozen teacher params (sharded like params) or None
    rest: Any = None  # non-Param model state (not trained)

    def checkpoint_items(self) -> dict:
        """What a checkpoint holds: everything but the teacher and `rest` (rebuilt from source)."""
        return {"step": self.step, "params": self.params, "opt_state": self.opt_state,
                "rng": self.rng}

    def replace_checkpoint_items(self, items: Mapping[str, Any]) -> "TrainState":
        return self.replace(**{k: items[k] for k in ("step", "params", "opt_state", "rng")})


@struct.dataclass
class Built:
    state: TrainState
    shardings: TrainState  # same structure, NamedSharding leaves
    graphdef: Any = struct.field(pytree_node=False)


def opt_state_shardings(tx: optax.GradientTransformation, params: Any, param_shardings: Any,
                        mesh: Mesh) -> Any:
    """Param-shaped optimizer leaves sharded like their params, the rest (counts) replicated."""
    abstract = jax.eval_shape(tx.init, params)
    rep = mesh_lib.replicated(mesh)
    return optax.tree_utils.tree_map_params(
        tx, lambda _, s: s, abstract, param_shardings, transform_non_params=lambda _: rep)


def init_state(model: nnx.Module, tx: optax.GradientTransformation, mesh: Mesh,
               rules: Mapping[str, Any], seed: int,
               teacher: Optional[nnx.Module] = None) -> Built:
    """Splits `model`, places params by the logical rules and initialises optax sharded.

    Args:
      model: the student (nnx.Module, concrete weights on host or device).
      teacher: a frozen teacher with the same parameter tree, or None.
    Returns:
      Built(state, shardings, graphdef), state placed per `shardings`.
    """
    graphdef, params_state, rest = nnx.split(model, nnx.Param, ...)
    p_shard = mesh_lib.param_shardings(params_state, rules, mesh)
    params = mesh_lib.put_global(params_state.to_pure_dict(), p_shard)
    o_shard = opt_state_shardings(tx, params, p_shard, mesh)
    opt_state = jax.jit(tx.init, out_shardings=o_shard)(params)
    rep = mesh_lib.replicated(mesh)
    rest_pure = rest.to_pure_dict()
    rest_shard = jax.tree.map(lambda _: rep, rest_pure)
    teacher_params = teacher_shard = None
    if teacher is not None:
        _, t_state, _ = nnx.split(teacher, nnx.Param, ...)
        teacher_shard = mesh_lib.param_shardings(t_state, rules, mesh)
        teacher_params = mesh_lib.put_global(t_state.to_pure_dict(), teacher_shard)
    state = TrainState(
        step=mesh_lib.put_global(jnp.zeros((), jnp.int32), rep), params=params, opt_state=opt_state,
        rng=mesh_lib.put_global(jax.random.key_data(jax.random.PRNGKey(seed)), rep),
        teacher=teacher_params, rest=mesh_lib.put_global(rest_pure, rest_shard))
    shardings = TrainState(step=rep, params=p_shard, opt_state=o_shard, rng=rep,
                           teacher=teacher_shard, rest=rest_shard)
    return Built(state=state, shardings=shardings, graphdef=graphdef)
