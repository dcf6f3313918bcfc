"""Train-step throughput on this machine's CPU: model FLOPs per image-text pair from XLA's cost
analysis, compile time, pairs/s and MFU against a stated peak. Synthetic uint8 batches, the
real jitted train step (`TrainSetup`), one device, float32.

    python experiments/throughput.py --variants=S/16,B/16 --batch=8 --steps=3 \
        --peak_gflops=128 >> experiments/results/throughput.md

The default peak is 2 cores x ~2 GHz x 32 float32 FLOPs/cycle (AVX2: two 8-wide FMA units);
state the machine's own with --peak_gflops.
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from configs.base import get_config  # noqa: E402
from flipjax.data.pipeline import to_global  # noqa: E402
from flipjax.train.sharding import make_mesh  # noqa: E402
from flipjax.train.step import TrainSetup  # noqa: E402

flags.DEFINE_list("variants", ["S/16", "B/16"], "Image tower variants (text tower: same size).")
flags.DEFINE_integer("batch", 8, "Global batch (pairs) per step.")
flags.DEFINE_integer("steps", 3, "Timed steps, after one warm-up step.")
flags.DEFINE_float("peak_gflops", 128.0, "Peak float32 GFLOP/s of this machine, for MFU.")
FLAGS = flags.FLAGS


def measure(variant: str) -> dict[str, float]:
    config = get_config(f"batch={FLAGS.batch}")
    config.mesh, config.loss_impl = [("data", 1)], "global"
    config.model.dtype = "float32"  # CPUs have no fast bfloat16 matmul
    config.model.image.variant = variant
    config.model.text.variant = variant.split("/")[0]
    config.model.text.proj_dim = None
    setup = TrainSetup(config, config.tokenizer.vocab_size, make_mesh(config.mesh))
    rng = np.random.default_rng(0)
    r, n = config.data.image_size, config.model.text.max_len
    batch = {"image": rng.integers(0, 256, (FLAGS.batch, r, r, 3), dtype=np.uint8),
             "text": rng.integers(0, 1000, (FLAGS.batch, n)).astype(np.int32)}
    batch = to_global(batch, setup.batch_sharding)
    state = setup.init()
    t0 = time.perf_counter()
    compiled = setup.train_step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    flops = compiled.cost_analysis()["flops"]
    state, m = compiled(state, batch)
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(FLAGS.steps):
        state, m = compiled(state, batch)
    jax.block_until_ready(m)
    step_s = (time.perf_counter() - t0) / FLAGS.steps
    return {"gflops_per_pair": flops / FLAGS.batch / 1e9, "compile_s": compile_s,
            "step_s": step_s, "pairs_per_s": FLAGS.batch / step_s,
            "mfu": flops / step_s / (FLAGS.peak_gflops * 1e9)}


def main(argv: list[str]) -> None:
    del argv
    print(f"\n`python experiments/throughput.py --variants={','.join(FLAGS.variants)} "
          f"--batch={FLAGS.batch} --steps={FLAGS.steps} --peak_gflops={FLAGS.peak_gflops}` "
          f"— jax {jax.__version__}, {jax.devices()[0].device_kind}, float32, 224 px, 64 "
          "tokens\n")
    print("| towers | GFLOPs/pair (train step) | compile s | step s | pairs/s | MFU |")
    print("|---|---|---|---|---|---|")
    for variant in FLAGS.variants:
        r = measure(variant)
        print(f"| {variant} + {variant.split('/')[0]} text | {r['gflops_per_pair']:.1f} | "
              f"{r['compile_s']:.0f} | {r['step_s']:.2f} | {r['pairs_per_s']:.2f} | "
              f"{100 * r['mfu']:.1f}% |", flush=True)


if __name__ == "__main__":
    app.run(main)
