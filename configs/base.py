"""FLIP-style pretraining on FaceCaption-15M: ViT-B/16 at 224 px + a base text tower.

    python -m flipjax.main --config=configs/base.py --workdir=gs://BUCKET/flip_b16 [--distributed]

Expects FaceCaption-15M built with `python -m tfds_builders build facecaption15m
--data_dir=DATA --manual_dir=...` and a tokenizer trained on its captions with
`python -m flipjax.data.tokenizer --dataset=facecaption15m --data_dir=DATA --output=...`.
Point `--config.data.data_dir` and `--config.tokenizer.path` at them.

Where this follows the paper's FLIP (Dai et al. 2024, see shared reference notes):
  * ViT-B/16 image tower at 224 px (FLIP started from CLIP ViT-B/16), CLIP's mean/std.
  * Contrastive image-text training on face crops of FaceCaption-15M, AdamW, weight decay 0.05,
    15 epochs, captions up to 64 tokens (FLIP: 65 BERT tokens).
Where it departs, and why:
  * Two-tower CLIP/SigLIP-style model trained with softmax InfoNCE over the global batch. FLIP is
    BLIP-style: ITC with momentum encoders and a 61,440-entry feature queue, plus an image-text
    matching head with cross-attention. A large global batch (here 4,096, vs FLIP's 640) gives
    the negatives the queue gave, without a second (momentum) model; `loss="sigmoid"` is SigLIP
    (set `model.bias_init=-10.0` and `model.temperature_init=10.0` with it, as SigLIP does).
  * Trained from scratch with a SentencePiece tokenizer trained on the captions, instead of from
    CLIP ViT-B/16 + bert-base-uncased weights; lr 5e-4 with warmup + cosine instead of FLIP's
    3e-5 step decay (which suits fine-tuning from pretrained towers).
  * Random resized crop (scale 0.8-1) + flip instead of FLIP's resize + RandAugment: the builder
    already stores square face crops with a margin.
  * From-scratch CLIP/SigLIP (big_vision) settings rather than those FLIP fine-tuned CLIP and
    BERT with: warmup 5k steps from 0 (FLIP: 20k from 1e-6); AdamW b2 0.98, eps 1e-6, gradient
    clipping at norm 1 and weight decay on kernels only (FLIP: torch's defaults, no clipping,
    decay on all); a MAP-pooled image tower with tanh GELU, LayerNorm eps 1e-6 and no pre-norm,
    a text tower pooled at its last token, and 768-d embeddings (FLIP: CLIP's class token,
    quick GELU and eps 1e-5, BERT's [CLS], 768->256 projections); the logit scale (1/0.07 at
    init, as FLIP's temperature) capped at 100 as CLIP caps it (FLIP clamps the temperature
    to [0.001, 0.5]).
  * `total_steps` is 15 epochs of the v2 parquet's 13.2M rows (FLIP's log: 15.3M samples per
    epoch). Fewer images still download, and over fewer the same steps are more epochs: set
    `--config.total_steps` from the train split's size that the build reports.
"""

import ml_collections
from ml_collections.config_dict import placeholder

