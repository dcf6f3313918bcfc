"""Contrastive losses computed per device with `jax.shard_map`, so that no device ever holds the
(B, B) logits: each holds (B/n, B) for softmax and one (B/n, B/n) block at a time for sigmoid.

They equal the global losses in `flipjax.train.losses` in value and gradient (tested); only the
memory differs. Under plain `jax.jit` XLA chooses how to partition the global loss and may keep
the whole logit matrix on every device, which at a 32k batch is 4 GiB per device
(`experiments/results/loss_memory.md`).

softmax: open_clip's `--local-loss --gather-with-grad`. Each device all-gathers the other tower's
    embeddings (the gather's transpose, a reduce-scatter, carries the gradient back) and computes
    the InfoNCE terms of its own images (its rows) and of its own captions (its columns).
sigmoid: big_vision's chunked SigLIP as a ring. The captions move one device along the ring per
    step (`ppermute`) while each device scores its images against the block it holds; the
    positives are all in the first, local block.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from flipjax.train.losses import LossFn
from flipjax.train.sharding import batch_axes, batch_shards


def _local_index(axes: tuple[str, ...], local_batch: int) -> jax.Array:
    """Global row indices of this device's slice of the batch (batch split over `axes`)."""
    return jax.lax.axis_index(axes) * local_batch + jnp.arange(local_batch)


def _softmax_local(zimg, ztxt, scale, bias, *, axes, global_batch):
    zimg, ztxt = zimg.astype(jnp.float32), ztxt.astype(jnp.float32)
    rows = _local_index(axes, zimg.shape[0])
    all_txt = jax.lax.all_gather(ztxt, axes, tiled=True)
    all_img = jax.lax.all_gather(zimg, axes, tiled=True)
    i2t = scale * zimg @ all_txt.T + bias  # own images against every caption
    t2i = scale * ztxt @ all_img.T + bias  # own captions against every image
    pos = jnp.take_along_axis(i2t, rows[:, None], axis=1)[:, 0]
    loss = (jnp.sum(jax.nn.logsumexp(i2t, axis=1) - pos)
            + jnp.sum(jax.nn.logsumexp(t2i, axis=1) - pos))
    loss = jax.lax.psum(loss, axes) / (2 * global_batch)
    hits = {"i2t_top1": jnp.sum(jnp.argmax(i2t, axis=1) == rows),
            "t2i_top1": jnp.sum(jnp.argmax(t2i, axis=1) == rows)}
    return loss, {k: jax.lax.psum(v, axes) / global_batch for k, v in hits.items()}


def _sigmoid_local(zimg, ztxt, scale, bias, *, axes, num_devices, global_batch):
    zimg, ztxt = zimg.astype(jnp.float32), ztxt.astype(jnp.float32)
    b = zimg.shape[0]
    ring = [(i, (i + 1) % num_devices) for i in range(num_devices)]

    def block_loss(txt, labels):
        logits = scale * zimg @ txt.T + bias
        return -jnp.sum(jax.nn.log_sigmoid(labels * logits)), logits

    # The positives: the local block, labels +1 on the diagonal.
    own_loss, own_logits = block_loss(ztxt, 2.0 * jnp.eye(b, dtype=jnp.float32) - 1.0)
    rows = _local_index(axes, b)
    # Top-1 without a (b, B) matrix: the best caption per own image stays here as (score, global
    # index); the best image per caption travels with the captions around the ring.
    img_best = (jnp.max(own_logits, axis=1), rows[jnp.argmax(own_logits, axis=1)])
    txt_best = (jnp.max(own_logits, axis=0), rows[jnp.argmax(own_logits, axis=0)])

    def better(best, val, idx):
        """The higher score; on a tie (a duplicate caption or image in the batch) the lower
        global index, as `argmax` over the whole row takes."""
        take = (val > best[0]) | ((val == best[0]) & (idx < best[1]))
        return jnp.where(take, val, best[0]), jnp.where(take, idx, best[1])

    # Remat each step so the backward pass keeps only the (b, d) blocks, not the (b, b) logits.
    @jax.checkpoint
    def step(carry, _):
        moving, total, img_best = carry
        txt, txt_rows, txt_best = jax.lax.ppermute(moving, axes, ring)
        loss, logits = block_loss(txt, -1.0)
        img_best = better(img_best, jnp.max(logits, axis=1), txt_rows[jnp.argmax(logits, axis=1)])
        txt_best = better(txt_best, jnp.max(logits, axis=0), rows[jnp.argmax(logits, axis=0)])
        return ((txt, txt_rows, txt_best), total + loss, img_best), None

    carry = ((ztxt, rows, txt_best), own_loss, img_best)
    ((_, txt_rows, txt_best), loss, img_best), _ = jax.lax.scan(
        step, carry, None, length=num_devices - 1)
    loss = jax.lax.psum(loss, axes) / global_batch
    hits = {"i2t_top1": jnp.sum(img_best[1] == rows), "t2i_top1": jnp.sum(txt_best[1] == txt_rows)}
    return loss, {k: jax.lax.psum(v, axes) / global_batch for k, v in hits.items()}


def make_sharded_loss(name: str, mesh: Mesh) -> LossFn:
    """The loss `name` ("softmax" or "sigmoid") with the batch split over `batch_axes(mesh)`
    (a `tensor` axis holds copies), taking and returning the same values as the global
    `LOSSES[name]`."""
    axes = batch_axes(mesh)
    num_devices = batch_shards(mesh)

    def loss_fn(zimg, ztxt, scale, bias):
        global_batch = zimg.shape[0]
        if global_batch % num_devices:
            raise ValueError(f"batch {global_batch} is not divisible by {num_devices} devices")
        if name == "softmax":
            local = lambda *a: _softmax_local(*a, axes=axes, global_batch=global_batch)
        elif name == "sigmoid":
            local = lambda *a: _sigmoid_local(*a, axes=axes, num_devices=num_devices,
                                              global_batch=global_batch)
        else:
            raise ValueError(f"unknown loss {name!r}; use 'softmax' or 'sigmoid'")
        batch = P(axes)
        return jax.shard_map(local, mesh=mesh, in_specs=(batch, batch, P(), P()),
                             out_specs=(P(), P()))(zimg, ztxt, scale, bias)

    return loss_fn
