"""The layout transposes XLA:GPU puts into the train step, found without a GPU: compiles the
CLIP-shaped step of `experiments/throughput.py` (its flags: `--variants`, `--batch`, `--dtype`,
`--layouts`, `--gelus`, `--compile_options`, the first of each) for an H100 by JAX's deviceless
ahead-of-time compilation (`jax.experimental.topologies`), then lists the step's kernels that
transpose an array, with the bytes they write and the JAX operations they come from. It also
prints the step's XLA scratch memory and the bytes that its memory-bound kernels (all but
cuBLAS's matmuls and cuDNN's attention) read and write: at the H100's ~3 TB/s, a floor on
their time; and the bytes of all kernels, which also count what matmuls read in place of a
fusion (an add folded into a matmul reads its addend there).

Why: on an H100, B/16 spent 28 of its 199 ms per step in such transposes
(`experiments/results/throughput_h100.md`), which no CPU test shows and GPU time is scarce.
This is how their cause (the position embeddings' gradient, see
`flipjax.models.layers.add_position_embedding`) was found, and how a change can be checked for
new ones before it reaches a GPU.

It needs JAX's CUDA plugin of the installed jax's version, which installs and compiles without
a GPU or CUDA (about 400 MB; never in CI):

    pip install jax-cuda13-plugin==JAX_VERSION jax-cuda13-pjrt==JAX_VERSION
    JAX_PLATFORMS=cpu python experiments/gpu_layouts.py --variants=B/16 --batch=512 \\
        --dtype=bfloat16 --layouts=unrolled/none/cudnn --gelus=tanh

Without a GPU nothing is autotuned: every matmul goes to cuBLAS
(`xla_gpu_enable_triton_gemm=false`), as the H100's autotuner chose for this step's matmuls
(its profile shows cuBLAS kernels only), and cuDNN's fused attention is lowered without asking
the absent cuDNN library its version. Kernel names differ from a GPU build's; shapes and
operations do not.
"""

from __future__ import annotations

import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax._src.cudnn.fused_attention_stablehlo as cudnn_attention_lowering  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from jax.experimental import topologies  # noqa: E402

from experiments import throughput  # noqa: E402
from experiments.profile_step import hlo_computations  # noqa: E402 (and its --top flag)
from flipjax.train.sharding import make_mesh  # noqa: E402
from flipjax.train.step import TrainSetup  # noqa: E402

flags.DEFINE_string("hlo_out", None, "Also write the compiled step's HLO to this file.")
FLAGS = flags.FLAGS

# XLA's description of an H100 SXM (80 GB HBM3) for compiling without one: what the GPU
# backend reads from a device (the CUDA runtime and cuDNN versions: those of JAX's CUDA 13
# wheels).
H100_TARGET = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132
  fpus_per_core: 128 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: 3352320000000 l2_cache_size: 52428800
  clock_rate_ghz: 1.98 device_memory_size: 84929347584 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 } registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 10 }
runtime_version { major: 13 minor: 0 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""
CUDNN_VERSION = 91000

BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4}
Computations = dict[str, list[tuple[str, ...]]]


def compile_for_h100() -> jax.stages.Compiled:
    """The flags' train step, compiled for one H100."""
    # cuDNN attention checks the local cuDNN and GPU before lowering; there are none here.
    cudnn_attention_lowering.check_cudnn_version = lambda: CUDNN_VERSION
    cudnn_attention_lowering.check_compute_capability = lambda *_: True
    topology = topologies.get_topology_desc(platform="cuda", target_config=H100_TARGET,
                                            topology="1x1x1")
    config = throughput.clip_shaped_config(FLAGS.variants[0], FLAGS.layouts[0], FLAGS.gelus[0])
    setup = TrainSetup(config, throughput.VOCAB, make_mesh(config.mesh, topology.devices))
    batch = {name: jax.ShapeDtypeStruct(array.shape, array.dtype, sharding=setup.batch_sharding)
             for name, array in throughput.random_batch(config).items()}
    lowered = setup.train_step.lower(setup.abstract_state, batch)
    options = {"xla_gpu_enable_triton_gemm": False,
               **throughput.parse_compile_options(FLAGS.compile_options[0])}
    return lowered.compile(options)


