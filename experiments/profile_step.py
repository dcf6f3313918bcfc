"""Where one train step's device time goes: traces `--steps` steps of the CLIP-shaped model of
`experiments/throughput.py` (its flags: first `--variants`, `--layouts`, `--gelus` and
`--compile_options` entry, `--batch`, `--dtype`) with `jax.profiler` and prints the kernels
that take the most time, grouped into attention, matmuls, fusions, copies and the rest.

    JAX_PLATFORMS=cuda,cpu python experiments/profile_step.py --variants=B/16 --batch=256 \\
        --dtype=bfloat16 --layouts=unrolled/none --profile_dir=/tmp/profile

Without `JAX_PLATFORMS` set it profiles the CPU (as `throughput.py` defaults); there XLA names
each kernel after its HLO instruction, so the script also reads from the compiled step's HLO
the FLOPs of the matmuls each kernel runs (a dot's own, a fusion's summed over its body) and
prints their speed, grouped by matmul shape. XLA:CPU traces its kernels only with
`--xla_cpu_enable_xprof_traceme=true`:

    XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true python experiments/profile_step.py \\
        --variants=S/16 --batch=8 --steps=2

XLA runs independent kernels on the CPU's cores at once, so kernel times sum to more than the
step, and a kernel that shares the cores looks slower than it is alone. A dot that XLA:CPU runs
asynchronously (Eigen) is timed from its start event to its "end: " event. On a GPU, the
matmuls and attention are named by the libraries that run them (cuBLAS, cuDNN), so no FLOPs
are read for them; XLA's own kernels (fusions, transposes) are named after an HLO
instruction with "." and "-" written "_" (one kernel XLA shares among identical fusions
counts them all under one name), listed with that instruction's output shapes. The trace
(`perfetto_trace.json.gz` under `--profile_dir`) opens in ui.perfetto.dev, and the compiled
step's HLO (`train_step.hlo.txt` beside it) says what each named kernel computes.
"""

from __future__ import annotations

import collections
import functools
import glob
import gzip
import json
import math
import os
import re
import sys
from typing import TypeVar

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
from absl import app, flags  # noqa: E402

from experiments import throughput  # noqa: E402

flags.DEFINE_string("profile_dir", "/tmp/flipjax_profile", "Where the trace goes.")
flags.DEFINE_integer("top", 25, "Kernels listed.")
FLAGS = flags.FLAGS
T = TypeVar("T")

CATEGORIES = (("attention", ("sdpa", "flash", "fmha", "cudnn::fusion")),
              ("matmul", ("gemm", "nvjet", "xmma", "cutlass", "cublas", "matmul", "dot")),
              ("copy", ("memcpy", "memset", "copy", "transpose")),
              ("fusion", ("fusion",)))

