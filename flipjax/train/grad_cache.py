"""GradCache (Gao et al. 2021): the gradient of a contrastive loss over a global batch too large
to backpropagate through the towers at once, equal to the full-batch gradient.

Gradient accumulation over micro-batches would shrink the set of negatives to one micro-batch.
Instead: (1) embed every micro-batch without keeping activations, (2) take the loss over all the
embeddings and its gradient with respect to them (cheap: (B, d)), (3) per micro-batch, re-run
the towers under `jax.vjp` and pull those embedding gradients back to the parameters, summing.
Peak activation memory is that of one micro-batch; the price is a second forward pass.

Micro-batch j holds rows j, j+k, j+2k, ... of the batch, so every micro-batch is spread over
all devices exactly as the batch is and slicing it moves no data.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

Embed = Callable[[Any, dict], tuple[jax.Array, jax.Array]]
Contrastive = Callable[[Any, jax.Array, jax.Array], tuple[jax.Array, dict]]


def split_micro(x: jax.Array, steps: int, sharding: NamedSharding) -> jax.Array:
    """(B, ...) -> (steps, B // steps, ...), micro-batch j = rows j::steps."""
    x = x.reshape(x.shape[0] // steps, steps, *x.shape[1:]).swapaxes(0, 1)
    return jax.lax.with_sharding_constraint(
        x, NamedSharding(sharding.mesh, P(None, *sharding.spec)))


def merge_micro(x: jax.Array, sharding: NamedSharding) -> jax.Array:
    """Inverse of `split_micro`: back to the batch's own row order."""
    return jax.lax.with_sharding_constraint(x.swapaxes(0, 1).reshape(-1, *x.shape[2:]),
                                            sharding)


def grad_cache_value_and_grad(embed: Embed, contrastive: Contrastive, params: Any, batch: dict,
                              steps: int, sharding: NamedSharding
                              ) -> tuple[tuple[jax.Array, dict], Any]:
    """Like `jax.value_and_grad(loss, has_aux=True)(params, batch)` for
    loss(params, batch) = contrastive(params, *embed(params, batch)), in `steps` micro-batches.

    `embed(params, micro_batch)` -> (zimg, ztxt); `contrastive(params, zimg, ztxt)` -> (loss,
    aux); `sharding` is the batch's sharding (rows over devices), kept on every micro-batch.
    """
    micro = jax.tree.map(lambda x: split_micro(x, steps, sharding), batch)

    def forward(_, mb):
        return None, embed(params, mb)

    _, (zimg, ztxt) = jax.lax.scan(forward, None, micro)
    zimg, ztxt = merge_micro(zimg, sharding), merge_micro(ztxt, sharding)
    (loss, aux), (grads, gimg, gtxt) = jax.value_and_grad(
        contrastive, argnums=(0, 1, 2), has_aux=True)(params, zimg, ztxt)

    def backward(acc, xs):
        mb, gi, gt = xs
        _, pull = jax.vjp(lambda p: embed(p, mb), params)
        (g,) = pull((gi, gt))
        return jax.tree.map(jnp.add, acc, g), None

    cotangents = (split_micro(gimg, steps, sharding), split_micro(gtxt, steps, sharding))
    grads, _ = jax.lax.scan(backward, grads, (micro, *cotangents))
    return (loss, aux), grads