def written_bytes(shape: str) -> int:
    """Bytes of an HLO shape (an array or a tuple of them)."""
    return sum(BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d]))
               for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", shape) if dtype in BYTES)


def launching(computations: Computations) -> set[str]:
    """The computations whose instructions launch kernels: the entry computation and the
    command buffers', conditionals' and loops' bodies, not the fusions' bodies."""
    fused = {callee for body in computations.values() for _, _, opcode, rest in body
             if opcode == "fusion" for callee in re.findall(r"calls=%([\w.\-]+)", rest)}
    return set(computations) - fused


def kernel_bytes(computations: Computations, libraries: bool = False) -> int:
    """Bytes read and written by the step's kernels, each fusion or lone operation's operands
    and outputs: the memory-bound ones only, or with `libraries` also cuBLAS's matmuls and
    cuDNN's attention (custom calls; not their byte-typed workspace outputs, scratch that
    they need not fill)."""
    free = {"parameter", "get-tuple-element", "bitcast", "tuple", "constant", "call",
            "conditional", "while"}
    if not libraries:
        free.add("custom-call")
    total = 0
    for name in launching(computations):
        shapes = {instruction: shape for instruction, shape, *_ in computations[name]}
        for _, shape, opcode, rest in computations[name]:
            if opcode not in free:
                if opcode == "custom-call":
                    shape = re.sub(r"[su]8\[\d+\]", "", shape)
                operands = re.findall(r"%([\w.\-]+)", rest.split(")", 1)[0])
                total += written_bytes(shape) + sum(written_bytes(shapes.get(o, ""))
                                                    for o in operands)
    return total


def transposing_kernels(computations: Computations) -> list[tuple[int, str, str]]:
    """(bytes written, kernel, JAX operation) of every kernel that transposes: a fusion whose
    body holds a transpose, or a lone transpose."""
    kernels = []
    for name in launching(computations):
        for instruction, shape, opcode, rest in computations[name]:
            callee = re.search(r"calls=%([\w.\-]+)", rest) if opcode == "fusion" else None
            inner = computations[callee.group(1)] if callee else []
            transposes = [r for *_, op, r in inner if op == "transpose"]
            if opcode == "transpose" or transposes:
                op_name = re.search(r'op_name="([^"]*)"', (transposes or [rest])[0])
                kernels.append((written_bytes(shape), instruction,
                                op_name.group(1) if op_name else "?"))
    return sorted(kernels, reverse=True)


def main(argv: list[str]) -> None:
    del argv
    compiled = compile_for_h100()
    hlo_text = compiled.as_text()
    if FLAGS.hlo_out:
        with open(FLAGS.hlo_out, "w") as f:
            f.write(hlo_text)
    computations = hlo_computations(hlo_text)
    kernels = transposing_kernels(computations)
    print(f"{FLAGS.variants[0]} {FLAGS.layouts[0]} {FLAGS.gelus[0]} GELU, batch {FLAGS.batch}, "
          f"{FLAGS.dtype}, jax {jax.__version__}: {len(kernels)} transposing kernels writing "
          f"{sum(b for b, *_ in kernels) / 1e9:.2f} GB per step; XLA scratch "
          f"{compiled.memory_analysis().temp_size_in_bytes / 2**30:.2f} GiB; memory-bound "
          f"kernels read and write {kernel_bytes(computations) / 1e9:.1f} GB per step, all "
          f"kernels {kernel_bytes(computations, libraries=True) / 1e9:.1f} GB")
    for size, name, op_name in kernels[:FLAGS.top]:
        print(f"  {size / 1e6:8.1f} MB  {name[:40]:40s}  {op_name[-70:]}")


if __name__ == "__main__":
    app.run(main)
