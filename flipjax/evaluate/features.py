"""Embedding whole dataset splits with the frozen towers, batched and sharded over all devices.

Evaluation sets are small next to training data, so every process reads the whole split and
feeds identical global batches (`make_array_from_callback` takes each device's slice); outputs
are replicated, so every process ends with all embeddings. Batches have one fixed size, the
tail padded by repeating the last row, so one compiled function serves them all.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Callable, Collection, Iterator

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from flax import nnx
from tqdm import tqdm

from flipjax.data.pipeline import (
    EvalPreprocess,
    data_source,
    normalize_images,
    read_field,
    split_name,
)
from flipjax.data.tokenizer import Tokenizer, captions_of, text_of
from flipjax.models import TwoTowers
from flipjax.storage import storage_path, write_npz_whole
from flipjax.train.sharding import batch_sharding, batch_shards, process0_flag, replicated


def model_fingerprint(model_cfg: ml_collections.ConfigDict,
                      data_cfg: ml_collections.ConfigDict) -> str:
    """A short hash of everything besides the params that decides an image's features: the
    architecture and the eval preprocessing. Keys the on-disk feature cache."""
    blob = json.dumps({"model": model_cfg.to_dict(), "image_size": data_cfg.image_size,
                       "image_key": data_cfg.image_key, "mean": list(data_cfg.mean),
                       "std": list(data_cfg.std),
                       "eval_resize": data_cfg.eval_resize},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def padded(rows: np.ndarray, batch_size: int) -> np.ndarray:
    return np.concatenate([rows, np.repeat(rows[-1:], batch_size - len(rows), axis=0)])


class EvaluationInterruptedError(Exception):
    """An evaluation stopped between batches by its `interrupted` check (a preemption notice):
    it has no results, and the run that resumes from its step evaluates it again."""


class Embedder:
    """Jitted, sharded image and text embedding for a model's params.

    `interrupted` is asked before every batch; when it says so the batch raises
    EvaluationInterruptedError. A training run passes its preemption notice, since one evaluator
    (a probe's embedding of CelebA, say) can outlast the grace period of a notice that
    arrives while it runs, and the step must be saved inside it."""

    def __init__(self, graphdef: nnx.GraphDef, mesh: jax.sharding.Mesh,
                 data_cfg: ml_collections.ConfigDict, batch_size: int, fingerprint: str = "",
                 interrupted: Callable[[], bool] = lambda: False):
        self.fingerprint, self.interrupted = fingerprint, interrupted
        shards = batch_shards(mesh)
        if batch_size % shards:
            raise ValueError(f"eval batch size {batch_size} is not divisible by the "
                             f"{shards} batch shards")
        self.batch_size, self.sharding = batch_size, batch_sharding(mesh)
        mean, std = tuple(data_cfg.mean), tuple(data_cfg.std)

        def images(params, u8):
            model: TwoTowers = nnx.merge(graphdef, params)
            return model.embed_images(normalize_images(u8, mean, std))

        def texts(params, ids):
            model: TwoTowers = nnx.merge(graphdef, params)
            return model.embed_texts(ids)

        def image_layers(params, u8, blocks):
            model: TwoTowers = nnx.merge(graphdef, params)
            return model.img.layer_features(normalize_images(u8, mean, std), blocks)

        kw = dict(in_shardings=(None, self.sharding), out_shardings=replicated(mesh))
        self._images, self._texts = jax.jit(images, **kw), jax.jit(texts, **kw)
        self._image_layers = jax.jit(image_layers, static_argnums=2, **kw)
        self._image_tower_sums = jax.jit(
            lambda params: jnp.stack([jnp.stack([jnp.sum(x.astype(jnp.float32)),
                                                 jnp.sum(jnp.square(x.astype(jnp.float32)))])
                                      for x in jax.tree.leaves(params["img"])]),
            out_shardings=replicated(mesh))

    def weights_digest(self, params: dict) -> str:
        """A short hash of the image tower's weights (each tensor's sum and sum of squares):
        a run rolled back and retrained past a step must not be served that step's cached
        features from before. Float32 sums round by how the weights are sharded, so on
        another mesh the same weights may miss the cache and be embedded again."""
        sums = np.asarray(self._image_tower_sums(params))
        return hashlib.sha256(sums.tobytes()).hexdigest()[:12]

    def _run(self, fn: Callable, params: dict, rows: np.ndarray) -> np.ndarray:
        """`fn`'s outputs for `rows`; non-finite ones (a diverged checkpoint) are a ValueError:
        a NaN feature compares false with everything, so probes and zero-shot would score the
        checkpoint as a constant predictor rather than fail."""
        if self.interrupted():
            raise EvaluationInterruptedError("a preemption notice arrived while evaluating")
        batch = padded(rows, self.batch_size)
        array = jax.make_array_from_callback(batch.shape, self.sharding, lambda idx: batch[idx])
        out = np.asarray(fn(params, array))[: len(rows)]
        finite = np.isfinite(out.reshape(len(out), -1)).all(axis=1)
        if not finite.all():
            raise ValueError(f"the model's outputs for {int((~finite).sum())} of {len(out)} "
                             "inputs hold NaN or Inf; evaluation needs finite features (is "
                             "the checkpoint diverged?)")
        return out

    def images(self, params: dict, images_u8: np.ndarray) -> np.ndarray:
        return self._run(self._images, params, images_u8)

    def image_layers(self, params: dict, images_u8: np.ndarray,
                     blocks: tuple[int, ...] | None) -> np.ndarray:
        """`ViT.layer_features` (N, F, width), as float16 (saturating: a block output past
        65504 would be inf): a CelebA train split's is 3 GB."""
        fn = lambda params, images: self._image_layers(params, images, blocks)  # noqa: E731
        limit = np.finfo(np.float16).max
        return np.clip(self._run(fn, params, images_u8), -limit, limit).astype(np.float16)

    def texts(self, params: dict, ids: np.ndarray) -> np.ndarray:
        out = [self._run(self._texts, params, ids[i: i + self.batch_size])
               for i in range(0, len(ids), self.batch_size)]
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def eval_records(data_cfg: ml_collections.ConfigDict, split: str) -> grain.MapDataset:
    """A split's records, eval-preprocessed when read (by index, in split order)."""
    return grain.MapDataset.source(data_source(data_cfg, split)).map(
        EvalPreprocess(data_cfg.image_size, data_cfg.image_key, data_cfg.eval_resize,
                       split_name(data_cfg, split)))


