"""The implementations of `config.model.attention` side by side: forward + backward time of one
layer's attention, and how far each one's output and input gradients lie from a float32
reference (`jax.nn.dot_product_attention` on float32 copies of the same inputs).

    JAX_PLATFORMS=cuda python experiments/attention_kernels.py --batch=256 \\
        --shapes=197,64:causal --heads=12 --head_dim=64 --dtype=bfloat16

`--shapes` lists sequence lengths, `:causal` for a causal mask (the text tower's 64 tokens);
the default is a B/16 image tower's 197 tokens and its text tower's 64. An implementation that
does not run here ("cudnn" off CUDA GPUs, or in float32) is reported as such.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from flipjax.models.layers import ATTENTION_IMPLEMENTATIONS  # noqa: E402

flags.DEFINE_integer("batch", 8, "Batch size.")
flags.DEFINE_list("shapes", ["197", "64:causal"], "Sequence lengths, `:causal` for a mask.")
flags.DEFINE_integer("heads", 12, "Attention heads.")
flags.DEFINE_integer("head_dim", 64, "Width of each head.")
flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16"], "Compute dtype.")
flags.DEFINE_integer("steps", 20, "Timed calls (median), after two untimed ones.")
FLAGS = flags.FLAGS

Attention = Callable[[jax.Array, jax.Array, jax.Array, bool], jax.Array]


def reference(q: jax.Array, k: jax.Array, v: jax.Array, is_causal: bool) -> jax.Array:
    return jax.nn.dot_product_attention(q, k, v, is_causal=is_causal)


def forward_backward(attention: Attention, is_causal: bool) -> Callable:
    """f(q, k, v, weights) -> ((loss, out), (dq, dk, dv)) of loss = sum(out * weights). The
    weights are an argument: closed over, XLA would spend seconds constant-folding them."""
    def loss(q, k, v, weights):
        out = attention(q, k, v, is_causal).astype(jnp.float32)
        return jnp.sum(out * weights), out
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


def median_ms(fn: Callable, *args: jax.Array) -> float:
    for _ in range(2):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(FLAGS.steps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def main(argv: list[str]) -> None:
    del argv
    dtype = jnp.dtype(FLAGS.dtype)
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, {FLAGS.dtype}, batch "
          f"{FLAGS.batch}, {FLAGS.heads} heads of {FLAGS.head_dim}\n")
    print("| seq | causal | attention | fwd+bwd ms | max abs error: out | dq | dk | dv |")
    print("|---|---|---|---|---|---|---|---|")
    for entry in FLAGS.shapes:
        seq, _, mask = entry.partition(":")
        is_causal = mask == "causal"
        shape = (FLAGS.batch, int(seq), FLAGS.heads, FLAGS.head_dim)
        q, k, v, w = (jax.random.normal(jax.random.key(i), shape) for i in range(4))
        (_, want), want_grads = forward_backward(reference, is_causal)(q, k, v, w)
        for name, attention in ATTENTION_IMPLEMENTATIONS.items():
            fn = forward_backward(attention, is_causal)
            args = [x.astype(dtype) for x in (q, k, v)] + [w]
            try:
                (_, out), grads = fn(*args)
            except Exception as e:  # noqa: BLE001 - not on this backend: say so, go on
                print(f"| {seq} | {is_causal} | {name} | {type(e).__name__}: "
                      f"{str(e).splitlines()[0][:80]} | | | | |")
                continue
            errors = [float(jnp.max(jnp.abs(x.astype(jnp.float32) - r)))
                      for x, r in zip((out, *grads), (want, *want_grads), strict=True)]
            print(f"| {seq} | {is_causal} | {name} | {median_ms(fn, *args):.2f} | "
                  + " | ".join(f"{e:.1e}" for e in errors) + " |", flush=True)


if __name__ == "__main__":
    app.run(main)
