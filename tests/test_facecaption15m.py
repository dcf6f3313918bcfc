"""End-to-end tests of the FaceCaption-15M builder on miniature copies of all three image layouts.

The fixtures (face_fixtures.py) hold real face photos and every kind of broken input; each test
builds, reads the dataset back with plain TFDS, and compares records, pixels and skip counts
with what the fixture planted.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import shutil
import signal
import sys
import threading
from pathlib import Path

import face_fixtures as ff
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow_datasets as tfds
from PIL import Image

import tfds_builders
from tfds_builders import face_crop
from tfds_builders.builder_utils import REPORT_FILENAME, EmptySplitError
from tfds_builders.facecaption15m import layouts, records
from tfds_builders.facecaption15m.builder import FaceCaption15M, FaceCaption15MConfig

SPLITS = (("train", 0.5), ("validation", 0.25), ("test", 0.25))
RESOLUTION = 64
MARGIN = 0.2
LAYOUTS = [("flat", "border"), ("files", "border"), ("webdataset", "center_crop"),
           ("parquet", "border"), ("files", "no"), ("files", "keep_ratio_largest")]


def config(name: str, **overrides) -> FaceCaption15MConfig:
    return FaceCaption15MConfig(name=name, resolution=RESOLUTION, margin=MARGIN,
                                min_face_size=16, split_fractions=SPLITS, **overrides)


def build(fixture: ff.FaceCaptionFixture, data_dir: Path, cfg: FaceCaption15MConfig,
          num_workers: int = 1, beam_runner=None) -> FaceCaption15M:
    builder = FaceCaption15M(data_dir=str(data_dir), config=cfg, num_workers=num_workers)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=str(fixture.manual_dir), beam_runner=beam_runner))
    return builder


def read_back(builder: tfds.core.DatasetBuilder) -> dict[str, dict[str, dict]]:
    """split -> id -> record, read through TFDS alone from the written directory."""
    reader = tfds.builder_from_directory(str(builder.data_path))
    return {split: {r["id"].decode(): r for r in source}
            for split, source in reader.as_data_source().items()}


def report(builder: tfds.core.DatasetBuilder) -> dict:
    return json.loads((builder.data_path / REPORT_FILENAME).read_text())


def expected_splits(fixture: ff.FaceCaptionFixture) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {name: set() for name, _ in SPLITS}
    for sample_id in fixture.kept:
        out[records.split_of(sample_id.encode(), SPLITS)].add(sample_id)
    return out


@pytest.mark.parametrize(("layout", "resize_mode"), LAYOUTS)
def test_build_from_each_layout(tmp_path: Path, layout: str, resize_mode: str) -> None:
    fixture = ff.make_facecaption15m(tmp_path, layout, resize_mode=resize_mode)
    builder = build(fixture, tmp_path / "data",
                    config(f"test_{layout}", img2dataset_resize_mode=resize_mode))
    got = read_back(builder)
    splits = expected_splits(fixture)
    assert all(splits.values()), "the fixture must put a record in every split"
    assert {split: set(ids) for split, ids in got.items()} == splits
    assert report(builder) == {
        "dataset": builder.info.full_name,
        "mode": "local",
        "records_read": fixture.records_read,
        "records_written": {split: len(ids) for split, ids in splits.items()},
        "skipped": dict(sorted(fixture.skipped.items())),
        "ignored_images": dict(sorted(fixture.ignored_images.items())),
    }
    for split_records in got.values():
        for sample_id, record in split_records.items():
            row = fixture.kept[sample_id]
            image = Image.open(io.BytesIO(record["image"]))
            assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (64, 64))
            assert record["caption"].decode() == ff.CAPTION_TEXT
            assert record["laion_caption"].decode() == "".join(row.laion_caption)
            np.testing.assert_array_equal(record["box"], json.loads(row.box))
            original = Image.open(io.BytesIO(row.image)).size
            np.testing.assert_array_equal(record["original_size"], original)
            if row.scene is not None:  # The crop shows the face, upright, in colour.
                want = ff.reference_crop(row.scene, row.scene_box, MARGIN, RESOLUTION)
                assert ff.mean_abs_diff(image, want) < 10, sample_id
    assert "tensorflow" not in sys.modules


def test_wrong_resize_mode_misplaces_crops(tmp_path: Path) -> None:
    """The content check above is sensitive: ignoring img2dataset's padding fails it."""
    fixture = ff.make_facecaption15m(tmp_path, "files", resize_mode="border")
    builder = build(fixture, tmp_path / "data", config("wrong", img2dataset_resize_mode="fixed"))
    record = read_back(builder)["train"]["good0"]
    row = fixture.kept["good0"]
    want = ff.reference_crop(row.scene, row.scene_box, MARGIN, RESOLUTION)
    assert ff.mean_abs_diff(Image.open(io.BytesIO(record["image"])), want) > 15


