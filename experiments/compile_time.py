"""Compile time, compiled memory and step time of the B/16 train step, for each way of laying
out the encoder: unrolled layers or `nnx.scan` (`config.model.scan_layers`), times each remat
policy (`config.model.remat`). One CPU device, float32, `configs/base.py` otherwise.

    python experiments/compile_time.py --variant=B/16 --batch=8 --steps=2 \
        > experiments/results/compile_time.md

"lower s" is tracing to StableHLO, "compile s" XLA's compilation; "temp MiB" is XLA's
compiled memory analysis of the step's scratch space (activations kept for the backward pass
live there), which is what the remat policies trade against recompute.
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

flags.DEFINE_string("variant", "B/16", "Image tower variant (the text tower has the same size).")
flags.DEFINE_integer("batch", 8, "Global batch (pairs) per step.")
flags.DEFINE_integer("steps", 2, "Timed steps after one warm-up step; 0 skips running.")
flags.DEFINE_list("layouts", ["unrolled/none", "scan/none", "unrolled/dots", "scan/dots",
                              "unrolled/full", "scan/full"], "layer layout / remat policy")
FLAGS = flags.FLAGS


def measure(scan: bool, remat: str) -> dict[str, float]:
    config = get_config(f"batch={FLAGS.batch}")
    config.mesh, config.loss_impl = [("data", 1)], "global"
    config.model.dtype = "float32"  # CPUs have no fast bfloat16 matmul
    config.model.image.variant = FLAGS.variant
    config.model.text.variant = FLAGS.variant.split("/")[0]
    config.model.update(scan_layers=scan, remat=remat)
    setup = TrainSetup(config, config.tokenizer.vocab_size, make_mesh(config.mesh))
    rng = np.random.default_rng(0)
    r, n = config.data.image_size, config.model.text.max_len
    batch = to_global({"image": rng.integers(0, 256, (FLAGS.batch, r, r, 3), dtype=np.uint8),
                       "text": rng.integers(0, 1000, (FLAGS.batch, n)).astype(np.int32)},
                      setup.batch_sharding)
    state = setup.init()
    t0 = time.perf_counter()
    lowered = setup.train_step.lower(state, batch)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    result = {"lower_s": t1 - t0, "compile_s": t2 - t1,
              "temp_mib": compiled.memory_analysis().temp_size_in_bytes / 2**20,
              "step_s": float("nan")}
    if FLAGS.steps:
        state, m = compiled(state, batch)
        jax.block_until_ready(m)
        t0 = time.perf_counter()
        for _ in range(FLAGS.steps):
            state, m = compiled(state, batch)
        jax.block_until_ready(m)
        result["step_s"] = (time.perf_counter() - t0) / FLAGS.steps
    return result


def main(argv: list[str]) -> None:
    del argv
    print(f"`python experiments/compile_time.py --variant={FLAGS.variant} --batch={FLAGS.batch} "
          f"--steps={FLAGS.steps}` — jax {jax.__version__}, {jax.devices()[0].device_kind}, "
          f"{os.cpu_count()} cores, float32, {FLAGS.variant} + same-size text tower\n")
    print("| layers | remat | lower s | compile s | temp MiB | step s |")
    print("|---|---|---|---|---|---|")
    for layout in FLAGS.layouts:
        kind, remat = layout.split("/")
        r = measure(kind == "scan", remat)
        print(f"| {kind} | {remat} | {r['lower_s']:.1f} | {r['compile_s']:.1f} | "
              f"{r['temp_mib']:.0f} | {r['step_s']:.2f} |", flush=True)


if __name__ == "__main__":
    app.run(main)
