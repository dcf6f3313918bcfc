"""GradCache micro-batching gives the full-batch loss, gradients and updated parameters."""

import jax
import jax.numpy as jnp
import numpy as np
from conftest import assert_same_trained_params, load_config
from flax import nnx

from flipjax.data.pipeline import normalize_images, to_global
from flipjax.models import make_model
from flipjax.train.grad_cache import grad_cache_value_and_grad, merge_micro, split_micro
from flipjax.train.losses import softmax_loss
from flipjax.train.sharding import batch_sharding, make_mesh
from flipjax.train.step import TrainSetup


def random_batch(config, seed=0):
    rng = np.random.default_rng(seed)
    b, r, n = config.data.global_batch_size, config.data.image_size, config.model.text.max_len
    return {"image": rng.integers(0, 256, (b, r, r, 3), dtype=np.uint8),
            "text": rng.integers(0, 200, (b, n)).astype(np.int32)}


def test_split_keeps_rows_local_and_merge_inverts():
    mesh = make_mesh([("data", -1)])
    rows = batch_sharding(mesh)
    x = jax.device_put(jnp.arange(32 * 3).reshape(32, 3), rows)
    micro = jax.jit(lambda x: split_micro(x, 2, rows))(x)
    assert micro.shape == (2, 16, 3)
    np.testing.assert_array_equal(micro[1], np.asarray(x)[1::2])
    # Each device's micro-batch rows are rows it already holds: nothing moves.
    for shard in micro.addressable_shards:
        dev_rows = {int(v) // 3 for v in np.asarray(shard.data)[:, :, 0].ravel()}
        own = {int(v) // 3 for s in x.addressable_shards if s.device == shard.device
               for v in np.asarray(s.data)[:, 0]}
        assert dev_rows <= own
    np.testing.assert_array_equal(jax.jit(lambda m: merge_micro(m, rows))(micro), x)


def test_grad_cache_equals_full_batch_gradient():
    config = load_config()
    model = make_model(config.model, vocab_size=200)
    graphdef, params = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(params)
    mesh = make_mesh(config.mesh)
    rows = batch_sharding(mesh)
    batch = jax.device_put(random_batch(config), rows)

    def embed(p, b):
        m = nnx.merge(graphdef, p)
        return m(normalize_images(b["image"], (0.5,) * 3, (0.5,) * 3), b["text"])

    def contrastive(p, zimg, ztxt):
        scale, bias = nnx.merge(graphdef, p).logit_scale_and_bias()
        return softmax_loss(zimg, ztxt, scale, bias)

    full = jax.jit(jax.value_and_grad(lambda p, b: contrastive(p, *embed(p, b)), has_aux=True))
    cached = jax.jit(lambda p, b: grad_cache_value_and_grad(embed, contrastive, p, b, 2, rows))
    (want, _), want_g = full(params, batch)
    (got, _), got_g = cached(params, batch)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6),
                 got_g, want_g)
    assert float(jnp.abs(got_g["t"])) > 0  # the temperature's gradient comes from the loss alone
    assert float(jnp.abs(got_g["txt"]["pos_embedding"]).max()) > 0


def test_train_step_with_accumulation_matches_full_batch():
    config = load_config()
    config.loss, config.loss_impl = "sigmoid", "sharded"
    config.model.image.depth = config.model.text.depth = 1  # compiles faster
    mesh = make_mesh(config.mesh)
    batches = [random_batch(config, s) for s in range(2)]

    def run(accum):
        config.grad_accum_steps = accum
        setup = TrainSetup(config, 200, mesh)
        state, out = setup.init(), []
        for batch in batches:
            state, m = setup.train_step(state, to_global(batch, setup.batch_sharding))
            out.append((float(m["loss"]), float(m["grad_norm"]), float(m["i2t_top1"])))
        return out, jax.device_get(state["params"])

    want, want_params = run(1)
    got, got_params = run(2)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert_same_trained_params(got_params, want_params)
