"""Train-step throughput of flipjax and open_clip on this machine's CPU, in the same run: model
FLOPs per image-text pair from XLA's cost analysis, pairs/s, MFU against a stated peak, and
flipjax / open_clip.

Both train the same CLIP-shaped architecture at 224 px: ViT with a class token and pre-LN,
exact GELU, a causal text tower of the image tower's width pooled at EOS, 64 tokens, a 32k
vocabulary, bias-free projections to the tower width, softmax InfoNCE, AdamW with global-norm
clipping, float32. flipjax runs its real jitted train step (`TrainSetup`); open_clip runs
`open_clip.model.CLIP` + `open_clip.loss.ClipLoss` + `torch.optim.AdamW` eagerly, as
open_clip's training loop does, with torch using every core.

open_clip needs torchvision, so run this in a separate venv (never in CI):

    python -m venv /tmp/oc && /tmp/oc/bin/pip install torch==2.14.1 torchvision==0.29.1 \
        open-clip-torch -e .
    /tmp/oc/bin/python experiments/throughput.py --variants=S/16,B/16 --batch=8 --steps=5 \
        --peak_gflops=156.5

Without open_clip installed the open_clip columns read "–". The peak is the machine's float32
FLOP/s (cores x clock x FLOPs/cycle); MFU for both uses flipjax's XLA FLOP count, since the
architectures are the same.
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

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
flags.DEFINE_integer("steps", 5, "Timed steps (median), after one warm-up step.")
flags.DEFINE_float("peak_gflops", 156.5, "Peak float32 GFLOP/s of this machine, for MFU.")
FLAGS = flags.FLAGS

VOCAB = 32_000


def clip_shaped_config(variant: str) -> ml_collections.ConfigDict:
    """configs/base.py with open_clip's CLIP architecture, so both sides train the same model."""
    config = get_config(f"batch={FLAGS.batch}")
    config.mesh, config.loss_impl, config.loss = [("data", 1)], "global", "softmax"
    width = SIZES[variant.split("/")[0]].width
    model = config.model
    # Unrolled layers: XLA's cost analysis counts a scanned body once, not once per layer.
    model.update(dtype="float32", gelu="exact", ln_eps=1e-5, bias_init=None, scan_layers=False,
                 remat="none")
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


def time_steps(step, state) -> float:
    """Median seconds per step over `--steps` steps after a warm-up step: a step that shares
    the machine with a stray process moves the median less than the mean."""
    state = step(state)
    times = []
    for _ in range(FLAGS.steps):
        t0 = time.perf_counter()
        state = step(state)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def measure_flipjax(config: ml_collections.ConfigDict, batch: dict) -> dict[str, float]:
    setup = TrainSetup(config, VOCAB, make_mesh(config.mesh))
    batch = to_global(batch, setup.batch_sharding)
    state = setup.init()
    t0 = time.perf_counter()
    compiled = setup.train_step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0

    def step(s):
        s, m = compiled(s, batch)
        jax.block_until_ready(m)
        return s

    return {"flops": compiled.cost_analysis()["flops"], "compile_s": compile_s,
            "step_s": time_steps(step, state)}


def measure_open_clip(config: ml_collections.ConfigDict, batch: dict) -> float | None:
    """Seconds per open_clip train step on the same architecture and batch, or None."""
    try:
        import torch
        from open_clip.loss import ClipLoss
        from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    except ImportError:
        return None
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
    ).train()
    optim = config.optim
    opt = torch.optim.AdamW(model.parameters(), lr=optim.lr, betas=(optim.b1, optim.b2),
                            eps=optim.eps, weight_decay=optim.weight_decay)
    loss_fn = ClipLoss()
    mean = torch.tensor(config.data.mean).view(1, 3, 1, 1)
    std = torch.tensor(config.data.std).view(1, 3, 1, 1)
    pixels = torch.from_numpy(batch["image"]).permute(0, 3, 1, 2).contiguous()
    ids = torch.from_numpy(batch["text"]).long()

    def step(_):
        images = (pixels.float() / 255.0 - mean) / std
        loss = loss_fn(*model(images, ids))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip_norm)
        opt.step()

    return time_steps(step, None)


def main(argv: list[str]) -> None:
    del argv
    try:
        import open_clip
        import torch
        versions = f"open_clip {open_clip.__version__}, torch {torch.__version__}"
    except ImportError:
        versions = "open_clip not installed"
    print(f"\n`python experiments/throughput.py --variants={','.join(FLAGS.variants)} "
          f"--batch={FLAGS.batch} --steps={FLAGS.steps} --peak_gflops={FLAGS.peak_gflops}` "
          f"— jax {jax.__version__}, {versions}, {os.cpu_count()} cores, float32, 224 px, "
          "64 tokens\n")
    print("| towers | GFLOPs/pair (train step) | flipjax compile s | flipjax pairs/s | "
          "flipjax MFU | open_clip pairs/s | open_clip MFU | flipjax / open_clip |")
    print("|---|---|---|---|---|---|---|---|")
    peak = FLAGS.peak_gflops * 1e9
    for variant in FLAGS.variants:
        config = clip_shaped_config(variant)
        batch = random_batch(config)
        ours = measure_flipjax(config, batch)
        theirs = measure_open_clip(config, batch)
        flops = ours["flops"]
        oc = (["–"] * 3 if theirs is None else
              [f"{FLAGS.batch / theirs:.2f}", f"{100 * flops / theirs / peak:.0f}%",
               f"{theirs / ours['step_s']:.2f}×"])
        print(f"| {variant} + {variant.split('/')[0]} text | {flops / FLAGS.batch / 1e9:.1f} | "
              f"{ours['compile_s']:.0f} | {FLAGS.batch / ours['step_s']:.2f} | "
              f"{100 * flops / ours['step_s'] / peak:.0f}% | " + " | ".join(oc) + " |",
              flush=True)


if __name__ == "__main__":
    app.run(main)
