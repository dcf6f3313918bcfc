"""Robust image and text handling shared by every face dataset builder.

Web-scale face data (FaceCaption-15M is scraped from LAION) contains every kind of broken or
unusual file, and a build over millions of images must never die on one of them. Everything
here therefore turns a bad input into a `Skip` exception carrying a short reason code, which
the builders count and report instead of crashing. The same code is used by every builder, so
a reason means the same thing in every skip report.

Conventions:
  * Boxes are `(x1, y1, x2, y2)` in pixels of the image *as stored* (before EXIF orientation is
    applied), right/bottom exclusive. That is how the boxes of FaceCaption-15M were made: the
    images were downloaded with img2dataset, which decodes with OpenCV's `IMREAD_UNCHANGED`
    (EXIF orientation ignored) and re-encodes without EXIF, and the face detector ran on those
    pixels. An EXIF orientation the file carries is applied to the crop afterwards (files that
    img2dataset re-encoded carry none).
  * Every stored image is RGB JPEG. Transparent images are composited on white (as img2dataset
    does), palette and grey images are expanded, CMYK goes through Pillow's conversion and 16-bit
    images are scaled to 8 bits.
  * Nothing in this module imports TensorFlow Datasets, so process-pool workers start quickly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import numpy as np
from etils import epath
from PIL import Image

# Reason codes for skipped records, shared by all builders. They are the keys of the skip
# reports (see builder_utils), so they are part of the public interface.
MISSING_IMAGE = "missing_image"
CORRUPT_IMAGE = "corrupt_image"
TRUNCATED_IMAGE = "truncated_image"
DECOMPRESSION_BOMB = "decompression_bomb"
UNSUPPORTED_MODE = "unsupported_mode"
BOX_MALFORMED = "box_malformed"
BOX_DEGENERATE = "box_degenerate"
BOX_OUTSIDE_IMAGE = "box_outside_image"
FACE_TOO_SMALL = "face_too_small"
EMPTY_CAPTION = "empty_caption"
INVALID_UTF8 = "invalid_utf8"
MISSING_ID = "missing_id"
DUPLICATE_ID = "duplicate_id"
BAD_ANNOTATION = "bad_annotation"  # An annotation line or value that cannot be parsed.
MISSING_ANNOTATION = "missing_annotation"  # An image listed in a split without its labels.
TRAIN_TEST_OVERLAP = "train_test_overlap"  # Listed in train and test: kept in test only.
# A file that is there but does not read (permissions, an I/O error, a symlink loop).
UNREADABLE_FILE = "unreadable_file"
# Errors that say the storage, not the file, failed (a gs:// build losing its network): they
# end the build, since skipping would count every later record as unreadable.
STORAGE_ERRORS = (ConnectionError, TimeoutError)
# An image img2dataset may have resized whose sidecar does not say its original size, so the
# box (original pixels) cannot be placed on it.
UNKNOWN_ORIGINAL_SIZE = "unknown_original_size"

# Pixel limit of a decoded image. Big enough for any real photo (10k x 10k), small enough that a
# forged header cannot make a worker allocate tens of gigabytes.
DEFAULT_MAX_PIXELS = 100_000_000

_EXIF_ORIENTATION_TAG = 0x0112
# EXIF orientation value -> Pillow transposition that makes the image upright.
_ORIENTATION_FIX = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa"})
_HIGH_DEPTH_MODES = frozenset({"I", "F", "I;16", "I;16L", "I;16B", "I;16N"})
INT32_MAX = 2**31 - 1


class Skip(Exception):  # noqa: N818 - a control-flow signal, not an error condition
    """An input record cannot be used; `reason` is one of the reason codes of this module."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class CropSpec:
    """How a face is cut out and stored.

    Attributes:
      resolution: the short side of the stored crop in pixels.
      margin: context added on each side of the box, as a fraction of the box's longer side
        (0.2 widens a 100 px box to a 140 px square), so hair and chin are not cut off.
      min_face_size: faces whose shorter visible side is below this many pixels of the
        decoded image are skipped; upscaling them would only store blur.
      max_pixels: images with more pixels are skipped as decompression bombs.
      jpeg_quality: quality of the re-encoded JPEG.
    """

    resolution: int = 256
    margin: float = 0.2
    min_face_size: int = 32
    max_pixels: int = DEFAULT_MAX_PIXELS
    jpeg_quality: int = 95


Box = tuple[float, float, float, float]
_JPEG_MAX_SIDE = 65_500
T = TypeVar("T")
R = TypeVar("R")