# One HLO instruction of `Compiled.as_text()`: name, shape (an array's or a tuple's), opcode,
# and the rest of the line ("operands), attributes").
HLO_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.+?) ([\w-]+)\((.*)$")
HLO_COMPUTATION = re.compile(r"^(?:ENTRY )?%(\S+) .*\{$")


def category(name: str, flops: float = 0.0) -> str:
    lower = name.lower()
    by_name = next((c for c, keys in CATEGORIES if any(k in lower for k in keys)), "other")
    return "matmul" if flops and by_name != "attention" else by_name


def dims(text: str) -> list[int]:
    return [int(d) for d in text.split(",") if d]


def array_dims(shape: str) -> list[int]:
    """The dims of an HLO shape's (first) array: "bf16[8,197]{1,0}" -> [8, 197]."""
    return dims(re.search(r"\[([\d,]*)\]", shape).group(1))


def hlo_computations(hlo_text: str) -> dict[str, list[tuple[str, ...]]]:
    """Each computation of `Compiled.as_text()` and its instructions, as (name, shape, opcode,
    "operands), attributes")."""
    computations: dict[str, list[tuple[str, ...]]] = {}
    body: list[tuple[str, ...]] = []
    for line in hlo_text.splitlines():
        if match := HLO_COMPUTATION.match(line):
            body = computations.setdefault(match.group(1), [])
        elif match := HLO_INSTRUCTION.match(line):
            body.append(match.groups())
    return computations


def matmul_flops(computations: dict[str, list[tuple[str, ...]]]) -> dict[str, tuple[float, str]]:
    """For every HLO instruction that runs matmuls: their FLOPs (2 x output size x contracted
    size, per dot, summed over the computations a fusion calls) and shapes, "lhs x rhs"."""
    own: dict[str, tuple[float, str]] = {}
    callees: dict[str, list[str]] = {}
    for instructions in computations.values():
        shapes = {name: shape for name, shape, *_ in instructions}
        for name, shape, opcode, rest in instructions:
            operands, attributes = rest.split(")", 1)
            callees[name] = re.findall(r"calls=%([\w.\-]+)", attributes)
            if opcode == "dot":
                lhs, rhs = (array_dims(shapes[o.strip().lstrip("%")])
                            for o in operands.split(","))
                contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", attributes)
                k = math.prod(lhs[d] for d in dims(contracting.group(1)))
                own[name] = (2.0 * math.prod(array_dims(shape)) * k, f"{lhs}x{rhs}")

    @functools.cache
    def total(name: str) -> tuple[float, str]:
        parts = [own.get(name, (0.0, ""))] + [total(instruction[0]) for callee in callees[name]
                                              for instruction in computations[callee]]
        return sum(f for f, _ in parts), " + ".join(s for f, s in parts if f)

    return {name: total(name) for name in callees if total(name)[0]}


def by_kernel_name(per_instruction: dict[str, T]) -> dict[str, T]:
    """`per_instruction` also keyed by the names kernels have in a GPU trace: XLA:GPU names the
    kernel of HLO instruction `input_add_reduce_fusion.25` `input_add_reduce_fusion_25`, its
    other characters outside [A-Za-z0-9_] also "_" (XLA:CPU keeps the HLO name)."""
    return {re.sub(r"[^A-Za-z0-9_]", "_", name): value
            for name, value in per_instruction.items()} | per_instruction


def device_events(trace_path: str, kernel_names: set[str]) -> list[dict]:
    """Complete events on device timelines (any process named like a GPU/TPU); on a CPU-only
    run, those named after an HLO instruction of the step (`kernel_names`): the host's Python
    and runtime frames that enclose them would count their time twice. An asynchronous dot's
    event spans from its start to its "end: " event."""
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
    complete = sorted((e for e in events if e.get("ph") == "X" and "dur" in e),
                      key=lambda e: e["ts"])
    if devices:
        return [e for e in complete if e["pid"] in devices
                and (not streams or (e["pid"], e["tid"]) in streams)]
    kernels, started = [], {}
    for e in complete:
        name = e["name"]
        if name.startswith("end: ") and name[5:] in started:
            start = started.pop(name[5:])
            start["dur"] = e["ts"] + e["dur"] - start["ts"]
        elif name in kernel_names:
            started[name] = e = dict(e)
            kernels.append(e)
    return kernels


def main(argv: list[str]) -> None:
    del argv
    variant, layout = FLAGS.variants[0], FLAGS.layouts[0]
    config = throughput.clip_shaped_config(variant, layout, FLAGS.gelus[0])
    run, _, compiled = throughput.flipjax_stepper(config, throughput.random_batch(config),
                                                  FLAGS.compile_options[0])
    hlo_text = compiled.as_text()
    os.makedirs(FLAGS.profile_dir, exist_ok=True)
    hlo_path = os.path.join(FLAGS.profile_dir, "train_step.hlo.txt")
    with open(hlo_path, "w") as f:
        f.write(hlo_text)
    computations = hlo_computations(hlo_text)
    output_shapes = by_kernel_name(
        {name: shape for body in computations.values() for name, shape, *_ in body})
    kernel_names = set(output_shapes)
    flops = by_kernel_name(matmul_flops(computations))
    run(2)  # warm-up
    with jax.profiler.trace(FLAGS.profile_dir, create_perfetto_trace=True):
        run(FLAGS.steps)
    trace_path = max(glob.glob(os.path.join(FLAGS.profile_dir, "**", "perfetto_trace.json.gz"),
                               recursive=True), key=os.path.getmtime)
    per_name: collections.Counter = collections.Counter()
    for e in device_events(trace_path, kernel_names):
        per_name[e["name"]] += e["dur"] / FLAGS.steps
    total = sum(per_name.values())
    if not total:
        raise SystemExit(f"no kernels in {trace_path}; on the CPU set XLA_FLAGS="
                         "--xla_cpu_enable_xprof_traceme=true")
    per_category: collections.Counter = collections.Counter()
    per_shape: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0, 0])
    for name, us in per_name.items():
        kernel_flops, shapes = flops.get(name, (0.0, ""))
        per_category[category(name, kernel_flops)] += us
        if kernel_flops:
            row = per_shape[shapes]
            row[0], row[1], row[2] = row[0] + us, row[1] + kernel_flops, row[2] + 1
    options = f" `{FLAGS.compile_options[0]}`" if FLAGS.compile_options[0] else ""
    print(f"{variant} {layout} {FLAGS.gelus[0]} GELU{options}, batch {FLAGS.batch}, {FLAGS.dtype}: "
          f"{total / 1e3:.1f} ms of device kernels per step ({trace_path})")
    for name, us in per_category.most_common():
        print(f"  {name:9s} {us / 1e3:8.1f} ms  {100 * us / total:5.1f}%")
    if per_shape:
        us, flop = sum(r[0] for r in per_shape.values()), sum(r[1] for r in per_shape.values())
        print(f"kernels with matmuls: {us / 1e3:.1f} ms per step at {flop / us / 1e3:.1f} "
              "GFLOP/s; by matmul shape (lhs x rhs), slowest first:")
        for shapes, (us, flop, count) in sorted(per_shape.items(),
                                                key=lambda kv: kv[1][1] / kv[1][0]):
            print(f"  {us / 1e3:8.1f} ms  {flop / us / 1e3:6.1f} GFLOP/s  {count:3d} kernels  "
                  f"{shapes[:100]}")
    print(f"top {FLAGS.top} kernels (ms per step; an XLA kernel's output shape from the "
          f"compiled step's HLO, {hlo_path}):")
    for name, us in per_name.most_common(FLAGS.top):
        kernel_flops, _ = flops.get(name, (0.0, ""))
        speed = f"{kernel_flops / us / 1e3:6.1f} GFLOP/s" if kernel_flops else " " * 14
        shape = f"  {output_shapes[name]}" if name in output_shapes else ""
        print(f"  {us / 1e3:8.2f}  {category(name, kernel_flops):9s} {speed}  {name[:100]}{shape}")


if __name__ == "__main__":
    app.run(main)
