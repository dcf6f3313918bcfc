"""TFDS builder for CelebA-Dialog caption retrieval (see `CelebADialog`)."""

from __future__ import annotations

import inspect
import json
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from tfds_builders.builder_utils import (
    ImageSetBuilder,
    ManualDirError,
    annotation_lines,
    default_image_set_configs,
    find_path,
)
from tfds_builders.celeba import PARTITIONS
from tfds_builders.face_crop import (
    BAD_ANNOTATION,
    DUPLICATE_ID,
    EMPTY_CAPTION,
    MISSING_ANNOTATION,
)
from tfds_builders.mm_celeba_hq import caption_features

# The fine-grained attributes CelebA-Dialog describes, in the order their captions are stored.
DIALOG_ATTRIBUTES: tuple[str, ...] = ("Bangs", "Eyeglasses", "No_Beard", "Smiling", "Young")


def dialog_captions(entry: object) -> tuple[str, list[str]] | None:
    """(overall caption, attribute-wise captions in DIALOG_ATTRIBUTES order, then any other
    attribute keys alphabetically), stripped, blank or null attribute captions dropped; None
    if the entry is malformed."""
    if not isinstance(entry, dict):
        return None
    overall = entry.get("overall_caption") or ""
    per_attribute = entry.get("attribute_wise_captions") or {}
    if not isinstance(overall, str) or not isinstance(per_attribute, dict):
        return None
    keys = [k for k in DIALOG_ATTRIBUTES if k in per_attribute]
    keys += sorted(k for k in per_attribute if k not in DIALOG_ATTRIBUTES)
    texts = [per_attribute[k] for k in keys if per_attribute[k] is not None]
    if not all(isinstance(t, str) for t in texts):
        return None
    return overall.strip(), [t.strip() for t in texts if t.strip()]


def read_hq_mapping(path: epath.Path) -> list[tuple[str, str] | None]:
    """CelebA-HQ-to-CelebA-mapping.txt -> [(HQ index, CelebA file name)], None for bad lines.

    Format: a header line "idx orig_idx orig_file", then e.g. "0 119613 119614.jpg".
    """
    out: list[tuple[str, str] | None] = []
    for line in annotation_lines(path)[1:]:
        fields = (line or "").split()
        if line is not None and not fields:
            continue
        out.append((fields[0], fields[2]) if len(fields) == 3 and fields[0].isdigit() else None)
    return out


class CelebADialog(ImageSetBuilder):
    """CelebA-Dialog (Jiang et al., Talk-to-Edit 2021): CelebA-HQ faces with captions.

    Manual download (github.com/ziqihuangg/CelebA-Dialog), in manual_dir:
      image/<N>.jpg                     the 30,000 CelebA-HQ images (1024x1024)
      text/captions_hq.json             {"<N>.jpg": {"overall_caption": str,
                                         "attribute_wise_captions": {"Bangs": str, ...}}}
      CelebA-HQ-to-CelebA-mapping.txt   from CelebA-HQ / CelebAMask-HQ
      list_eval_partition.txt           from CelebA
    CelebA-Dialog ships no split file of its own; its images are CelebA images, so the splits
    are CelebA's official train/validation/test partition, looked up through the CelebA-HQ
    mapping (the same way other CelebA-HQ benchmarks split).

    Records: `image` (RGB JPEG, downscaled to the config's max_short_side), `caption` (the
    overall caption, which retrieval queries with), `captions` (the overall caption first, then
    the attribute-wise captions for Bangs, Eyeglasses, No_Beard, Smiling and Young, then any
    other attribute alphabetically; a null or blank one is dropped, so the metadata's
    "caption_order" is their order, not fixed positions) and `id` ("N"). Images with no caption
    entry (the release lacks a few), a blank overall caption or no partition are skipped and
    counted in skipped.json.
    """

    name = "celeba_dialog"
    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {
        "1.0.0": "Initial release.",
        "1.1.0": "`caption`: the overall caption alone. A null attribute caption is dropped "
                 "instead of rejecting the image; a blank overall caption skips it.",
    }
    BUILDER_CONFIGS = default_image_set_configs()
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Download CelebA-Dialog (github.com/ziqihuangg/CelebA-Dialog): image/ and
    text/captions_hq.json, plus CelebA-HQ-to-CelebA-mapping.txt (CelebA-HQ) and
    list_eval_partition.txt (CelebA), all in manual_dir.
    """

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=inspect.cleandoc(CelebADialog.__doc__),
            features=tfds.features.FeaturesDict({
                **caption_features(),
                "caption": tfds.features.Tensor(shape=(), dtype=np.object_)}),
            metadata=tfds.core.MetadataDict(caption_order=["overall", *DIALOG_ATTRIBUTES]),
            homepage="https://github.com/ziqihuangg/CelebA-Dialog",
            citation="@inproceedings{jiang2021talk, title={Talk-to-Edit: Fine-Grained Facial "
                     "Editing via Dialog}, author={Jiang, Yuming and Huang, Ziqi and Pan, "
                     "Xingang and Loy, Chen Change and Liu, Ziwei}, booktitle={ICCV}, "
                     "year={2021}}",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        manual = dl_manager.manual_dir
        images = find_path(manual, ["image"], "the image folder")
        captions_path = find_path(manual, ["text/captions_hq.json", "captions_hq.json"],
                                  "the captions")
        try:
            captions = json.loads(captions_path.read_bytes())
        except ValueError as e:
            raise ManualDirError(f"{captions_path} is not valid JSON: {e}") from None
        if not isinstance(captions, dict):
            raise ManualDirError(f"{captions_path} must map image names to caption entries")
        mapping = read_hq_mapping(find_path(
            manual, ["CelebA-HQ-to-CelebA-mapping.txt"], "the CelebA-HQ mapping"))
        partition = {}
        for line in annotation_lines(find_path(manual, ["list_eval_partition.txt",
                                                        "Eval/list_eval_partition.txt"],
                                               "the CelebA split file")):
            fields = (line or "").split()
            if len(fields) == 2 and fields[1] in PARTITIONS:
                partition[fields[0]] = PARTITIONS[fields[1]]
        entries: dict[str, list] = {split: [] for split in PARTITIONS.values()}
        seen: set[str] = set()
        for item in mapping:
            self.report.records_read += 1
            if item is None:
                self.report.skipped[BAD_ANNOTATION] += 1
                continue
            index, celeba_file = item
            if index in seen:
                self.report.skipped[DUPLICATE_ID] += 1
                continue
            seen.add(index)
            entry = captions.get(f"{index}.jpg")
            if entry is None or celeba_file not in partition:
                self.report.skipped[MISSING_ANNOTATION] += 1
                continue
            texts = dialog_captions(entry)
            if texts is None:
                self.report.skipped[BAD_ANNOTATION] += 1
            elif not texts[0]:
                self.report.skipped[EMPTY_CAPTION] += 1
            else:
                overall, per_attribute = texts
                entries[partition[celeba_file]].append(
                    (index, str(images / f"{index}.jpg"),
                     {"caption": overall, "captions": [overall, *per_attribute], "id": index}))
        return {split: self._generate_examples(split, items)
                for split, items in entries.items()}
