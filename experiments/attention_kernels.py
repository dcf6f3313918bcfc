"""The attention kernels of `config.model.attention` side by side: forward + backward time of
one layer's attention, and how far each kernel's output and input gradients lie from a float32
reference (`jax.nn.dot_product_attention` on float32 copies of the same inputs).

    JAX_PLATFORMS=cuda python experiments/attention_kernels.py --batch=256 --seq=197,64 \\
        --heads=12 --head_dim=64 --dtype=bfloat16

Each `--seq` entry is timed without and with a causal mask as the towers use it: an odd length
(the image tower's 197) without, an even one (the text tower's 64) with. Kernels that do not
run on this backend ("cudnn" off NVIDIA GPUs, or in float32) are reported as such.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from flipjax.models.layers import cudnn_attention, dot_product_attention  # noqa: E402

flags.DEFINE_integer("batch", 8, "Batch size.")
flags.DEFINE_list("seq", ["197", "64"], "Sequence lengths; odd ones run unmasked, even causal.")
flags.DEFINE_integer("heads", 12, "Attention heads.")
flags.DEFINE_integer("head_dim", 64, "Width of each head.")
flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16"], "Compute dtype.")
flags.DEFINE_integer("steps", 20, "Timed calls (median), after two untimed ones.")
FLAGS = flags.FLAGS


def dot_kernel(q, k, v, is_causal):
    heads_major = lambda x: x.transpose(0, 2, 1, 3)
    return heads_major(dot_product_attention(heads_major(q), heads_major(k), heads_major(v),
                                             is_causal))


KERNELS = {"dot": dot_kernel, "cudnn": cudnn_attention}


def forward_backward(kernel, is_causal: bool):
    """f(q, k, v, weights) -> ((loss, out), (dq, dk, dv)) of loss = sum(out * weights). The
    weights are an argument: closed over, XLA would spend seconds constant-folding them."""
    def loss(q, k, v, weights):
        out = kernel(q, k, v, is_causal).astype(jnp.float32)
        return jnp.sum(out * weights), out
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


def median_ms(fn, *args) -> float:
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
    print("| seq | causal | kernel | fwd+bwd ms | max abs error: out | dq | dk | dv |")
    print("|---|---|---|---|---|---|---|---|")
    for seq in map(int, FLAGS.seq):
        is_causal = seq % 2 == 0
        shape = (FLAGS.batch, seq, FLAGS.heads, FLAGS.head_dim)
        q, k, v, w = (jax.random.normal(jax.random.key(i), shape) for i in range(4))
        (_, reference), reference_grads = forward_backward(
            lambda q, k, v, causal: jax.nn.dot_product_attention(q, k, v, is_causal=causal),
            is_causal)(q, k, v, w)
        for name, kernel in KERNELS.items():
            fn = forward_backward(kernel, is_causal)
            args = [x.astype(dtype) for x in (q, k, v)] + [w]
            try:
                (_, out), grads = fn(*args)
            except Exception as e:  # noqa: BLE001 - a kernel this backend lacks: say so, go on
                print(f"| {seq} | {is_causal} | {name} | {type(e).__name__}: "
                      f"{str(e).splitlines()[0][:80]} | | | | |")
                continue
            errors = [float(jnp.max(jnp.abs(x.astype(jnp.float32) - r)))
                      for x, r in zip((out, *grads), (reference, *reference_grads), strict=True)]
            print(f"| {seq} | {is_causal} | {name} | {median_ms(fn, *args):.2f} | "
                  + " | ".join(f"{e:.1e}" for e in errors) + " |", flush=True)


if __name__ == "__main__":
    app.run(main)