@pytest.mark.parametrize("layout", ["flat", "parquet"])
def test_workers_give_identical_records_and_reports(tmp_path: Path, layout: str) -> None:
    """Parallel workers write the records and count the skips a single one does (the flat
    layout probes names in workers; the parquet one sorts its tasks to read row groups
    once)."""
    fixture = ff.make_facecaption15m(tmp_path, layout)
    one_builder = build(fixture, tmp_path / "one", config("w"))
    two_builder = build(fixture, tmp_path / "two", config("w"), num_workers=2)
    assert report(one_builder) == report(two_builder)
    one, two = read_back(one_builder), read_back(two_builder)
    assert one.keys() == two.keys()
    for split in one:
        assert one[split].keys() == two[split].keys()
        for sample_id, record in one[split].items():
            for key, value in record.items():
                np.testing.assert_array_equal(two[split][sample_id][key], value)


@pytest.mark.skipif(importlib.util.find_spec("apache_beam") is None,
                    reason="apache-beam is not installed (pip install .[beam])")
@pytest.mark.parametrize("layout", ["flat", "webdataset", "parquet"])
def test_beam_build_matches_local_build(tmp_path: Path, layout: str) -> None:
    import apache_beam as beam

    fixture = ff.make_facecaption15m(tmp_path, layout, resize_mode="center_crop")
    cfg = config("beam", img2dataset_resize_mode="center_crop")
    local = build(fixture, tmp_path / "local", cfg)
    beamed = build(fixture, tmp_path / "beam", cfg, beam_runner=beam.runners.DirectRunner())
    assert report(beamed) == {**report(local), "mode": "beam"}
    local_records, beam_records = read_back(local), read_back(beamed)
    assert local_records.keys() == beam_records.keys()
    for split, records_by_id in local_records.items():
        assert records_by_id.keys() == beam_records[split].keys()
        for sample_id, record in records_by_id.items():
            for key, value in record.items():
                np.testing.assert_array_equal(beam_records[split][sample_id][key], value)


def _manual_dir_with(tmp_path: Path, layout: str = "flat") -> ff.FaceCaptionFixture:
    return ff.make_facecaption15m(tmp_path / "fixture", layout)


def test_layout_errors_say_what_was_expected_and_found(tmp_path: Path) -> None:
    fixture = _manual_dir_with(tmp_path)
    images = fixture.manual_dir / "images"
    (images / "00000.tar").write_bytes(b"")
    with pytest.raises(layouts.LayoutError, match=r"(?s)Expected exactly one of.*webdataset.*"
                       r"Found 1 tar shards, 0 numbered shard directories, 0 parquet shards "
                       r"with images, \d+ image files"):
        build(fixture, tmp_path / "a", config("a"))
    (images / "00000.tar").unlink()
    with pytest.raises(layouts.LayoutError, match=r"the 'webdataset' layout"):
        build(fixture, tmp_path / "b", config("b", layout="webdataset"))
    shutil.rmtree(images)
    images.mkdir()
    with pytest.raises(layouts.LayoutError, match=r"(?s)Found 0 tar shards.*is empty"):
        build(fixture, tmp_path / "c", config("c"))
    images.rmdir()
    with pytest.raises(layouts.LayoutError, match=r"not found.*(\n.*){8}\n"
                       r"Found: .*contains: FaceCaption-v2.parquet"):
        build(fixture, tmp_path / "d", config("d"))
    parquet = fixture.manual_dir / "FaceCaption-v2.parquet"
    parquet.rename(fixture.manual_dir / "v2.parquet.part")
    with pytest.raises(layouts.LayoutError, match=r"one \*\.parquet.*\nFound: v2.parquet.part"):
        build(fixture, tmp_path / "e", config("e"))


