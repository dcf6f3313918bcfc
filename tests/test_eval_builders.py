"""End-to-end tests of the evaluation-set builders (CelebA, LFWA, MM-CelebA-HQ, CelebA-Dialog).

Each test builds from a miniature copy of the real download made of real face photos, with
broken images and annotations planted in it, then reads the dataset back with plain TFDS (no
builder code) and compares every record and every skip count with what the fixture planted.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import resource
import subprocess
import sys
from pathlib import Path
from unittest import mock

import face_fixtures as ff
import numpy as np
import pytest
import tensorflow_datasets as tfds
from conftest import REPO
from PIL import Image

import tfds_builders
from tfds_builders.builder_utils import CELEBA_ATTRIBUTE_NAMES, REPORT_FILENAME, ManualDirError
from tfds_builders.celeba import CelebA
from tfds_builders.celeba_dialog import CelebADialog
from tfds_builders.lfwa import LFWA
from tfds_builders.mm_celeba_hq import MMCelebAHQ


def build(builder_cls: type, fixture: ff.EvalFixture, data_dir: Path,
          config: str = "default") -> tfds.core.DatasetBuilder:
    builder = builder_cls(data_dir=str(data_dir), config=config)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(fixture.manual_dir)))
    return builder


def read_back(builder: tfds.core.DatasetBuilder) -> dict[str, dict[str, dict]]:
    """split -> id -> record, read through TFDS alone from the written directory."""
    reader = tfds.builder_from_directory(str(builder.data_path))
    return {split: {r["id"].decode(): r for r in source}
            for split, source in reader.as_data_source().items()}


def check_ids_and_report(builder: tfds.core.DatasetBuilder, fixture: ff.EvalFixture,
                         records: dict[str, dict[str, dict]]) -> None:
    assert {s: set(ids) for s, ids in records.items()} == \
        {s: set(ids) for s, ids in fixture.splits.items()}
    report = json.loads((builder.data_path / REPORT_FILENAME).read_text())
    assert report["records_read"] == fixture.records_read
    assert report["skipped"] == fixture.skipped
    assert report["records_written"] == {s: len(ids) for s, ids in fixture.splits.items()}
    assert report["mode"] == "local"


def decode(image: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(image))
    assert img.format == "JPEG" and img.mode == "RGB"
    return img


def test_celeba(tmp_path: Path) -> None:
    fixture = ff.make_celeba(tmp_path)
    builder = build(CelebA, fixture, tmp_path / "data")
    records = read_back(builder)
    check_ids_and_report(builder, fixture, records)
    for split, expected in fixture.splits.items():
        for image_id, want in expected.items():
            got = records[split][image_id]
            np.testing.assert_array_equal(got["attributes"], want["attributes"])
            assert got["identity"] == want["identity"]
            np.testing.assert_array_equal(got["bbox"], want["bbox"])
            np.testing.assert_array_equal(got["landmarks"], want["landmarks"])
            assert decode(got["image"]).size == (178, 218)
            if want["jpeg"] is not None:  # RGB JPEGs are stored untouched.
                assert got["image"] == want["jpeg"]
    info = tfds.builder_from_directory(str(builder.data_path)).info
    assert list(info.metadata["attribute_names"]) == list(CELEBA_ATTRIBUTE_NAMES)
    assert list(CELEBA_ATTRIBUTE_NAMES) == ff.CELEBA_ATTRIBUTES
    assert dict(info.metadata["annotations"]) == {"identity": True, "bbox": True,
                                                  "landmarks": True}


NO_TENSORFLOW = pytest.mark.skipif(importlib.util.find_spec("tensorflow") is not None,
                                   reason="TFDS uses TensorFlow's files where it is installed")


@NO_TENSORFLOW
def test_celeba_past_the_memory_buffer_without_tensorflow(tmp_path: Path) -> None:
    """A split past TFDS's in-memory buffer (1 GB; here 4 KB) is sorted through bucket files
    (hashed keys: several), without TensorFlow: the same records and report."""
    fixture = ff.make_celeba(tmp_path)
    script = f"""
import sys
from unittest import mock
import tensorflow_datasets as tfds
from tensorflow_datasets.core import shuffle
from tfds_builders.celeba import CelebA
with mock.patch.object(shuffle, "MAX_MEM_BUFFER_SIZE", 4096):
    CelebA(data_dir={str(tmp_path / "data")!r}).download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir={str(fixture.manual_dir)!r}))
assert "tensorflow" not in sys.modules
"""
    subprocess.run([sys.executable, "-c", script], check=True, cwd=REPO)
    builder = CelebA(data_dir=str(tmp_path / "data"))
    check_ids_and_report(builder, fixture, read_back(builder))


@NO_TENSORFLOW
@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open files in /proc")
def test_bucket_files_raise_the_open_files_limit(tmp_path: Path) -> None:
    """TFDS keeps up to 1000 bucket files open; under a lower limit (macOS: 256) opening one
    more raises the limit instead of failing."""
    script = f"""