def in_batches(records: grain.MapDataset, batch_size: int, desc: str) -> Iterator[list[dict]]:
    """Lists of up to `batch_size` of `records`, in order, with a progress bar."""
    n = len(records)
    for start in tqdm(range(0, n, batch_size), desc=desc, leave=False,
                      disable=jax.process_index() != 0):
        yield [records[i] for i in range(start, min(n, start + batch_size))]


def embed_split(embedder: Embedder, params: dict, data_cfg: ml_collections.ConfigDict,
                split: str, tokenizer: Tokenizer, *, text_key: str | None = None
                ) -> dict[str, np.ndarray]:
    """Image embeddings of every record of `split` and, with `text_key`, caption embeddings.

    A record may hold one caption (a string) or several (a sequence); `caption_owner[j]` is the
    index of the image that caption j describes.
    """
    images, captions, owners = [], [], []
    num_images, where = 0, split_name(data_cfg, split)
    for recs in in_batches(eval_records(data_cfg, split), embedder.batch_size,
                           f"embed {split}"):
        images.append(embedder.images(params, np.stack([r["image"] for r in recs])))
        if text_key is not None:
            for i, r in enumerate(recs):
                texts = read_field(r, text_key, captions_of, where)
                captions += texts
                owners += [num_images + i] * len(texts)
        num_images += len(recs)
    out = {"image": np.concatenate(images)}
    if text_key is not None:
        out["text"] = embedder.texts(params, tokenizer.encode_batch(captions))
        out["caption_owner"] = np.asarray(owners, np.int64)
    return out


def label_array(values: list) -> np.ndarray:
    """Labels as an array: 0/1 ints for attribute vectors (-1/1 files read as 0/1), str for
    names (e.g. LFWA identities), ints otherwise."""
    if isinstance(values[0], (bytes, str)):
        return np.asarray([text_of(v) for v in values])
    array = np.asarray(values)
    return (array > 0).astype(np.int32) if array.ndim == 2 else array.astype(np.int64)


def source_identity(data_cfg: ml_collections.ConfigDict, split: str) -> str:
    """Which build of a split the records come from: its directory and its size, so that a
    moved, rebuilt or re-versioned dataset is embedded anew rather than served from cache."""
    info = data_source(data_cfg, split).dataset_info
    directory = str(storage_path(info.data_dir))
    stats = info.splits[split.split("[")[0]]
    return f"{directory}|{stats.num_examples}|{stats.num_bytes}"