def test_img2dataset_without_id_column_fails_early(tmp_path: Path) -> None:
    fixture = _manual_dir_with(tmp_path, "files")
    sidecar = fixture.manual_dir / "images" / "00000" / "000000000.json"
    meta = json.loads(sidecar.read_text())
    del meta["_id"]
    sidecar.write_text(json.dumps(meta))
    with pytest.raises(layouts.LayoutError, match=r"--save_additional_columns '\[\"_id\"\]'"):
        build(fixture, tmp_path / "data", config("noid"))


def test_img2dataset_parquet_without_id_column_fails_early(tmp_path: Path) -> None:
    fixture = _manual_dir_with(tmp_path, "parquet")
    shard = fixture.manual_dir / "images" / "00001.parquet"  # 00000 is the cut-off one
    pq.write_table(pq.read_table(shard).drop_columns(["_id"]), shard)
    with pytest.raises(layouts.LayoutError, match=r"00001.parquet has no \"_id\" column.*"
                       r"--save_additional_columns"):
        build(fixture, tmp_path / "data", config("noid"))


def test_unknown_parquet_schema_is_rejected(tmp_path: Path) -> None:
    fixture = _manual_dir_with(tmp_path)
    pq.write_table(pa.table({"id": ["a"], "text": ["a caption"], "bbox": [[1, 2, 3, 4]]}),
                   fixture.manual_dir / "FaceCaption-v2.parquet")
    with pytest.raises(records.SchemaError, match=r"(?s)missing column '_id'.*Supported: "
                       r"FaceCaption-v2.*Found columns: id \(string\), text \(string\)"):
        build(fixture, tmp_path / "data", config("v1"))


def test_a_cut_off_parquet_download_is_named(tmp_path: Path) -> None:
    """The 4 GB parquet cut off mid-download has no footer: the error names the file."""
    fixture = _manual_dir_with(tmp_path)
    path = fixture.manual_dir / "FaceCaption-v2.parquet"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(records.SchemaError, match=r"FaceCaption-v2\.parquet: not a readable "
                       r"parquet file .*download it again"):
        build(fixture, tmp_path / "data", config("cut"))


def test_an_unreadable_row_group_of_the_captions_is_named(tmp_path: Path) -> None:
    """A damaged row group of the caption parquet (its ids unreadable, so not even its split is
    known) stops the build with the file, the row group and its rows."""
    fixture = _manual_dir_with(tmp_path)
    path = fixture.manual_dir / "FaceCaption-v2.parquet"
    path.write_bytes(ff.damage_page_header(path.read_bytes(), 1, 0))
    with pytest.raises(records.SchemaError, match=r"FaceCaption-v2\.parquet: row group 1 "
                       r"\(rows 16 to 31\) is unreadable"):
        build(fixture, tmp_path / "data", config("damaged"))


def test_empty_split_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"fractions > 0 summing to 1"):  # before any build
        FaceCaption15MConfig(name="zero", split_fractions=(("train", 1.0), ("test", 0.0)))
    fixture = _manual_dir_with(tmp_path)
    cfg = FaceCaption15MConfig(name="tiny", resolution=RESOLUTION, min_face_size=16,
                               split_fractions=(("train", 1 - 1e-12), ("test", 1e-12)))
    with pytest.raises(EmptySplitError, match=r"Split 'test' .*no usable records"):
        build(fixture, tmp_path / "data", cfg)


def test_a_file_that_does_not_read_is_counted_not_fatal(tmp_path: Path) -> None:
    """An image that is there but fails to read (here a symlink loop; also permissions or an
    I/O error) is a skipped record, and a sidecar link to nothing a bad sidecar: neither may
    end a build over millions of files."""
    loop = tmp_path / "loop.jpg"
    os.symlink(loop, loop)
    with pytest.raises(face_crop.Skip) as skipped:
        face_crop.read_file(str(loop))
    assert skipped.value.reason == face_crop.UNREADABLE_FILE
    # A storage that fails (a gs:// build losing its network) ends the build instead.
    def no_network(self):
        raise ConnectionResetError("connection reset by peer")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(face_crop.epath.Path, "read_bytes", no_network)
        with pytest.raises(ConnectionResetError):
            face_crop.read_file(str(tmp_path / "any.jpg"))
    shard = tmp_path / "00000"
    shard.mkdir()
    (shard / "000000001.json").write_text(json.dumps({"_id": "a", "status": "success"}))
    Image.new("RGB", (8, 8)).save(shard / "000000001.jpg")
    os.symlink(tmp_path / "gone.json", shard / "000000002.json")
    Image.new("RGB", (8, 8)).save(shard / "000000002.jpg")
    index = layouts.index_shard(str(shard), layouts.FILES)
    assert [sample_id for sample_id, _ in index.entries] == ["a"]
    assert +index.ignored == {layouts.BAD_SIDECAR: 1}


