"""Plumbing shared by the face dataset builders: workers, ArrayRecord output and skip reports.

Every builder here reads messy, manually downloaded data and skips what it cannot use instead of
failing. What was skipped, and why, must not be lost, so each build writes a JSON report next to
the dataset files and prints a summary at the end:

    <data_dir>/<name>/<config>/<version>/skipped.json
    {
      "dataset": "facecaption15m/default/1.0.0",
      "mode": "local" | "beam",
      "records_read": 1000,                       # input records considered
      "records_written": {"train": 980, ...},     # per split
      "skipped": {"missing_image": 12, ...},      # input records not written, by reason
      "ignored_images": {"not_in_parquet": 3, ...}  # image files that matched no record
    }

`records_read == sum(records_written) + sum(skipped)` always holds. The skip reasons are
defined in `face_crop`, the ignored-image reasons in `facecaption15m.layouts`. In Beam mode the
counts travel as Beam metrics counters and are collected from the pipeline result, so the
report is identical in both modes.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import functools
import importlib.util
import json
import types
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from tfds_builders import face_crop
from tfds_builders.parallel import ordered_map

REPORT_FILENAME = "skipped.json"


def tfds_buckets_without_tensorflow() -> None:
    """Lets TFDS write a split larger than its in-memory buffer (1 GB of records, e.g.
    CelebA's train split) without TensorFlow, as the rest of a build already goes.

    Past the buffer TFDS's writer sorts records through 1000 temporary bucket files that it
    opens with `tf.io.gfile`; without TensorFlow that raised ModuleNotFoundError after the
    first gigabyte. Where TensorFlow is not installed, the buckets use plain files (etils, so
    gs:// too). Every builder's constructor calls this (once is enough; again is harmless)."""
    if importlib.util.find_spec("tensorflow") is not None:
        return
    from tensorflow_datasets.core import shuffle

    def open_bucket(path: str, mode: str):
        try:
            return epath.Path(path).open(mode)
        except OSError as e:  # up to 1000 buckets open at once (macOS allows 256 by default)
            if e.errno != errno.EMFILE or not _allow_more_open_files(shuffle.BUCKETS_NUMBER):
                raise
            return epath.Path(path).open(mode)

    gfile = types.SimpleNamespace(GFile=open_bucket,
                                  exists=lambda path: epath.Path(path).exists(),
                                  remove=lambda path: epath.Path(path).unlink())
    # `errors.ResourceExhaustedError` is what TFDS catches around writes; plain files raise
    # OSError instead, which propagates.
    shuffle.tf = types.SimpleNamespace(
        io=types.SimpleNamespace(gfile=gfile),
        errors=types.SimpleNamespace(ResourceExhaustedError=type("NeverRaised", (Exception,), {})))


def _allow_more_open_files(more: int) -> bool:
    """Raises the soft limit on open files by `more`, up to the hard limit (which macOS sets
    to unlimited); whether it rose."""
    import resource  # POSIX only; the builders' TensorFlow-free buckets need it on EMFILE only

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return False
    wanted = soft + more if hard == resource.RLIM_INFINITY else min(soft + more, hard)
    if wanted <= soft:
        return False
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    except (ValueError, OSError):  # e.g. macOS refuses a soft limit above OPEN_MAX
        return False
    return True

# The 40 CelebA attributes in the order of list_attr_celeba.txt; LFWA uses the same ones.
CELEBA_ATTRIBUTE_NAMES: tuple[str, ...] = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs",
    "Big_Lips", "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair",
    "Bushy_Eyebrows", "Chubby", "Double_Chin", "Eyeglasses", "Goatee", "Gray_Hair",
    "Heavy_Makeup", "High_Cheekbones", "Male", "Mouth_Slightly_Open", "Mustache", "Narrow_Eyes",
    "No_Beard", "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline", "Rosy_Cheeks",
    "Sideburns", "Smiling", "Straight_Hair", "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat",
    "Wearing_Lipstick", "Wearing_Necklace", "Wearing_Necktie", "Young",
)

MMLAB_FACE_ATTRIBUTES = dict(
    homepage="https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html",
    citation="@inproceedings{liu2015faceattributes, title={Deep Learning Face Attributes in the "
             "Wild}, author={Liu, Ziwei and Luo, Ping and Wang, Xiaogang and Tang, Xiaoou}, "
             "booktitle={ICCV}, year={2015}}",
)


def attribute_set_info(builder: tfds.core.DatasetBuilder, description: str,
                       **features: tfds.features.FeatureConnector) -> tfds.core.DatasetInfo:
    """DatasetInfo of a 40-attribute set from MMLAB's "Deep Learning Face Attributes in the
    Wild" (CelebA, LFWA): JPEG bytes, the attributes in CELEBA_ATTRIBUTE_NAMES order, an id,
    and the set's own `features`."""
    return tfds.core.DatasetInfo(
        builder=builder,
        description=description,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(), dtype=np.object_),
            "attributes": tfds.features.Tensor(shape=(40,), dtype=np.int32),
            "id": tfds.features.Tensor(shape=(), dtype=np.object_),
            **features,
        }),
        metadata=tfds.core.MetadataDict(attribute_names=list(CELEBA_ATTRIBUTE_NAMES)),
        **MMLAB_FACE_ATTRIBUTES,
    )


