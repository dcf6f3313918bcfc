import functools
import types
from unittest import mock

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import load_config
from flax import nnx

from flipjax.models import make_model
from flipjax.models.layers import (
    ATTENTION_IMPLEMENTATIONS,
    Attention,
    Encoder,
    Mlp,
    add_position_embedding,
    add_residual,
    cudnn_attention,
    dense,
    resolve_attention,
    stack_layers,
    unstack_layers,
)
from flipjax.models.variants import SIZES, Size, decode_variant
from flipjax.models.vit import PatchEmbed, ViT, sincos2d_posemb
from flipjax.train.sharding import make_mesh
from flipjax.train.step import TrainSetup


def model_config(**image_overrides) -> ml_collections.ConfigDict:
    """The tiny demo model with each tower's size taken from its variant name alone."""
    cfg = load_config().model
    for tower in (cfg.image, cfg.text):
        tower.update(width=None, depth=None, mlp_dim=None, num_heads=None)
    cfg.image.update(image_overrides)
    return cfg


# (width, depth, mlp_dim, heads) as published: ViT (Dosovitskiy et al.; Ti, S, B, L, H),
# big_vision's M and SigLIP's So400m; mu is flipjax's test size.
PUBLISHED_SIZES = {"mu": (32, 1, 128, 2), "Ti": (192, 12, 768, 3), "S": (384, 12, 1536, 6),
                   "M": (512, 12, 2048, 8), "B": (768, 12, 3072, 12), "L": (1024, 24, 4096, 16),
                   "So400m": (1152, 27, 4304, 16), "H": (1280, 32, 5120, 16)}


@pytest.mark.parametrize("variant", ["mu/8", "Ti/16", "S/14", "M/16", "B/16", "L/14",
                                     "So400m/14", "H/14"])
def test_variant_param_shapes(variant):
    name, patch = variant.split("/")
    width, depth, mlp_dim, heads = PUBLISHED_SIZES[name]
    cfg = model_config(variant=variant, image_size=int(patch) * 2)
    model = nnx.eval_shape(lambda: make_model(cfg, vocab_size=100))
    assert len(model.img.encoder.layers) == depth
    assert model.img.patch_embed.kernel.shape == (int(patch), int(patch), 3, width)
    block = model.img.encoder.layers[0]
    assert block.mlp.fc1.kernel.shape == (width, mlp_dim)
    assert block.attn.num_heads == heads
    assert model.img.pos_embedding.shape == (1, 4, width)


@pytest.mark.parametrize("pool,posemb", [("map", "learn"), ("gap", "sincos2d"),
                                         ("tok", "learn"), ("tok", "sincos2d")])
