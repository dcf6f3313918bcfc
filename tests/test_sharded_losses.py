"""The shard_map losses equal the global ones in value, gradient and top-1 metrics, on 8 devices
and on a 2-D mesh, for several batch sizes (lucasb-eyer's advice for chunked SigLIP)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from flipjax.train.losses import LOSSES
from flipjax.train.sharded_losses import make_sharded_loss
from flipjax.train.sharding import make_mesh


def unit_rows(rng, n, d):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def loss_and_grads(loss_fn, zimg, ztxt, scale, bias):
    def f(zimg, ztxt, log_scale, bias):
        return loss_fn(zimg, ztxt, jnp.exp(log_scale), bias)

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True))(
        zimg, ztxt, jnp.log(scale), bias)


@pytest.mark.parametrize("name", ["softmax", "sigmoid"])
@pytest.mark.parametrize("batch,axes", [(8, [("data", -1)]), (32, [("data", -1)]),
                                        (96, [("data", 2), ("fsdp", -1)])])
def test_sharded_loss_matches_global(name, batch, axes):
    mesh = make_mesh(axes)
    rng = np.random.default_rng(batch)
    zimg, ztxt = unit_rows(rng, batch, 16), unit_rows(rng, batch, 16)
    # Correlated pairs, so the top-1 metrics are neither 0 nor 1.
    ztxt = unit_rows(rng, batch, 16) * 1.5 + zimg
    ztxt /= np.linalg.norm(ztxt, axis=1, keepdims=True)
    scale, bias = jnp.float32(10.0), jnp.float32(-3.0 if name == "sigmoid" else 0.0)
    sharded = NamedSharding(mesh, P(mesh.axis_names))
    args = (jax.device_put(zimg, sharded), jax.device_put(ztxt, sharded), scale, bias)

    (want, want_m), want_g = loss_and_grads(LOSSES[name], zimg, ztxt, scale, bias)
    (got, got_m), got_g = loss_and_grads(make_sharded_loss(name, mesh), *args)

    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert 0 < want_m["i2t_top1"] < 1, want_m
    for k in want_m:
        np.testing.assert_allclose(got_m[k], want_m[k], rtol=1e-6, err_msg=k)
    for g, w in zip(got_g, want_g, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)
    assert got_g[0].sharding.is_equivalent_to(sharded, 2)


@pytest.mark.parametrize("name", ["softmax", "sigmoid"])
def test_duplicate_pairs_tie_as_in_the_global_metrics(name):
    """A pair repeated on another device (templated captions make duplicates likely) ties in
    the top-1 search: the sharded metrics break the tie as the global `argmax` does."""
    mesh = make_mesh([("data", -1)])
    rng = np.random.default_rng(0)
    zimg, ztxt = unit_rows(rng, 16, 16), unit_rows(rng, 16, 16)
    zimg[12], ztxt[12] = zimg[1], ztxt[1]  # on device 6; the original on device 0
    sharded = NamedSharding(mesh, P(mesh.axis_names))
    args = (jnp.float32(10.0), jnp.float32(-3.0))
    _, want = LOSSES[name](zimg, ztxt, *args)
    _, got = jax.jit(make_sharded_loss(name, mesh))(
        jax.device_put(zimg, sharded), jax.device_put(ztxt, sharded), *args)
    assert want["i2t_top1"] < 1
    for k in want:
        np.testing.assert_allclose(got[k], want[k], err_msg=k)


def test_sharded_loss_rejects_indivisible_batch():
    with pytest.raises(ValueError, match="not divisible"):
        make_sharded_loss("softmax", make_mesh([("data", -1)]))(
            jnp.zeros((12, 4)), jnp.zeros((12, 4)), 1.0, 0.0)
