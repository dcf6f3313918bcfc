"""TFDS builder for `synthetic_faces`, a procedurally rendered stand-in for FaceCaption-15M."""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from tfds_builders.builder_utils import tfds_buckets_without_tensorflow
from tfds_builders.parallel import ordered_map
from tfds_builders.synthetic_faces.attributes import ATTRIBUTE_NAMES, sample_attributes
from tfds_builders.synthetic_faces.captions import make_caption
from tfds_builders.synthetic_faces.render import encode_jpeg, render_face

SPLITS: tuple[str, ...] = ("train", "validation", "test")


@dataclasses.dataclass(kw_only=True)
class SyntheticFacesConfig(tfds.core.BuilderConfig):
    """Image size, split sizes and seed; each config is an independent, reproducible dataset."""

    image_size: int = 64
    num_train: int = 20_000
    num_validation: int = 1_000
    num_test: int = 1_000
    seed: int = 0


def generate_example(seed: int, split_index: int, index: int,
                     image_size: int) -> tuple[int, dict[str, Any]]:
    """Renders record `index` of split `SPLITS[split_index]`; returns (key, example).

    The key is `index` itself: with shuffling disabled TFDS writes records in key order and,
    for a split past its in-memory buffer (1 GB), buckets them by the key's integer value (a
    string key raised a TypeError there, and sorted "train_1000000" before "train_999999").

    The record is a pure function of (seed, split_index, index), so a build is bit-for-bit
    reproducible and records can be rendered in any order or in parallel workers. This is a
    module-level function so that multiprocessing can pickle it.
    """
    rng = np.random.default_rng([seed, split_index, index])
    attrs = sample_attributes(rng)
    image = render_face(attrs, rng, image_size)
    caption = make_caption(attrs, rng)
    return index, {
        "image": encode_jpeg(image),
        "caption": caption,
        "attributes": np.array([attrs[name] for name in ATTRIBUTE_NAMES], dtype=np.int32),
        "id": f"{SPLITS[split_index]}_{index:06d}",
    }


class SyntheticFaces(tfds.core.GeneratorBasedBuilder):
    """Synthetic cartoon faces with CelebA-style attributes and FaceCaption-15M-style captions.

    Purpose: a tiny, fully controlled image-text dataset on which a small CLIP/FLIP-style model
    can learn image<->caption alignment on a CPU in minutes, so that the whole training,
    evaluation and export pipeline can be tested end to end without the 15M-pair real dataset.
    Because the generating attributes are known exactly, it also supports linear-probe and
    zero-shot attribute evaluation with perfect labels.

    Each record holds:
      * `image`: JPEG bytes (quality 90) of a square RGB face, 64 px by default. Faces vary in
        position, scale, in-plane rotation, skin tone, colours, background and lighting.
      * `caption`: one to four short English sentences generated from the attributes.
      * `attributes`: int32 0/1 vector ordered as `ATTRIBUTE_NAMES` (also stored in the dataset
        metadata under "attribute_names", next to "image_size"), with CelebA names and realistic
        dependencies (one hair colour or Bald, No_Beard == not (Mustache or Goatee), ...).
      * `id`: "<split>_<index>".
    Records are written in generation order (`disable_shuffling`), so record i of a split is
    the one generated from seed (config.seed, split index, i).
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        SyntheticFacesConfig(name="default", description="64 px, 20000/1000/1000 images."),
        SyntheticFacesConfig(name="tiny", num_train=512, num_validation=64, num_test=64,
                             description="64 px, 512/64/64 images, for tests."),
        SyntheticFacesConfig(name="res96", image_size=96,
                             description="96 px, 20000/1000/1000 images."),
        SyntheticFacesConfig(name="res128", image_size=128,
                             description="128 px, 20000/1000/1000 images."),
    ]

    def __init__(self, *, num_workers: int = 1, **kwargs: Any) -> None:
        """`num_workers` > 1 renders in a spawned process pool (rendering dominates build time)."""
        tfds_buckets_without_tensorflow()
        self._num_workers = num_workers
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        cfg = self.builder_config
        return tfds.core.DatasetInfo(
            builder=self,
            description=inspect.cleandoc(SyntheticFaces.__doc__),
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(), dtype=np.object_),
                "caption": tfds.features.Tensor(shape=(), dtype=np.object_),
                "attributes": tfds.features.Tensor(shape=(len(ATTRIBUTE_NAMES),), dtype=np.int32),
                "id": tfds.features.Tensor(shape=(), dtype=np.object_),
            }),
            metadata=tfds.core.MetadataDict(
                attribute_names=list(ATTRIBUTE_NAMES), image_size=cfg.image_size
            ),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        del dl_manager  # Nothing to download: every example is rendered.
        cfg = self.builder_config
        sizes = (cfg.num_train, cfg.num_validation, cfg.num_test)
        return {name: self._generate_examples(i, sizes[i]) for i, name in enumerate(SPLITS)}

    def _generate_examples(self, split_index: int,
                           num_examples: int) -> Iterator[tuple[int, dict[str, Any]]]:
        cfg = self.builder_config
        make = functools.partial(generate_example, cfg.seed, split_index,
                                 image_size=cfg.image_size)
        yield from ordered_map(make, range(num_examples), self._num_workers, chunk_size=64)