def decode_text(value: bytes | str | None) -> str:
    """Decodes one text field strictly and strips surrounding whitespace.

    Raises Skip(INVALID_UTF8) for bytes that are not UTF-8, because silently replacing them
    would put mojibake into captions the model is trained on.
    """
    if value is None:
        return ""
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise Skip(INVALID_UTF8, str(e)) from None
    return value.strip()


def parse_box(value: bytes | str | Sequence[float] | None) -> Box:
    """Parses a face box given as a JSON string `"[x1, y1, x2, y2]"` or a number sequence.

    Raises Skip(BOX_MALFORMED) for anything that is not four finite numbers (including NaN,
    which `json` accepts) and Skip(BOX_DEGENERATE) for zero-area or inverted boxes.
    """
    if isinstance(value, bytes | str):
        try:
            value = json.loads(value)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise Skip(BOX_MALFORMED, f"not JSON: {e}") from None
    if not isinstance(value, Sequence) or isinstance(value, str | bytes) or len(value) != 4:
        raise Skip(BOX_MALFORMED, f"expected 4 numbers, got {value!r}")
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
        raise Skip(BOX_MALFORMED, f"non-numeric coordinate in {value!r}")
    try:
        x1, y1, x2, y2 = (float(v) for v in value)
    except OverflowError:  # an integer past float's range
        raise Skip(BOX_MALFORMED, f"huge coordinate in {str(value)[:100]}") from None
    if not all(math.isfinite(v) and abs(v) <= INT32_MAX for v in (x1, y1, x2, y2)):
        raise Skip(BOX_MALFORMED, f"non-finite or huge coordinate in {value!r}")
    if x2 <= x1 or y2 <= y1:
        raise Skip(BOX_DEGENERATE, f"zero-area or inverted box {value!r}")
    return x1, y1, x2, y2


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Reads only the image header and enforces the pixel limit before anything is decoded."""
    if not data:
        raise Skip(CORRUPT_IMAGE, "empty file")
    with warnings.catch_warnings():
        # Our own limit replaces Pillow's warning threshold; its hard error is still caught.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:
            raise Skip(DECOMPRESSION_BOMB, str(e)) from None
        except Exception as e:  # noqa: BLE001 - plugins raise many types (AVIF: RuntimeError)
            raise Skip(CORRUPT_IMAGE, f"{type(e).__name__}: {e}") from None
    width, height = img.size
    if width <= 0 or height <= 0:
        raise Skip(CORRUPT_IMAGE, f"empty size {img.size}")
    if width * height > max_pixels:
        raise Skip(DECOMPRESSION_BOMB, f"{width}x{height} exceeds {max_pixels} pixels")
    return img


def exif_orientation(img: Image.Image) -> int:
    """EXIF orientation 1-8 of a loaded image (`load_pixels`); 1 when absent or unreadable
    (broken EXIF is common on the web and must not cost the image). Only after the load: a
    PNG's `getexif()` decodes the image itself, and a failure there, swallowed here, left
    Pillow nothing to decode in the later load, which then passed on blank pixels."""
    try:
        value = img.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    except Exception:  # noqa: BLE001 - any malformed EXIF block just means "no orientation"
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def apply_orientation(img: Image.Image, orientation: int) -> Image.Image:
    """Applies an EXIF orientation to pixels that were decoded without it."""
    op = _ORIENTATION_FIX.get(orientation)
    return img if op is None else img.transpose(op)


def load_pixels(img: Image.Image, draft_scale: int = 1) -> tuple[Image.Image, float]:
    """Decodes the pixels, optionally at 1/2, 1/4 or 1/8 scale (JPEG only, nearly free).

    Returns the loaded image and the factor by which its coordinates are smaller than the
    header size. Truncated files and decoder failures become Skips.
    """
    scale = 1.0
    if draft_scale > 1:
        width, height = img.size
        drafted = img.draft(None, (width // draft_scale, height // draft_scale))
        if drafted is not None:  # Only JPEG supports drafts; drafted[1] is the scaled frame.
            scale = width / drafted[1][2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img.load()
        except OSError as e:
            reason = TRUNCATED_IMAGE if "truncated" in str(e).lower() else CORRUPT_IMAGE
            raise Skip(reason, str(e)) from None
        except Exception as e:  # noqa: BLE001 - decoders raise many types on hostile input
            raise Skip(CORRUPT_IMAGE, f"{type(e).__name__}: {e}") from None
    return img, scale


def to_rgb(img: Image.Image) -> Image.Image:
    """Converts any decoded mode to 8-bit RGB the way a viewer would display it: transparent
    pixels (an alpha channel, or PNG's tRNS colour key in `info["transparency"]`) on white, as
    Hugging Face's `convert_to_rgb` (the exported processor's) does."""
    key = img.info.get("transparency")
    if key is not None and img.mode not in _HIGH_DEPTH_MODES:
        img = img.convert("RGBA")
    if img.mode == "RGB":
        return img
    if img.mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if img.mode in _HIGH_DEPTH_MODES:
        values = np.asarray(img, dtype=np.float64)
        # 16-bit data spans 0..65535; float data within 0..1 is that range, as image editors
        # read float TIFFs; other 32-bit integer or float data of unknown range is shown as
        # 8-bit if it fits, else scaled like 16-bit.
        keyed = values == key if isinstance(key, int | float) else None
        if img.mode.startswith("I;16") or values.max(initial=0) > 255:
            values = values / 257.0
        elif img.mode == "F" and values.min(initial=0) >= 0 and values.max(initial=0) <= 1:
            values = values * 255.0
        grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        if keyed is not None:
            grey[keyed] = 255
        return Image.fromarray(grey).convert("RGB")
    try:
        return img.convert("RGB")
    except ValueError as e:
        raise Skip(UNSUPPORTED_MODE, f"{img.mode}: {e}") from None


def capture_skip(fn: Callable[[T], R], task: T) -> tuple[bool, R | str]:
    """Runs `fn(task)` and returns (True, result), or (False, reason) if it raised Skip.

    Process pools return this instead of raising, because `Skip` does not survive pickling
    and a skipped record is an expected outcome, not a failure of the worker.
    """
    try:
        return True, fn(task)
    except Skip as e:
        return False, e.reason


def encode_jpeg(img: Image.Image, quality: int) -> bytes:
    """Encodes an RGB image as baseline JPEG without metadata (orientation is already applied);
    Skip(UNSUPPORTED_MODE) for a side beyond JPEG's 65,500 px."""
    if max(img.size) > _JPEG_MAX_SIDE:
        raise Skip(UNSUPPORTED_MODE, f"{img.size} has a side over JPEG's {_JPEG_MAX_SIDE} px")
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def resize_short_side(img: Image.Image, short_side: int) -> Image.Image:
    """Resizes so the shorter side is `short_side`, keeping the aspect ratio."""
    width, height = img.size
    scale = short_side / min(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if size == img.size:
        return img
    return img.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)


