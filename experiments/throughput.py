"""Train-step throughput of flipjax and open_clip on one machine, in the same run: model FLOPs
per image-text pair from XLA's cost analysis, pairs/s, MFU against a stated peak, and
flipjax / open_clip.

Both train the same CLIP-shaped architecture at 224 px: ViT with a class token and pre-LN,
exact GELU, a causal text tower of the image tower's width pooled at EOS, 64 tokens, a 32k
vocabulary, bias-free projections to the tower width, softmax InfoNCE, AdamW with global-norm
clipping and float32 moments. flipjax runs its real jitted train step (`TrainSetup`) in each
`--layouts` entry (`layers/remat`: unrolled or scan, and a `config.model.remat` policy);
open_clip runs `open_clip.model.CLIP` +
`open_clip.loss.ClipLoss` + `torch.optim.AdamW` eagerly, as open_clip's training loop does
(with `--dtype=bfloat16`: float32 weights under `torch.autocast(bfloat16)`, open_clip's
`--precision amp_bf16`; flipjax: `model.dtype="bfloat16"`, float32 master weights).

open_clip needs torchvision, so on the CPU run this in a separate venv (never in CI); its
Python picks the jax: 3.12 or later gets jax 0.12, 3.11 jax 0.10.2, and on the CPU the two
differ (`experiments/results/throughput.md` has both; `python3.11` gives the other):

    python3.12 -m venv /tmp/oc && /tmp/oc/bin/pip install torch==2.14.1 torchvision==0.29.1 \
        open-clip-torch -e .
    /tmp/oc/bin/python experiments/throughput.py --variants=S/16,B/16 --batch=8 --steps=3 \
        --peak_gflops=156.5

On a GPU (JAX and torch both on the GPU; H100/H200 dense bf16 peak 989 TFLOP/s):

    XLA_PYTHON_CLIENT_MEM_FRACTION=0.5 JAX_PLATFORMS=cuda,cpu python experiments/throughput.py \
        --dtype=bfloat16 --batch=256 --steps=10 --rounds=1 --peak_gflops=989000 \
        --layouts=unrolled/none,scan/dots

(half the GPU memory for JAX, the rest for torch: by default JAX takes 75% up front).

The same script, without open_clip, gives the table of `experiments/results/compile_time.md`
(trace and XLA compile seconds and XLA's scratch memory of each layout):

    python experiments/throughput.py --variants=B/16 --batch=8 --steps=3 --rounds=1 \
        --layouts=unrolled/none,scan/none,unrolled/dots,scan/dots,unrolled/full,scan/full

Step times are medians over `--rounds` blocks of the mean time of `--steps` steps (each block
after an untimed step; on an accelerator a block's steps are dispatched back to back, on the
CPU each is waited for), each flipjax layout's blocks taken in turns with open_clip's, so a
drifting machine slows both alike; "/ open_clip" divides the two medians of those same rounds,
and the open_clip row gives the median of its medians over all layouts. Without open_clip
installed that row is left out and "/ open_clip" reads "–". MFU uses model FLOPs (no remat
recompute but the MLP's GELU, which every layout recomputes: elementwise, 0.6% of S/16's count)
of the unrolled step, read from XLA's cost analysis of the lowered step (a scanned
body would be counted once), for every row, since the architectures are the same. These are
the FLOPs the model needs: flipjax's unrolled layers run each tower's last block for the
pooled token alone (`flipjax.models.layers.Encoder`), while open_clip, and flipjax's scanned
layers, run it for every token: 7% more FLOPs than their rows count (per pair, S/16: 36.5
against 34.0 GFLOPs, B/16: 139.7 against 130.1).

On the CPU the process runs with glibc malloc keeping freed memory
(`flipjax/train/host_memory.py`, what `config.keep_freed_host_memory` does for CPU training):
otherwise XLA:CPU page-faults its whole scratch buffer back in on every step.
"""

from __future__ import annotations

import itertools
import os
import sys
import time
from collections.abc import Callable

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flipjax.train.host_memory import keep_freed_host_memory  # noqa: E402

# As configs do for CPU runs (`keep_freed_host_memory`), before numpy, torch or JAX start
# threads; both frameworks run under it.
KEPT_HOST_MEMORY = (os.environ["JAX_PLATFORMS"].startswith("cpu")
                    and keep_freed_host_memory())

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from configs.base import get_config  # noqa: E402
from flipjax.data.pipeline import to_global  # noqa: E402
from flipjax.models.variants import SIZES  # noqa: E402
from flipjax.train.sharding import make_mesh  # noqa: E402
from flipjax.train.step import TrainSetup  # noqa: E402

