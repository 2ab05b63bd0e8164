"""The target any per-token loss teaches: Q = p - dL/dz.

For a loss L(z) of the logits at one position, gradient descent moves p toward p - dL/dz. When L
is a Q-target loss this recovers Q exactly; for other losses it tells which target they imply.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def induced_target(
    per_token_loss_fn: Callable[[jax.Array, jax.Array], jax.Array],
    logits: jax.Array,
    labels: jax.Array,
) -> jax.Array:
    """Q = softmax(z) - dL/dz at every position.

    Args:
      per_token_loss_fn: (logits [..., V], labels [...]) -> per-position loss [...]; positions
        must not interact (each loss depends only on its own row of logits).
      logits: [..., V] float.
      labels: [...] int.

    Returns:
      Q [..., V] in the promoted float dtype (float32 for bfloat16 inputs). It sums to 1 at each
      position whenever the loss is invariant to adding a constant to the logits.
    """
    z = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    grad = jax.grad(lambda x: jnp.sum(per_token_loss_fn(x, labels)))(z)
    return jax.nn.softmax(z, axis=-1) - grad
