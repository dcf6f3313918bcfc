"""The matmuls of a CLIP train step's encoder blocks, alone: XLA:CPU against torch on one CPU.

`throughput.py` compares whole train steps of flipjax and open_clip. This script times the
matrix products of the step's encoder blocks one by one (its image tower's 197 tokens and its
text tower's 64 for a ViT-S/16 or ViT-B/16 CLIP at 224 px; the patch embedding, the heads and
the logits, ~2% of the FLOPs, are left out), in the operand layouts that autodiff gives them,
as one `jax.jit` product (XLA:CPU picks the kernel: YNNPACK or Eigen) and as one torch
product (MKL), in turns:

    /tmp/oc/bin/python experiments/cpu_matmul.py --variants=S/16,B/16 --batch=8 --steps=10 \\
        --rounds=7 --output=/tmp/cpu_matmul.md

(`experiments/results/cpu_matmul.md` puts two such runs, one per jax, under one summary.) The
open_clip venv of `throughput.py` has torch; without torch only XLA's column is filled. The
flags are `throughput.py`'s: `--steps` calls per timed block, `--rounds` blocks of each library
in turns (the median is reported), the first `--compile_options` entry for XLA; and as there,
the process keeps freed host memory (glibc malloc) for both libraries.

A linear layer's products, for x (tokens, in) and its kernel: the forward x @ W, the input
gradient dY @ Wᵀ and the weight gradient xᵀ @ dY, as `flipjax.models.layers.dense_matmul`
computes them on the CPU (over tokens flattened) and as torch's `F.linear` autograd does
(torch keeps W as (out, in), so the layouts are torch's own). The attention core's six
products (QKᵀ and PV forward; dP, dQ, dK and dV backward) in the three einsum layouts of
`flipjax.models.layers.dot_product_attention`, dK and dV computed transposed, (head_dim, keys);
torch runs the same einsums, which is not what open_clip runs (a fused attention kernel). Each
XLA call includes jit dispatch (tens of microseconds), which weighs on the smallest products
(the text tower's attention products, 0.1–0.5 ms each).

"Per step" multiplies each product's time by how often a train step runs it: every block of
both towers in full (flipjax runs most of each tower's last block for one token only, so
this overcounts XLA's column by a few percent). It is the step's matmul time were each
product run alone at this speed; in the step XLA runs independent kernels side by side, so it
compares kernels and does not predict the step.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from experiments.throughput import parse_compile_options  # noqa: E402
from flipjax.models.variants import SIZES, Size  # noqa: E402

FLAGS = flags.FLAGS

TEXT_TOKENS = 64

# A linear layer's three products: (name, einsum over x (t, i), W (i, o), dY (t, o), torch's
# product as `F.linear` and its autograd run it, over x, W (o, i) and dY).
LINEAR = [
    ("forward x @ W", "ti,io->to", lambda x, w, dy: x @ w.t()),
    ("input grad dY @ Wᵀ", "to,io->ti", lambda x, w, dy: dy @ w),
    ("weight grad xᵀ @ dY", "ti,to->io", lambda x, w, dy: dy.t() @ x),
]
# The attention core's products over (batch, heads, ...), as dot_product_attention writes them.
ATTENTION = [
    ("QKᵀ, dP = dO·Vᵀ", "bnqh,bnkh->bnqk"),
    ("PV, dQ = dS·K", "bnqk,bnkh->bnqh"),
    ("dKᵀ = Qᵀ·dS, dVᵀ = dOᵀ·P", "bnqh,bnqk->bnhk"),
]


def time_block(fn: Callable[[], object], results: list[float]) -> None:
    """Appends one block's mean milliseconds per call to `results`, after an untimed call."""
    fn()
    t0 = time.perf_counter()
    for _ in range(FLAGS.steps):
        fn()
    results.append(1e3 * (time.perf_counter() - t0) / FLAGS.steps)


def operands(equation: str, sizes: dict[str, int]) -> list[np.ndarray]:
    """Random float32 inputs of an einsum, by its letters' sizes."""
    rng = np.random.default_rng(0)
    inputs = equation.split("->")[0].split(",")
    return [rng.standard_normal([sizes[a] for a in spec], dtype=np.float32) for spec in inputs]


def time_product(jax_eq: str, torch_run: Callable[[], object] | None, sizes: dict[str, int]
                 ) -> tuple[float, float | None]:
    """Median ms per call of one product in XLA:CPU and (where given) torch, in turns."""
    options = parse_compile_options(FLAGS.compile_options[0])
    args = [jnp.asarray(a) for a in operands(jax_eq, sizes)]
    product = jax.jit(lambda a, b: jnp.einsum(jax_eq, a, b)).lower(*args).compile(options)
    runs = [lambda: product(*args).block_until_ready()] + ([torch_run] if torch_run else [])
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(FLAGS.rounds):
        for run, samples in zip(runs, times, strict=True):
            time_block(run, samples)
    medians = [float(np.median(t)) for t in times]
    return medians[0], (medians[1] if torch_run else None)