def clip_box(box: Box, size: tuple[int, int]) -> Box:
    """Intersects a box with the image; Skip(BOX_OUTSIDE_IMAGE) when nothing is left."""
    width, height = size
    x1, y1, x2, y2 = max(box[0], 0.0), max(box[1], 0.0), min(box[2], width), min(box[3], height)
    if x2 <= x1 or y2 <= y1:
        raise Skip(BOX_OUTSIDE_IMAGE, f"box {box} does not overlap the {width}x{height} image")
    return x1, y1, x2, y2


def crop_window(box: Box, size: tuple[int, int], margin: float) -> tuple[int, int, int, int]:
    """The square around `box` enlarged by `margin`, moved (not shrunk) to fit in the image.

    Only when the square is larger than the image in one direction is that side clamped to
    the image, which makes the window a rectangle; the face is never cut off to stay square.
    """
    width, height = size
    x1, y1, x2, y2 = box
    side = max(x2 - x1, y2 - y1) * (1.0 + 2.0 * margin)
    cx, cy = (x1 + x2) / 2.0, (y1 + y2) / 2.0
    side_x, side_y = min(side, width), min(side, height)
    left = min(max(cx - side_x / 2.0, 0.0), width - side_x)
    top = min(max(cy - side_y / 2.0, 0.0), height - side_y)
    left_px, top_px = round(left), round(top)
    right_px = min(width, max(left_px + 1, round(left + side_x)))
    bottom_px = min(height, max(top_px + 1, round(top + side_y)))
    return left_px, top_px, right_px, bottom_px


def _draft_scale(window: tuple[int, int, int, int], resolution: int) -> int:
    """Largest JPEG DCT scale (1, 2, 4 or 8) that still leaves the crop >= `resolution`."""
    short = min(window[2] - window[0], window[3] - window[1])
    for scale in (8, 4, 2):
        if short / scale >= resolution:
            return scale
    return 1