def test_split_assignment_is_stable_and_proportional() -> None:
    counts = {name: 0 for name, _ in SPLITS}
    for i in range(20000):
        counts[records.split_of(f"{i:024x}".encode(), SPLITS)] += 1
    for name, fraction in SPLITS:
        assert abs(counts[name] / 20000 - fraction) < 0.015
    # The documented rule, written out independently: a change of hash would silently move
    # records between splits of datasets built before and after it.
    for i in range(200):
        value = int(hashlib.sha256(f"id{i}".encode()).hexdigest()[:16], 16) / 16**16
        want = "train" if value < 0.5 else "validation" if value < 0.75 else "test"
        assert records.split_of(f"id{i}".encode(), SPLITS) == want


def test_an_id_and_its_padded_spelling_share_split_and_image() -> None:
    """Records and the join strip an `_id`'s surrounding whitespace, so the split hash and the
    sidecar index must too: else " abc" and "abc" could be one record in two splits, or a
    sidecar's padded id would miss its row."""
    spellings = [b"id7", b"id7 ", " id7\t", "id7"]
    assert {records.id_bytes(v) for v in spellings} == {b"id7"}
    for i in range(50):  # enough ids that a raw-bytes hash would have split some pairs
        assert (records.split_of(records.id_bytes(f" id{i} ".encode()), SPLITS)
                == records.split_of(records.id_bytes(f"id{i}"), SPLITS))
    assert records.id_bytes(b"\xff id") == b"\xff id"  # not UTF-8: hashed as it is
    index = layouts.ShardIndex()
    for sidecar_id in ("id7 ", "  ", None):
        layouts._add_entry(index, {"_id": sidecar_id}, layouts.ImageRef("a.jpg"))
    assert [sample_id for sample_id, _ in index.entries] == ["id7"]
    assert index.ignored[layouts.SIDECAR_WITHOUT_ID] == 2


def test_map_box_follows_img2dataset_geometry() -> None:
    box = (100.0, 50.0, 200.0, 150.0)
    assert layouts.map_box(box, (400, 200), (400, 200), "border") == box
    assert layouts.map_box(box, None, (256, 256), "border") == box
    # border: 400x200 -> 256x128 content, padded by 64 px top and bottom.
    assert layouts.map_box(box, (400, 200), (256, 256), "border") == (64, 96, 128, 160)
    # center_crop: 400x200 -> 512x256, then 128 px cut off left and right.
    assert layouts.map_box(box, (400, 200), (256, 256), "center_crop") == (0, 64, 128, 192)
    assert layouts.map_box(box, (400, 200), (200, 100), "keep_ratio") == (50, 25, 100, 75)
    assert layouts.map_box(box, (400, 200), (256, 256), "fixed") == (64, 64, 128, 192)
    # keep_ratio_largest: 400x200 -> 256x128, both axes scaled by 0.64, nothing cut or padded.
    assert layouts.map_box(box, (400, 200), (256, 128), "keep_ratio_largest") == (64, 32, 128, 96)


def test_large_jpeg_is_cropped_from_a_reduced_decode() -> None:
    img, box = ff.scene(3)
    big = img.resize((img.width * 8, img.height * 8), Image.Resampling.BICUBIC)
    spec = face_crop.CropSpec(resolution=RESOLUTION, margin=MARGIN)
    opened = face_crop.open_image(ff.encode(big, quality=95), spec.max_pixels)
    crop = Image.open(io.BytesIO(face_crop.crop_face(opened, tuple(8 * v for v in box), spec)))
    assert opened.size == img.size  # The JPEG was decoded at 1/8 scale, ...
    assert crop.size == (RESOLUTION, RESOLUTION)  # ... yet the crop is right.
    assert ff.mean_abs_diff(crop, ff.reference_crop(img, box, MARGIN, RESOLUTION)) < 10


def test_registered_in_cli() -> None:
    assert tfds_builders.builder_class("facecaption15m") is FaceCaption15M
    assert FaceCaption15M.name == "facecaption15m"


