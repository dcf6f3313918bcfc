"""TFDS builder for Multi-Modal-CelebA-HQ caption retrieval (see `MMCelebAHQ`)."""

from __future__ import annotations

import inspect
import pickle
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from tfds_builders.builder_utils import (
    ImageSetBuilder,
    ManualDirError,
    default_image_set_configs,
    find_path,
)
from tfds_builders.face_crop import (
    DUPLICATE_ID,
    EMPTY_CAPTION,
    INVALID_UTF8,
    MISSING_ANNOTATION,
    TRAIN_TEST_OVERLAP,
    Skip,
    skips_unreadable,
)


class _ListUnpickler(pickle.Unpickler):
    """Unpickles plain lists of strings only: a split file must never run code on load."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a split file")


def read_split_file(path: epath.Path) -> list[str]:
    """The image names of an AttnGAN-style `filenames.pickle` (Python 2 or 3 pickle)."""
    try:
        with path.open("rb") as f:
            names = _ListUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise ManualDirError(f"{path} is not a pickled list of file names: {e}") from None
    if not isinstance(names, list | tuple):
        raise ManualDirError(f"{path} holds a {type(names).__name__}, expected a list of names")
    out = []
    for name in names:
        name = name.decode("latin1") if isinstance(name, bytes) else str(name)
        out.append(name.rsplit("/", 1)[-1].removesuffix(".jpg"))
    return out


def read_captions(path: epath.Path) -> list[str]:
    """The non-blank lines of a caption file; Skip for a missing, unreadable, empty or
    non-UTF-8 file."""
    with skips_unreadable(missing=MISSING_ANNOTATION):
        data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Skip(INVALID_UTF8, f"{path}: {e}") from None
    captions = [line.strip() for line in text.splitlines() if line.strip()]
    if not captions:
        raise Skip(EMPTY_CAPTION, str(path))
    return captions


def caption_features() -> dict[str, tfds.features.FeatureConnector]:
    """Features of the caption retrieval sets: image, all captions of the image, id.

    `captions` is a variable-length sequence of strings, which TFDS stores without TensorFlow
    and returns as a list of bytes.
    """
    text = tfds.features.Tensor(shape=(), dtype=np.object_)
    return {
        "image": tfds.features.Tensor(shape=(), dtype=np.object_),
        "captions": tfds.features.Sequence(text),
        "id": text,
    }


class MMCelebAHQ(ImageSetBuilder):
    """Multi-Modal-CelebA-HQ (Xia et al., TediGAN 2021): CelebA-HQ faces with 10 captions each.

    Manual download (github.com/IIGROUP/MM-CelebA-HQ-Dataset), in manual_dir:
      CelebA-HQ-img/<N>.jpg            the 30,000 1024x1024 images, N = 0..29999
      celeba-caption/<N>.txt           10 captions, one per line
      train/filenames.pickle           pickled list of the 24,000 training names ("N")
      test/filenames.pickle            pickled list of the 6,000 test names
    `image/images/` and `text/celeba-caption/`, the folder names of some copies of the
    archive, are accepted too.

    Records: `image` (RGB JPEG, downscaled to the config's max_short_side), `captions` (the
    image's non-blank caption lines, a list of strings) and `id` ("N"). Images without a usable
    caption file are skipped and counted in skipped.json.
    """

    name = "mm_celeba_hq"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = default_image_set_configs()
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Download Multi-Modal-CelebA-HQ (github.com/IIGROUP/MM-CelebA-HQ-Dataset): put
    CelebA-HQ-img/, celeba-caption/, train/filenames.pickle and test/filenames.pickle in
    manual_dir.
    """

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=inspect.cleandoc(MMCelebAHQ.__doc__),
            features=tfds.features.FeaturesDict(caption_features()),
            homepage="https://github.com/IIGROUP/MM-CelebA-HQ-Dataset",
            citation="@inproceedings{xia2021tedigan, title={TediGAN: Text-Guided Diverse Face "
                     "Image Generation and Manipulation}, author={Xia, Weihao and Yang, Yujiu "
                     "and Xue, Jing-Hao and Wu, Baoyuan}, booktitle={CVPR}, year={2021}}",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        manual = dl_manager.manual_dir
        images = find_path(manual, ["CelebA-HQ-img", "image/images"], "the image folder")
        captions = find_path(manual, ["celeba-caption", "text/celeba-caption"],
                             "the caption folder")
        names = {split: read_split_file(find_path(manual, [f"{split}/filenames.pickle"],
                                                  f"the {split} split"))
                 for split in ("train", "test")}
        test_names = set(names["test"])
        out = {}
        for split in ("train", "test"):
            entries, seen = [], set()
            for name in names[split]:
                self.report.records_read += 1
                if split == "train" and name in test_names:  # retrieval's test must not leak
                    self.report.skipped[TRAIN_TEST_OVERLAP] += 1
                    continue
                if name in seen:
                    self.report.skipped[DUPLICATE_ID] += 1
                    continue
                seen.add(name)
                try:
                    texts = read_captions(captions / f"{name}.txt")
                except Skip as e:
                    self.report.skipped[e.reason] += 1
                    continue
                entries.append((name, str(images / f"{name}.jpg"),
                                {"captions": texts, "id": name}))
            out[split] = self._generate_examples(split, entries)
        return out
