"""Grain input pipeline over TFDS ArrayRecord datasets, read without TensorFlow.

Train: `tfds.data_source` -> seeded global shuffle, reshuffled each epoch -> repeat -> JPEG
decode + random resized crop + flip + tokenise (lazy, seeded per global record, so a restored
iterator reproduces the same batches) -> this process's contiguous rows of each global batch,
no batch spanning two epochs (`ProcessSlice`) -> per-process batch -> optional worker
processes. The global batch is the same
for any number of processes. Each process's iterator state is checkpointed with the model.

Images leave the host as uint8 and are normalised on the device (`normalize_images`), which
quarters host->device traffic.
"""

from __future__ import annotations

import io
import math
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from jax.sharding import NamedSharding
from PIL import Image

from flipjax.data.tokenizer import Tokenizer, captions_of
from tfds_builders.face_crop import to_rgb

Batch = dict[str, np.ndarray]
T = TypeVar("T")


def decode_rgb(data: bytes) -> Image.Image:
    """Encoded image bytes as 8-bit RGB, converted as the dataset builders and
    `flipjax.embed` convert (`face_crop.to_rgb`: transparency over white, 16-bit grey scaled).
    No EXIF orientation is applied: the builders apply it before they encode a record, so
    records carry none (`flipjax.embed`, reading users' files, applies it first). Decoded
    here, not when first used, so that a truncated file fails inside `read_field`."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return to_rgb(image)


def random_resized_crop(image: Image.Image, size: int, scale: tuple[float, float],
                        ratio: tuple[float, float], rng: np.random.Generator) -> Image.Image:
    """torchvision's RandomResizedCrop: a random area/aspect box, resized to size x size."""
    w, h = image.size
    area = w * h
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            x0, y0 = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
            return image.resize((size, size), Image.BICUBIC, box=(x0, y0, x0 + cw, y0 + ch))
    # As torchvision after 10 misses: the whole image, cut to the nearest allowed aspect.
    cw, ch = w, h
    if w / h < ratio[0]:
        ch = round(w / ratio[0])
    elif w / h > ratio[1]:
        cw = round(h * ratio[1])
    x0, y0 = (w - cw) // 2, (h - ch) // 2
    return image.resize((size, size), Image.BICUBIC, box=(x0, y0, x0 + cw, y0 + ch))


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """Resize the short side to `size` (bicubic) and take the central square."""
    w, h = image.size
    s = min(w, h)
    x0, y0 = (w - s) / 2, (h - s) / 2
    return image.resize((size, size), Image.BICUBIC, box=(x0, y0, x0 + s, y0 + s))


def read_field(record: dict, key: str, parse: Callable[[Any], T], where: str) -> T:
    """`parse(record[key])`, a failure re-raised naming the split (`where`), the record's `id`
    and the field: a record that does not decode (a dataset built by other tools than
    tfds_builders, whose conversion checks each one) stops the run saying which it is."""
    try:
        return parse(record[key])
    except Exception as e:  # noqa: BLE001 - whatever it was (PIL's errors, a Skip), named
        record_id = record.get("id")
        if isinstance(record_id, bytes):
            record_id = record_id.decode("utf-8", "replace")
        raise ValueError(f"{where}, record id={record_id!r}, field {key!r}: {e}") from e


def some_captions(value: bytes | str | Sequence[bytes | str]) -> list[str]:
    """`captions_of`, refusing a field that holds none."""
    captions = captions_of(value)
    if not captions:
        raise ValueError("holds no caption")
    return captions


def split_name(cfg: ml_collections.ConfigDict, split: str) -> str:
    """How errors about a split's records name it."""
    return f"{dataset_name(cfg.name, cfg.builder_config)} split {split!r}"


class TrainPreprocess(grain.transforms.RandomMap):
    def __init__(self, cfg: ml_collections.ConfigDict, tokenizer: Tokenizer):
        self.size, self.tokenizer = cfg.image_size, tokenizer
        self.image_key, self.text_key = cfg.image_key, cfg.text_key
        self.scale, self.ratio = tuple(cfg.augment.crop_scale), tuple(cfg.augment.crop_ratio)
        self.flip = cfg.augment.flip
        self.where = split_name(cfg, cfg.train_split)

    def random_map(self, record: dict, rng: np.random.Generator) -> Batch:
        image = read_field(record, self.image_key, decode_rgb, self.where)
        image = random_resized_crop(image, self.size, self.scale, self.ratio, rng)
        if self.flip and rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        # A record with several captions trains on one of them, drawn anew each epoch; one
        # caption draws nothing, so single-caption datasets keep their augmentation stream.
        captions = read_field(record, self.text_key, some_captions, self.where)
        caption = captions[rng.integers(len(captions))] if len(captions) > 1 else captions[0]
        return {"image": np.asarray(image, np.uint8), "text": self.tokenizer.encode(caption)}


