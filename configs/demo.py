"""Demo: tiny towers on procedurally rendered faces, on a laptop CPU in a few minutes.

Builds `synthetic_faces` and trains its tokenizer under ./data if they're missing, then trains
with the same code path as `configs/base.py`. Besides sizes, what differs is what a CPU and a
small dataset want: float32 compute and moments, no remat or scanned layers, the global loss,
a higher learning rate, and the synthetic images' mean and std.

    python -m flipjax.main --config=configs/demo.py --workdir=workdirs/demo

`configs/demo.py:tiny` shrinks everything further (a few seconds a step-block) for tests and
smoke runs: `--config=configs/demo.py:tiny`.
"""

import ml_collections
from ml_collections.config_dict import placeholder


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 700
    c.log_every_steps = 50

    resolution = ml_collections.FieldReference(64)
    max_len = ml_collections.FieldReference(32)

    # Unset fields are typed placeholders (None until set) and sequences are tuples: the
    # --config.FIELD flags cannot set a field holding a plain None or a list.
    c.data = dict(
        name="synthetic_faces", builder_config=placeholder(str), data_dir="./data",
        manual_dir=placeholder(str), build_if_missing=True, train_split="train",
        image_key="image", text_key="caption",
        # How evaluation brings an image to the square input: "center_crop" or "squash" (the
        # whole frame, as FLIP evaluates CelebA); an evaluator may set its own.
        eval_resize="center_crop",
        image_size=resolution, global_batch_size=128, num_workers=0, read_threads=2,
        prefetch_batches=4,
        augment=dict(crop_scale=(0.7, 1.0), crop_ratio=(0.9, 1.1), flip=True),
        mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
    )
    c.tokenizer = dict(path="./data/tokenizers/synthetic_faces_spm1k.model", vocab_size=1000,
                       max_len=max_len, train_if_missing=True)

    c.model = dict(
        image=dict(variant="Ti/16", width=128, depth=3, mlp_dim=512, num_heads=4,
                   image_size=resolution, pool="map", posemb="learn", pre_norm=False,
                   proj_dim=placeholder(int), proj_bias=True),
        text=dict(variant="Ti", width=128, depth=2, mlp_dim=512, num_heads=4, max_len=max_len,
                  pool="last", causal=False, eos_id=1, proj_dim=128, proj_bias=True),
        temperature_init=10.0, bias_init=placeholder(float), max_temperature=100.0,
        gelu="tanh", ln_eps=1e-6, dtype="float32", remat="none", scan_layers=False,
        attention="auto",
    )
    # A Hugging Face SiglipModel/CLIPModel directory (safetensors) to start from, and which
    # towers to load from it; `t`/`b` load only with both (flipjax/export/hf_import.py).
    c.init_from = dict(path=placeholder(str), towers=("img", "txt"))
    c.loss = "softmax"
    # "sharded": shard_map loss, O(B^2/n) memory per device (flipjax/train/sharded_losses.py).
    c.loss_impl = "global"
    # >1: GradCache over this many micro-batches, same gradient as the full batch.
    c.grad_accum_steps = 1
    # A non-finite loss/gradient never updates the params; "raise" stops, "skip" goes on.
    c.nonfinite = "raise"
    c.optim = dict(lr=1e-3, end_lr_fraction=0.01, warmup_steps=100, b1=0.9, b2=0.98, eps=1e-8,
                   weight_decay=0.05, grad_clip_norm=1.0,
                   mu_dtype=placeholder(str), decay_regex=r".*/kernel",
                   frozen_regex="", lr_mults=())

    # XLA:CPU's per-step scratch buffers stay in the heap instead of being page-faulted back
    # in every step (flipjax/train/host_memory.py); for CPU runs only.
    c.keep_freed_host_memory = True
    c.mesh = (("data", -1), ("fsdp", 1))
    c.sharding_rules = ((".*", "fsdp"),)
    c.fsdp_min_size_mb = 4.0

    c.checkpoint = dict(every_steps=200, keep=2, async_save=True)
    c.evals = dict(
        retrieval=dict(type="retrieval", split="test", every_steps=500, batch_size=256),
        # Probes at the end only (the trainer always runs every evaluator at the last step);
        # 5k train images keep feature extraction to seconds.
        linear_probe=dict(type="linear_probe", train_split="train[:5000]",
                          val_split="validation", test_split="test", label_key="attributes",
                          kind="multilabel", l2_grid=(0.0, 1e-3, 1e-2), epochs_grid=(10, 30),
                          probe_batch_size=256, every_steps=c.get_ref("total_steps"),
                          batch_size=256),
        zeroshot=dict(type="zeroshot_attributes", split="test",
                      every_steps=c.get_ref("total_steps"), batch_size=256),
    )
    if arg == "tiny":
        c.total_steps, c.log_every_steps = 40, 1
        c.data.builder_config = "tiny"
        c.data.global_batch_size = 16
        c.data.read_threads, c.data.prefetch_batches = 1, 2
        resolution.set(32)
        max_len.set(16)
        c.tokenizer.vocab_size = 200
        c.tokenizer.path = "./data/tokenizers/synthetic_faces_tiny_spm200.model"
        tiny_size = dict(width=64, depth=2, mlp_dim=256, num_heads=2)
        c.model.image.update(variant="mu/8", **tiny_size)
        c.model.text.update(variant="mu", proj_dim=placeholder(int), **tiny_size)  # None
        c.optim.warmup_steps = 5
        c.checkpoint.every_steps = 10
        c.evals.retrieval.update(every_steps=20, batch_size=32)
        c.evals.linear_probe.update(train_split="train", l2_grid=(0.0, 1e-2),
                                    epochs_grid=(2, 5), probe_batch_size=64, batch_size=32)
        c.evals.zeroshot.update(batch_size=32)
    elif arg:
        raise ValueError(f"configs/demo.py takes no argument or 'tiny', got {arg!r}")
    return c