def test_cli_sets_config_fields(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`python -m tfds_builders build ... --set FIELD=VALUE` builds the default config with those
    fields, under the name set: here a center_crop download's boxes map right only with the
    mode set (see `test_wrong_resize_mode_misplaces_crops`), and the crops have the resolution
    set. The dataset reads back under that name without the builder's code."""
    from tfds_builders.__main__ import main

    fixture = ff.make_facecaption15m(tmp_path, "files", resize_mode="center_crop")
    data_dir = tmp_path / "data"
    main(["build", "facecaption15m", f"--data_dir={data_dir}",
          f"--manual_dir={fixture.manual_dir}", "--set", "name=center_crop48",
          "--set", "img2dataset_resize_mode=center_crop",
          "--set", "resolution=48", "--set", "min_face_size=16",
          "--set", f"split_fractions={SPLITS!r}"])
    assert "facecaption15m/center_crop48/1.0.0" in capsys.readouterr().out
    reader = tfds.builder_from_directory(str(data_dir / "facecaption15m/center_crop48/1.0.0"))
    assert "With img2dataset_resize_mode='center_crop'" in reader.info.config_description
    source = tfds.data_source("facecaption15m/center_crop48", split="train",
                              data_dir=str(data_dir))
    got = {r["id"].decode(): r for r in source}
    assert set(got) == expected_splits(fixture)["train"]
    for sample_id, record in got.items():
        row, image = fixture.kept[sample_id], Image.open(io.BytesIO(record["image"]))
        assert image.size == (48, 48)
        if row.scene is not None:
            want = ff.reference_crop(row.scene, row.scene_box, MARGIN, 48)
            assert ff.mean_abs_diff(image, want) < 10, sample_id


def test_cli_refuses_unknown_fields_and_unnamed_configs(tmp_path: Path) -> None:
    from tfds_builders.__main__ import main

    build = ["build", "facecaption15m", f"--data_dir={tmp_path}", "--set"]
    with pytest.raises(SystemExit, match="has no field colour; settable: images_subdir"):
        main([*build, "colour=red", "--set", "name=red"])
    with pytest.raises(SystemExit, match="set a new config name with name=NAME"):
        main([*build, "resolution=128"])
    with pytest.raises(SystemExit, match="set a new config name with name=NAME"):
        main([*build, "resolution=128", "--set", "name=files"])
    # A value is read as its field's type: a folder named 2024 stays a name, a fraction of
    # a pixel is refused, a list stands for a tuple and an int for a float.
    cfg = tfds_builders.configured("facecaption15m", None, {
        "name": "x", "images_subdir": "2024", "parquet_file": "2024", "margin": "1",
        "split_fractions": "[['train', 0.5], ['test', 0.5]]"})
    assert (cfg.images_subdir, cfg.parquet_file, cfg.margin) == ("2024", "2024", 1.0)
    assert type(cfg.margin) is float and cfg.split_fractions == (("train", 0.5), ("test", 0.5))
    assert tfds_builders.configured("celeba", None, {"name": "whole", "max_short_side": "None"}
                                    ).max_short_side is None
    with pytest.raises(SystemExit, match=r"resolution='256.5' is float 256.5; the field is "
                                         r"declared int"):
        main([*build, "resolution=256.5", "--set", "name=r"])


def test_a_box_off_the_photo_or_into_border_padding_takes_no_padding(tmp_path: Path) -> None:
    """img2dataset's "border" pads the photo to a square; a box partly off the photo is cut
    from the photo alone (no white), and one wholly off it is counted, not cut from padding."""
    photo = Image.new("RGB", (600, 200), (90, 60, 30))
    stored = Image.new("RGB", (300, 300), (255, 255, 255))
    stored.paste(photo.resize((300, 100)), (0, 100))
    (tmp_path / "x.jpg").write_bytes(ff.encode(stored, quality=95))
    ref = layouts.ImageRef(str(tmp_path / "x.jpg"), original_size=(600, 200))
    settings = records.ImageSettings(layouts.FILES, str(tmp_path), "border",
                                     face_crop.CropSpec(resolution=32, margin=0.2, min_face_size=8),
                                     flat_extensions=())
    row = records.Row(index=0, id="x", caption="c", laion_caption="",
                      box=(250.0, 150.0, 342.0, 262.0))  # its lower part is off the photo
    _, example = records.make_example(row, ref, settings)
    pixels = np.asarray(Image.open(io.BytesIO(example["image"])), np.float32)
    assert pixels.max() < 200, "the crop holds the white padding"
    row = records.Row(index=0, id="x", caption="c", laion_caption="",
                      box=(100.0, 220.0, 300.0, 420.0))  # wholly below the photo
    with pytest.raises(face_crop.Skip) as skip:
        records.make_example(row, ref, settings)
    assert skip.value.reason == face_crop.BOX_OUTSIDE_IMAGE


def test_a_png_whose_data_breaks_is_skipped_not_written_blank() -> None:
    """Reading EXIF decodes a PNG; a failure there must not leave a blank image behind."""
    noise = np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8)
    out = io.BytesIO()
    Image.fromarray(noise, "L").save(out, format="PNG")
    data = bytearray(out.getvalue())
    data[100] ^= 0xFF  # inside the compressed pixel data
    spec = face_crop.CropSpec(resolution=16, margin=0.0, min_face_size=4)
    with pytest.raises(face_crop.Skip):
        face_crop.normalize_image(bytes(data), None)
    with pytest.raises(face_crop.Skip):
        face_crop.crop_face(face_crop.open_image(bytes(data), spec.max_pixels),
                            (8.0, 8.0, 40.0, 40.0), spec)


