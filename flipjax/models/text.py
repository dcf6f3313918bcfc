"""Text transformer tower: token ids (B, L) -> pooled features (B, proj_dim or width).

The default (`pool="last"`, no causal mask) is SigLIP's: captions are padded with EOS ("sticky
EOS", see `flipjax.data.tokenizer`) so the last position always holds an EOS that has attended to
the whole caption. `pool="eos"` with `causal=True` is CLIP's: pool at the first EOS.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from flipjax.models.layers import Encoder, add_position_embedding, dense, normal_param
from flipjax.models.variants import Size

POOLS = ("last", "first", "mean", "eos")


class TextTransformer(nnx.Module):
    def __init__(self, size: Size, *, vocab_size: int, max_len: int, pool: str = "last",
                 causal: bool = False, eos_id: int = 1, proj_dim: int | None = None,
                 proj_bias: bool = True, gelu: str = "tanh", ln_eps: float = 1e-6,
                 remat: str = "none", scan_layers: bool = False, attention: str = "dot",
                 platform: str, dtype=jnp.float32, rngs: nnx.Rngs):
        if pool not in POOLS:
            raise ValueError(f"text pool must be one of {POOLS}, got {pool!r}")
        d = size.width
        self.pool, self.causal, self.eos_id, self.dtype = pool, causal, eos_id, dtype
        # Gathered in float32, then cast: the gather's backward scatter-adds one row per
        # token, and in bfloat16 the EOS row (most positions, with EOS padding) stops growing
        # after a few hundred adds (85% off at 14k EOS tokens).
        self.token_embedding = nnx.Embed(vocab_size, d, dtype=jnp.float32,
                                         embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
        self.pos_embedding = normal_param((1, max_len, d), 0.01, rngs)
        self.encoder = Encoder(d, size.depth, size.mlp_dim, size.num_heads, gelu=gelu,
                               ln_eps=ln_eps, remat=remat, scan=scan_layers,
                               attention=attention, platform=platform, dtype=dtype, rngs=rngs)
        self.head = (dense(d, proj_dim, use_bias=proj_bias, platform=platform, dtype=dtype,
                           rngs=rngs)
                     if proj_dim else None)

    def tokens(self, ids: jax.Array, position: int | jax.Array | None = None) -> jax.Array:
        """Encoded tokens (B, L, width), or only the one at `position` (an index, or one per
        caption), (B, width)."""
        x = self.token_embedding(ids).astype(self.dtype)
        x = add_position_embedding(x, self.pos_embedding[:, : ids.shape[1]].astype(x.dtype))
        return self.encoder(x, is_causal=self.causal, position=position)

    def __call__(self, ids: jax.Array) -> jax.Array:
        if self.pool == "mean":
            x = jnp.mean(self.tokens(ids), axis=1)
        elif self.pool == "eos":  # each caption's first EOS, its output computed alone
            x = self.tokens(ids, jnp.argmax(ids == self.eos_id, axis=1))
        else:  # a fixed token, its output computed alone
            x = self.tokens(ids, {"last": -1, "first": 0}[self.pool])
        return self.head(x) if self.head is not None else x
