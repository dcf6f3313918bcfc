"""Checks a training config before anything is compiled, and prepares what it may build.

Each problem is reported as one line naming the config field and what to do about it.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Iterator

import jax
import ml_collections
from flax import nnx

from flipjax.data.pipeline import EVAL_RESIZES
from flipjax.data.tokenizer import EOS_ID
from flipjax.models import embedding_dims, make_model
from flipjax.models.layers import (
    ATTENTION_IMPLEMENTATIONS,
    REMAT_POLICIES,
    cudnn_attention_runs_here,
)
from flipjax.models.text import POOLS as TEXT_POOLS
from flipjax.models.two_towers import DTYPES, tower_size
from flipjax.models.vit import POOLS as IMAGE_POOLS
from flipjax.models.vit import POSEMBS, probe_blocks
from flipjax.storage import storage_path
from flipjax.train.losses import LOSSES
from flipjax.train.optimizer import check_decay_regex, param_groups
from flipjax.train.sharding import (
    batch_shards,
    check_strategy,
    check_tensor_groups,
    fails_together,
    make_mesh,
)

LOSS_IMPLS = ("global", "sharded")
NONFINITE = ("raise", "skip")


class ConfigError(ValueError):
    """A config field that cannot work, with the field's name and what to do."""


@contextlib.contextmanager
def exit_on_config_error() -> Iterator[None]:
    """Ends a command on a ConfigError with its one line and exit status 2, as absl does for
    a bad flag: the message names the field and the fix, a traceback would bury it."""
    try:
        yield
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def dataset_dir_exists(data_cfg: ml_collections.ConfigDict) -> bool:
    """Whether the config's dataset is built: DATA_DIR/NAME/CONFIG/VERSION, or
    DATA_DIR/NAME/VERSION for a builder without configs. No `builder_config` means the
    builder's default (first) one, which TFDS reads then, not any config built there."""
    import tfds_builders

    root = storage_path(data_cfg.data_dir) / data_cfg.name
    config = data_cfg.builder_config
    if config is None and data_cfg.name in tfds_builders.BUILDERS:
        configs = tfds_builders.builder_class(data_cfg.name).BUILDER_CONFIGS
        config = configs[0].name if configs else None
    if config is not None:
        return any((root / config).glob("*/dataset_info.json"))
    return any(root.glob("*/dataset_info.json")) or any(root.glob("*/*/dataset_info.json"))


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing (`app.run(main, flags_parser=parse_flags)`), where an override of a
    field the config lacks (`--config.optim.lr_typo=1e-4`) is one line naming it, with the
    closest field ml_collections finds, and exit code 2 instead of a traceback."""
    from absl import app

    try:
        return app.parse_flags_with_usage(argv)  # absl's one-line errors for the other flags
    except (AttributeError, KeyError) as e:
        # ml_collections' message: "'widht'" and maybe 'Did you mean "width" instead of ...'.
        found, close = re.search(r"(\w+)", str(e)), re.search(r'Did you mean "(\w+)"', str(e))
        names = [a[2:].split("=")[0].split(".")[1:] for a in argv if a.startswith("--config.")]
        path = next((n for n in names if found and found.group(1) in n), None)
        if path is None:
            raise
        field = path[: path.index(found.group(1)) + 1]
        hint = f" (did you mean config.{'.'.join([*field[:-1], close.group(1)])}?)" if close \
            else ""
        print(f"error: --config.{'.'.join(path)}: the config has no field "
              f"config.{'.'.join(field)}{hint}", file=sys.stderr)
        sys.exit(2)


def check(condition: bool, field: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"config.{field}: {message}")


def validate_evals(config: ml_collections.ConfigDict, shards: int) -> None:
    """Raises ConfigError on the first evaluator field that cannot work (`validate` before
    training, `python -m flipjax.evaluate` before evaluating); `make_evaluators` then checks
    the splits they read."""
    from flipjax.evaluate import EVAL_BATCH_SIZE, EVALUATORS, evaluator_config

    data, model = config.data, config.model
    check(data.get("eval_resize") in EVAL_RESIZES, "data.eval_resize",
          f"{data.get('eval_resize')!r} is not one of {sorted(EVAL_RESIZES)} (config files "
          "from before the field existed lack it: add eval_resize=\"center_crop\")")
    for name, eval_cfg in config.evals.items():
        check(eval_cfg.type in EVALUATORS, f"evals.{name}.type",
              f"unknown evaluator {eval_cfg.type!r}; use one of {sorted(EVALUATORS)}")
        every = eval_cfg.get("every_steps", 1)  # training requires it (`validate`)
        check(every > 0, f"evals.{name}.every_steps", f"{every} must be positive")
        resize = eval_cfg.get("eval_resize")
        check(resize in (None, *EVAL_RESIZES), f"evals.{name}.eval_resize",
              f"{resize!r} is not one of {sorted(EVAL_RESIZES)}")
        ebs = eval_cfg.get("batch_size") or EVAL_BATCH_SIZE  # None: the default
        check(ebs > 0 and ebs % shards == 0, f"evals.{name}.batch_size",
              f"{ebs} is not a positive multiple of the {shards} batch shards")
        fields = evaluator_config(name, eval_cfg)
        if eval_cfg.type == "linear_probe" and fields.features == "layers":
            try:
                probe_blocks(fields.blocks, tower_size(model.image, with_patch=True)[0].depth)
            except ValueError as e:
                raise ConfigError(f"config.evals.{name}.blocks: {e}") from None


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError on the first field that cannot work on this machine."""
    num_processes = jax.process_count()
    data, model = config.data, config.model
    try:
        mesh = make_mesh(config.mesh)
        check_tensor_groups(mesh.devices, mesh.axis_names)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    # Devices on a `tensor` axis share their examples: the batch splits over the other axes.
    shards = batch_shards(mesh)
    bs = data.global_batch_size
    check(bs > 0 and bs % shards == 0, "data.global_batch_size",
          f"{bs} is not divisible by the {shards} batch shards (devices outside any tensor "
          f"axis); use a multiple of {shards}")
    check(bs % num_processes == 0, "data.global_batch_size",
          f"{bs} is not divisible by the {num_processes} processes")
    for pattern, strategy in config.sharding_rules:
        try:
            check_strategy(pattern, strategy, [name for name, _ in config.mesh])
        except ValueError as e:
            raise ConfigError(str(e)) from None
    optim = config.optim
    patterns = [("optim.decay_regex", optim.decay_regex),
                ("optim.frozen_regex", optim.frozen_regex)]
    patterns += [(f"optim.lr_mults[{i}]", rule[0]) for i, rule in enumerate(optim.lr_mults)]
    patterns += [(f"sharding_rules[{i}]", rule[0]) for i, rule in enumerate(config.sharding_rules)]
    for field, pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"config.{field}: {pattern!r} is not a regular expression ({e})"
                              ) from None
    check(config.loss in LOSSES, "loss", f"unknown loss {config.loss!r}; use one of "
          f"{sorted(LOSSES)}")
    # SigLIP's learnable bias, started at -10, is what keeps the B-1 negatives per row from
    # swamping the first steps; a sigmoid loss without one is an easy slip, not a recipe.
    check(config.loss != "sigmoid" or model.bias_init is not None, "model.bias_init",
          "the sigmoid loss needs a learnable bias: set it (SigLIP: -10.0, with "
          "model.temperature_init=10.0)")
    # The clamp applies after each update: a larger start would train step 1 at a scale the
    # clamp then cuts (and move a frozen temperature).
    check(model.max_temperature is None or model.temperature_init <= model.max_temperature,
          "model.temperature_init", f"{model.temperature_init} is above "
          f"model.max_temperature={model.max_temperature}")
    check(config.loss_impl in LOSS_IMPLS, "loss_impl",
          f"{config.loss_impl!r} is not one of {LOSS_IMPLS}")
    accum = config.grad_accum_steps
    check(accum >= 1 and (bs // shards) % accum == 0, "grad_accum_steps",
          f"{accum} must be >= 1 and divide the batch per shard {bs // shards}, so that every "
          "micro-batch spans all devices")
    check(config.nonfinite in NONFINITE, "nonfinite",
          f"{config.nonfinite!r} is not one of {NONFINITE}")
    check(model.dtype in DTYPES, "model.dtype", f"{model.dtype!r} is not one of {sorted(DTYPES)}")
    check(model.remat in REMAT_POLICIES, "model.remat",
          f"{model.remat!r} is not one of {sorted(REMAT_POLICIES)}")
    attention = model.attention
    check(attention in ("auto", *ATTENTION_IMPLEMENTATIONS), "model.attention",
          f"{attention!r} is not 'auto' or one of {sorted(ATTENTION_IMPLEMENTATIONS)}")
    check(attention != "cudnn" or cudnn_attention_runs_here(DTYPES[model.dtype]),
          "model.attention", "'cudnn' needs JAX's default device to be a CUDA GPU of compute "
          "capability 8.0+ and "
          f"model.dtype bfloat16 (here: {jax.devices()[0].device_kind}, "
          f"{model.dtype}); use 'auto'")
    mu_dtype = config.optim.mu_dtype
    check(mu_dtype in (None, *DTYPES), "optim.mu_dtype",
          f"{mu_dtype!r} is not None or one of {sorted(DTYPES)}")
    for tower, with_patch in (("image", True), ("text", False)):
        try:
            size, patch = tower_size(model[tower], with_patch=with_patch)
        except ValueError as e:
            raise ConfigError(f"config.model.{tower}.variant: {e}") from None
        check(size.width % size.num_heads == 0, f"model.{tower}.num_heads",
              f"width {size.width} is not divisible by {size.num_heads} heads")
    _, patch = tower_size(model.image, with_patch=True)
    check(model.image.image_size % patch == 0, "model.image.image_size",
          f"{model.image.image_size} is not divisible by the patch size {patch}")
    check(model.image.image_size == data.image_size, "data.image_size",
          f"{data.image_size} differs from config.model.image.image_size "
          f"{model.image.image_size}; set both to the same resolution")
    check(model.image.pool in IMAGE_POOLS, "model.image.pool",
          f"{model.image.pool!r} is not one of {IMAGE_POOLS}")
    check(model.image.posemb in POSEMBS, "model.image.posemb",
          f"{model.image.posemb!r} is not one of {POSEMBS}")
    check(model.text.pool in TEXT_POOLS, "model.text.pool",
          f"{model.text.pool!r} is not one of {TEXT_POOLS}")
    # Pooling that would see one token only, whatever the caption says:
    check(not (model.text.pool == "first" and model.text.causal), "model.text.pool",
          "'first' with model.text.causal=True pools a token that sees only itself; use "
          "'eos' (CLIP) or 'last' without a causal mask (SigLIP)")
    check(model.text.pool != "eos" or model.text.eos_id == EOS_ID,
          "model.text.eos_id", f"{model.text.eos_id} is not the id our tokenizers end "
          f"captions with ({EOS_ID}): 'eos' pooling would find none and pool the first token")
    check(model.text.max_len == config.tokenizer.max_len, "tokenizer.max_len",
          f"{config.tokenizer.max_len} differs from config.model.text.max_len "
          f"{model.text.max_len}")
    img_dim, txt_dim = embedding_dims(model)
    check(img_dim == txt_dim, "model.text.proj_dim",
          f"the towers' embeddings differ in size (image {img_dim}, text {txt_dim}); set "
          "model.image.proj_dim and/or model.text.proj_dim to the same value")
    for field, value in (("total_steps", config.total_steps),
                         ("log_every_steps", config.log_every_steps),
                         ("checkpoint.every_steps", config.checkpoint.every_steps),
                         # Orbax's max_to_keep=0 deletes each checkpoint as soon as it lands.
                         ("checkpoint.keep", config.checkpoint.keep)):
        check(value > 0, field, f"{value} must be positive")
    # Seeds the model's init and, through numpy's SeedSequence, the data order.
    check(config.seed >= 0, "seed", f"{config.seed} must be 0 or more")
    for name, eval_cfg in config.evals.items():
        check("every_steps" in eval_cfg, f"evals.{name}.every_steps",
              "missing: the evaluator's interval in steps")
    validate_evals(config, shards)
    # Rules that label no parameter, checked on the model's names (shapes only, no weights).
    try:
        abstract_params = nnx.eval_shape(lambda: nnx.to_pure_dict(nnx.state(make_model(
            model, vocab_size=config.tokenizer.vocab_size), nnx.Param)))
    except ValueError as e:  # a model field no check above covers, e.g. model.gelu
        raise ConfigError(f"config.model: {e}") from None
    try:
        param_groups(abstract_params, optim)
        check_decay_regex(abstract_params, optim)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if not data.build_if_missing:
        check(dataset_dir_exists(data), "data.name",
              f"dataset {data.name!r} is not built under {data.data_dir!r}; build it with "
              f"`python -m tfds_builders build {data.name} --data_dir={data.data_dir} "
              "--manual_dir=...` or set config.data.data_dir")
    if not config.tokenizer.train_if_missing:
        check(storage_path(config.tokenizer.path).exists(), "tokenizer.path",
              f"{config.tokenizer.path!r} does not exist; train it with `python -m "
              f"flipjax.data.tokenizer --dataset={data.name} --data_dir={data.data_dir} "
              + (f"--builder_config={data.builder_config} " if data.builder_config else "")
              + f"--vocab_size={config.tokenizer.vocab_size} --output={config.tokenizer.path}`")


def prepare(config: ml_collections.ConfigDict) -> None:
    """Builds the dataset and trains the tokenizer if the config asks for it and they're
    missing (the demo config does; pod configs point at prepared data).

    With several processes only process 0 does it and the others wait for its outcome: they
    share the storage (as multi-host runs must, data_dir included), where concurrent writers of
    one file would race, and tokenizers trained on each host could differ."""
    with fails_together("build the dataset or train the tokenizer"):
        if jax.process_index() == 0:
            _build_missing(config)


def _build_missing(config: ml_collections.ConfigDict) -> None:
    from flipjax.data.tokenizer import dataset_texts, train_sentencepiece

    data = config.data
    if data.build_if_missing and not dataset_dir_exists(data):
        import tfds_builders

        tfds_builders.build(data.name, data.data_dir, manual_dir=data.manual_dir,
                            num_workers=os.cpu_count() or 1, config=data.builder_config)
    if config.tokenizer.train_if_missing and not storage_path(config.tokenizer.path).exists():
        texts = dataset_texts(data.name, data.data_dir, data.train_split, data.text_key,
                              data.builder_config,
                              fields=("config.data.train_split", "config.data.text_key"))
        train_sentencepiece(texts, config.tokenizer.path, config.tokenizer.vocab_size)