def test_a_side_beyond_jpegs_limit_is_skipped() -> None:
    out = io.BytesIO()
    Image.new("L", (66_000, 4), 128).save(out, format="PNG")
    with pytest.raises(face_crop.Skip) as skip:
        face_crop.normalize_image(out.getvalue(), None)
    assert skip.value.reason == face_crop.UNSUPPORTED_MODE


def _die_on_five(item: int) -> int:
    if item == 5:
        os.kill(os.getpid(), signal.SIGKILL)
    return item


def test_a_killed_worker_fails_the_build_rather_than_hanging_it() -> None:
    from concurrent.futures.process import BrokenProcessPool

    from tfds_builders.parallel import ordered_map

    assert list(ordered_map(abs, range(-20, 0), num_workers=2, chunk_size=3)) == \
        list(range(20, 0, -1))
    outcome: dict = {}

    def consume() -> None:
        try:
            list(ordered_map(_die_on_five, range(10), num_workers=2, chunk_size=2))
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            outcome["error"] = e

    # In a daemon thread with a deadline: a pool that waits for the dead worker fails the
    # test rather than hanging it.
    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    thread.join(timeout=120)
    assert isinstance(outcome.get("error"), BrokenProcessPool), outcome


def test_a_failing_storage_ends_the_build_in_every_layout(tmp_path: Path) -> None:
    """A connection reset while indexing a tar or parquet shard, or reading a parquet image,
    ends the build: counted as one unreadable shard, it would shrink the dataset silently."""
    shard = tmp_path / "00000.tar"
    shard.write_bytes(b"")

    def no_network(self, *args, **kwargs):
        raise ConnectionResetError("connection reset by peer")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(type(layouts.epath.Path(shard)), "open", no_network)
        for layout in (layouts.WEBDATASET, layouts.PARQUET):
            with pytest.raises(ConnectionResetError):
                layouts.index_shard(str(shard), layout)
        with pytest.raises(ConnectionResetError):
            layouts.ImageRef(str(tmp_path / "gone.parquet"), 0, 0, column="jpg").read()


def test_hostile_boxes_and_sidecars_are_counted_not_fatal(tmp_path: Path) -> None:
    """Input that broke the parsers (an integer past float's range, JSON nested past Python's
    recursion limit, an original size past int32) is a skipped record or a bad sidecar."""
    for box in ("[1" + "0" * 400 + ", 0, 2, 2]", "[" * 100_000):
        with pytest.raises(face_crop.Skip) as skip:
            face_crop.parse_box(box)
        assert skip.value.reason == face_crop.BOX_MALFORMED
    shard = tmp_path / "00000"
    shard.mkdir()
    (shard / "000000001.json").write_text("[" * 100_000)
    (shard / "000000002.json").write_text(json.dumps(
        {"_id": "b", "status": "success", "original_width": 3_000_000_000,
         "original_height": 10}))
    for name in ("000000001.jpg", "000000002.jpg"):
        Image.new("RGB", (8, 8)).save(shard / name)
    index = layouts.index_shard(str(shard), layouts.FILES)
    assert +index.ignored == {layouts.BAD_SIDECAR: 1}
    assert [(i, ref.original_size) for i, ref in index.entries] == [("b", None)]