def squash(image: Image.Image, size: int) -> Image.Image:
    """The whole image resized to size x size (bicubic), aspect ratio not kept: FLIP's
    evaluation transform (`Resize((224, 224))`), which keeps what a centre crop of a portrait
    frame cuts off (CelebA's 178x218 lose the neck and the top of the head)."""
    return image.resize((size, size), Image.BICUBIC)


EVAL_RESIZES = {"center_crop": center_crop, "squash": squash}


class EvalPreprocess(grain.transforms.Map):
    """Deterministic resize (`EVAL_RESIZES`); keeps every other field for the evaluators.
    `where` names the split in errors (`split_name`)."""

    def __init__(self, image_size: int, image_key: str, resize: str, where: str):
        self.size, self.image_key, self.resize = image_size, image_key, EVAL_RESIZES[resize]
        self.where = where

    def map(self, record: dict) -> dict:
        out = dict(record)
        image = read_field(record, self.image_key, decode_rgb, self.where)
        out["image"] = np.asarray(self.resize(image, self.size), np.uint8)
        return out


def dataset_name(name: str, builder_config: str | None) -> str:
    """TFDS's "name/config" form, which also reads datasets whose builder isn't imported."""
    return f"{name}/{builder_config}" if builder_config else name


def data_source(cfg: ml_collections.ConfigDict, split: str, field: str | None = None,
                keys: Mapping[str, str] | None = None) -> Sequence[dict]:
    """The records of one split, by index (the ArrayRecord files, read without TensorFlow).

    With `field`, the config field (or flag) that chose `split`, and `keys` ({field: feature}
    for the features the caller reads), a split that TFDS cannot open or that selects no
    records, or a feature the dataset lacks, is a `flipjax.config.ConfigError` naming the
    field, raised before anything is trained or embedded."""
    from flipjax.config import ConfigError  # flipjax.config imports this module

    name = dataset_name(cfg.name, cfg.builder_config)
    if field is None:
        return tfds.data_source(name, split=split, data_dir=cfg.data_dir)
    where = f"dataset {name!r} in {cfg.data_dir!r}"
    try:
        source = tfds.data_source(name, split=split, data_dir=cfg.data_dir)
    except (ValueError, KeyError, FileNotFoundError) as e:  # an unknown split, no such build
        lines = str(e).strip().splitlines()  # TFDS's first line says which (then 500 more)
        raise ConfigError(f"{field}={split!r} ({where}): "
                          f"{lines[0] if lines else type(e).__name__}") from e
    features = list(source.dataset_info.features.keys())
    for key_field, key in (keys or {}).items():
        if key not in features:
            raise ConfigError(f"{key_field}={key!r}: {where} has no such feature; its "
                              f"features are {features}")
    if not len(source):
        raise ConfigError(f"{field}={split!r} ({where}): the split selects no records")
    return source


def split_build(cfg: ml_collections.ConfigDict, split: str) -> dict[str, Any]:
    """What identifies the build that a split spec ("train[:90%]") reads: the dataset, its
    version, and for each split the spec draws on its records per shard and its bytes. A
    rebuild (more images downloaded, other crops) changes it; the same build copied
    elsewhere does not. JSON-ready."""
    source = data_source(cfg, split)
    info = source.dataset_info
    parts = sorted({part.splitname for part in
                    tfds.core.ReadInstruction.from_spec(split).to_absolute(info.splits)})
    return {"dataset": dataset_name(cfg.name, cfg.builder_config),
            "version": str(info.version), "split": split, "records": len(source),
            "builds": {name: {"shard_lengths": [int(n) for n in info.splits[name].shard_lengths],
                              "num_bytes": int(info.splits[name].num_bytes)}
                       for name in parts}}


