"""TFDS builder for CelebA attribute recognition (see `CelebA`)."""

from __future__ import annotations

import inspect
import re
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from tfds_builders.builder_utils import (
    CELEBA_ATTRIBUTE_NAMES,
    ImageSetBuilder,
    ManualDirError,
    annotation_lines,
    attribute_set_info,
    default_image_set_configs,
    find_optional,
    find_path,
)
from tfds_builders.face_crop import BAD_ANNOTATION, DUPLICATE_ID, MISSING_ANNOTATION

# list_eval_partition.txt codes.
PARTITIONS = {"0": "train", "1": "validation", "2": "test"}
# The official archive keeps annotations in Anno/ and Eval/ and images in Img/.
_ANNO, _EVAL, _IMG = ("", "Anno/"), ("", "Eval/"), ("", "Img/")


def _candidates(prefixes: tuple[str, ...], name: str) -> list[str]:
    return [prefix + name for prefix in prefixes]


def parse_attribute_file(path: epath.Path) -> dict[str, np.ndarray | None]:
    """list_attr_celeba.txt -> {image name: int32[40] of 0/1 in CELEBA_ATTRIBUTE_NAMES order}.

    Format: a count line, a line of the 40 attribute names, then "<name> v1 ... v40" with
    values -1/1. Columns are matched by name, so a reordered file still reads correctly. A
    line that cannot be parsed maps to None (counted as bad_annotation for its image), and so
    does an image with two lines that disagree: which one is right is unknown. Lines are split
    as bytes, so a stray non-UTF-8 byte among the values still names its image.
    """
    lines = annotation_lines(path)
    header = (lines[1] or "").split() if len(lines) > 1 else []
    if sorted(header) != sorted(CELEBA_ATTRIBUTE_NAMES):
        raise ManualDirError(f"{path}: line 2 must list the 40 CelebA attribute names, got "
                             f"{header[:45]}")
    order = [header.index(name) for name in CELEBA_ATTRIBUTE_NAMES]
    out: dict[str, np.ndarray | None] = {}
    for raw in path.read_bytes().splitlines()[2:]:
        fields = raw.split()
        if not fields:
            continue
        try:
            values = np.array([int(v) for v in fields[1:]], dtype=np.int32)
        except ValueError:  # int() of bytes reads ASCII digits only
            values = None
        parsed = None
        if values is not None and len(values) == 40 and np.isin(values, (-1, 1)).all():
            parsed = (values[order] > 0).astype(np.int32)
        try:
            name = fields[0].decode("utf-8")
        except UnicodeDecodeError:  # no image of the split file can have this name
            continue
        if name in out and (out[name] is None or parsed is None
                            or not np.array_equal(out[name], parsed)):
            parsed = None
        out[name] = parsed
    return out


_INT32 = re.compile(r"-?[0-9]{1,10}")


def parse_table(path: epath.Path | None, width: int, header_lines: int) -> dict[str, list[int]]:
    """Optional "<name> int int ..." annotation files (identities, boxes, landmarks).

    Lines that do not hold `width` integers are left out: the feature then says -1 ("unknown")
    for that image instead of dropping an image that has valid attributes.
    """
    if path is None:
        return {}
    out = {}
    for line in annotation_lines(path)[header_lines:]:
        fields = (line or "").split()
        # ASCII digits that fit the int32 features ("4²" passes str.isdigit, not int()).
        if len(fields) == width + 1 and all(_INT32.fullmatch(f) and -2**31 <= int(f) < 2**31
                                            for f in fields[1:]):
            out[fields[0]] = [int(f) for f in fields[1:]]
    return out


