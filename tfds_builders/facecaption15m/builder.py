"""TFDS builder for FaceCaption-15M face crops (see `FaceCaption15M`)."""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from tqdm import tqdm

from tfds_builders import face_crop
from tfds_builders.builder_utils import FaceDatasetBuilder
from tfds_builders.face_crop import DUPLICATE_ID, Skip
from tfds_builders.facecaption15m import layouts, records
from tfds_builders.parallel import ordered_map

DEFAULT_SPLITS: tuple[tuple[str, float], ...] = (
    ("train", 0.99), ("validation", 0.005), ("test", 0.005))


@dataclasses.dataclass(kw_only=True)
class FaceCaption15MConfig(tfds.core.BuilderConfig):
    """Input layout, crop geometry and split fractions.

    Attributes:
      layout: "auto" (detected from `<manual_dir>/<images_subdir>`), "files", "webdataset",
        "parquet" or "flat"; see `layouts`.
      img2dataset_resize_mode: the `--resize_mode` img2dataset was run with ("border" is its
        default); it decides how parquet boxes map onto the stored images. Ignored for "flat".
      resolution, margin, min_face_size, max_pixels, jpeg_quality: see `face_crop.CropSpec`.
      split_fractions: (split name, fraction) pairs summing to 1. A record's split is a hash
        of its `_id`, so changing the fractions moves only the records at the boundaries.
      parquet_file: the metadata parquet inside manual_dir; None means the only `*.parquet`.
      images_subdir: the directory inside manual_dir holding the images.
    """

    layout: str = layouts.AUTO
    img2dataset_resize_mode: str = "border"
    resolution: int = face_crop.CropSpec.resolution
    margin: float = face_crop.CropSpec.margin
    min_face_size: int = face_crop.CropSpec.min_face_size
    max_pixels: int = face_crop.CropSpec.max_pixels
    jpeg_quality: int = face_crop.CropSpec.jpeg_quality
    split_fractions: tuple[tuple[str, float], ...] = DEFAULT_SPLITS
    parquet_file: str | None = None
    images_subdir: str = "images"

    def __post_init__(self) -> None:
        if self.layout != layouts.AUTO and self.layout not in layouts.LAYOUTS:
            raise ValueError(f"layout must be {layouts.AUTO!r} or one of {layouts.LAYOUTS}")
        if self.img2dataset_resize_mode not in layouts.RESIZE_MODES:
            raise ValueError(f"img2dataset_resize_mode must be one of {layouts.RESIZE_MODES}")
        names = [name for name, _ in self.split_fractions]
        fractions = [fraction for _, fraction in self.split_fractions]
        # A split of fraction 0 could get no record, and the build would fail on it only
        # after writing the splits before it (train: hours at 15M rows).
        if len(set(names)) != len(names) or min(fractions) <= 0 or abs(sum(fractions) - 1) > 1e-9:
            raise ValueError(f"split_fractions must name distinct splits with fractions > 0 "
                             f"summing to 1 (leave an unwanted split out), got "
                             f"{self.split_fractions}")

    @property
    def crop_spec(self) -> face_crop.CropSpec:
        return face_crop.CropSpec(resolution=self.resolution, margin=self.margin,
                                  min_face_size=self.min_face_size, max_pixels=self.max_pixels,
                                  jpeg_quality=self.jpeg_quality)


def _layout_config(layout: str) -> FaceCaption15MConfig:
    return FaceCaption15MConfig(
        name=layout, layout=layout,
        description=f"Like 'default' but requires the {layout!r} image layout.")