def test_forward_shapes_and_normalisation(pool, posemb):
    cfg = model_config(pool=pool, posemb=posemb, image_size=32, variant="mu/8", pre_norm=True,
                       proj_dim=32)
    cfg.text.update(proj_dim=32)
    model = make_model(cfg, vocab_size=50)
    images = jnp.zeros((3, 32, 32, 3))
    ids = jnp.ones((3, cfg.text.max_len), jnp.int32)
    zimg, ztxt = model(images, ids)
    assert zimg.shape == (3, 32) and ztxt.shape == (3, 32)
    np.testing.assert_allclose(np.linalg.norm(zimg, axis=-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(ztxt, axis=-1), 1.0, atol=1e-5)
    expected_tokens = 16 + (pool == "tok")
    assert model.img.tokens(images).shape == (3, expected_tokens, SIZES["mu"].width)


def test_class_token_pooling_reads_the_class_tokens_row():
    """A class-token ViT computes its last block for that token alone, and gets its row."""
    cfg = model_config(pool="tok", image_size=32, variant="mu/8", pre_norm=True, proj_dim=32)
    model = make_model(cfg, vocab_size=50)
    images = jax.random.uniform(jax.random.key(0), (3, 32, 32, 3))
    np.testing.assert_allclose(model.img(images), model.img.head(model.img.tokens(images)[:, 0]),
                               atol=1e-5)


def test_patch_embedding_is_the_strided_convolution():
    """The matmul over flattened patches is nnx.Conv with stride = kernel = patch, in value
    and parameter gradient, and draws the same initial parameters from the same seed."""
    ours = PatchEmbed(8, 32, platform="cpu", dtype=jnp.float32, rngs=nnx.Rngs(0))
    conv = nnx.Conv(3, 32, kernel_size=(8, 8), strides=(8, 8), padding="VALID",
                    rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(ours.kernel[...], conv.kernel[...])
    np.testing.assert_array_equal(ours.bias[...], conv.bias[...])
    bias = jax.random.normal(jax.random.key(1), (32,))
    ours.bias[...], conv.bias[...] = bias, bias
    images = jax.random.normal(jax.random.key(2), (2, 32, 24, 3))
    loss = lambda m: jnp.sum(jnp.sin(m(images)))
    value, grads = nnx.value_and_grad(loss)(ours)
    want, want_grads = nnx.value_and_grad(loss)(conv)
    np.testing.assert_allclose(value, want, rtol=1e-5)
    np.testing.assert_allclose(grads.kernel[...], want_grads.kernel[...], atol=1e-4)
    np.testing.assert_allclose(grads.bias[...], want_grads.bias[...], atol=1e-4)


def dot_operand_ranks(jaxpr: jax.extend.core.Jaxpr) -> set[tuple[int, ...]]:
    """The operand ranks of every dot_general in `jaxpr`, nested jaxprs (jit, remat) included."""
    ranks = set()
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            ranks.add(tuple(v.aval.ndim for v in eqn.invars))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if isinstance(inner, jax.extend.core.Jaxpr):
                    ranks |= dot_operand_ranks(inner)
    return ranks


@pytest.mark.parametrize("dtype,tolerance", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("shape", [(6,), (5, 6), (2, 3, 6), (2, 1, 3, 6)])
def test_dense_is_nnx_linear_in_value_and_gradient(shape, dtype, tolerance):
    """`dense` is `nnx.Linear`: the same parameters from the same seed, the same values and
    gradients (float32 parameters under bf16 compute included), and for a CPU or a GPU
    every matmul of its forward and backward is over 2-D operands, the weight gradient one
    product over the flattened tokens (the point of `dense_matmul`)."""
    ours = dense(6, 4, platform="cpu", dtype=dtype, rngs=nnx.Rngs(0))
    linear = nnx.Linear(6, 4, dtype=dtype, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(ours.kernel[...], linear.kernel[...])
    ours.bias[...] = linear.bias[...] = jax.random.normal(jax.random.key(3), (4,))
    x = jax.random.normal(jax.random.key(1), shape)
    w = jax.random.normal(jax.random.key(2), (*shape[:-1], 4))

    def loss(module, x):
        return jnp.sum(jnp.tanh(module(x).astype(jnp.float32)) * w)

    grad = jax.value_and_grad(loss, argnums=(0, 1))
    value, (grads, dx) = grad(ours, x)
    want, (want_grads, want_dx) = grad(linear, x)
    assert grads.kernel[...].dtype == jnp.float32
    np.testing.assert_allclose(value, want, rtol=tolerance)
    np.testing.assert_allclose(dx, want_dx, atol=tolerance)
    np.testing.assert_allclose(grads.kernel[...], want_grads.kernel[...], atol=tolerance)
    np.testing.assert_allclose(grads.bias[...], want_grads.bias[...], atol=tolerance)
    if len(shape) > 1:
        assert dot_operand_ranks(jax.make_jaxpr(grad)(ours, x).jaxpr) == {(2, 2)}


@pytest.mark.parametrize("dtype,tolerance", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_add_position_embedding_is_an_add_whose_table_gradient_is_a_matmul(dtype, tolerance):
    """The same values and gradients as `x + table` (bf16 included), with the table's gradient
    a dot over the batch: autodiff's reduction over the batch is what made XLA:GPU lay the
    towers' activations out batch-minor."""
    x = jax.random.normal(jax.random.key(0), (4, 5, 6), dtype)
    table = jax.random.normal(jax.random.key(1), (1, 5, 6), dtype)
    w = jax.random.normal(jax.random.key(2), (4, 5, 6))

    def loss(add):
        return lambda x, table: jnp.sum(jnp.tanh(add(x, table).astype(jnp.float32)) * w)

    grad = jax.value_and_grad(loss(add_position_embedding), argnums=(0, 1))
    value, (dx, dtable) = grad(x, table)
    want, (want_dx, want_dtable) = jax.value_and_grad(loss(jnp.add), argnums=(0, 1))(x, table)
    assert dtable.dtype == dtype and dtable.shape == table.shape
    np.testing.assert_allclose(value, want, rtol=tolerance)
    np.testing.assert_allclose(dx.astype(np.float32), want_dx.astype(np.float32), atol=tolerance)
    np.testing.assert_allclose(dtable.astype(np.float32), want_dtable.astype(np.float32),
                               rtol=tolerance, atol=tolerance)
    backward = jax.make_jaxpr(lambda g: jax.vjp(add_position_embedding, x, table)[1](g))(x)
    ops = {eqn.primitive.name for eqn in backward.jaxpr.eqns}
    assert "dot_general" in ops and "reduce_sum" not in ops
    plain = jax.make_jaxpr(lambda g: jax.vjp(jnp.add, x, table)[1](g))(x)
    assert "reduce_sum" in {eqn.primitive.name for eqn in plain.jaxpr.eqns}


@pytest.mark.parametrize("gelu", ["tanh", "exact", "quick"])
def test_mlp_keeps_only_the_gelu_input_and_output_for_its_backward(gelu):
    """Of the hidden layer's size, the backward keeps the GELU's input (for its derivative)
    and output (for fc2's weight gradient) only: no intermediate of the GELU (the tanh
    GELU's tanh) is kept."""
    mlp = Mlp(8, 32, gelu=gelu, platform="cpu", dtype=jnp.float32, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(mlp)
    x = jax.random.normal(jax.random.key(0), (2, 3, 8))
    backward = jax.jit(lambda p, x: jax.vjp(lambda p, x: nnx.merge(graphdef, p)(x), p, x)[1])(
        params, x)
    kept = [leaf for leaf in jax.tree.leaves(backward) if leaf.size == 2 * 3 * 32]
    assert len(kept) == 2


def test_add_residual_is_a_sum_kept_out_of_its_branch_forward_only():
    """x + branch in value and gradient. The forward holds the branch behind an optimisation
    barrier, so that XLA:GPU cannot fold the add into the branch's matmul; the gradient is
    not held back (then the bias gradients fuse with the LayerNorm backward as before)."""
    x, y, w = (jax.random.normal(jax.random.key(i), (2, 3, 4)) for i in range(3))

    def loss(add):
        return lambda x, y: jnp.sum(jnp.tanh(add(x, y)) * w)

    add = functools.partial(add_residual, platform="cpu")
    value, grads = jax.value_and_grad(loss(add), argnums=(0, 1))(x, y)
    want, want_grads = jax.value_and_grad(loss(jnp.add), argnums=(0, 1))(x, y)
    np.testing.assert_array_equal(value, want)
    for got, expected in zip(grads, want_grads, strict=True):
        np.testing.assert_array_equal(got, expected)
    step = jax.jit(jax.value_and_grad(loss(add), argnums=(0, 1))).lower(x, y)
    assert step.as_text().count("optimization_barrier") == 1  # the forward's only


def test_a_model_built_for_a_tpu_keeps_tpu_forms_on_any_host():
    """`make_model` for a TPU device (as a deviceless compile for a pod does, from this CPU
    host): every matmul keeps its (batch, seq) axes and no residual add is held apart; built
    for this CPU, the products are over flattened tokens and the adds are held apart."""
    cfg = model_config(variant="mu/8", image_size=32)
    images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    ids = jax.random.randint(jax.random.key(1), (2, cfg.text.max_len), 0, 50)

    def grad_jaxpr(model: nnx.Module) -> jax.extend.core.Jaxpr:
        loss = lambda m: jnp.sum(m.embed_images(images)) + jnp.sum(m.embed_texts(ids))
        return jax.make_jaxpr(nnx.grad(loss))(model).jaxpr

    def barriers(jaxpr: jax.extend.core.Jaxpr) -> int:
        return str(jaxpr).count("optimization_barrier")

    tpu = grad_jaxpr(make_model(cfg, vocab_size=50, device=types.SimpleNamespace(platform="tpu")))
    cpu = grad_jaxpr(make_model(cfg, vocab_size=50))
    assert barriers(tpu) == 0 and barriers(cpu) > 0
    assert (3, 2) in dot_operand_ranks(tpu) and (3, 2) not in dot_operand_ranks(cpu)


def test_add_residual_leaves_scanned_rematerialised_encoders_unchanged():
    """Under `nnx.scan` over layers and the "dots" remat policy (a custom VJP inside both),
    the model's loss and gradients are those of plain residual adds."""
    cfg = model_config(variant="mu/8", image_size=32)
    cfg.update(remat="dots", scan_layers=True)
    model = make_model(cfg, vocab_size=50)
    images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    ids = jax.random.randint(jax.random.key(1), (2, cfg.text.max_len), 0, 50)

    def loss(m):
        zimg, ztxt = m(images, ids)
        return jnp.sum((zimg @ ztxt.T) ** 2)

    value, grads = nnx.value_and_grad(loss)(model)
    with mock.patch("flipjax.models.layers.add_residual", lambda x, branch, platform: x + branch):
        want, want_grads = nnx.value_and_grad(loss)(model)
    np.testing.assert_allclose(value, want, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 nnx.to_pure_dict(grads), nnx.to_pure_dict(want_grads))


def test_dense_takes_nnx_linears_precision_in_every_form():
    """The CPU/GPU form (tokens flattened) computes what the TPU form (`nnx.Linear`'s own
    product) does, and passes the layer's precision to its dot."""
    x = jax.random.normal(jax.random.key(0), (2, 3, 6))
    layers = {platform: dense(6, 4, platform=platform, precision=jax.lax.Precision.HIGHEST,
                              rngs=nnx.Rngs(0)) for platform in ("cpu", "tpu")}
    np.testing.assert_allclose(layers["cpu"](x), layers["tpu"](x), rtol=1e-6, atol=1e-6)
    jaxpr = str(jax.make_jaxpr(lambda y: layers["cpu"](y))(x))
    assert "dot_general" in jaxpr and "precision=(Precision.HIGHEST, Precision.HIGHEST)" in jaxpr


@pytest.mark.parametrize("pool", ["last", "first", "mean", "eos"])
def test_text_pooling(pool):
    cfg = model_config(variant="mu/8", image_size=32)
    cfg.text.update(pool=pool, causal=pool == "eos", proj_dim=None)
    model = make_model(cfg, vocab_size=50)
    ids = jnp.array([[5, 6, 1, 1, 1, 1, 1, 1] + [1] * (cfg.text.max_len - 8)])
    tokens = model.txt.tokens(ids)
    pooled = model.txt(ids)
    expected = {"last": tokens[:, -1], "first": tokens[:, 0], "mean": tokens.mean(1),
                "eos": tokens[:, 2]}[pool]
    np.testing.assert_allclose(pooled, expected, atol=1e-6)


def test_causal_text_ignores_later_tokens():
    cfg = model_config(variant="mu/8", image_size=32)
    cfg.text.update(pool="eos", causal=True)
    model = make_model(cfg, vocab_size=50)
    a = jnp.array([[5, 6, 1] + [7] * (cfg.text.max_len - 3)])
    b = jnp.array([[5, 6, 1] + [9] * (cfg.text.max_len - 3)])
    np.testing.assert_allclose(model.txt(a), model.txt(b), atol=1e-6)


# The (batch, seq, heads, head_dim) attentions the model can run, as the CPU can run them:
# "cudnn" pads odd lengths to even ones (a masked key, a sliced-off query), here through XLA.
ATTENTIONS_ON_CPU = {
    "dot": ATTENTION_IMPLEMENTATIONS["dot"],
    "cudnn padding": functools.partial(cudnn_attention, implementation="xla"),
}


@pytest.mark.parametrize("attention", sorted(ATTENTIONS_ON_CPU))
@pytest.mark.parametrize("causal,tq,tk", [(False, 7, 7), (True, 7, 7), (False, 1, 9),
                                           (False, 6, 6), (True, 6, 6), (False, 4, 5),
                                           (False, 1, 8)])
def test_attention_matches_jax_in_value_and_gradient(attention, causal, tq, tk):
    """Our attention (heads-major, FlashAttention-style backward) and the cuDNN path's padding
    are jax's attention, to float32 rounding: self-attention with and without a causal mask,
    odd and even lengths, and MAP-head-like single queries over more keys."""
    q, k, v, w = (jax.random.normal(jax.random.key(i), (2, n, 3, 8))
                  for i, n in enumerate((tq, tk, tk, tq)))

    def ours(q, k, v):
        return jnp.sum(ATTENTIONS_ON_CPU[attention](q, k, v, causal) * w)

    def theirs(q, k, v):
        return jnp.sum(jax.nn.dot_product_attention(q, k, v, is_causal=causal) * w)

    value, grads = jax.value_and_grad(ours, argnums=(0, 1, 2))(q, k, v)
    expected, expected_grads = jax.value_and_grad(theirs, argnums=(0, 1, 2))(q, k, v)
    np.testing.assert_allclose(value, expected, rtol=1e-5)
    for got, want in zip(grads, expected_grads, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("attention", sorted(ATTENTIONS_ON_CPU))
@pytest.mark.parametrize("causal,tq,tk,num_keys", [(False, 8, 8, 7), (True, 8, 8, 7),
                                                    (False, 1, 9, 6)])
def test_attention_ignores_padding_keys(attention, causal, tq, tk, num_keys):
    """Keys past `num_keys` are padding: the output and the real keys' gradients are those of
    attention over the real keys alone, and the padding gets no gradient."""
    q, k, v, w = (jax.random.normal(jax.random.key(i), (2, n, 3, 8))
                  for i, n in enumerate((tq, tk, tk, tq)))

    def ours(q, k, v):
        return jnp.sum(ATTENTIONS_ON_CPU[attention](q, k, v, causal, num_keys) * w)

    def theirs(q, k, v):
        return jnp.sum(jax.nn.dot_product_attention(q, k[:, :num_keys], v[:, :num_keys],
                                                    is_causal=causal) * w)

    value, (dq, dk, dv) = jax.value_and_grad(ours, argnums=(0, 1, 2))(q, k, v)
    expected, (want_dq, want_dk, want_dv) = jax.value_and_grad(theirs, argnums=(0, 1, 2))(q, k, v)
    np.testing.assert_allclose(value, expected, rtol=1e-5)
    np.testing.assert_allclose(dq, want_dq, atol=1e-5)
    for got, want in ((dk, want_dk), (dv, want_dv)):
        np.testing.assert_allclose(got[:, :num_keys], want[:, :num_keys], atol=1e-5)
        np.testing.assert_array_equal(got[:, num_keys:], 0.0)


@pytest.mark.parametrize("attention", sorted(ATTENTIONS_ON_CPU))
@pytest.mark.parametrize("causal,num_keys", [(False, None), (True, None), (False, 5),
                                             (False, np.array([6, 2]))])
def test_key_bias_changes_nothing_and_gets_no_gradient(attention, causal, num_keys):
    """Softmax attention is unchanged by the key bias (masks, per-example key counts and the
    cuDNN path's padding included), so its true gradient is zero: `Attention.keys` is
    `self.k` in value, and computes that gradient as exactly zero and every other gradient
    as autodiff through `self.k` does."""
    module = Attention(8, 2, attention="dot", platform="cpu", dtype=jnp.float32,
                       rngs=nnx.Rngs(0))
    module.implementation = "test"
    module.k.bias[...] = jax.random.normal(jax.random.key(3), (8,))
    x = jax.random.normal(jax.random.key(1), (2, 6, 8))
    w = jax.random.normal(jax.random.key(2), (2, 6, 8))
    np.testing.assert_array_equal(module.keys(x), module.k(x))

    def loss(module: Attention) -> jax.Array:
        return jnp.sum(module(x, is_causal=causal, num_keys=num_keys) * w)

    with mock.patch.dict(ATTENTION_IMPLEMENTATIONS, test=ATTENTIONS_ON_CPU[attention]):
        value, grads = nnx.value_and_grad(loss)(module)
        with mock.patch.object(Attention, "keys", lambda self, context: self.k(context)):
            want, want_grads = nnx.value_and_grad(loss)(module)
        bias = module.k.bias[...]
        module.k.bias[...] = jnp.zeros_like(bias)
        without_bias = loss(module)
        module.k.bias[...] = bias
    np.testing.assert_array_equal(grads["k"]["bias"][...], 0.0)
    np.testing.assert_allclose(want_grads["k"]["bias"][...], 0.0, atol=1e-5)
    np.testing.assert_allclose(value, want, rtol=1e-6)
    np.testing.assert_allclose(without_bias, value, rtol=1e-5)
    for (path, got), (_, expected) in zip(nnx.to_flat_state(grads),
                                          nnx.to_flat_state(want_grads), strict=True):
        if path != ("k", "bias"):
            np.testing.assert_allclose(got[...], expected[...], atol=1e-5, err_msg=str(path))


@pytest.mark.parametrize("scan,remat", [(False, "none"), (True, "dots")])
def test_encoder_pads_odd_lengths_once_for_even_length_kernels(monkeypatch, scan, remat):
    """With an even-length kernel ("cudnn", here its padding run through XLA) the encoder pads
    an odd token count (a ViT's 197) once: every layer gets the padded length and the number
    of real keys, and values and gradients are those of the unpadded "dot" encoder with the
    same weights."""
    seen = set()

    def cudnn_through_xla(q, k, v, is_causal, num_keys):
        seen.add((q.shape[1], k.shape[1], num_keys))
        return cudnn_attention(q, k, v, is_causal, num_keys, implementation="xla")

    monkeypatch.setitem(ATTENTION_IMPLEMENTATIONS, "cudnn", cudnn_through_xla)
    x = jax.random.normal(jax.random.key(0), (2, 7, 16))

    def loss_and_grads(attention: str):
        model = Encoder(16, 2, 32, 2, gelu="tanh", ln_eps=1e-6, remat=remat, scan=scan,
                        attention=attention, platform="cpu", dtype=jnp.float32,
                        rngs=nnx.Rngs(0))
        loss = lambda m, x: jnp.sum(jnp.sin(m(x)))
        return nnx.value_and_grad(loss, argnums=(0, 1))(model, x)

    (value, (grads, dx)), (want, (want_grads, want_dx)) = map(loss_and_grads, ("cudnn", "dot"))
    assert seen == {(8, 8, 7)}
    np.testing.assert_allclose(value, want, rtol=1e-5)
    np.testing.assert_allclose(dx, want_dx, atol=1e-5)
    for got, expected in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("scan,remat,depth", [(False, "none", 3), (False, "dots", 1),
                                               (True, "dots", 3)])
@pytest.mark.parametrize("attention", ["dot", "cudnn"])
@pytest.mark.parametrize("causal,position", [(False, -1), (True, 3), (True, (2, 6)),
                                             (False, (6, 0))])
def test_encoder_at_one_position_is_that_row_of_the_full_encoder(
        monkeypatch, scan, remat, depth, attention, causal, position):
    """Asked for one token's output, an unrolled encoder runs its last block for that query
    alone (the spy sees a single query; a scanned one runs every block in full) and still gives
    that token's row of the full output, in value, input gradient and every parameter
    gradient: at a fixed index or one per example (a caption's EOS), with and without a
    causal mask, and through the cuDNN path's padding to even lengths."""
    queries = set()
    implementation = {"dot": ATTENTION_IMPLEMENTATIONS["dot"],
                      "cudnn": functools.partial(cudnn_attention, implementation="xla")}[attention]

    def spy(q, k, v, is_causal, num_keys):
        queries.add(q.shape[1])
        return implementation(q, k, v, is_causal, num_keys)

    monkeypatch.setitem(ATTENTION_IMPLEMENTATIONS, attention, spy)
    model = Encoder(16, depth, 32, 2, gelu="tanh", ln_eps=1e-6, remat=remat, scan=scan,
                    attention=attention, platform="cpu", dtype=jnp.float32, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 7, 16))

    per_example = isinstance(position, tuple)
    position = jnp.array(position) if per_example else position

    def at_position(m, x):
        return jnp.sum(jnp.sin(m(x, is_causal=causal, position=position)))

    def row_of_full(m, x):
        tokens = m(x, is_causal=causal)
        row = (jnp.take_along_axis(tokens, position[:, None, None], axis=1)[:, 0]
               if per_example else tokens[:, position])
        return jnp.sum(jnp.sin(row))

    value, (grads, dx) = nnx.value_and_grad(at_position, argnums=(0, 1))(model, x)
    tokens = 8 if attention == "cudnn" else 7
    assert queries == ({tokens} if scan else {1} if depth == 1 else {tokens, 1})
    want, (want_grads, want_dx) = nnx.value_and_grad(row_of_full, argnums=(0, 1))(model, x)
    np.testing.assert_allclose(value, want, rtol=1e-5)
    np.testing.assert_allclose(dx, want_dx, atol=1e-5)
    for got, expected in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(got, expected, atol=1e-5)


def fake_cuda_device(compute_capability: str) -> types.SimpleNamespace:
    """What `resolve_attention` reads of a CUDA GPU (tests have none)."""
    return types.SimpleNamespace(platform="gpu", compute_capability=compute_capability,
                                 client=types.SimpleNamespace(platform_version="cuda 12080"))


def test_auto_attention_is_cudnn_on_a_cuda_gpu_in_16_bits_else_xla():
    assert resolve_attention("auto", jnp.bfloat16) == "dot"  # tests run on the CPU
    h100, v100 = fake_cuda_device("9.0"), fake_cuda_device("7.0")
    assert resolve_attention("auto", jnp.bfloat16, h100) == "cudnn"
    assert resolve_attention("auto", jnp.float32, h100) == "dot"
    assert resolve_attention("auto", jnp.bfloat16, v100) == "dot"
    assert resolve_attention("cudnn", jnp.float32) == "cudnn"
    with pytest.raises(ValueError, match="attention must be 'auto' or one of"):
        resolve_attention("flash", jnp.float32)
    # Layers take the name `make_model` resolved: "auto" there would be decided twice.
    with pytest.raises(ValueError, match="attention must be one of"):
        Attention(8, 2, attention="auto", platform="cpu", dtype=jnp.float32, rngs=nnx.Rngs(0))


def attention_kernels(model: nnx.Module) -> set[str]:
    return {m.implementation for _, m in nnx.iter_graph(model) if hasattr(m, "implementation")}


def test_auto_attention_follows_the_device_the_model_is_built_for():
    """A model built for a GPU gets cuDNN attention even where JAX's default device is the
    CPU, and a train step on a CPU mesh gets XLA's even where a GPU is the default."""
    cfg = model_config(variant="mu/8", image_size=32)
    cfg.dtype = "bfloat16"
    model = nnx.eval_shape(lambda: make_model(cfg, vocab_size=50, device=fake_cuda_device("9.0")))
    assert attention_kernels(model) == {"cudnn"}
    config = load_config()
    config.model.dtype = "bfloat16"
    with mock.patch("jax.devices", lambda *_: [fake_cuda_device("9.0")]):
        assert resolve_attention("auto", jnp.bfloat16) == "cudnn"  # the default is a GPU now
        setup = TrainSetup(config, 50, make_mesh([("data", 1)], jax.local_devices()[:1]))
    assert attention_kernels(nnx.merge(setup.graphdef, setup.abstract_state["params"])) == {"dot"}


def test_bf16_compute_keeps_fp32_params():
    cfg = model_config(variant="mu/8", image_size=32)
    cfg.dtype = "bfloat16"
    model = make_model(cfg, vocab_size=50)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    zimg, _ = model(jnp.zeros((2, 32, 32, 3)), jnp.ones((2, cfg.text.max_len), jnp.int32))
    assert zimg.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(zimg)))


def test_bf16_token_embedding_gradient_sums_in_float32():
    """A bf16 text tower's embedding gradient, for EOS (most positions of EOS-padded captions),
    is a sum of ~10k rows: it matches the float32 tower's to bf16 rounding, where a bf16
    scatter-add stalled far short of it."""
    cfg = model_config(variant="mu/8", image_size=32)
    cfg.text.max_len = 64
    ids = np.full((256, 64), 1, np.int32)  # EOS
    ids[:, :8] = np.random.default_rng(0).integers(3, 50, (256, 8))
    w = jax.random.normal(jax.random.key(0), (cfg.text.proj_dim or SIZES["mu"].width,))
    grads = {}
    for dtype in ("float32", "bfloat16"):
        cfg.dtype = dtype
        graphdef, params = nnx.split(make_model(cfg, vocab_size=50).txt, nnx.Param)
        grads[dtype] = jax.grad(lambda p, g=graphdef: jnp.sum(
            nnx.merge(g, p)(jnp.asarray(ids)).astype(jnp.float32) * w))(params)
    exact, bf16 = (np.asarray(g["token_embedding"]["embedding"][...][1]) for g in grads.values())
    assert np.linalg.norm(bf16 - exact) < 0.03 * np.linalg.norm(exact)


def test_bf16_first_moment_keeps_float32_params():
    config = load_config()
    config.optim.mu_dtype = "bfloat16"
    setup = TrainSetup(config, 50, make_mesh([("data", 1)], jax.devices()[:1]))
    adam = setup.abstract_state["opt_state"][2].inner_states["default"].inner_state[0]
    assert {x.dtype for x in jax.tree.leaves(adam.mu)} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(adam.nu)} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(setup.abstract_state["params"])} == {
        jnp.dtype(jnp.float32)}


@pytest.mark.parametrize("remat,scan", [("full", False), ("dots", False), ("none", True),
                                         ("full", True)])
def test_remat_and_scan_match_plain_forward_and_grad(remat, scan):
    """Remat policies and nnx.scan change memory and compile time, never the function: the
    same weights (scanned ones unstacked) give the same loss and gradients."""
    cfg = model_config(variant="mu/8", image_size=32)
    cfg.update(remat=remat, scan_layers=scan)
    other = make_model(cfg, vocab_size=50)
    cfg.update(remat="none", scan_layers=False)
    plain = make_model(cfg, vocab_size=50)
    params = nnx.to_pure_dict(nnx.state(other, nnx.Param))
    nnx.replace_by_pure_dict(state := nnx.state(plain, nnx.Param), unstack_layers(params))
    nnx.update(plain, state)
    images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    ids = jax.random.randint(jax.random.key(1), (2, cfg.text.max_len), 0, 50)

    def loss(m):
        zimg, ztxt = m(images, ids)
        return jnp.sum((zimg @ ztxt.T) ** 2) + jnp.sum(m.img.tokens(images) ** 2)

    np.testing.assert_allclose(loss(plain), loss(other), rtol=1e-6)
    g_plain = nnx.to_pure_dict(nnx.grad(loss)(plain))
    g_other = unstack_layers(nnx.to_pure_dict(nnx.grad(loss)(other)))
    # Float32 rounding differs with fusion; a misplaced layer would differ at O(1).
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5),
                 g_plain, g_other)


