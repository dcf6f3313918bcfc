"""Transformer building blocks shared by the image and the text tower.

Every sub-module name here is chosen so that exporting to Hugging Face SigLIP/CLIP is a rename
table (see `flipjax/export`): `norm1`/`norm2` -> `layer_norm1/2`, `attn.{q,k,v,out}` ->
`self_attn.{q,k,v,out}_proj`, `mlp.fc1/fc2` -> `mlp.fc1/fc2`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

GELU_FLAVOURS: dict[str, Callable[[jax.Array], jax.Array]] = {
    # big_vision / SigLIP (`nn.gelu` default, HF `gelu_pytorch_tanh`).
    "tanh": functools.partial(jax.nn.gelu, approximate=True),
    # BERT / HF `gelu`.
    "exact": functools.partial(jax.nn.gelu, approximate=False),
    # OpenAI CLIP / HF `quick_gelu`.
    "quick": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


def gelu_fn(flavour: str) -> Callable[[jax.Array], jax.Array]:
    if flavour not in GELU_FLAVOURS:
        raise ValueError(f"gelu must be one of {sorted(GELU_FLAVOURS)}, got {flavour!r}")
    return GELU_FLAVOURS[flavour]


class Attention(nnx.Module):
    """Multi-head attention with separate q/k/v/out projections (1:1 with HF's layout)."""

    def __init__(self, width: int, num_heads: int, *, dtype, rngs: nnx.Rngs):
        if width % num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        dense = functools.partial(nnx.Linear, width, width, dtype=dtype, rngs=rngs)
        self.q, self.k, self.v, self.out = dense(), dense(), dense(), dense()

    def __call__(self, x: jax.Array, context: jax.Array | None = None, *,
                 is_causal: bool = False) -> jax.Array:
        context = x if context is None else context
        b, tq, d = x.shape
        heads = lambda y: y.reshape(b, y.shape[1], self.num_heads, d // self.num_heads)
        q, k, v = heads(self.q(x)), heads(self.k(context)), heads(self.v(context))
        y = jax.nn.dot_product_attention(q, k, v, is_causal=is_causal)
        return self.out(y.reshape(b, tq, d))


class Mlp(nnx.Module):
    def __init__(self, width: int, mlp_dim: int, *, gelu: str, dtype, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(width, mlp_dim, dtype=dtype, rngs=rngs)
        self.fc2 = nnx.Linear(mlp_dim, width, dtype=dtype, rngs=rngs)
        self.act = gelu_fn(gelu)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(self.act(self.fc1(x)))


class EncoderBlock(nnx.Module):
    """Pre-LN transformer block, as in ViT, CLIP and SigLIP."""

    def __init__(self, width: int, mlp_dim: int, num_heads: int, *, gelu: str, ln_eps: float,
                 dtype, rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(width, epsilon=ln_eps, dtype=dtype, rngs=rngs)
        self.attn = Attention(width, num_heads, dtype=dtype, rngs=rngs)
        self.norm2 = nnx.LayerNorm(width, epsilon=ln_eps, dtype=dtype, rngs=rngs)
        self.mlp = Mlp(width, mlp_dim, gelu=gelu, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, *, is_causal: bool = False) -> jax.Array:
        x = x + self.attn(self.norm1(x), is_causal=is_causal)
        return x + self.mlp(self.norm2(x))


class Encoder(nnx.Module):
    """A stack of `EncoderBlock`s followed by a final LayerNorm.

    `remat=True` recomputes each block's activations in the backward pass (jax.checkpoint with
    the `nothing_saveable` policy, big_vision's default), trading compute for memory.
    """

    def __init__(self, width: int, depth: int, mlp_dim: int, num_heads: int, *, gelu: str,
                 ln_eps: float, remat: bool, dtype, rngs: nnx.Rngs):
        self.layers = nnx.List([
            EncoderBlock(width, mlp_dim, num_heads, gelu=gelu, ln_eps=ln_eps, dtype=dtype,
                         rngs=rngs)
            for _ in range(depth)
        ])
        self.encoder_norm = nnx.LayerNorm(width, epsilon=ln_eps, dtype=dtype, rngs=rngs)
        self.remat = remat

    def __call__(self, x: jax.Array, *, is_causal: bool = False) -> jax.Array:
        for block in self.layers:
            if self.remat:
                x = nnx.remat(
                    lambda blk, y: blk(y, is_causal=is_causal),
                    policy=jax.checkpoint_policies.nothing_saveable,
                )(block, x)
            else:
                x = block(x, is_causal=is_causal)
        return self.encoder_norm(x)


def normal_param(shape: tuple[int, ...], stddev: float, rngs: nnx.Rngs) -> nnx.Param:
    return nnx.Param(jax.random.normal(rngs.params(), shape, jnp.float32) * stddev)