class FaceCaption15M(FaceDatasetBuilder):
    """Face crops of FaceCaption-15M (Dai et al. 2024) with their captions.

    Each record is one parquet row of `FaceCaption-v2.parquet` joined with its image:
      * `image`: RGB JPEG of the face box widened by `margin` on each side, squared, moved to
        fit the image (`face_crop.crop_window`), made upright by the file's EXIF orientation if
        any, and resized so its short side is `resolution` px.
      * `caption`: the FaceCaption-15M caption; `laion_caption`: the original LAION alt text
        ("" when absent); `id`: the row's `_id`.
      * `box`: int32 [x1, y1, x2, y2], the parquet box as given (pixels of the original image);
        `original_size`: int32 [width, height] of the image the box refers to.
    Splits are assigned by a hash of `_id` (fractions in the config), so no `_id` is ever in two
    splits and the assignment does not depend on the build. Rows that cannot be used are
    skipped and counted by reason in `skipped.json` next to the dataset (see builder_utils).

    The build runs locally with `num_workers` processes, or as an Apache Beam pipeline when
    TFDS is given a Beam runner or pipeline options (DownloadConfig.beam_runner/beam_options),
    e.g. to build all 13M rows on Dataflow, Spark or Flink.
    """

    name = "facecaption15m"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        FaceCaption15MConfig(
            name="default",
            description="Image layout detected; 256 px crops, 20% margin; 99/0.5/0.5% splits."),
        *(_layout_config(layout) for layout in layouts.LAYOUTS),
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Put FaceCaption-v2.parquet (huggingface.co/datasets/OpenFace-CQUPT/FaceCaption-15M) in
    manual_dir and the images in manual_dir/images/, in one of these layouts:
      * img2dataset --output_format files, webdataset or parquet, run with
        --save_additional_columns '["_id"]' (the sidecar must hold `_id`);
      * the originals as distributed by the authors, named <_id>.<ext>.
    See tfds_builders/README.md for the full commands.
    """

    def _info(self) -> tfds.core.DatasetInfo:
        cfg = self.builder_config
        text = tfds.features.Tensor(shape=(), dtype=np.object_)
        return tfds.core.DatasetInfo(
            builder=self,
            description=inspect.cleandoc(FaceCaption15M.__doc__),
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(), dtype=np.object_),
                "caption": text,
                "laion_caption": text,
                "id": text,
                "box": tfds.features.Tensor(shape=(4,), dtype=np.int32),
                "original_size": tfds.features.Tensor(shape=(2,), dtype=np.int32),
            }),
            metadata=tfds.core.MetadataDict(
                resolution=cfg.resolution, margin=cfg.margin, min_face_size=cfg.min_face_size,
                split_fractions=[list(pair) for pair in cfg.split_fractions]),
            homepage="https://huggingface.co/datasets/OpenFace-CQUPT/FaceCaption-15M",
            citation="@article{dai2024facecaption15m, title={15M Multimodal Facial Image-Text "
                     "Dataset}, author={Dai, Dawei and others}, journal={arXiv:2407.08515}, "
                     "year={2024}}",
        )

    def _find_parquet(self, manual_dir: epath.Path) -> epath.Path:
        cfg = self.builder_config
        if cfg.parquet_file is not None:
            path = manual_dir / cfg.parquet_file
            candidates = [path] if path.is_file() else []
        else:
            candidates = sorted(manual_dir.glob("*.parquet"))
        if len(candidates) != 1:
            wanted = cfg.parquet_file or "exactly one *.parquet file (FaceCaption-v2.parquet)"
            found = sorted(p.name + ("/" if p.is_dir() else "") for p in manual_dir.iterdir())
            raise layouts.LayoutError(
                f"Expected {wanted} in {manual_dir} and the images in "
                f"{manual_dir / cfg.images_subdir}/.\nFound: {', '.join(found) or 'nothing'}")
        return candidates[0]

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        cfg = self.builder_config
        manual_dir = dl_manager.manual_dir
        parquet = self._find_parquet(manual_dir)
        metadata = records.parquet_metadata(parquet)  # the footer, read once
        columns = records.check_schema(metadata.schema.to_arrow_schema(), str(parquet))
        images_dir = manual_dir / cfg.images_subdir
        detected = layouts.detect_layout(images_dir, cfg.layout)
        layout = detected.name
        settings = records.ImageSettings(
            layout=layout, images_dir=str(images_dir), resize_mode=cfg.img2dataset_resize_mode,
            spec=cfg.crop_spec, flat_extensions=detected.flat_extensions)
        groups = records.row_groups(parquet, metadata)
        shards = [] if layout == layouts.FLAT else layouts.list_shards(images_dir, layout)
        index = None
        if not self._use_beam and layout != layouts.FLAT:
            index = self._build_index(shards, layout)
        return {
            name: self._generate_examples(split=name, groups=groups, columns=columns,
                                          settings=settings, shards=shards, index=index)
            for name, _ in cfg.split_fractions
        }

    def _build_index(self, shards: list[str], layout: str) -> dict[str, layouts.ImageRef]:
        """`_id` -> image over all img2dataset shards, for the local build.

        Holds one entry per image in memory (about 420 bytes each); the Beam build joins
        with a distributed CoGroupByKey instead.
        """
        index: dict[str, layouts.ImageRef] = {}
        shard_indexes = ordered_map(functools.partial(layouts.index_shard, layout=layout),
                                    shards, self._num_workers)
        for shard_index in tqdm(shard_indexes, total=len(shards), desc="Indexing image shards",
                                unit=" shards"):
            self.report.ignored_images.update(shard_index.ignored)
            for sample_id, ref in shard_index.entries:
                if sample_id not in index:
                    index[sample_id] = ref
                    continue
                # Same choice as the Beam join: the image first in shard order.
                self.report.ignored_images[layouts.DUPLICATE_IMAGE] += 1
                if ref.position < index[sample_id].position:
                    index[sample_id] = ref
        return index

    def _generate_examples(self, *, split: str, groups: list[records.RowGroup],
                           columns: tuple[str, ...], settings: records.ImageSettings,
                           shards: list[str], index: dict[str, layouts.ImageRef] | None) -> Any:
        """A generator of examples, or in Beam mode a `beam.PTransform` producing them."""
        cfg = self.builder_config
        if self._use_beam:
            from tfds_builders.facecaption15m import beam_pipeline  # Beam is optional.

            return beam_pipeline.generate_examples(
                namespace=self.beam_namespace, split=split, split_fractions=cfg.split_fractions,
                groups=groups, columns=columns, settings=settings, shards=shards,
                count_index_problems=split == cfg.split_fractions[0][0])
        return self._local_examples(split, groups, columns, settings, index)

    def _local_examples(self, split: str, groups: list[records.RowGroup],
                        columns: tuple[str, ...], settings: records.ImageSettings,
                        index: dict[str, layouts.ImageRef] | None,
                        ) -> Iterator[tuple[str, dict[str, Any]]]:
        fractions = self.builder_config.split_fractions
        seen: set[str] = set()  # `_id`s of this split's rows, usable or not.
        kept: set[str] = set()

        def tasks() -> Iterator[tuple[records.Row, layouts.ImageRef | None, Any]]:
            progress = tqdm(total=sum(g.num_rows for g in groups), unit=" rows",
                            desc=f"Reading parquet rows for {split}")
            for group in groups:
                for row_index, cells in records.read_rows(group, columns, split, fractions):
                    self.report.records_read += 1
                    try:
                        sample_id = records.row_id(cells)
                        seen.add(sample_id)
                        row = records.parse_row(row_index, sample_id, cells)
                    except Skip as e:
                        self.report.skipped[e.reason] += 1
                        continue
                    if row.id in kept:
                        self.report.skipped[DUPLICATE_ID] += 1
                        continue
                    kept.add(row.id)
                    yield row, index.get(row.id) if index is not None else None, settings
                progress.update(group.num_rows)
            progress.close()

        work: Iterable = tasks()
        if settings.layout == layouts.PARQUET:
            # A parquet image is read with its row group, and img2dataset writes rows in the
            # order downloads finish: visiting the split's images in shard order reads each
            # group about once per worker instead of once per image. TFDS orders the written
            # examples by key, so the dataset is the same; the split's tasks are held in memory.
            work = sorted(work, key=lambda task: task[1].position if task[1] else ("", -1, -1))
        outcomes = self._parallel(records.make_example_task, work)
        yield from self._nonempty(split, self._keep_successes(outcomes))
        if index is not None:
            self.report.ignored_images[layouts.NOT_IN_PARQUET] += sum(
                1 for sample_id in index
                if sample_id not in seen
                and records.split_of(records.id_bytes(sample_id), fractions) == split)