def test_images_of_one_key_in_a_shard_keep_the_first_and_count_the_others(tmp_path: Path
                                                                          ) -> None:
    shard = tmp_path / "00000"
    shard.mkdir()
    (shard / "000000001.json").write_text(json.dumps({"_id": "a", "status": "success"}))
    Image.new("RGB", (8, 8)).save(shard / "000000001.jpg")
    Image.new("RGB", (8, 8)).save(shard / "000000001.png")
    index = layouts.index_shard(str(shard), layouts.FILES)
    assert [(i, Path(ref.path).name) for i, ref in index.entries] == [("a", "000000001.jpg")]
    assert +index.ignored == {layouts.DUPLICATE_IMAGE: 1}


def test_images_img2dataset_did_not_reencode_take_their_box_as_it_is(tmp_path: Path) -> None:
    """`--disable_all_reencoding` stores the downloaded bytes and writes every size field as
    null: the image is its original, so the box fits it even under a resizing mode; a
    sidecar that merely lacks the original size (an old img2dataset) still cannot be placed."""
    photo = Image.new("RGB", (120, 90), (90, 60, 30))
    photo.paste((200, 180, 160), (40, 20, 80, 70))
    shard = tmp_path / "00000"
    shard.mkdir()
    photo.save(shard / "000000001.jpg", quality=95)
    photo.save(shard / "000000002.jpg", quality=95)
    (shard / "000000001.json").write_text(json.dumps(
        {"_id": "raw", "status": "success", "width": None, "height": None,
         "original_width": None, "original_height": None}))
    (shard / "000000002.json").write_text(json.dumps({"_id": "old", "status": "success"}))
    refs = dict(layouts.index_shard(str(shard), layouts.FILES).entries)
    settings = records.ImageSettings(layouts.FILES, str(tmp_path), "border",
                                     face_crop.CropSpec(resolution=16, margin=0.0,
                                                        min_face_size=8), flat_extensions=())
    row = records.Row(index=0, id="raw", caption="c", laion_caption="",
                      box=(40.0, 20.0, 80.0, 70.0))
    _, example = records.make_example(row, refs["raw"], settings)
    assert list(example["original_size"]) == [120, 90]
    crop = np.asarray(Image.open(io.BytesIO(example["image"])), np.float32)
    np.testing.assert_allclose(crop[5:11, 5:11].reshape(-1, 3).mean(0), (200, 180, 160),
                               atol=8)  # the face, where the box says
    with pytest.raises(face_crop.Skip) as skip:
        records.make_example(row, refs["old"], settings)
    assert skip.value.reason == face_crop.UNKNOWN_ORIGINAL_SIZE


def test_a_row_group_is_read_a_bounded_number_of_rows_at_a_time(tmp_path: Path,
                                                                monkeypatch) -> None:
    """A parquet written in one big row group (older pyarrow put up to 64M rows in one) is
    read in slices, with the same rows, row indices and split assignment as read whole."""
    path = tmp_path / "one_group.parquet"
    pq.write_table(pa.table({
        "_id": pa.array([f"id{i}" for i in range(40)]),
        "caption": pa.array([[f"caption {i}"] for i in range(40)], pa.list_(pa.string())),
        "box": pa.array(["[1, 2, 3, 4]"] * 40)}), path, row_group_size=40)
    group = records.RowGroup(str(path), index=0, first_row=100, num_rows=40)
    columns = ["_id", "caption", "box"]
    whole = {split: list(records.read_rows(group, columns, split, SPLITS)) for split, _ in SPLITS}
    monkeypatch.setattr(records, "ROWS_PER_READ", 7)
    to_bytes, read = records._text_as_bytes, []
    monkeypatch.setattr(records, "_text_as_bytes", lambda c: (read.append(len(c)), to_bytes(c))[1])
    sliced = {split: list(records.read_rows(group, columns, split, SPLITS))
              for split, _ in SPLITS}
    assert sliced == whole and 0 < max(read) <= 7
    assert sorted(i for rows in sliced.values() for i, _ in rows) == list(range(100, 140))
    assert whole["train"][0][1]["caption"] == [b"caption " + whole["train"][0][1]["_id"][2:]]
