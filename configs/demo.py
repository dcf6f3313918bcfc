"""Demo: tiny towers on procedurally rendered faces, on a laptop CPU in a few minutes.

Builds `synthetic_faces` and trains its tokenizer under ./data (of the directory it runs in)
if they're missing, then trains with the same code path as `configs/base.py`, of which this is
a copy with the fields below changed:

    python -m flipjax.main --config=configs/demo.py --workdir=workdirs/demo

Besides sizes, what differs is what a CPU and a small dataset want: float32 compute and
moments, no remat or scanned layers, the global loss, a higher learning rate, the synthetic
images' mean and std, and probes at the end.

`configs/demo.py:tiny` shrinks everything further (a few seconds a step-block) for tests and
smoke runs: `--config=configs/demo.py:tiny`.
"""

import importlib.util
import pathlib

import ml_collections
from ml_collections.config_dict import placeholder


def base_config(arg: str) -> ml_collections.ConfigDict:
    """`configs/base.py`'s config, read from beside this file, so that this one also loads
    from outside the repository root (`--config=/path/to/configs/demo.py`)."""
    spec = importlib.util.spec_from_file_location(
        "flipjax_base_config", pathlib.Path(__file__).with_name("base.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = base_config("batch=128")
    c.total_steps = 700
    c.log_every_steps = 50

    # image_size and max_len are shared with the towers (FieldReferences): set once here.
    c.data.update(name="synthetic_faces", build_if_missing=True, image_size=64, num_workers=0,
                  mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    c.data.augment.crop_scale = (0.7, 1.0)
    c.tokenizer.update(path="./data/tokenizers/synthetic_faces_spm1k.model", vocab_size=1000,
                       max_len=32, train_if_missing=True)

    c.model.image.update(variant="Ti/16", width=128, depth=3, mlp_dim=512, num_heads=4)
    c.model.text.update(variant="Ti", width=128, depth=2, mlp_dim=512, num_heads=4,
                        proj_dim=128)
    c.model.update(temperature_init=10.0, dtype="float32", remat="none", scan_layers=False)
    c.loss_impl = "global"
    c.optim.update(lr=1e-3, end_lr_fraction=0.01, warmup_steps=100, eps=1e-8)
    c.optim.mu_dtype = placeholder(str)  # None: float32 moments

    # XLA:CPU's per-step scratch buffers stay in the heap instead of being page-faulted back
    # in every step (flipjax/train/host_memory.py); for CPU runs only.
    c.keep_freed_host_memory = True

    c.checkpoint.update(every_steps=200, keep=2)
    c.evals.retrieval.update(every_steps=500, batch_size=256)
    # Probes at the end only (the trainer always runs every evaluator at the last step);
    # 5k train images keep feature extraction to seconds.
    c.evals.linear_probe = dict(
        type="linear_probe", train_split="train[:5000]", val_split="validation",
        test_split="test", label_key="attributes", kind="multilabel", l2_grid=(0.0, 1e-3, 1e-2),
        epochs_grid=(10, 30), probe_batch_size=256, every_steps=c.get_ref("total_steps"),
        batch_size=256)
    c.evals.zeroshot = dict(type="zeroshot_attributes", split="test",
                            every_steps=c.get_ref("total_steps"), batch_size=256)
    if arg == "tiny":
        c.total_steps, c.log_every_steps = 40, 1
        c.data.builder_config = "tiny"
        c.data.global_batch_size = 16
        c.data.read_threads, c.data.prefetch_batches = 1, 2
        c.data.image_size = 32
        c.tokenizer.update(max_len=16, vocab_size=200,
                           path="./data/tokenizers/synthetic_faces_tiny_spm200.model")
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