def crop_face(img: Image.Image, box: Box, spec: CropSpec,
              area: tuple[int, int, int, int] | None = None) -> bytes:
    """Cuts the face `box` out of an image from `open_image` and returns JPEG bytes.

    `box` is in pixels of the stored image (see module docstring). The crop is a square
    around the box with `spec.margin` context, moved to fit the image (`crop_window`), made
    upright, RGB, and resized so its short side is `spec.resolution`. Large JPEGs are decoded
    at reduced scale when the crop allows, which makes multi-megapixel originals several times
    cheaper. `area` (left, top, right, bottom) is the part of the image that holds the
    picture, where a resize padded it (img2dataset's "border"): face and context are cut
    from it only, never from the padding.
    """
    left, top, right, bottom = area or (0, 0, *img.size)
    visible = clip_box((box[0] - left, box[1] - top, box[2] - left, box[3] - top),
                       (right - left, bottom - top))
    if min(visible[2] - visible[0], visible[3] - visible[1]) < spec.min_face_size:
        raise Skip(FACE_TOO_SMALL, f"visible face {visible} < {spec.min_face_size} px")
    window = crop_window(visible, (right - left, bottom - top), spec.margin)
    img, scale = load_pixels(img, _draft_scale(window, spec.resolution))
    orientation = exif_orientation(img)
    if scale != 1.0:  # the decoded frame is `scale` times smaller; stay inside the area
        x0, y0 = left / scale, top / scale
        left, top = math.ceil(x0), math.ceil(y0)
        right, bottom = math.floor(right / scale), math.floor(bottom / scale)
        shifted = (visible[0] / scale + x0 - left, visible[1] / scale + y0 - top,
                   visible[2] / scale + x0 - left, visible[3] / scale + y0 - top)
        window = crop_window(shifted, (right - left, bottom - top), spec.margin)
    window = (window[0] + left, window[1] + top, window[2] + left, window[3] + top)
    face = to_rgb(img.crop(window))
    face = apply_orientation(face, orientation)
    face = resize_short_side(face, spec.resolution)
    return encode_jpeg(face, spec.jpeg_quality)


def normalize_image(data: bytes, max_short_side: int | None, max_pixels: int = DEFAULT_MAX_PIXELS,
                    jpeg_quality: int = CropSpec.jpeg_quality) -> bytes:
    """Validates a whole (already face-aligned) image and returns it as RGB JPEG bytes.

    Used by the evaluation sets, whose images are already face crops. Images larger than
    `max_short_side` are downscaled (never upscaled). A file that is already an upright RGB
    JPEG of acceptable size is returned byte-for-byte, so benchmark pixels are not re-encoded.
    """
    img = open_image(data, max_pixels)
    width, height = img.size
    needs_resize = max_short_side is not None and min(width, height) > max_short_side
    scale = 1
    if needs_resize:
        scale = _draft_scale((0, 0, width, height), max_short_side)
    img, _ = load_pixels(img, scale)
    orientation = exif_orientation(img)
    if img.format == "JPEG" and img.mode == "RGB" and orientation == 1 and not needs_resize:
        return data
    img = apply_orientation(to_rgb(img), orientation)
    if needs_resize:
        img = resize_short_side(img, max_short_side)
    return encode_jpeg(img, jpeg_quality)


@contextlib.contextmanager
def skips_unreadable(missing: str = MISSING_IMAGE) -> Iterator[None]:
    """Around reading one input file: one absent or not a file is Skip(`missing`), one that
    does not read Skip(UNREADABLE_FILE), since one file must not end a build; a failing
    storage (`STORAGE_ERRORS`) still does."""
    try:
        yield
    except STORAGE_ERRORS:
        raise
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
        raise Skip(missing, str(e)) from None
    except OSError as e:
        raise Skip(UNREADABLE_FILE, str(e)) from None


def read_file(path: str) -> bytes:
    """Reads an image file, local or at a URL such as gs:// (through etils.epath, as the rest of
    the conversion reads manual_dir), skipping it as `skips_unreadable` says."""
    with skips_unreadable():
        return epath.Path(path).read_bytes()


def image_example(task: tuple[str, str, dict, int | None, int]) -> tuple[str, dict]:
    """(key, example) of an evaluation-set image: task = (key, image path, other features,
    max_short_side, max_pixels); the image is the file's `normalize_image`.

    One picklable argument, so it can be mapped over a process pool.
    """
    key, path, features, max_short_side, max_pixels = task
    return key, {"image": normalize_image(read_file(path), max_short_side, max_pixels),
                 **features}
