"""End-to-end tests of the `synthetic_faces` builder: build, read back without builder code, and
check that the labels, captions and pixels agree with each other."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

import tfds_builders
from tfds_builders.synthetic_faces import ATTRIBUTE_NAMES
from tfds_builders.synthetic_faces.synthetic_faces import SPLITS, generate_example

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_SIZES = {"train": 512, "validation": 64, "test": 64}
COL = {name: i for i, name in enumerate(ATTRIBUTE_NAMES)}

# Attributes that every caption mentions when present and never when absent.
EXACT_KEYWORDS = {
    "Smiling": r"smil",
    "Eyeglasses": r"glasses",
    "Wearing_Hat": r"\bhat\b",
    "Bald": r"\bbald\b",
    "Black_Hair": r"black",
    "Blond_Hair": r"blond",
    "Brown_Hair": r"brown",
    "Gray_Hair": r"gray|grey|silver",
    "Bangs": r"bangs|fringe",
    "Mustache": r"mustache|moustache",
    "Goatee": r"goatee",
    "Wearing_Earrings": r"earring",
    "Wearing_Lipstick": r"lipstick",
}
# Mentioned most of the time when present; the keyword never appears when absent.
IMPLIED_BY_KEYWORD = {
    "Young": r"\byoung\b",
    "Mouth_Slightly_Open": r"open|parted",
    "Pale_Skin": r"\bpale\b",
    "Rosy_Cheeks": r"cheeks",
    "No_Beard": r"clean-shaven",
}
MALE_WORDS = r"\b(man|guy|gentleman|he|his)\b"
FEMALE_WORDS = r"\b(woman|lady|she|her)\b"
OLD_WORDS = r"\b(older|elderly|middle-aged)\b"


@pytest.fixture(scope="module")
def api_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data_dir = tmp_path_factory.mktemp("api")
    builder = tfds_builders.build("synthetic_faces", str(data_dir), config="tiny")
    assert builder.info.full_name == "synthetic_faces/tiny/1.0.0"
    return data_dir


@pytest.fixture(scope="module")
def cli_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built through the CLI with a worker pool, so determinism also covers the parallel path."""
    data_dir = tmp_path_factory.mktemp("cli")
    result = subprocess.run(
        [sys.executable, "-m", "tfds_builders", "build", "synthetic_faces",
         f"--data_dir={data_dir}", "--config=tiny", "--num_workers=2"],
        capture_output=True, text=True, check=True, cwd=REPO_ROOT,
    )
    for split, n in TINY_SIZES.items():
        assert f"{split}: {n} records" in result.stdout
    return data_dir


def _dataset_dir(data_dir: Path) -> Path:
    return data_dir / "synthetic_faces" / "tiny" / "1.0.0"


@pytest.fixture(scope="module")
def train(api_dir: Path) -> list[dict]:
    source = tfds.data_source("synthetic_faces/tiny", split="train", data_dir=str(api_dir))
    return [source[i] for i in range(len(source))]


def _decode(jpeg: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(jpeg))
    assert image.mode == "RGB"
    return np.asarray(image)


def test_reads_back_without_builder_code(api_dir: Path) -> None:
    builder = tfds.builder_from_directory(str(_dataset_dir(api_dir)))
    assert type(builder).__name__ == "ReadOnlyBuilder"
    assert builder.info.metadata["attribute_names"] == list(ATTRIBUTE_NAMES)
    assert builder.info.metadata["image_size"] == 64
    assert {s: builder.info.splits[s].num_examples for s in SPLITS} == TINY_SIZES
    for split, n in TINY_SIZES.items():
        source = builder.as_data_source(split=split)
        assert len(source) == n
        record = source[n - 1]
        assert set(record) == {"image", "caption", "attributes", "id"}
        assert record["id"] == f"{split}_{n - 1:06d}".encode()
        assert record["attributes"].shape == (len(ATTRIBUTE_NAMES),)
        assert record["attributes"].dtype == np.int32
    assert "tensorflow" not in sys.modules


def test_images_are_64px_rgb_jpeg(train: list[dict]) -> None:
    for record in train[:64]:
        assert _decode(record["image"]).shape == (64, 64, 3)


def test_record_i_is_generated_from_seed_split_and_index(api_dir: Path) -> None:
    source = tfds.data_source("synthetic_faces/tiny", split="validation", data_dir=str(api_dir))
    for i in (0, 17, 63):
        key, expected = generate_example(0, SPLITS.index("validation"), i, 64)
        assert key == i and source[i]["id"] == f"validation_{i:06d}".encode()
        assert source[i]["image"] == expected["image"]
        assert source[i]["caption"] == expected["caption"].encode()
        np.testing.assert_array_equal(source[i]["attributes"], expected["attributes"])


def test_a_split_past_the_memory_buffer_keeps_its_order(tmp_path: Path) -> None:
    """TFDS writes a split larger than its in-memory buffer (1 GB; here lowered to 4 KB)
    through temporary bucket files: without TensorFlow too (it opened them with tf.io.gfile),
    and with the integer keys the order needs (string keys raised TypeError there)."""
    script = f"""
from unittest import mock
from tensorflow_datasets.core import shuffle
import tfds_builders
with mock.patch.object(shuffle, "MAX_MEM_BUFFER_SIZE", 4096):
    tfds_builders.build("synthetic_faces", {str(tmp_path)!r}, config="tiny")
"""
    subprocess.run([sys.executable, "-c", script], check=True, cwd=REPO_ROOT)
    source = tfds.data_source("synthetic_faces/tiny", split="test", data_dir=str(tmp_path))
    assert [source[i]["id"] for i in range(len(source))] == [
        f"test_{i:06d}".encode() for i in range(TINY_SIZES["test"])]