NUM_TRAIN_PAIRS = 13_200_000  # FaceCaption-v2.parquet rows (before link rot and filtering)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    batch = int(arg.removeprefix("batch=")) if arg else 4096
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 15 * (NUM_TRAIN_PAIRS // batch)  # 15 epochs of whole batches
    c.log_every_steps = 100

    resolution = ml_collections.FieldReference(224)
    max_len = ml_collections.FieldReference(64)
    # Unset fields are typed placeholders (None until set) and sequences are tuples: the
    # --config.FIELD flags cannot set a field holding a plain None or a list.
    c.data = dict(
        name="facecaption15m", builder_config=placeholder(str), data_dir="./data",
        manual_dir=placeholder(str), build_if_missing=False, train_split="train",
        image_key="image", text_key="caption",
        # How evaluation brings an image to the square input: "center_crop" or "squash" (the
        # whole frame, as FLIP evaluates CelebA); an evaluator may set its own.
        eval_resize="center_crop",
        # Per worker process: read_threads batches decoded at once, prefetch_batches kept
        # ready (a batch is this host's share of the global batch: ~77 MB at 512 per host).
        image_size=resolution, global_batch_size=batch, num_workers=16, read_threads=2,
        prefetch_batches=4,
        augment=dict(crop_scale=(0.8, 1.0), crop_ratio=(0.9, 1.1), flip=True),
        mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711),
    )
    c.tokenizer = dict(path="./data/tokenizers/facecaption15m_spm32k.model",
                       vocab_size=32_000, max_len=max_len, train_if_missing=False)
    c.model = dict(
        # width/depth/mlp_dim/num_heads: set to override the variant's.
        image=dict(variant="B/16", width=placeholder(int), depth=placeholder(int),
                   mlp_dim=placeholder(int), num_heads=placeholder(int),
                   image_size=resolution, pool="map", posemb="learn", pre_norm=False,
                   proj_dim=placeholder(int), proj_bias=True),
        text=dict(variant="B", width=placeholder(int), depth=placeholder(int),
                  mlp_dim=placeholder(int), num_heads=placeholder(int),
                  max_len=max_len, pool="last", causal=False, eos_id=1, proj_dim=768,
                  proj_bias=True),
        temperature_init=1 / 0.07, bias_init=placeholder(float), max_temperature=100.0,
        gelu="tanh", ln_eps=1e-6, dtype="bfloat16",
        # Activations kept for backward: "none" (all), "dots" (projection outputs only) or
        # "full" (block inputs only). With scan, "dots" halves the scratch of "none" and was
        # no slower on two CPUs (experiments/results/compile_time.md); a GPU with memory
        # to spare ran unrolled layers without remat 19% faster
        # (experiments/results/throughput_h200.md).
        remat="dots",
        # nnx.scan over the stacked blocks: one compiled block per tower instead of 12
        # (compile-time numbers in experiments/results/compile_time.md); export unstacks.
        scan_layers=True,
        # "auto": cuDNN's fused attention on an NVIDIA GPU in bf16, else XLA's ("dot");
        # see flipjax.models.layers.ATTENTION_IMPLEMENTATIONS.
        attention="auto",
    )
    # A Hugging Face SiglipModel/CLIPModel directory (safetensors) to start from, and which
    # towers to load from it; `t`/`b` load only with both (flipjax/export/hf_import.py).
    c.init_from = dict(path=placeholder(str), towers=("img", "txt"))
    c.loss = "softmax"
    # shard_map losses: per-device memory O(B^2/n) by construction, whatever the partitioner
    # makes of the global loss (experiments/results/loss_memory.md).
    c.loss_impl = "sharded"
    c.grad_accum_steps = 1  # >1: GradCache micro-batches, for a batch that doesn't fit
    c.nonfinite = "raise"  # or "skip": keep the old params, count it, carry on
    # decay_regex, frozen_regex and lr_mults' patterns match whole parameter names such as
    # "img/encoder/layers/mlp/fc1/kernel" (e.g. frozen_regex="img/.*" freezes the image tower);
    # a freeze or multiplier rule that matches nothing is an error.
    c.optim = dict(lr=5e-4, end_lr_fraction=0.0, warmup_steps=5_000, b1=0.9, b2=0.98, eps=1e-6,
                   weight_decay=0.05, grad_clip_norm=1.0,
                   mu_dtype="bfloat16", decay_regex=r".*/kernel",
                   frozen_regex="", lr_mults=())

    # True only where XLA runs on the CPU: reuse its scratch buffers' host memory across steps
    # instead of page-faulting them back in (flipjax/train/host_memory.py).
    c.keep_freed_host_memory = False
    # One axis of size -1 takes the remaining devices; on a pod prefer fsdp within a slice.
    c.mesh = (("data", -1), ("fsdp", 1))
    # (regex, strategy), first match wins. Searched anywhere in each train-state leaf's name,
    # so that "img/.*/kernel" places a kernel and its Adam moments ("opt_state/.../img/...")
    # alike; optim's regexes instead match whole parameter names ("img/.*").
    c.sharding_rules = ((".*", "fsdp"),)
    c.fsdp_min_size_mb = 4.0

    c.checkpoint = dict(every_steps=1_000, keep=3, async_save=True)
    c.evals = dict(
        retrieval=dict(type="retrieval", split="test", every_steps=5_000, batch_size=1024),
    )
    return c