flags.DEFINE_list("variants", ["S/16", "B/16"], "Image tower variants (text tower: same size).")
flags.DEFINE_integer("batch", 8, "Global batch (pairs) per step, for both.")
flags.DEFINE_integer("steps", 5, "Timed steps per block, after one untimed step.")
flags.DEFINE_integer("rounds", 2, "Blocks of each implementation, taken in turns.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype of both.")
flags.DEFINE_list("layouts", ["unrolled/none"], "flipjax rows: layers/remat[/attention].")
flags.DEFINE_list(
    "gelus", ["exact"],
    "GELU flavours of the flipjax rows (`flipjax.models.layers.GELU_FLAVOURS`): open_clip's "
    "is exact, so only exact rows are paired with it; configs/base.py's is tanh.")
flags.DEFINE_multi_string(
    "compile_options", [""],
    "XLA option sets to compile each flipjax layout with, one row each: space-separated "
    "name=value pairs of XLA's debug options (the XLA_FLAGS names without the dashes), '' for "
    "the defaults.")
flags.DEFINE_bool("open_clip", True, "Time open_clip too (where it is installed).")
flags.DEFINE_float("peak_gflops", 156.5, "Peak GFLOP/s of this machine in --dtype, for MFU.")
flags.DEFINE_string("output", None, "Also write the table (markdown) to this file.")
FLAGS = flags.FLAGS

VOCAB = 32_000


def clip_shaped_config(variant: str, layout: str = "unrolled/none", gelu: str = "exact"
                       ) -> ml_collections.ConfigDict:
    """configs/base.py with open_clip's CLIP architecture, so both sides train the same model,
    in one `--layouts` entry: `layers/remat`, optionally `/attention` (a kernel of
    `flipjax.models.layers.ATTENTION_IMPLEMENTATIONS`, or "auto", the default). `gelu` other
    than open_clip's "exact" departs from that architecture by its activation alone."""
    layers, remat, *attention = layout.split("/")
    config = get_config(f"batch={FLAGS.batch}")
    config.mesh, config.loss_impl, config.loss = [("data", 1)], "global", "softmax"
    width = SIZES[variant.split("/")[0]].width
    model = config.model
    model.update(dtype=FLAGS.dtype, gelu=gelu, ln_eps=1e-5, bias_init=None,
                 scan_layers=layers == "scan", remat=remat,
                 attention=attention[0] if attention else "auto")
    model.image.update(variant=variant, pool="tok", pre_norm=True, proj_dim=width,
                       proj_bias=False)
    model.text.update(variant=variant.split("/")[0], pool="eos", causal=True, proj_dim=width,
                      proj_bias=False)
    config.optim.mu_dtype = None  # float32 Adam moments, as torch.optim.AdamW keeps
    config.tokenizer.vocab_size = VOCAB
    return config