import os, resource
from tensorflow_datasets.core import shuffle
from tfds_builders.builder_utils import tfds_buckets_without_tensorflow
tfds_buckets_without_tensorflow()
limit = len(os.listdir("/proc/self/fd")) + 4
resource.setrlimit(resource.RLIMIT_NOFILE, (limit, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
files = [shuffle.tf.io.gfile.GFile({str(tmp_path)!r} + f"/bucket_{{i}}.tmp", "wb")
         for i in range(50)]
assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] > limit
"""
    subprocess.run([sys.executable, "-c", script], check=True, cwd=REPO)
    assert len(list(tmp_path.glob("bucket_*.tmp"))) == 50


@pytest.mark.parametrize("limits,raised_to", [
    ((256, resource.RLIM_INFINITY), 256 + 1000),  # macOS's default: no hard limit
    ((100, 500), 500),  # up to the hard limit
    ((500, 500), None),  # cannot rise: the EMFILE stands
    ((resource.RLIM_INFINITY, resource.RLIM_INFINITY), None),
])
def test_open_files_limit_rises_by_what_the_buckets_need(limits, raised_to) -> None:
    from tfds_builders.builder_utils import _allow_more_open_files

    with mock.patch("resource.getrlimit", return_value=limits), \
            mock.patch("resource.setrlimit") as setrlimit:
        assert _allow_more_open_files(1000) == (raised_to is not None)
    if raised_to is not None:
        setrlimit.assert_called_once_with(resource.RLIMIT_NOFILE, (raised_to, limits[1]))
    else:
        setrlimit.assert_not_called()


def test_celeba_without_optional_annotations(tmp_path: Path) -> None:
    fixture = ff.make_celeba(tmp_path)
    for name in ("identity_CelebA.txt", "list_bbox_celeba.txt",
                 "list_landmarks_align_celeba.txt"):
        (fixture.manual_dir / "Anno" / name).unlink()
    builder = build(CelebA, fixture, tmp_path / "data")
    record = next(iter(read_back(builder)["train"].values()))
    assert record["identity"] == -1
    assert (record["bbox"] == -1).all() and (record["landmarks"] == -1).all()
    assert not any(dict(builder.info.metadata["annotations"]).values())


def test_celeba_missing_file_fails_with_listing(tmp_path: Path) -> None:
    fixture = ff.make_celeba(tmp_path)
    (fixture.manual_dir / "Anno" / "list_attr_celeba.txt").unlink()
    with pytest.raises(ManualDirError, match=r"list_attr_celeba\.txt.*\n.*Found: Anno/, Eval/"):
        build(CelebA, fixture, tmp_path / "data")


def test_lfwa(tmp_path: Path) -> None:
    fixture = ff.make_lfwa(tmp_path)
    builder = build(LFWA, fixture, tmp_path / "data")
    records = read_back(builder)
    check_ids_and_report(builder, fixture, records)
    assert not set(records["train"]) & set(records["test"])
    for split, expected in fixture.splits.items():
        for image_id, want in expected.items():
            got = records[split][image_id]
            np.testing.assert_array_equal(got["attributes"], want["attributes"])
            assert got["identity"].decode() == want["identity"]
            assert decode(got["image"]).size == (250, 250)


@pytest.mark.parametrize("name", ["lfw_att_40.mat", "indices_train_test.mat"])
@pytest.mark.parametrize("kept", [0, 10, 100, 0.5])
def test_lfwa_cut_off_mat_file_is_named(tmp_path: Path, name: str, kept: float) -> None:
    """A .mat file cut off mid-download (v7.3/HDF5 and the older format alike; empty, inside
    its header, or half of it) is an error naming it, not h5py's or scipy's without a path."""
    fixture = ff.make_lfwa(tmp_path)
    path = fixture.manual_dir / name
    data = path.read_bytes()
    path.write_bytes(data[: int(kept * len(data)) if isinstance(kept, float) else kept])
    with pytest.raises(ManualDirError, match=rf"{name.replace('.', '[.]')}: cannot be read "
                                             r"as LFWA's \.mat file"):
        build(LFWA, fixture, tmp_path / "data")


def test_mm_celeba_hq(tmp_path: Path) -> None:
    fixture = ff.make_mm_celeba_hq(tmp_path, size=320)
    builder = build(MMCelebAHQ, fixture, tmp_path / "data")
    records = read_back(builder)
    check_ids_and_report(builder, fixture, records)
    for split, expected in fixture.splits.items():
        for image_id, want in expected.items():
            got = records[split][image_id]
            assert [c.decode() for c in got["captions"]] == want["captions"]
            assert decode(got["image"]).size == (256, 256)  # Downscaled from 320.


def test_mm_celeba_hq_full_resolution(tmp_path: Path) -> None:
    fixture = ff.make_mm_celeba_hq(tmp_path, size=320)
    builder = build(MMCelebAHQ, fixture, tmp_path / "data", config="full")
    record = read_back(builder)["test"]["13"]
    assert decode(record["image"]).size == (320, 320)


def test_celeba_dialog(tmp_path: Path) -> None:
    fixture = ff.make_celeba_dialog(tmp_path, size=300)
    builder = build(CelebADialog, fixture, tmp_path / "data")
    records = read_back(builder)
    check_ids_and_report(builder, fixture, records)
    for split, expected in fixture.splits.items():
        for image_id, want in expected.items():
            got = records[split][image_id]
            assert [c.decode() for c in got["captions"]] == want["captions"]
            assert got["caption"].decode() == want["caption"]
            assert decode(got["image"]).size == (256, 256)
    assert "11" in records["test"]  # its null attribute caption is dropped, not fatal


def test_registered_in_cli() -> None:
    for name, cls in (("celeba", CelebA), ("lfwa", LFWA), ("mm_celeba_hq", MMCelebAHQ),
                      ("celeba_dialog", CelebADialog)):
        assert tfds_builders.builder_class(name) is cls
        assert cls.name == name


def test_annotation_lines_that_are_not_int32s_are_left_out(tmp_path: Path) -> None:
    """str.isdigit takes "4²", which int() refuses; int32 features refuse 3062147483."""
    from tfds_builders.celeba import parse_table

    path = tmp_path / "list_bbox_celeba.txt"
    path.write_text("3\nimage_id x_1 y_1 width height\n000001.jpg 95 71 226 313\n"
                    "000002.jpg 4\u00b2 71 226 313\n000003.jpg 3062147483 71 226 313\n")
    assert parse_table(path, 4, 2) == {"000001.jpg": [95, 71, 226, 313]}
