"""Per-device memory of the contrastive loss and its gradient w.r.t. the embeddings, global
(plain jit on batch-sharded embeddings) vs sharded (shard_map), from XLA's compiled memory
analysis on 8 virtual CPU devices. Nothing is executed, so 32k batches compile on a laptop.

    python experiments/loss_memory.py > experiments/results/loss_memory.md
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from flipjax.train.losses import LOSSES  # noqa: E402
from flipjax.train.sharded_losses import make_sharded_loss  # noqa: E402
from flipjax.train.sharding import make_mesh  # noqa: E402

BATCHES = (4096, 16384, 32768)
DIMS = (512, 768)
MIB = 2**20


def peak_mib(loss_fn, batch: int, dim: int, sharding: NamedSharding) -> tuple[float, float]:
    """(temporary, temporary + arguments + outputs) MiB per device of loss + d loss/d z."""
    def f(zimg, ztxt, scale, bias):
        (loss, metrics), grads = jax.value_and_grad(
            lambda a, b: loss_fn(a, b, scale, bias), argnums=(0, 1), has_aux=True)(zimg, ztxt)
        return loss, metrics, grads

    z = jax.ShapeDtypeStruct((batch, dim), jnp.float32, sharding=sharding)
    s = jax.ShapeDtypeStruct((), jnp.float32)
    stats = jax.jit(f).lower(z, z, s, s).compile().memory_analysis()
    total = (stats.temp_size_in_bytes + stats.argument_size_in_bytes
             + stats.output_size_in_bytes - stats.alias_size_in_bytes)
    return stats.temp_size_in_bytes / MIB, total / MIB


def main() -> None:
    mesh = make_mesh([("data", -1)])
    sharding = NamedSharding(mesh, P(mesh.axis_names))
    n = mesh.devices.size
    print("# Contrastive loss memory per device: global vs sharded\n")
    print(f"`python experiments/loss_memory.py` — jax {jax.__version__}, {n} virtual CPU "
          "devices, float32 embeddings sharded over the batch, loss + gradient w.r.t. both "
          "towers' embeddings. Numbers are XLA's `compile().memory_analysis()` per device "
          "(temp = scratch buffers; total = temp + arguments + outputs). For reference, one "
          "float32 (B, B) matrix is 4B² bytes and one (B/n, B) block 4B²/n.\n")
    print("| loss | B | d | (B,B) f32 MiB | global temp MiB | global total MiB "
          "| sharded temp MiB | sharded total MiB | global/sharded temp |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in ("softmax", "sigmoid"):
        sharded_fn = make_sharded_loss(name, mesh)
        for batch in BATCHES:
            for dim in DIMS:
                g_temp, g_total = peak_mib(LOSSES[name], batch, dim, sharding)
                s_temp, s_total = peak_mib(sharded_fn, batch, dim, sharding)
                full = 4 * batch * batch / MIB
                print(f"| {name} | {batch} | {dim} | {full:,.0f} | {g_temp:,.0f} | "
                      f"{g_total:,.0f} | {s_temp:,.0f} | {s_total:,.0f} | "
                      f"{g_temp / s_temp:.1f}× |", flush=True)


if __name__ == "__main__":
    main()