# Beam counter names: RECORDS_READ, and "<SKIPPED>/<reason>" / "<IGNORED>/<reason>".
RECORDS_READ = "records_read"
SKIPPED = "skipped"
IGNORED = "ignored_images"


@dataclasses.dataclass
class SkipReport:
    """Counts of what a build read and skipped."""

    records_read: int = 0
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    ignored_images: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def add_counter(self, name: str, value: int) -> None:
        """Adds a Beam counter (named as documented above) to the report."""
        group, _, reason = name.partition("/")
        if name == RECORDS_READ:
            self.records_read += value
        elif group == SKIPPED:
            self.skipped[reason] += value
        elif group == IGNORED:
            self.ignored_images[reason] += value

    def as_dict(self, dataset: str, mode: str, written: dict[str, int]) -> dict[str, Any]:
        """The JSON report, with zero counts left out so reports compare exactly."""
        return {
            "dataset": dataset,
            "mode": mode,
            "records_read": self.records_read,
            "records_written": written,
            "skipped": dict(sorted((k, v) for k, v in self.skipped.items() if v)),
            "ignored_images": dict(sorted((k, v) for k, v in self.ignored_images.items() if v)),
        }


def format_report(report: dict[str, Any], path: str) -> str:
    """Human-readable summary of a report dict, printed at the end of a build."""
    written = report["records_written"]
    lines = [
        f"{report['dataset']}: read {report['records_read']} records, wrote "
        f"{sum(written.values())} ({', '.join(f'{k} {v}' for k, v in written.items())}), "
        f"skipped {sum(report['skipped'].values())}."
    ]
    lines += [f"  skipped {reason}: {n}" for reason, n in report["skipped"].items()]
    lines += [f"  ignored image ({reason}): {n}" for reason, n in report["ignored_images"].items()]
    lines.append(f"  report: {path}")
    return "\n".join(lines)


class ManualDirError(ValueError):
    """A required file of a manual download is missing."""


class EmptySplitError(ValueError):
    """A split would contain no records, which TFDS cannot write."""


def find_path(manual_dir: epath.Path, candidates: Sequence[str], what: str) -> epath.Path:
    """The first of `candidates` (paths relative to manual_dir) that exists.

    Official archives and common re-uploads nest the same files differently (CelebA's
    `Anno/` and `Eval/` folders, for instance), so each required file has a few accepted
    places. If none exists, the error lists them and what manual_dir actually contains.
    """
    for candidate in candidates:
        path = manual_dir / candidate
        if path.exists():
            return path
    found = sorted(p.name + ("/" if p.is_dir() else "") for p in manual_dir.iterdir()) \
        if manual_dir.is_dir() else []
    raise ManualDirError(
        f"Missing {what} in {manual_dir}: expected one of {', '.join(candidates)}.\n"
        f"Found: {', '.join(found[:30]) or 'nothing'}")


def find_optional(manual_dir: epath.Path, candidates: Sequence[str]) -> epath.Path | None:
    """Like `find_path` for annotations the dataset can do without."""
    return next((manual_dir / c for c in candidates if (manual_dir / c).exists()), None)


def annotation_lines(path: epath.Path) -> list[str | None]:
    """The lines of an annotation text file; None for a line that is not valid UTF-8, so one
    bad line costs one record rather than the whole file."""
    lines = []
    for raw in path.read_bytes().splitlines():
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            lines.append(None)
    return lines


@dataclasses.dataclass(kw_only=True)
class ImageSetConfig(tfds.core.BuilderConfig):
    """Image size limits for the evaluation sets, whose images are already aligned faces.

    Attributes:
      max_short_side: images whose short side is larger are downscaled to it (never
        upscaled); None keeps every image at its distributed size. Untouched RGB JPEGs are
        stored byte-for-byte.
      max_pixels: images with more pixels are skipped as decompression bombs.
    """

    max_short_side: int | None = 256
    max_pixels: int = face_crop.DEFAULT_MAX_PIXELS


def default_image_set_configs() -> list[ImageSetConfig]:
    """The configs every evaluation set offers: 256 px (default) and full resolution."""
    return [
        ImageSetConfig(name="default", description="Images as distributed, downscaled to at "
                       "most 256 px on the short side."),
        ImageSetConfig(name="full", max_short_side=None,
                       description="Images at their distributed resolution."),
    ]


