"""Contrastive losses over the global batch: softmax InfoNCE (CLIP/FLIP) and sigmoid (SigLIP).

Written on globally sharded arrays under `jax.jit`: XLA inserts the all-gather of the other
tower's embeddings. Logits are computed in float32 whatever the model's compute dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

LossFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array],
                  tuple[jax.Array, dict[str, jax.Array]]]


def contrastive_logits(zimg: jax.Array, ztxt: jax.Array, scale: jax.Array,
                       bias: jax.Array) -> jax.Array:
    """(B, B) logits, row i = image i against every caption."""
    zimg, ztxt = zimg.astype(jnp.float32), ztxt.astype(jnp.float32)
    return scale * zimg @ ztxt.T + bias


def in_batch_top1(logits: jax.Array) -> dict[str, jax.Array]:
    """Fraction of images whose own caption scores highest, and vice versa."""
    target = jnp.arange(logits.shape[0])
    return {"i2t_top1": jnp.mean(jnp.argmax(logits, axis=1) == target),
            "t2i_top1": jnp.mean(jnp.argmax(logits, axis=0) == target)}


def softmax_loss(zimg: jax.Array, ztxt: jax.Array, scale: jax.Array, bias: jax.Array
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Symmetric InfoNCE: cross-entropy over captions per image and over images per caption."""
    logits = contrastive_logits(zimg, ztxt, scale, bias)
    diag = jnp.diagonal(logits)
    i2t = jax.nn.logsumexp(logits, axis=1) - diag
    t2i = jax.nn.logsumexp(logits, axis=0) - diag
    loss = 0.5 * (jnp.mean(i2t) + jnp.mean(t2i))
    return loss, in_batch_top1(logits)


def sigmoid_loss(zimg: jax.Array, ztxt: jax.Array, scale: jax.Array, bias: jax.Array
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """SigLIP: an independent binary label per pair, +1 on the diagonal and -1 elsewhere.

    As in big_vision, each image's loss sums over all captions and the batch mean is taken.
    """
    logits = contrastive_logits(zimg, ztxt, scale, bias)
    labels = 2.0 * jnp.eye(logits.shape[0], dtype=logits.dtype) - 1.0
    loss = -jnp.mean(jnp.sum(jax.nn.log_sigmoid(labels * logits), axis=1))
    return loss, in_batch_top1(logits)


LOSSES: dict[str, LossFn] = {"softmax": softmax_loss, "sigmoid": sigmoid_loss}
