"""Does a config's train step fit a TPU pod's chips? Compiles it for a TPU topology without a
TPU (JAX's deviceless ahead-of-time compilation, as MaxText's `train_compile.py` does) and
prints, per mesh and loss, XLA's memory analysis per chip against the chip's HBM.

Why: the README's pod settings (`configs/base.py` on a v5e-256 at batch 32k) cannot be run
here, and a config that does not fit fails only after a pod is allocated. The compile is the
one a pod runs: the model gets the TPU forms of its layers (`make_model` reads the platform
from the mesh's devices), and the partitioner lays the program out for every chip.

It needs `libtpu` of the version the installed jax names (`pip install "jax[tpu]"` resolves
it; about 140 MB, never in CI); no TPU, and a CPU host is enough:

    JAX_PLATFORMS=cpu python experiments/tpu_compile.py --topologies=v5e:16x16 \\
        --config=configs/base.py:batch=32768 --losses=sigmoid,softmax \\
        --meshes="data=-1 fsdp=1","data=16 fsdp=16"

(`experiments/results/tpu_compile.md` collects the tables of several such commands.)

`--config` takes overrides as `flipjax.main` does (`--config.model.remat=full`). "total" is
what the step needs on one chip at once: scratch (temp) + arguments (train state and batch
shard) + outputs that do not reuse an argument's buffer. Nothing is executed, so the step
time is not known from this; XLA's FLOP count is left out because it counts a scanned
layer's loop body once.
"""

from __future__ import annotations

import itertools
import os
import shlex
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# libtpu looks for a TPU VM's metadata; on another host it needs these to initialise.
os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from flipjax.train.sharding import TENSOR_PARALLEL_RULES, make_mesh  # noqa: E402
from flipjax.train.step import TrainSetup  # noqa: E402

config_flags.DEFINE_config_file("config", "configs/base.py:batch=32768", "Training config.",
                                lock_config=False)
flags.DEFINE_list("topologies", ["v5e:16x16"], "TPU topologies, as jax names them.")
flags.DEFINE_list("losses", ["sigmoid", "softmax"], "config.loss of each row.")
flags.DEFINE_list("meshes", ["data=-1 fsdp=1"], "config.mesh of each row: 'AXIS=SIZE ...'.")
flags.DEFINE_bool("tensor_parallel", False, "Put TENSOR_PARALLEL_RULES before the config's "
                  "sharding rules (for meshes with a tensor axis).")
flags.DEFINE_string("output", None, "Also write the table to this markdown file.")
FLAGS = flags.FLAGS

GIB = 2**30
# HBM per chip by `device_kind`, from Google Cloud's TPU pages.
HBM_GIB = {"TPU v4": 32, "TPU v5 lite": 16, "TPU v5": 95, "TPU v5p": 95, "TPU v6 lite": 32}


def parse_mesh(text: str) -> tuple[tuple[str, int], ...]:
    """'data=-1 fsdp=1' -> (("data", -1), ("fsdp", 1))."""
    return tuple((axis, int(size)) for axis, size in (item.split("=") for item in text.split()))


def compile_step(config, devices: list) -> tuple[jax.stages.Compiled, float]:
    """The config's train step compiled for `devices` (a topology's), and its compile seconds."""
    setup = TrainSetup(config, config.tokenizer.vocab_size, make_mesh(config.mesh, devices))
    start = time.perf_counter()
    compiled = setup.train_step.lower(setup.abstract_state, setup.abstract_batch).compile()
    return compiled, time.perf_counter() - start


def main(argv: list[str]) -> None:
    del argv
    config = FLAGS.config
    if FLAGS.tensor_parallel:
        config.sharding_rules = TENSOR_PARALLEL_RULES + tuple(config.sharding_rules)
    lines = [
        f"`python experiments/tpu_compile.py {shlex.join(sys.argv[1:])}` — jax {jax.__version__}, "
        f"compiled without a TPU; {config.model.image.variant} + {config.model.text.variant} "
        f"text, {config.data.image_size} px, global batch {config.data.global_batch_size}, "
        f"{config.model.dtype}, remat {config.model.remat!r}, scan_layers "
        f"{config.model.scan_layers}, loss_impl {config.loss_impl!r}, Adam mu "
        f"{config.optim.mu_dtype}"
        + (", Megatron rules for the tensor axis" if FLAGS.tensor_parallel else "")
        + ". GiB per chip.", "",
        "| topology | chips | mesh | loss | pairs per chip | compile s | temp | arguments "
        "| outputs (not aliased) | total | HBM | fits |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for name, mesh, loss in itertools.product(FLAGS.topologies, FLAGS.meshes, FLAGS.losses):
        devices = topologies.get_topology_desc(name, "tpu").devices
        config.mesh, config.loss = parse_mesh(mesh), loss
        compiled, seconds = compile_step(config, devices)
        stats = compiled.memory_analysis()
        outputs = stats.output_size_in_bytes - stats.alias_size_in_bytes
        total = stats.temp_size_in_bytes + stats.argument_size_in_bytes + outputs
        kind = devices[0].device_kind
        hbm = HBM_GIB.get(kind)
        lines.append(
            f"| {name} ({kind}) | {len(devices)} | {mesh} | {loss} | "
            f"{config.data.global_batch_size // len(devices)} | {seconds:.0f} | "
            f"{stats.temp_size_in_bytes / GIB:.2f} | {stats.argument_size_in_bytes / GIB:.2f} | "
            f"{outputs / GIB:.2f} | {total / GIB:.2f} | {hbm if hbm else '?'} | "
            f"{'?' if hbm is None else 'yes' if total < hbm * GIB else 'no'} |")
        print(lines[-1], flush=True)
    if FLAGS.output:
        with open(FLAGS.output, "w") as f:
            f.write("# The train step compiled for TPU pods without a TPU\n\n"
                    + "\n".join(lines) + "\n")


if __name__ == "__main__":
    app.run(main)