class CelebA(ImageSetBuilder):
    """CelebA (Liu et al. 2015) aligned faces with the 40 binary attributes.

    Manual download (mmlab.ie.cuhk.edu.hk/projects/CelebA.html), in manual_dir, either at the
    top level or in the official archive's Img/, Anno/ and Eval/ folders:
      img_align_celeba/000001.jpg ...     aligned 178x218 images
      list_attr_celeba.txt                attributes, -1/1
      list_eval_partition.txt             "<image> 0|1|2" = train|validation|test
      identity_CelebA.txt                 optional, "<image> <identity>"
      list_bbox_celeba.txt                optional, "<image> x y w h" (in-the-wild images)
      list_landmarks_align_celeba.txt     optional, 5 (x, y) points on the aligned images

    Records: `image` (RGB JPEG; the aligned image, downscaled if larger than the config's
    max_short_side), `attributes` (int32[40], 1 = present, order in the metadata
    "attribute_names"), `id` (file name without extension), `identity` (int32),
    `bbox` (int32[4] x, y, width, height in the unaligned image) and `landmarks` (int32[10]);
    the last three are -1 when their file is absent (see metadata "annotations"). Splits are
    the official partition. Unusable entries are counted in skipped.json.
    """

    name = "celeba"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = default_image_set_configs()
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Download CelebA (mmlab.ie.cuhk.edu.hk/projects/CelebA.html): Img/img_align_celeba.zip
    (extract it), Anno/list_attr_celeba.txt, Eval/list_eval_partition.txt and optionally
    Anno/identity_CelebA.txt, list_bbox_celeba.txt, list_landmarks_align_celeba.txt.
    """

    def _info(self) -> tfds.core.DatasetInfo:
        return attribute_set_info(
            self, inspect.cleandoc(CelebA.__doc__),
            identity=tfds.features.Tensor(shape=(), dtype=np.int32),
            bbox=tfds.features.Tensor(shape=(4,), dtype=np.int32),
            landmarks=tfds.features.Tensor(shape=(10,), dtype=np.int32),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        manual = dl_manager.manual_dir
        images = find_path(manual, _candidates(_IMG, "img_align_celeba"), "the image folder")
        attributes = parse_attribute_file(
            find_path(manual, _candidates(_ANNO, "list_attr_celeba.txt"), "the attributes"))
        partition = find_path(manual, _candidates(_EVAL, "list_eval_partition.txt"),
                              "the split file")
        optional = {
            "identity": (find_optional(manual, _candidates(_ANNO, "identity_CelebA.txt")), 1, 0),
            "bbox": (find_optional(manual, _candidates(_ANNO, "list_bbox_celeba.txt")), 4, 2),
            "landmarks": (find_optional(
                manual, _candidates(_ANNO, "list_landmarks_align_celeba.txt")), 10, 2),
        }
        self.info.metadata["annotations"] = {k: v[0] is not None for k, v in optional.items()}
        tables = {key: parse_table(*spec) for key, spec in optional.items()}
        entries: dict[str, list] = {split: [] for split in PARTITIONS.values()}
        seen: set[str] = set()
        for line in annotation_lines(partition):
            fields = (line or "").split()
            if line is not None and not fields:
                continue
            self.report.records_read += 1
            if len(fields) != 2 or fields[1] not in PARTITIONS:
                self.report.skipped[BAD_ANNOTATION] += 1
                continue
            image, code = fields
            if image in seen:
                self.report.skipped[DUPLICATE_ID] += 1
                continue
            seen.add(image)
            if image not in attributes:
                self.report.skipped[MISSING_ANNOTATION] += 1
                continue
            if attributes[image] is None:
                self.report.skipped[BAD_ANNOTATION] += 1
                continue
            features = {
                "attributes": attributes[image],
                "id": image.rsplit(".", 1)[0],
                "identity": np.int32(tables["identity"].get(image, [-1])[0]),
                "bbox": np.array(tables["bbox"].get(image, [-1] * 4), np.int32),
                "landmarks": np.array(tables["landmarks"].get(image, [-1] * 10), np.int32),
            }
            entries[PARTITIONS[code]].append((image, str(images / image), features))
        return {split: self._generate_examples(split, items)
                for split, items in entries.items()}