def products(size: Size, image_tokens: int, batch: int, torch
             ) -> list[tuple[str, str, str, Callable | None, dict[str, int], int]]:
    """(tower, product, jax einsum, torch product (None without torch), sizes, times per
    step) of the encoder blocks of a train step at `batch` pairs, both towers of `size`."""
    width, mlp, heads = size.width, size.mlp_dim, size.num_heads
    rows = []
    for tower, seq in (("image", image_tokens), ("text", TEXT_TOKENS)):
        tokens = batch * seq
        for layer, (i, o), per_block in (("q/k/v/out", (width, width), 4),
                                         ("fc1", (width, mlp), 1), ("fc2", (mlp, width), 1)):
            sizes = {"t": tokens, "i": i, "o": o}
            for name, jax_eq, torch_product in LINEAR:
                torch_run = None
                if torch is not None:
                    x, w, dy = (torch.from_numpy(a) for a in operands("ti,oi,to->", sizes))
                    torch_run = functools.partial(torch_product, x, w, dy)
                rows.append((tower, f"{layer} {name} ({tokens}×{i}→{o})", jax_eq, torch_run,
                             sizes, per_block * size.depth))
        sizes = {"b": batch, "n": heads, "q": seq, "k": seq, "h": width // heads}
        for name, equation in ATTENTION:
            torch_run = None
            if torch is not None:
                a, b = (torch.from_numpy(x) for x in operands(equation, sizes))
                torch_run = functools.partial(torch.einsum, equation, a, b)
            rows.append((tower, f"attention {name} ({batch}·{heads} × {seq}×{seq}×"
                         f"{width // heads})", equation, torch_run, sizes, 2 * size.depth))
    return rows


def flops(equation: str, sizes: dict[str, int]) -> float:
    letters = set(equation.replace(",", "").replace("->", ""))
    return 2.0 * float(np.prod([sizes[a] for a in letters]))


def main(argv: list[str]) -> None:
    del argv
    try:
        import torch
        torch.set_num_threads(os.cpu_count() or 1)
        torch_name = f"torch {torch.__version__}"
    except ImportError:
        torch, torch_name = None, "torch not installed"
    lines = [
        "`python experiments/cpu_matmul.py --variants=" + ",".join(FLAGS.variants)
        + f" --batch={FLAGS.batch} --steps={FLAGS.steps} --rounds={FLAGS.rounds}"
        + (f" --compile_options='{FLAGS.compile_options[0]}'"
           if FLAGS.compile_options[0] else "")
        + f"` — jax {jax.__version__} ({jax.devices()[0].device_kind}), {torch_name}, "
        f"{os.cpu_count()} host cores, float32", ""]
    print(lines[0], flush=True)
    for variant in FLAGS.variants:
        table = [f"### {variant} + {variant.split('/')[0]} text, batch {FLAGS.batch}", "",
                 "| tower | product | per step | XLA:CPU GFLOP/s | torch GFLOP/s | "
                 "XLA / torch speed |", "|---|---|---|---|---|---|"]
        print("\n".join(table), flush=True)
        totals = np.zeros(2)
        patch = int(variant.split("/")[1])
        rows = products(SIZES[variant.split("/")[0]], (224 // patch) ** 2 + 1, FLAGS.batch, torch)
        for tower, name, jax_eq, torch_run, sizes, count in rows:
            gflop = flops(jax_eq, sizes) / 1e9
            xla_ms, torch_ms = time_product(jax_eq, torch_run, sizes)
            totals += count * np.array([xla_ms, torch_ms or 0.0])
            cells = [f"{gflop / xla_ms * 1e3:.0f}", "–", "–"]
            if torch_ms is not None:
                cells[1:] = [f"{gflop / torch_ms * 1e3:.0f}", f"{torch_ms / xla_ms:.2f}×"]
            table.append(f"| {tower} | {name} | {count} | " + " | ".join(cells) + " |")
            print(table[-1], flush=True)
        summary = f"\nPer step, each product alone × its count: XLA:CPU {totals[0]:.0f} ms"
        if torch is not None:
            summary += f", torch {totals[1]:.0f} ms ({totals[1] / totals[0]:.2f}×)."
        table += [summary, ""]
        print(summary, flush=True)
        lines += table
    if FLAGS.output:
        with open(FLAGS.output, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    app.run(main)