def test_two_builds_are_identical(api_dir: Path, cli_dir: Path) -> None:
    """Serial (API) and pooled (CLI) builds must produce the same records, byte for byte."""
    for split, n in TINY_SIZES.items():
        a = tfds.data_source("synthetic_faces/tiny", split=split, data_dir=str(api_dir))
        b = tfds.data_source("synthetic_faces/tiny", split=split, data_dir=str(cli_dir))
        for i in range(n):
            ra, rb = a[i], b[i]
            assert ra["id"] == rb["id"] and ra["image"] == rb["image"], (split, i)
            assert ra["caption"] == rb["caption"], (split, i)
            np.testing.assert_array_equal(ra["attributes"], rb["attributes"])


def test_attribute_dependency_rules(train: list[dict]) -> None:
    attrs = np.stack([r["attributes"] for r in train]).astype(bool)
    a = {name: attrs[:, i] for name, i in COL.items()}
    hair = a["Black_Hair"].astype(int) + a["Blond_Hair"] + a["Brown_Hair"] + a["Gray_Hair"]
    assert np.all(hair + a["Bald"] == 1)
    assert not np.any(a["Bald"] & (a["Bangs"] | a["Wearing_Hat"] | ~a["Male"]))
    assert not np.any(a["Gray_Hair"] & a["Young"])
    assert np.array_equal(a["No_Beard"], ~(a["Mustache"] | a["Goatee"]))
    assert not np.any((a["Mustache"] | a["Goatee"]) & ~a["Male"])
    assert not np.any((a["Wearing_Lipstick"] | a["Wearing_Earrings"]) & a["Male"])


def test_attributes_are_balanced(train: list[dict]) -> None:
    rates = np.stack([r["attributes"] for r in train]).mean(axis=0)
    for name, rate in zip(ATTRIBUTE_NAMES, rates, strict=True):
        assert 0.1 <= rate <= 0.9, (name, rate)


def test_captions_agree_with_attributes(train: list[dict]) -> None:
    captions = set()
    for record in train:
        caption = record["caption"].decode()
        captions.add(caption)
        assert caption[0].isupper() and caption[-1] in ".!", caption
        text = caption.lower()
        has = {name: bool(v) for name, v in zip(ATTRIBUTE_NAMES, record["attributes"], strict=True)}
        for name, pattern in EXACT_KEYWORDS.items():
            assert bool(re.search(pattern, text)) == has[name], (name, caption)
        for name, pattern in IMPLIED_BY_KEYWORD.items():
            assert not re.search(pattern, text) or has[name], (name, caption)
        assert bool(re.search(MALE_WORDS, text)) == has["Male"], caption
        assert bool(re.search(FEMALE_WORDS, text)) != has["Male"], caption
        assert not re.search(OLD_WORDS, text) or not has["Young"], caption
    assert len(captions) > 0.95 * len(train)


def _pixel_features(records: list[dict]) -> np.ndarray:
    images = [Image.open(io.BytesIO(r["image"])).resize((32, 32), Image.Resampling.BOX)
              for r in records]
    return np.stack([np.asarray(im, np.float64).ravel() / 255.0 for im in images])


def test_attributes_are_visible_in_pixels(api_dir: Path, train: list[dict]) -> None:
    """A linear model on raw 32x32 pixels must beat chance clearly on held-out faces.

    Pose, scale, background and lighting jitter make this hard for a linear model on purpose,
    so only attributes with a large or high-contrast footprint are checked here. The model is
    class-balanced ridge regression in closed (dual) form, so there is no optimiser to tune.
    """
    held_out = []
    for split in ("validation", "test"):
        source = tfds.data_source("synthetic_faces/tiny", split=split, data_dir=str(api_dir))
        held_out += [source[i] for i in range(len(source))]
    x_train, x_test = _pixel_features(train), _pixel_features(held_out)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    dual = np.linalg.inv(x_train @ x_train.T + 1000.0 * np.eye(len(x_train)))
    y_train = np.stack([r["attributes"] for r in train])
    y_test = np.stack([r["attributes"] for r in held_out])
    thresholds = {"Pale_Skin": 0.85, "Black_Hair": 0.7, "Gray_Hair": 0.68, "Eyeglasses": 0.68}
    for name, threshold in thresholds.items():
        y = y_train[:, COL[name]]
        target = np.where(y == 1, 0.5 / y.mean(), -0.5 / (1.0 - y.mean()))
        pred = x_test @ (x_train.T @ (dual @ target)) > 0
        true = y_test[:, COL[name]] == 1
        balanced_accuracy = 0.5 * (pred[true].mean() + (~pred[~true]).mean())
        assert balanced_accuracy > threshold, (name, balanced_accuracy)


def test_unknown_builder_gives_one_clear_line() -> None:
    with pytest.raises(ValueError, match="known builders: .*synthetic_faces"):
        tfds_builders.build("no_such_dataset", "/nonexistent")
    result = subprocess.run(
        [sys.executable, "-m", "tfds_builders", "build", "no_such_dataset", "--data_dir=/x"],
        capture_output=True, text=True, cwd=REPO_ROOT,
    )
    assert result.returncode != 0
    assert result.stderr.strip().count("\n") == 0
    assert "no_such_dataset" in result.stderr and "synthetic_faces" in result.stderr


def test_importing_the_package_is_cheap() -> None:
    code = "import sys, tfds_builders; assert 'tensorflow_datasets' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT)
