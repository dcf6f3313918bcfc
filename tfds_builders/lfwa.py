"""TFDS builder for LFWA attribute recognition (see `LFWA`)."""

from __future__ import annotations

import inspect
from typing import Any

import h5py
import numpy as np
import scipy.io
import tensorflow_datasets as tfds
from etils import epath

from tfds_builders.builder_utils import (
    CELEBA_ATTRIBUTE_NAMES,
    ImageSetBuilder,
    ManualDirError,
    attribute_set_info,
    default_image_set_configs,
    find_path,
)
from tfds_builders.face_crop import BAD_ANNOTATION, DUPLICATE_ID, TRAIN_TEST_OVERLAP

_MAT73_MAGIC = b"MATLAB 7.3"


def _hdf5_value(f: Any, value: Any) -> Any:
    """A MATLAB v7.3 variable as numpy (numbers) or a list of str (cell array of char).

    MATLAB stores arrays column-major, so h5py sees them transposed; chars are uint16 codes
    and cells are arrays of object references.
    """
    data = value[()]
    if data.dtype == h5py.ref_dtype:
        return [_hdf5_value(f, f[ref]) for ref in data.T.reshape(-1)]
    if value.attrs.get("MATLAB_class") in (b"char", "char"):
        return "".join(map(chr, data.T.reshape(-1)))
    return np.asarray(data).T


def read_mat(path: epath.Path) -> dict[str, Any]:
    """Variables of a .mat file, v7.3 (HDF5, as LFWA+ ships it) or older (scipy);
    ManualDirError naming the file if it does not read (a cut-off download)."""
    with path.open("rb") as f:
        is_v73 = f.read(len(_MAT73_MAGIC)) == _MAT73_MAGIC
    try:
        if is_v73:
            with h5py.File(path, "r") as f:
                return {key: _hdf5_value(f, f[key]) for key in f if not key.startswith("#")}
        raw = scipy.io.loadmat(path, simplify_cells=True)
    except Exception as e:  # h5py and scipy fail in many ways on a cut-off file
        raise ManualDirError(f"{path}: cannot be read as LFWA's .mat file (cut off?) "
                             f"({type(e).__name__}: {e})") from e
    return {key: value for key, value in raw.items() if not key.startswith("__")}


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    return [str(v).strip() for v in np.asarray(value, dtype=object).reshape(-1)]


def _indices(value: Any) -> list[int]:
    """1-based MATLAB indices as 0-based ints; non-integral entries become -1 (invalid)."""
    flat = np.asarray(value, dtype=np.float64).reshape(-1)
    return [int(v) - 1 if float(v).is_integer() else -1 for v in flat]


def _labels(value: Any, count: int, path: epath.Path) -> np.ndarray:
    labels = np.asarray(value, dtype=np.float64)
    if labels.shape == (40, count) and count != 40:
        labels = labels.T
    if labels.shape != (count, 40):
        raise ManualDirError(f"{path}: 'label' has shape {labels.shape}, expected "
                             f"({count}, 40), one row per entry of 'name'")
    return labels


class LFWA(ImageSetBuilder):
    """LFWA (Liu et al. 2015): LFW images with the 40 CelebA attributes.

    Manual download: the LFW images and the LFWA annotations from the CelebA page
    (mmlab.ie.cuhk.edu.hk/projects/CelebA.html, "LFWA+" folder), in manual_dir:
      lfw/<Name>/<Name>_NNNN.jpg     LFW images (250x250)
      lfw_att_40.mat                 MATLAB file (v7.3/HDF5 as distributed, or older):
                                     `name` (cell, "<Name>\\<Name>_NNNN.jpg"), `label`
                                     (N x 40, 0/1 or -1/1) and `AttrName` (the 40 names)
      indices_train_test.mat         `indices_img_train`, `indices_img_test`: 1-based
                                     indices into `name`, the official split

    Records: `image` (RGB JPEG), `attributes` (int32[40], 1 = present, CelebA order, names in
    metadata "attribute_names"), `id` ("<Name>/<Name>_NNNN") and `identity` (the person's
    name). An image listed in both splits is kept in test only (counted as
    train_test_overlap), so test images never appear in train.
    """

    name = "lfwa"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = default_image_set_configs()
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Put the LFW images in manual_dir/lfw/ and lfw_att_40.mat and indices_train_test.mat from
    the LFWA+ annotations (mmlab.ie.cuhk.edu.hk/projects/CelebA.html) in manual_dir.
    """

    def _info(self) -> tfds.core.DatasetInfo:
        return attribute_set_info(
            self, inspect.cleandoc(LFWA.__doc__),
            identity=tfds.features.Tensor(shape=(), dtype=np.object_),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        manual = dl_manager.manual_dir
        images = find_path(manual, ["lfw"], "the LFW image folder")
        annotations_path = find_path(manual, ["lfw_att_40.mat"], "the LFWA attributes")
        splits_path = find_path(manual, ["indices_train_test.mat"], "the LFWA split")
        annotations, splits = read_mat(annotations_path), read_mat(splits_path)
        for path, found, needed in (
                (annotations_path, annotations, {"name", "label"}),
                (splits_path, splits, {"indices_img_train", "indices_img_test"})):
            if needed - found.keys():
                raise ManualDirError(f"{path} lacks the variables {sorted(needed - found.keys())}")
        names = _strings(annotations["name"])
        labels = _labels(annotations["label"], len(names), annotations_path)
        order = list(range(40))
        if "AttrName" in annotations:
            attr_names = _strings(annotations["AttrName"])
            if sorted(attr_names) != sorted(CELEBA_ATTRIBUTE_NAMES):
                raise ManualDirError(f"{annotations_path}: AttrName is not the 40 CelebA "
                                     f"attributes: {attr_names}")
            order = [attr_names.index(name) for name in CELEBA_ATTRIBUTE_NAMES]
        # Overlaps and repeats are found by image name, what records are keyed by: one file
        # may be listed under two indices.
        def name_of(index: int) -> str | None:
            return names[index].replace("\\", "/") if 0 <= index < len(names) else None

        test = _indices(splits["indices_img_test"])
        test_names = {name_of(i) for i in test} - {None}
        entries: dict[str, list] = {"train": [], "test": []}
        for split, indices in (("train", _indices(splits["indices_img_train"])), ("test", test)):
            seen: set[str] = set()
            for index in indices:
                self.report.records_read += 1
                name = name_of(index)
                if split == "train" and name in test_names:
                    self.report.skipped[TRAIN_TEST_OVERLAP] += 1
                elif name is not None and name in seen:
                    self.report.skipped[DUPLICATE_ID] += 1
                else:
                    seen.add(name)
                    self._add_entry(entries[split], index, names, labels, order, images)
        return {split: self._generate_examples(split, items)
                for split, items in entries.items()}

    def _add_entry(self, entries: list, index: int, names: list[str], labels: np.ndarray,
                   order: list[int], images: epath.Path) -> None:
        """Appends the entry for `names[index]`, or counts why it cannot be used."""
        if not 0 <= index < len(names):
            self.report.skipped[BAD_ANNOTATION] += 1
            return
        relative = names[index].replace("\\", "/")
        row = labels[index][order]
        if not np.isin(row, (-1, 0, 1)).all() or "/" not in relative:
            self.report.skipped[BAD_ANNOTATION] += 1
            return
        identity, _, _ = relative.partition("/")
        features = {"attributes": (row > 0).astype(np.int32),
                    "id": relative.rsplit(".", 1)[0], "identity": identity}
        entries.append((relative, str(images / relative), features))