def test_stack_layers_inverts_unstack_layers():
    cfg = model_config(variant="mu/8", image_size=32)
    cfg.scan_layers = True
    params = nnx.to_pure_dict(nnx.state(make_model(cfg, vocab_size=50), nnx.Param))
    layers = params["img"]["encoder"]["layers"]
    assert layers["mlp"]["fc1"]["kernel"].shape[0] == SIZES["mu"].depth
    per_layer = unstack_layers(params)
    assert sorted(per_layer["txt"]["encoder"]["layers"]) == list(range(SIZES["mu"].depth))
    jax.tree.map(np.testing.assert_array_equal, unstack_layers(per_layer), per_layer)
    jax.tree.map(np.testing.assert_array_equal, stack_layers(per_layer), params)


def test_sincos2d_is_distinct_per_position():
    pe = sincos2d_posemb(4, 4, 32)[0]
    assert pe.shape == (16, 32)
    distances = np.linalg.norm(pe[:, None] - pe[None], axis=-1) + np.eye(16)
    assert distances.min() > 0.1


@pytest.mark.parametrize("bad", ["X/16", "B", "B/x", "B/0"])
def test_decode_variant_rejects_bad_names(bad):
    with pytest.raises(ValueError, match="variant|size"):
        decode_variant(bad, with_patch=True)


