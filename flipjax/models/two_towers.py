"""The FLIP/CLIP/SigLIP two-tower model: an image tower and a text tower mapped to one space.

Embeddings are L2-normalised; `t` holds log(temperature) and `b` the optional logit bias, as in
big_vision's `two_towers`: logits = exp(t) * zimg @ ztxt.T + b.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from flipjax.models.layers import resolve_attention
from flipjax.models.text import TextTransformer
from flipjax.models.variants import Size, resolve_size
from flipjax.models.vit import ViT

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
SIZE_FIELDS = ("width", "depth", "mlp_dim", "num_heads")


def l2_normalize(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return x / (jnp.linalg.norm(x, axis=-1, keepdims=True) + 1e-8)


class TwoTowers(nnx.Module):
    def __init__(self, img: ViT, txt: TextTransformer, *, temperature_init: float,
                 bias_init: float | None):
        self.img, self.txt = img, txt
        self.t = nnx.Param(jnp.asarray(np.log(temperature_init), jnp.float32))
        self.b = nnx.Param(jnp.asarray(bias_init, jnp.float32)) if bias_init is not None else None

    def embed_images(self, images: jax.Array) -> jax.Array:
        return l2_normalize(self.img(images))

    def embed_texts(self, ids: jax.Array) -> jax.Array:
        return l2_normalize(self.txt(ids))

    def logit_scale_and_bias(self) -> tuple[jax.Array, jax.Array]:
        bias = self.b[...] if self.b is not None else jnp.zeros((), jnp.float32)
        return jnp.exp(self.t[...]), bias

    def __call__(self, images: jax.Array, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.embed_images(images), self.embed_texts(ids)


def tower_size(tower_cfg: ml_collections.ConfigDict, *, with_patch: bool
               ) -> tuple[Size, int | None]:
    overrides = {k: tower_cfg.get(k) for k in SIZE_FIELDS}
    return resolve_size(tower_cfg.variant, overrides, with_patch=with_patch)


def make_model(cfg: ml_collections.ConfigDict, *, vocab_size: int, seed: int = 0,
               device: jax.Device | None = None) -> TwoTowers:
    """Builds the model described by `config.model` (see configs/*.py for the fields) for
    `device`, the one it will run on (JAX's first by default; a deviceless compile's target
    device too): its attention "auto" and the platform forms of `dense_matmul` and
    `add_residual` are resolved for it."""
    rngs = nnx.Rngs(params=seed)
    dtype = DTYPES[cfg.dtype]
    device = device or jax.devices()[0]
    common = dict(gelu=cfg.gelu, ln_eps=cfg.ln_eps, remat=cfg.remat, scan_layers=cfg.scan_layers,
                  attention=resolve_attention(cfg.attention, dtype, device),
                  platform=device.platform, dtype=dtype, rngs=rngs)
    img_size, patch = tower_size(cfg.image, with_patch=True)
    txt_size, _ = tower_size(cfg.text, with_patch=False)
    img = ViT(img_size, patch, image_size=cfg.image.image_size, pool=cfg.image.pool,
              posemb=cfg.image.posemb, pre_norm=cfg.image.pre_norm,
              proj_dim=cfg.image.proj_dim, proj_bias=cfg.image.proj_bias, **common)
    txt = TextTransformer(txt_size, vocab_size=vocab_size, max_len=cfg.text.max_len,
                          pool=cfg.text.pool, causal=cfg.text.causal, eos_id=cfg.text.eos_id,
                          proj_dim=cfg.text.proj_dim, proj_bias=cfg.text.proj_bias, **common)
    return TwoTowers(img, txt, temperature_init=cfg.temperature_init, bias_init=cfg.bias_init)


def embedding_dims(cfg: ml_collections.ConfigDict) -> tuple[int, int]:
    """The output dims of the image and the text tower; they must agree."""
    img_size, _ = tower_size(cfg.image, with_patch=True)
    txt_size, _ = tower_size(cfg.text, with_patch=False)
    return (cfg.image.proj_dim or img_size.width, cfg.text.proj_dim or txt_size.width)