class FaceDatasetBuilder(tfds.core.GeneratorBasedBuilder):
    """Base class: `num_workers`, ArrayRecord by default, and the skip report.

    Subclasses count skipped records through `self.report` (or `_keep_successes`) while their
    generators run; Beam pipelines increment counters in the namespace `beam_namespace`.
    """

    def __init__(self, *, num_workers: int = 1, **kwargs: Any) -> None:
        """`num_workers` > 1 decodes and encodes images in a process pool.

        ArrayRecord is the default file format because TFDS's default, TFRecord, needs
        TensorFlow to write.
        """
        tfds_buckets_without_tensorflow()
        if kwargs.get("file_format") is None:
            kwargs["file_format"] = "array_record"
        self._num_workers = max(1, int(num_workers))
        self.report = SkipReport()
        self._report_dict: dict[str, Any] | None = None
        self._use_beam = False
        super().__init__(**kwargs)

    @property
    def beam_namespace(self) -> str:
        """Namespace of this builder's Beam metrics counters."""
        return f"tfds_builders.{self.name}"

    def _download_and_prepare(self, dl_manager: tfds.download.DownloadManager,
                              download_config: tfds.download.DownloadConfig) -> None:
        # Beam is used exactly when the caller asks TFDS for it, the usual TFDS convention.
        self._use_beam = (download_config.beam_runner is not None
                          or download_config.beam_options is not None)
        self.report = SkipReport()
        super()._download_and_prepare(dl_manager, download_config)
        written = {name: split.num_examples for name, split in self.info.splits.items()}
        self._report_dict = self.report.as_dict(
            self.info.full_name, "beam" if self._use_beam else "local", written)
        # `data_dir` is still the temporary build directory here, which TFDS renames on
        # success, so the report only appears next to a complete dataset.
        (self.data_path / REPORT_FILENAME).write_text(json.dumps(self._report_dict, indent=2))

    def _process_pipeline_result(self, pipeline_result: Any) -> None:
        from apache_beam.metrics.metric import MetricsFilter  # Only reached in Beam mode.

        filter_ = MetricsFilter().with_namespace(self.beam_namespace)
        for result in pipeline_result.metrics().query(filter_)["counters"]:
            value = result.committed if result.committed is not None else result.attempted
            self.report.add_counter(result.key.metric.name, value or 0)

    def _post_download_and_prepare_hook(self) -> None:
        if self._report_dict is not None:
            print(format_report(self._report_dict, str(self.data_path / REPORT_FILENAME)))

    def _nonempty(self, split: str, examples: Iterable[Any]) -> Iterator[Any]:
        """Passes `examples` through, failing clearly if there are none.

        TFDS cannot write an empty split and would fail with a bare "No examples were
        yielded"; this says which split it is and what was skipped, which is what the user
        needs to fix the input or the split fractions.
        """
        empty = True
        for example in examples:
            empty = False
            yield example
        if empty:
            counts = ", ".join(f"{k}: {v}" for k, v in sorted(self.report.skipped.items()))
            raise EmptySplitError(
                f"Split {split!r} of {self.name} has no usable records. Records skipped so far "
                f"(all splits): {counts or 'none'}. Check the manual_dir contents or give the "
                f"split a larger share.")

    def _keep_successes(self, outcomes: Iterable[tuple[bool, Any]]) -> Iterator[Any]:
        """Counts the reasons of failed `face_crop.capture_skip` outcomes; yields the rest."""
        for ok, value in outcomes:
            if ok:
                yield value
            else:
                self.report.skipped[value] += 1

    def _parallel(self, fn: Callable[[Any], Any], tasks: Iterable[Any]) -> Iterator[Any]:
        """`ordered_map` of `capture_skip(fn, task)` over this builder's workers."""
        return ordered_map(functools.partial(face_crop.capture_skip, fn), tasks,
                           self._num_workers)

    def _image_examples(self, entries: list[tuple[str, str, dict[str, Any]]],
                        max_short_side: int | None,
                        max_pixels: int) -> Iterator[tuple[str, dict[str, Any]]]:
        """Examples for (key, image path, other features) entries of an evaluation set.

        Each image goes through `face_crop.image_example` in the worker pool; entries whose
        image is missing or unusable are counted in the report and left out.
        """
        tasks = [(key, path, features, max_short_side, max_pixels)
                 for key, path, features in entries]
        yield from self._keep_successes(self._parallel(face_crop.image_example, tasks))


class ImageSetBuilder(FaceDatasetBuilder):
    """An evaluation set: `_split_generators` lists (key, image path, features) entries per
    split, and every split is generated the same way from them."""

    def _generate_examples(self, split: str,
                           entries: list) -> Iterator[tuple[str, dict[str, Any]]]:
        cfg: ImageSetConfig = self.builder_config
        yield from self._nonempty(
            split, self._image_examples(entries, cfg.max_short_side, cfg.max_pixels))
