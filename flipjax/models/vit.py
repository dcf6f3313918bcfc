"""Vision Transformer image tower (Dosovitskiy et al.), shaped as in big_vision, CLIP and SigLIP.

Position embeddings are learned or fixed 2-D sin-cos; pooling is a learned-probe attention head
(`map`, SigLIP), global average (`gap`) or a class token (`tok`, CLIP). A class token and a
LayerNorm before the encoder (`pre_norm`, CLIP's `pre_layrnorm`) are options so that CLIP weights
can be imported as they are.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flipjax.models.layers import (
    Attention,
    Encoder,
    Mlp,
    add_position_embedding,
    dense,
    dense_matmul,
    normal_param,
)
from flipjax.models.variants import Size

POOLS = ("map", "gap", "tok")
POSEMBS = ("learn", "sincos2d")


def sincos2d_posemb(h: int, w: int, width: int, temperature: float = 10_000.0) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding (MoCo v3 / big_vision), shape (1, h*w, width)."""
    if width % 4:
        raise ValueError(f"sincos2d needs a width divisible by 4, got {width}")
    y, x = np.mgrid[:h, :w]
    omega = 1.0 / temperature ** (np.arange(width // 4) / (width // 4 - 1 or 1))
    y = y.reshape(-1, 1) * omega[None]
    x = x.reshape(-1, 1) * omega[None]
    pe = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
    return pe[None].astype(np.float32)


class PatchEmbed(nnx.Module):
    """Non-overlapping patches -> tokens: a stride-`patch` convolution's parameters (`kernel`
    (patch, patch, 3, width), `bias`), computed as one matmul over flattened patches.

    Why not `nnx.Conv`: XLA:CPU runs this convolution and its weight gradient 1.6-1.8x
    slower than the same products as matmuls (ViT-S/16 at batch 8, forward + weight
    gradient, two runs on the development VM: 40 against 26 ms, 30 against 17 ms; not
    measured on accelerators). The parameters, their initialisation and the random keys
    drawn are the convolution's, so checkpoints, seeded runs and the Hugging Face mapping do
    not change."""

    def __init__(self, patch: int, width: int, *, platform: str, dtype, rngs: nnx.Rngs):
        self.patch, self.platform, self.dtype = patch, platform, dtype
        self.kernel = nnx.Param(
            nnx.initializers.lecun_normal()(rngs.params(), (patch, patch, 3, width), jnp.float32))
        self.bias = nnx.Param(nnx.initializers.zeros_init()(rngs.params(), (width,),
                                                              jnp.float32))

    def __call__(self, images: jax.Array) -> jax.Array:
        """(B, H, W, 3) -> (B, H/patch, W/patch, width)."""
        b, h, w, c = images.shape
        p, gh, gw = self.patch, h // self.patch, w // self.patch
        patches = images.reshape(b, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5)
        kernel = self.kernel.astype(self.dtype).reshape(p * p * c, -1)
        y = dense_matmul(patches.reshape(b, gh, gw, p * p * c).astype(self.dtype), kernel,
                         self.platform)
        return y + self.bias.astype(self.dtype)


class MAPHead(nnx.Module):
    """Multihead attention pooling: one learned query attends over all tokens (SigLIP)."""

    def __init__(self, size: Size, *, gelu: str, ln_eps: float, attention: str, platform: str,
                 dtype, rngs: nnx.Rngs):
        self.probe = nnx.Param(
            nnx.initializers.xavier_uniform()(rngs.params(), (1, 1, size.width), jnp.float32))
        self.attn = Attention(size.width, size.num_heads, attention=attention,
                              platform=platform, dtype=dtype, rngs=rngs)
        self.norm = nnx.LayerNorm(size.width, epsilon=ln_eps, dtype=dtype, rngs=rngs)
        self.mlp = Mlp(size.width, size.mlp_dim, gelu=gelu, platform=platform, dtype=dtype,
                       rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        probe = jnp.broadcast_to(self.probe.astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
        y = self.attn(probe, context=x)
        y = y + self.mlp(self.norm(y))
        return y[:, 0]


def probe_blocks(blocks: Sequence[int] | None, depth: int) -> tuple[int, ...]:
    """The blocks FLIP's attribute head reads besides the last, checked against `depth`
    (ValueError); None means FLIP's 4, 6, 8 of 12 at the same fractions of `depth`: (1, 2) of
    3, (1,) of 2, none of 1."""
    if blocks is None:
        return tuple(sorted({b for b in (round(depth / 3), depth // 2, round(2 * depth / 3))
                             if 1 <= b < depth}))
    if not all(1 <= b < depth for b in blocks):
        raise ValueError(f"{tuple(blocks)} must be block numbers 1..{depth - 1} of the "
                         f"{depth}-block image tower (its last block's output is always read)")
    return tuple(blocks)


class ViT(nnx.Module):
    """Image tower: pixels (B, H, W, 3) -> pooled features (B, proj_dim or width)."""

    def __init__(self, size: Size, patch: int, *, image_size: int, pool: str = "map",
                 posemb: str = "learn", pre_norm: bool = False, proj_dim: int | None = None,
                 proj_bias: bool = True, gelu: str = "tanh", ln_eps: float = 1e-6,
                 remat: str = "none", scan_layers: bool = False, attention: str = "dot",
                 platform: str, dtype=jnp.float32, rngs: nnx.Rngs):
        if pool not in POOLS:
            raise ValueError(f"image pool must be one of {POOLS}, got {pool!r}")
        if posemb not in POSEMBS:
            raise ValueError(f"image posemb must be one of {POSEMBS}, got {posemb!r}")
        if image_size % patch:
            raise ValueError(f"image_size {image_size} is not divisible by patch size {patch}")
        self.pool, self.posemb, self.dtype, self.depth = pool, posemb, dtype, size.depth
        self.grid = image_size // patch
        d = size.width
        self.patch_embed = PatchEmbed(patch, d, platform=platform, dtype=dtype, rngs=rngs)
        if pool == "tok":
            self.cls_token = nnx.Param(jnp.zeros((1, 1, d), jnp.float32))
        if posemb == "learn":
            num_tokens = self.grid**2 + (pool == "tok")
            self.pos_embedding = normal_param((1, num_tokens, d), d**-0.5, rngs)
        self.pre_norm = (nnx.LayerNorm(d, epsilon=ln_eps, dtype=dtype, rngs=rngs)
                         if pre_norm else None)
        self.encoder = Encoder(d, size.depth, size.mlp_dim, size.num_heads, gelu=gelu,
                               ln_eps=ln_eps, remat=remat, scan=scan_layers,
                               attention=attention, platform=platform, dtype=dtype, rngs=rngs)
        self.map_head = (MAPHead(size, gelu=gelu, ln_eps=ln_eps, attention=attention,
                                 platform=platform, dtype=dtype, rngs=rngs)
                         if pool == "map" else None)
        self.head = (dense(d, proj_dim, use_bias=proj_bias, platform=platform, dtype=dtype,
                           rngs=rngs)
                     if proj_dim else None)

    def tokens(self, images: jax.Array, position: int | None = None) -> jax.Array:
        """Encoded tokens (B, N, width), the input of pooling, or only the one at `position`
        (B, width)."""
        return self.encoder(self.encoder_input(images), position=position)

    def layer_features(self, images: jax.Array, blocks: Sequence[int] | None = None
                       ) -> jax.Array:
        """FLIP's attribute-probe features (B, F, width): for the outputs of `blocks` (1-based)
        and the encoder's final output, the class token (with `pool="tok"`), the mean and the
        max of the patch tokens, in that order. FLIP reads blocks 4, 6, 8 of 12 (F = 12);
        None means the blocks at those fractions of this tower's depth. With `pool="map"` the
        final output's MAP-pooled vector stands where the class token would (F = 9 of 12
        blocks): it is what the tower's embedding is made from, as FLIP's class token is."""
        blocks = probe_blocks(blocks, self.depth)
        cls = int(self.pool == "tok")

        def summarize(tokens: jax.Array) -> jax.Array:
            patches = tokens[:, cls:].astype(jnp.float32)
            parts = [tokens[:, 0].astype(jnp.float32)] if cls else []
            return jnp.stack([*parts, patches.mean(axis=1), patches.max(axis=1)], axis=1)

        per_block, final = self.encoder.block_summaries(self.encoder_input(images), summarize)
        picked = per_block[jnp.asarray([b - 1 for b in blocks], jnp.int32)]  # (L, B, K, D)
        last = summarize(final)
        if self.pool == "map":
            last = jnp.concatenate([self.map_head(final)[:, None].astype(jnp.float32), last],
                                   axis=1)
        _, b, k, d = picked.shape
        return jnp.concatenate([jnp.moveaxis(picked, 0, 1).reshape(b, len(blocks) * k, d),
                                last], axis=1)

    def encoder_input(self, images: jax.Array) -> jax.Array:
        """Patch embeddings with the class token and position embeddings, (B, N, width)."""
        x = self.patch_embed(images)
        b, h, w, d = x.shape
        x = x.reshape(b, h * w, d)
        if self.pool == "tok":
            x = jnp.concatenate([jnp.broadcast_to(self.cls_token.astype(x.dtype), (b, 1, d)), x],
                                axis=1)
        if self.posemb == "learn":
            x = add_position_embedding(x, self.pos_embedding.astype(x.dtype))
        else:
            pe = sincos2d_posemb(h, w, d)
            if self.pool == "tok":
                pe = np.concatenate([np.zeros((1, 1, d), np.float32), pe], axis=1)
            x = x + jnp.asarray(pe, x.dtype)
        if self.pre_norm is not None:
            x = self.pre_norm(x)
        return x

    def __call__(self, images: jax.Array) -> jax.Array:
        if self.pool == "tok":  # the encoder computes the class token's output alone
            x = self.tokens(images, position=0)
        elif self.pool == "map":
            x = self.map_head(self.tokens(images))
        else:
            x = jnp.mean(self.tokens(images), axis=1)
        return self.head(x) if self.head is not None else x
