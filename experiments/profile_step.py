"""Where one train step's device time goes: traces `--steps` steps of the CLIP-shaped model of
`experiments/throughput.py` (its flags: first `--variants`, `--layouts` and
`--compile_options` entry, `--batch`, `--dtype`) with `jax.profiler` and prints the kernels
that take the most time, grouped into matmuls, fusions, copies and the rest.

    JAX_PLATFORMS=cuda,cpu python experiments/profile_step.py --variants=B/16 --batch=256 \\
        --dtype=bfloat16 --layouts=unrolled/none --profile_dir=/tmp/profile

Without `JAX_PLATFORMS` set it profiles the CPU (as `throughput.py` defaults), where host-side
events are summed too. The trace (`perfetto_trace.json.gz` under `--profile_dir`) opens in
ui.perfetto.dev.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
from absl import app, flags  # noqa: E402

from experiments import throughput  # noqa: E402

flags.DEFINE_string("profile_dir", "/tmp/flipjax_profile", "Where the trace goes.")
flags.DEFINE_integer("top", 25, "Kernels listed.")
FLAGS = flags.FLAGS

CATEGORIES = (("attention", ("sdpa", "flash", "fmha", "cudnn::fusion")),
              ("matmul", ("gemm", "nvjet", "xmma", "cutlass", "cublas", "matmul", "dot")),
              ("copy", ("memcpy", "memset", "copy", "transpose")),
              ("fusion", ("fusion",)))


def category(name: str) -> str:
    lower = name.lower()
    return next((c for c, keys in CATEGORIES if any(k in lower for k in keys)), "other")


def device_events(trace_path: str) -> list[dict]:
    """Complete events on device timelines (any process named like a GPU/TPU); on a CPU-only
    run, those of every process."""
    with gzip.open(trace_path, "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    names = {e["pid"]: e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    devices = {pid for pid, name in names.items() if "GPU" in name or "TPU" in name}
    # A GPU timeline also has "XLA Modules"/"XLA Ops" rows that span the kernels: keep the
    # streams' kernels only, so nothing is counted twice.
    streams = {(e["pid"], e["tid"]) for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"
               and e["pid"] in devices and e["args"]["name"].startswith("Stream")}
    return [e for e in events if e.get("ph") == "X" and "dur" in e
            and (not devices or e["pid"] in devices)
            and (not streams or (e["pid"], e["tid"]) in streams)]


def main(argv: list[str]) -> None:
    del argv
    variant, layout = FLAGS.variants[0], FLAGS.layouts[0]
    config = throughput.clip_shaped_config(variant, layout)
    run, _ = throughput.flipjax_stepper(config, throughput.random_batch(config),
                                        FLAGS.compile_options[0])
    run(2)  # warm-up
    with jax.profiler.trace(FLAGS.profile_dir, create_perfetto_trace=True):
        run(FLAGS.steps)
    trace_path = max(glob.glob(os.path.join(FLAGS.profile_dir, "**", "perfetto_trace.json.gz"),
                               recursive=True), key=os.path.getmtime)
    per_name: collections.Counter = collections.Counter()
    for e in device_events(trace_path):
        per_name[e["name"]] += e["dur"] / FLAGS.steps
    total = sum(per_name.values())
    per_category: collections.Counter = collections.Counter()
    for name, us in per_name.items():
        per_category[category(name)] += us
    options = f" `{FLAGS.compile_options[0]}`" if FLAGS.compile_options[0] else ""
    print(f"{variant} {layout}{options}, batch {FLAGS.batch}, {FLAGS.dtype}: "
          f"{total / 1e3:.1f} ms of device kernels per step ({trace_path})")
    for name, us in per_category.most_common():
        print(f"  {name:8s} {us / 1e3:8.1f} ms  {100 * us / total:5.1f}%")
    print(f"top {FLAGS.top} kernels (ms per step):")
    for name, us in per_name.most_common(FLAGS.top):
        print(f"  {us / 1e3:8.2f}  {category(name):7s} {name[:110]}")


if __name__ == "__main__":
    app.run(main)