class ProcessSlice(grain.MapDataset):
    """Process `index`'s contiguous share of every global batch, no batch spanning two epochs.

    `parent` repeats epochs of `epoch_length` records, reshuffled each time. An epoch gives
    `epoch_length // B` global batches and drops its last `epoch_length % B` records (others
    each epoch), as PyTorch's `drop_last`: a batch across the boundary could hold one record
    twice, a negative the contrastive loss cannot tell from the positive. Global batch k is
    records [e*N + j*B, e*N + (j+1)*B) of `parent`, with (e, j) = divmod(k, N // B), and this
    process holds rows [index*b, (index+1)*b) of it.

    That is the row order `jax.make_array_from_process_local_data` assembles, so the global
    batch is the same records in the same order whatever the number of processes (a strided
    `parent[index::count]` gives the same records per batch, but interleaved).
    """

    def __init__(self, parent: grain.MapDataset, epoch_length: int, index: int, count: int,
                 local_batch: int):
        super().__init__(parent)
        self._epoch_length, self._index, self._count = epoch_length, index, count
        self._local_batch, self._global_batch = local_batch, count * local_batch
        self._batches_per_epoch = epoch_length // self._global_batch
        epochs = len(parent) // epoch_length
        self._length = epochs * self._batches_per_epoch * local_batch

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        batch, row = divmod(index, self._local_batch)
        epoch, batch_in_epoch = divmod(batch, self._batches_per_epoch)
        return self._parent[epoch * self._epoch_length + batch_in_epoch * self._global_batch
                            + self._index * self._local_batch + row]

    def __str__(self) -> str:
        return (f"ProcessSlice(epoch_length={self._epoch_length}, index={self._index}, "
                f"count={self._count}, b={self._local_batch})")


def make_train_dataset(cfg: ml_collections.ConfigDict, tokenizer: Tokenizer,
                       seed: int) -> grain.IterDataset:
    """The infinite, per-process training dataset of uint8 images and token ids."""
    num_processes = jax.process_count()
    local_batch = cfg.global_batch_size // num_processes
    source = data_source(cfg, cfg.train_split, "config.data.train_split",
                         {"config.data.image_key": cfg.image_key,
                          "config.data.text_key": cfg.text_key})
    if len(source) < cfg.global_batch_size:
        from flipjax.config import ConfigError  # flipjax.config imports this module
        raise ConfigError(f"config.data.global_batch_size: {cfg.global_batch_size} is more "
                          f"than the {len(source)} records of config.data.train_split="
                          f"{cfg.train_split!r}; an epoch must fill one batch")
    # Two unrelated seeds: Grain shuffles epoch e with seed + e, so `seed` itself would give
    # runs of seeds s and s + 1 one record order, an epoch apart.
    shuffle_seed, augment_seed = map(int, np.random.SeedSequence(seed).generate_state(2))
    ds = grain.MapDataset.source(source).shuffle(seed=shuffle_seed).repeat()
    # Augmentation seeds come from the global index (MapDataset is lazy: each process still
    # decodes only its own records), so the batches don't depend on the number of processes.
    ds = ds.random_map(TrainPreprocess(cfg, tokenizer), seed=augment_seed)
    ds = ProcessSlice(ds, len(source), jax.process_index(), num_processes, local_batch)
    ds = ds.batch(local_batch, drop_remainder=True)
    # Batched first, so that a worker's slice (mp_prefetch) is whole batches and the batches
    # are the same for any number of workers: each read thread builds a whole batch, and the
    # buffer counts batches (each a host's share of the global batch, so keep it small).
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads,
                                              prefetch_buffer_size=cfg.prefetch_batches))
    if cfg.num_workers:
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers),
                            worker_init_fn=worker_lives_with_trainer)
    return ds


def worker_lives_with_trainer(worker_index: int, worker_count: int) -> None:
    """Grain worker set-up: the worker ignores SIGTERM and exits when the trainer does.

    SIGTERM is a preemption notice for the trainer, which saves before it exits, and a VM
    shutdown sends it to every process: a worker it killed would fail the trainer's next
    batch before the save. Grain stops its workers itself (an event, then SIGKILL), but only
    from a living trainer: one killed outright (SIGKILL, the OOM killer) left its workers
    blocked on a full queue for good, each holding its decoded batches, so a daemon thread
    waits on the trainer (multiprocessing's parent sentinel) and ends the worker with it."""
    del worker_index, worker_count
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    trainer = multiprocessing.parent_process()
    if trainer is None:  # not a worker process: nothing to follow
        return

    def exit_with_trainer() -> None:
        trainer.join()
        os._exit(0)

    threading.Thread(target=exit_with_trainer, name="exit_with_trainer", daemon=True).start()


def to_global(batch: Batch, sharding: NamedSharding) -> dict[str, jax.Array]:
    """Assembles each process's slice into arrays sharded over the whole mesh."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}



def normalize_images(images: jax.Array, mean: tuple[float, ...],
                     std: tuple[float, ...]) -> jax.Array:
    """uint8 (B, H, W, 3) -> float32 ((x / 255) - mean) / std, on the device."""
    x = images.astype(jnp.float32) / 255.0
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