def random_batch(config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    r, n = config.data.image_size, config.model.text.max_len
    text = rng.integers(3, VOCAB, (FLAGS.batch, n)).astype(np.int32)
    text[:, n // 2] = 1  # an EOS mid-caption
    return {"image": rng.integers(0, 256, (FLAGS.batch, r, r, 3), dtype=np.uint8), "text": text}


def median_step_times(steppers: list[Callable[[int], None]]) -> list[float]:
    """Seconds per step of each stepper (a callable that runs n steps and waits for the last):
    the median over rounds of a block's mean. Each runs in blocks of one untimed step and
    `--steps` timed ones, the blocks taken in turns for `--rounds` rounds: a machine whose
    speed drifts (a shared VM) slows every implementation alike, and no timed step directly
    follows the other framework's, whose threads and memory may still be settling (alternated
    one by one, flipjax's steps ran 20% slower here)."""
    times: list[list[float]] = [[] for _ in steppers]
    for _ in range(FLAGS.rounds):
        for run, seconds in zip(steppers, times, strict=True):
            run(1)
            t0 = time.perf_counter()
            run(FLAGS.steps)
            seconds.append((time.perf_counter() - t0) / FLAGS.steps)
    return [float(np.median(t)) for t in times]


def model_flops(variant: str, batch: dict) -> float:
    """FLOPs of one train step of the unrolled, remat-free model, from XLA's cost analysis of
    the step lowered for one CPU device: the GPU backend has no cost analysis of a lowered
    step, and its compiled one leaves out the cuBLAS matmuls (run with JAX_PLATFORMS=cuda,cpu
    there)."""
    # "dot": cuDNN's kernel has no CPU lowering, nor a cost analysis.
    config = clip_shaped_config(variant, "unrolled/none/dot")
    setup = TrainSetup(config, VOCAB, make_mesh(config.mesh, jax.devices("cpu")[:1]))
    lowered = setup.train_step.lower(jax.eval_shape(setup.init),
                                     to_global(batch, setup.batch_sharding))
    return lowered.cost_analysis()["flops"]


def parse_compile_options(text: str) -> dict[str, str | bool]:
    """XLA options from "name=value name=value": XLA takes booleans only as Python bools, every
    other value as text."""
    options = dict(option.split("=", 1) for option in text.split())
    return {name: {"true": True, "false": False}.get(value.lower(), value)
            for name, value in options.items()}


def flipjax_stepper(config: ml_collections.ConfigDict, batch: dict, compile_options: str = ""
                    ) -> tuple[Callable[[int], None], dict[str, float], jax.stages.Compiled]:
    """A callable that runs n flipjax train steps, the step's lower and compile seconds and
    XLA scratch memory, and the compiled step (its HLO names the profiled kernels).
    `compile_options`: XLA options, as `--compile_options` gives them."""
    setup = TrainSetup(config, VOCAB, make_mesh(config.mesh))
    batch = to_global(batch, setup.batch_sharding)
    state = setup.init()
    t0 = time.perf_counter()
    lowered = setup.train_step.lower(state, batch)
    t1 = time.perf_counter()
    compiled = lowered.compile(parse_compile_options(compile_options))
    t2 = time.perf_counter()

    # On an accelerator, steps are dispatched back to back, as the training loop does: waiting
    # for each would leave the device idle while the host dispatches the next. On the CPU the
    # host is the device, and a few steps dispatched back to back measured the heap's growth,
    # not training: each step allocates while the previous one's buffers are alive, and the
    # first five such S/16 steps (batch 8, 2 cores) ran up to 1.7x slower than later ones,
    # which run as fast as steps waited for one by one.
    wait_each = jax.default_backend() == "cpu"

    def run(steps: int) -> None:
        nonlocal state
        for _ in range(steps):
            state, _ = compiled(state, batch)
            if wait_each:
                jax.block_until_ready(state)
        # The lifetime count: a skipped update is cheaper, so not a fair time.
        if int(state["nonfinite_steps"]):
            raise FloatingPointError(f"{config.model.image.variant}: non-finite train step")

    return run, {"lower_s": t1 - t0, "compile_s": t2 - t1,
                  "temp_gib": compiled.memory_analysis().temp_size_in_bytes / 2**30}, compiled


def open_clip_stepper(config: ml_collections.ConfigDict, batch: dict
                      ) -> Callable[[int], None] | None:
    """A callable that runs n open_clip train steps on the same architecture and batch, or
    None without open_clip (or with --noopen_clip)."""
    if not FLAGS.open_clip:
        return None
    try:
        import torch
        from open_clip.loss import ClipLoss
        from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    except ImportError:
        return None
    device = "cuda" if jax.default_backend() == "gpu" else "cpu"
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    image, text = config.model.image, config.model.text
    img_size, txt_size = SIZES[image.variant.split("/")[0]], SIZES[text.variant]
    patch = int(image.variant.split("/")[1])
    model = CLIP(
        embed_dim=image.proj_dim,
        vision_cfg=CLIPVisionCfg(layers=img_size.depth, width=img_size.width,
                                 head_width=img_size.width // img_size.num_heads,
                                 mlp_ratio=img_size.mlp_dim / img_size.width, patch_size=patch,
                                 image_size=image.image_size),
        text_cfg=CLIPTextCfg(context_length=text.max_len, vocab_size=VOCAB,
                             width=txt_size.width, heads=txt_size.num_heads,
                             layers=txt_size.depth, mlp_ratio=txt_size.mlp_dim / txt_size.width),
    ).to(device).train()
    optim = config.optim
    opt = torch.optim.AdamW(model.parameters(), lr=optim.lr, betas=(optim.b1, optim.b2),
                            eps=optim.eps, weight_decay=optim.weight_decay)
    loss_fn = ClipLoss()
    mean = torch.tensor(config.data.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(config.data.std, device=device).view(1, 3, 1, 1)
    pixels = torch.from_numpy(batch["image"]).permute(0, 3, 1, 2).contiguous().to(device)
    ids = torch.from_numpy(batch["text"]).long().to(device)
    autocast = torch.autocast(device, dtype=torch.bfloat16,
                              enabled=FLAGS.dtype == "bfloat16")

    def run(steps: int) -> None:
        for _ in range(steps):
            images = (pixels.float() / 255.0 - mean) / std
            with autocast:
                loss = loss_fn(*model(images, ids))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip_norm)
            opt.step()
        if device == "cuda":
            torch.cuda.synchronize()

    return run


def device_name() -> str:
    device = jax.devices()[0]
    return f"{device.device_kind} ({jax.device_count()} × {device.platform})"


def main(argv: list[str]) -> None:
    del argv
    try:
        import open_clip
        import torch
        versions = f"open_clip {open_clip.__version__}, torch {torch.__version__}"
    except ImportError:
        versions = "open_clip not installed"
    lines = [
        f"`python experiments/throughput.py --variants={','.join(FLAGS.variants)} "
        f"--batch={FLAGS.batch} --steps={FLAGS.steps} --rounds={FLAGS.rounds} "
        f"--dtype={FLAGS.dtype} --layouts={','.join(FLAGS.layouts)} "
        f"--gelus={','.join(FLAGS.gelus)} --peak_gflops={FLAGS.peak_gflops:g}"
        + ("".join(f" --compile_options='{o}'" for o in FLAGS.compile_options)
           if FLAGS.compile_options != [""] else "") + "` — "
        f"{device_name()}, jax {jax.__version__}, {versions}, {os.cpu_count()} host cores, "
        f"{FLAGS.dtype}, 224 px, 64 tokens"
        + (", glibc malloc keeping freed memory" if KEPT_HOST_MEMORY else ""),
        "",
        "| towers | implementation | GFLOPs/pair (train step) | lower s | compile s | "
        "XLA temp GiB | step ms | pairs/s | MFU | / open_clip |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    peak = FLAGS.peak_gflops * 1e9
    for variant in FLAGS.variants:
        batch = random_batch(clip_shaped_config(variant))
        flops = model_flops(variant, batch)
        towers = f"{variant} + {variant.split('/')[0]} text"
        theirs = open_clip_stepper(clip_shaped_config(variant), batch)
        rows, theirs_s = [], []
        for layout, gelu, options in itertools.product(FLAGS.layouts, FLAGS.gelus,
                                                       FLAGS.compile_options):
            name = (f"flipjax {layout}" + (f" {gelu} GELU" if gelu != "exact" else "")
                    + (f" `{options}`" if options else ""))
            config = clip_shaped_config(variant, layout, gelu)
            try:
                ours, info, _ = flipjax_stepper(config, batch, options)
            except jax.errors.JaxRuntimeError as e:
                if not options:
                    raise
                # An option this XLA lacks, or one that breaks the compile: say so, go on.
                print(f"| {towers} | {name} | {str(e).splitlines()[0][:120]} |", flush=True)
                continue
            pair = [theirs] if theirs and gelu == "exact" else []
            ours_s, *paired = median_step_times([ours] + pair)
            theirs_s += paired
            ratio = f"{paired[0] / ours_s:.2f}×" if paired else "–"
            rows.append([name, f"{info['lower_s']:.1f}", f"{info['compile_s']:.1f}",
                         f"{info['temp_gib']:.2f}", *rate(ours_s, flops, peak), ratio])
            print(row(towers, flops, rows[-1]), flush=True)
            del ours  # its state and executable, before the next layout's
        if theirs_s:
            rows.append(["open_clip", "–", "–", "–",
                         *rate(float(np.median(theirs_s)), flops, peak), "1.00×"])
            print(row(towers, flops, rows[-1]), flush=True)
        lines += [row(towers, flops, r) for r in rows]
    if FLAGS.output:
        with open(FLAGS.output, "w") as f:
            f.write("\n".join(lines) + "\n")


def rate(step_s: float, flops: float, peak: float) -> list[str]:
    return [f"{1e3 * step_s:.1f}", f"{FLAGS.batch / step_s:.2f}",
            f"{100 * flops / step_s / peak:.0f}%"]


def row(towers: str, flops: float, cells: list[str]) -> str:
    return f"| {towers} | {cells[0]} | {flops / FLAGS.batch / 1e9:.1f} | " + " | ".join(
        cells[1:]) + " |"


if __name__ == "__main__":
    app.run(main)