# What a cache file holds and how it was computed (preprocessing, label encoding): a change to
# either bumps it, so that workdirs' older files are not served as current ones.
FEATURE_CACHE_VERSION = 2


def feature_cache_path(cache_dir: str, data_cfg: ml_collections.ConfigDict, split: str,
                       label_key: str, step: int, fingerprint: str) -> epath.Path:
    """The cache file of a split's features at a checkpoint step; its hash covers the model
    fingerprint, the split's `source_identity` and `FEATURE_CACHE_VERSION`. Every file lies
    in `cache_dir` itself (a nested label key's "/" is written "_"), where pruning looks."""
    dataset = data_cfg.name + (f"-{data_cfg.builder_config}" if data_cfg.builder_config else "")
    split_name = split.replace("/", "_").replace("[", "_").replace("]", "").replace(":", "-")
    key = hashlib.sha256(f"v{FEATURE_CACHE_VERSION}|{fingerprint}|"
                         f"{source_identity(data_cfg, split)}|{split}|{label_key}".encode())
    return storage_path(cache_dir) / (f"{dataset}_{split_name}_{label_key.replace('/', '_')}_"
                                      f"step{step}_{key.hexdigest()[:12]}.npz")


_CACHE_STEP = re.compile(r"_step(\d+)_[0-9a-f]{12}\.npz$")


def prune_feature_cache(cache_dir: str, keep_steps: Collection[int]) -> None:
    """Deletes the cached features of checkpoint steps not in `keep_steps` (those whose
    checkpoints are gone cannot be evaluated again): a CelebA probe caches ~0.6 GB a step.
    Housekeeping, done by process 0 alone: a file that will not go is left with a warning,
    not raised, where the other processes would wait for process 0 in the next step."""
    root = storage_path(cache_dir)
    try:
        if not root.exists():
            return
        for path in root.iterdir():
            match = _CACHE_STEP.search(path.name)
            if match and int(match.group(1)) not in keep_steps:
                path.unlink(missing_ok=True)
    except Exception as e:  # noqa: BLE001 - an object store's client raises its own types
        logging.warning("feature cache in %s not pruned: %s", root, e)


def image_features(embedder: Embedder, params: dict, data_cfg: ml_collections.ConfigDict,
                   split: str, label_key: str, *, layers: bool = False,
                   blocks: tuple[int, ...] | None = None, cache_dir: str | None = None,
                   step: int | None = None) -> dict[str, np.ndarray]:
    """{"features": image embeddings (N, D), or with `layers` the image tower's
    `layer_features` of `blocks` (N, F, width), "labels": `label_key` of each record}.

    With `cache_dir` and `step` embeddings are read from / written to an .npz keyed by dataset,
    split, label, checkpoint step, the model fingerprint, the image tower's weights
    (`Embedder.weights_digest`) and the split's build, so
    re-evaluating a checkpoint (several probes, several hyperparameter grids) embeds each split
    once. Layer features are never cached: 12 vectors an image, 3.7 GB a CelebA evaluation,
    would fill the workdir's disk within a run.
    """
    path = None
    if cache_dir is not None and step is not None and not layers:
        path = feature_cache_path(cache_dir, data_cfg, split, label_key, step,
                                  f"{embedder.fingerprint}-{embedder.weights_digest(params)}")
        # Process 0's view for all: each must take the same branch (embedding is jitted over
        # all of them), and the others may look before process 0's write of this step (another
        # evaluator of the split) has landed.
        if process0_flag(path.exists()):
            with np.load(io.BytesIO(path.read_bytes())) as f:
                return {"features": f["features"], "labels": f["labels"]}
    # Filled in place: a CelebA train split's layer features are 3 GB, a concatenated list
    # of batches would hold them twice.
    records, feats, labels = eval_records(data_cfg, split), None, []
    for recs in in_batches(records, embedder.batch_size, f"features {split}"):
        images = np.stack([r["image"] for r in recs])
        batch = (embedder.image_layers(params, images, blocks) if layers
                 else embedder.images(params, images))
        if feats is None:
            feats = np.empty((len(records), *batch.shape[1:]), batch.dtype)
        feats[len(labels):len(labels) + len(batch)] = batch
        labels += [r[label_key] for r in recs]
    out = {"features": feats, "labels": label_array(labels)}
    if path is not None and jax.process_index() == 0:
        try:
            write_npz_whole(path, **out)
        except OSError as e:  # a full disk costs the cache, not the evaluation (nor a hang
            # of the other processes, which did not fail)
            logging.warning("feature cache not written (%s): %s", path, e)
    return out