@pytest.mark.parametrize("pool", ["tok", "map"])
@pytest.mark.parametrize("attention", ["dot", "cudnn"])
def test_layer_features_summarise_the_chosen_blocks_outputs(monkeypatch, pool, attention):
    """FLIP's probe features: class token (with one), patch mean and patch max of the chosen
    blocks' outputs and of the final output, the MAP-pooled vector first of the final
    output's with `pool="map"`, the same from a scanned tower, and never reading the pad
    token an even-length kernel adds to 17 tokens."""
    monkeypatch.setitem(ATTENTION_IMPLEMENTATIONS, "cudnn", functools.partial(
        cudnn_attention, implementation="xla"))
    images = jax.random.normal(jax.random.key(1), (3, 32, 32, 3))

    def vit(scan: bool) -> ViT:
        return ViT(Size(32, 4, 64, 2), 8, image_size=32, pool=pool, scan_layers=scan,
                   attention=attention, platform="cpu", rngs=nnx.Rngs(0))

    model = vit(scan=False)
    features = model.layer_features(images, (1, 3))
    x, outputs = model.encoder_input(images), []
    for number, block in enumerate(model.encoder.layers, start=1):
        x = block(x, num_keys=None)
        outputs += [x] if number in (1, 3) else []
    outputs.append(model.tokens(images))
    cls = int(pool == "tok")
    want = [v for t in outputs for v in ([t[:, 0]] if cls else [])
            + [t[:, cls:].mean(1), t[:, cls:].max(1)]]
    if pool == "map":
        want.insert(-2, model.map_head(outputs[-1]))
        np.testing.assert_allclose(want[-3], model(images), atol=1e-5)  # the tower's output
    assert features.shape == (3, 2 * 2 + 3 if pool == "map" else 3 * 3, 32)
    np.testing.assert_allclose(features, jnp.stack(want, axis=1), atol=1e-5)
    assert model.layer_features(images, ()).shape == (3, 3, 32)  # the final output's only

    scanned = vit(scan=True)
    params = nnx.state(scanned, nnx.Param)
    nnx.replace_by_pure_dict(params, stack_layers(nnx.to_pure_dict(nnx.state(model, nnx.Param))))
    nnx.update(scanned, params)
    np.testing.assert_allclose(scanned.layer_features(images, (1, 3)), features, atol=1e-5)
    with pytest.raises(ValueError, match=r"must be block numbers 1\.\.3"):
        model.layer_features(images, (4,))
