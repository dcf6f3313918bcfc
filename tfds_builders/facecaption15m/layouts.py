"""Where the FaceCaption-15M images are and how to find the one belonging to a parquet row.

FaceCaption-15M ships only URLs and boxes, so users bring images in one of four layouts
(all under `<manual_dir>/images/`):

  * `files`: `img2dataset --output_format files`, numbered shard directories
    `00000/000000123.jpg` with a `000000123.json` sidecar (and `.txt`), plus img2dataset's
    per-shard `00000.parquet` / `00000_stats.json` beside them.
  * `webdataset`: `img2dataset --output_format webdataset`, tar shards `00000.tar` whose
    members `000000123.jpg` / `.json` / `.txt` share a key.
  * `parquet`: `img2dataset --output_format parquet`, shards `00000.parquet` with one row per
    sample: the image bytes in a column named by `--encode_format` (`jpg`, `png` or `webp`)
    beside the sidecar's fields as columns.
  * `flat`: the originals distributed on request, one file `<_id>.<ext>` per image.

img2dataset names files by its own sequential key, not by `_id`, so for the img2dataset
layouts the join goes through the sidecar (JSON, or the parquet row's columns), which holds
`_id` when img2dataset ran with `--save_additional_columns '["_id"]'`. The sidecar also records
`original_width` / `original_height`: img2dataset resizes by default, and the parquet box refers
to the original image, so `map_box` converts it with the resize mode img2dataset used.

Nothing here imports TensorFlow Datasets; the functions run in pool workers and Beam workers.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import itertools
import json
import tarfile
from collections.abc import Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
from etils import epath

from tfds_builders.face_crop import (
    CORRUPT_IMAGE,
    INT32_MAX,
    MISSING_IMAGE,
    STORAGE_ERRORS,
    TRUNCATED_IMAGE,
    Box,
    Skip,
    read_file,
    skips_unreadable,
)

FILES = "files"
WEBDATASET = "webdataset"
PARQUET = "parquet"
FLAT = "flat"
LAYOUTS = (FILES, WEBDATASET, PARQUET, FLAT)
# img2dataset --encode_format values, which name the image column of its parquet output.
PARQUET_IMAGE_COLUMNS = ("jpg", "png", "webp")
# The sidecar fields read from a parquet shard (the image bytes are read per row, later).
_PARQUET_META_COLUMNS = ("_id", "status", "original_width", "original_height")
AUTO = "auto"

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_FLAT_EXTENSIONS = IMAGE_EXTENSIONS + tuple(ext.upper() for ext in IMAGE_EXTENSIONS)

# img2dataset --resize_mode values. "border" is img2dataset's default.
RESIZE_MODES = ("border", "keep_ratio", "keep_ratio_largest", "center_crop", "fixed", "no")

# Reasons for images that could not be matched to a parquet row ("ignored_images" in the report).
BAD_SIDECAR = "bad_sidecar"
SIDECAR_WITHOUT_ID = "sidecar_without_id"
SIDECAR_WITHOUT_IMAGE = "sidecar_without_image"
IMAGE_WITHOUT_SIDECAR = "image_without_sidecar"
UNREADABLE_TAR = "unreadable_tar"
UNREADABLE_PARQUET = "unreadable_parquet"
DUPLICATE_IMAGE = "duplicate_image"
NOT_IN_PARQUET = "not_in_parquet"

_LAYOUT_HELP = f"""\
  files      - img2dataset --output_format files: numbered shard directories such as
               00000/000000123.jpg with a 000000123.json sidecar holding "_id"
  webdataset - img2dataset --output_format webdataset: tar shards such as 00000.tar with
               members 000000123.jpg and 000000123.json holding "_id"
  parquet    - img2dataset --output_format parquet: shards such as 00000.parquet with an
               image column (jpg, png or webp) and an "_id" column
  flat       - original images named <_id>.<ext>, ext one of {", ".join(IMAGE_EXTENSIONS)}
               (lower or upper case, or as the folder spells it, e.g. .Jpg)"""

_SAMPLE_ENTRIES = 2000


class LayoutError(ValueError):
    """The manual directory does not look like any supported layout."""


@dataclasses.dataclass(frozen=True)
class ImageRef:
    """Where one image's bytes are: a plain file, a byte range inside a tar shard, or (with
    `column`, the image column) row `length` of row group `offset` of a parquet shard.

    `original_size` is the (width, height) the parquet box refers to, as recorded by
    img2dataset; None when unknown (the flat layout stores the originals themselves).
    `as_downloaded`: the sidecar says img2dataset stored the bytes it downloaded
    (`--disable_all_reencoding`: no size recorded, none changed), so the box fits as it is.
    """

    path: str
    offset: int = -1
    length: int = -1
    original_size: tuple[int, int] | None = None
    column: str | None = None
    as_downloaded: bool = False

    @property
    def position(self) -> tuple[str, int, int]:
        """Shard order, which decides between duplicate images of one `_id`."""
        return self.path, self.offset, self.length

    def read(self) -> bytes:
        """Returns the encoded image; Skip(MISSING_IMAGE / TRUNCATED_IMAGE / UNREADABLE_FILE)
        on failure."""
        if self.column is not None:
            return self._read_parquet_row()
        if self.offset < 0:
            return read_file(self.path)
        with skips_unreadable(), epath.Path(self.path).open("rb") as f:
            f.seek(self.offset)
            data = f.read(self.length)
        if len(data) != self.length:
            raise Skip(TRUNCATED_IMAGE, f"tar member at {self.path}:{self.offset} is cut off")
        return data

    def _read_parquet_row(self) -> bytes:
        try:
            images = _parquet_row_group(self.path, self.offset, self.column)
        except FileNotFoundError as e:
            raise Skip(MISSING_IMAGE, str(e)) from None
        except STORAGE_ERRORS:
            raise
        except (pa.ArrowException, OSError) as e:
            raise Skip(CORRUPT_IMAGE, f"{self.path} row group {self.offset}: {e}") from None
        if self.length >= len(images) or not images[self.length]:
            raise Skip(MISSING_IMAGE, f"{self.path} row group {self.offset} has no image in "
                                      f"row {self.length}")
        return images[self.length]


@functools.lru_cache(maxsize=2)
def _parquet_row_group(path: str, group: int, column: str) -> tuple[bytes | None, ...]:
    """The images of one row group of a parquet shard, kept for the next rows.

    Parquet compresses a column by pages, so one image costs its row group's read (img2dataset
    writes groups of 100 rows). Both builds visit a split's images in shard order (the local
    one sorts them, Beam groups them by row group), so the rows of a group arrive one after
    another and this cache reads each group about once per worker.
    """
    with epath.Path(path).open("rb") as f:
        return tuple(pq.ParquetFile(f).read_row_group(group, columns=[column])
                     .column(0).to_pylist())


@dataclasses.dataclass
class ShardIndex:
    """The images of one shard keyed by `_id`, and counts of images that cannot be used."""

    entries: list[tuple[str, ImageRef]] = dataclasses.field(default_factory=list)
    ignored: collections.Counter = dataclasses.field(default_factory=collections.Counter)


def _describe(directory: epath.Path) -> str:
    """A short listing of `directory` for error messages."""
    if not directory.exists():
        return f"{directory} does not exist"
    names = sorted(p.name + ("/" if p.is_dir() else "")
                   for p in itertools.islice(directory.iterdir(), 50))
    if not names:
        return f"{directory} is empty"
    return f"{directory} contains: {', '.join(names[:20])}" + (" ..." if len(names) > 20 else "")


@dataclasses.dataclass(frozen=True)
class DetectedLayout:
    """What `detect_layout` found: the layout, and for `flat` the extensions `resolve_flat`
    tries, in order: the image extensions among the directory's first entries as they are
    spelt there (`.Jpg` too), most common first, then the known ones in lower and upper
    case."""

    name: str
    flat_extensions: tuple[str, ...] = ()


def detect_layout(images_dir: epath.Path, layout: str = AUTO) -> DetectedLayout:
    """The layout of `images_dir`, checking a forced `layout` against what is there.

    Only the first entries of the directory are looked at (once), so this is instant even on
    a flat directory of millions of files. Raises LayoutError, listing the expected layouts
    and what was found, when the directory matches none or several of them.
    """
    if layout != AUTO and layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected {AUTO} or one of {LAYOUTS}")
    if not images_dir.is_dir():
        raise LayoutError(f"Image directory {images_dir} not found. Expected one of:\n"
                          f"{_LAYOUT_HELP}\nFound: {_describe(images_dir.parent)}")
    sample = list(itertools.islice(images_dir.iterdir(), _SAMPLE_ENTRIES))
    parquets = sorted(p for p in sample if p.suffix == ".parquet")
    # img2dataset also writes a metadata-only NNNNN.parquet beside files/webdataset shards:
    # parquet shards are those with an image column (a few are looked at, not thousands).
    with_images = [p for p in parquets[:3] if parquet_image_column(p)]
    found = {
        WEBDATASET: [p for p in sample if p.suffix == ".tar"],
        FILES: [p for p in sample if p.name.isdigit() and p.is_dir()],
        PARQUET: with_images + parquets[3:] if with_images else [],
        FLAT: [p for p in sample if p.suffix.lower() in IMAGE_EXTENSIONS],
    }
    present = [name for name in LAYOUTS if found[name]]
    if (layout == AUTO and len(present) != 1) or (layout != AUTO and not found[layout]):
        wanted = "exactly one of" if layout == AUTO else f"the {layout!r} layout, i.e."
        counts = (f"{len(found[WEBDATASET])} tar shards, {len(found[FILES])} numbered shard "
                  f"directories, {len(found[PARQUET])} parquet shards with images, "
                  f"{len(found[FLAT])} image files")
        raise LayoutError(f"Cannot use the images in {images_dir}. Expected {wanted}:\n"
                          f"{_LAYOUT_HELP}\nFound {counts}; {_describe(images_dir)}")
    chosen = present[0] if layout == AUTO else layout
    if chosen == FLAT:
        seen = collections.Counter(p.suffix for p in found[FLAT])
        return DetectedLayout(FLAT, tuple(dict.fromkeys(
            [ext for ext, _ in seen.most_common()] + list(_FLAT_EXTENSIONS))))
    if chosen == PARQUET:
        _check_parquet_has_id(found[PARQUET][0])
    else:
        _check_sidecars_have_id(found[chosen][0], chosen)
    return DetectedLayout(chosen)


def _image_column(names: list[str]) -> str | None:
    return next((name for name in PARQUET_IMAGE_COLUMNS if name in names), None)


def parquet_image_column(path: epath.Path) -> str | None:
    """The image column of an img2dataset parquet shard; None for a metadata-only or an
    unreadable parquet."""
    try:
        with path.open("rb") as f:
            return _image_column(pq.ParquetFile(f).schema_arrow.names)
    except (pa.ArrowException, OSError):
        return None


def _check_parquet_has_id(shard: epath.Path) -> None:
    """`shard` is one `parquet_image_column` could read."""
    with shard.open("rb") as f:
        names = pq.ParquetFile(f).schema_arrow.names
    if "_id" not in names:
        raise LayoutError(
            f"The img2dataset parquet shard {shard} has no \"_id\" column, so images cannot be "
            f"matched to parquet rows. Re-run img2dataset with --save_additional_columns "
            f"'[\"_id\"]'. Columns found: {sorted(names)}")


def _check_sidecars_have_id(shard: epath.Path, layout: str) -> None:
    """Fails early when img2dataset ran without keeping `_id`, since then nothing can join.
    A damaged shard is no evidence either way: the index counts it later."""
    try:
        sidecar = next(_iter_sidecars(shard, layout), None)
    except (tarfile.TarError, OSError, EOFError):
        return
    if sidecar is None:
        return
    name, payload = sidecar
    try:
        meta = json.loads(payload)
    except ValueError:
        return  # A single broken sidecar is counted per image later, not fatal.
    if isinstance(meta, dict) and "_id" not in meta:
        raise LayoutError(
            f"The img2dataset sidecar {name} has no \"_id\", so images cannot be matched to "
            f"parquet rows. Re-run img2dataset with --save_additional_columns '[\"_id\"]'. "
            f"Sidecar keys found: {sorted(meta)}")


def _iter_sidecars(shard: epath.Path, layout: str) -> Iterator[tuple[str, bytes]]:
    if layout == FILES:
        for path in sorted(shard.glob("*.json")):
            yield str(path), path.read_bytes()
        return
    with shard.open("rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(".json"):
                yield f"{shard}:{member.name}", tar.extractfile(member).read()
                return


def list_shards(images_dir: epath.Path, layout: str) -> list[str]:
    """The shards to index, sorted so that duplicate images resolve the same way everywhere."""
    if layout == FILES:
        return sorted(str(p) for p in images_dir.iterdir() if p.name.isdigit() and p.is_dir())
    if layout == WEBDATASET:
        return sorted(str(p) for p in images_dir.glob("*.tar"))
    if layout == PARQUET:
        return sorted(str(p) for p in images_dir.glob("*.parquet"))
    raise ValueError(f"layout {layout!r} has no shards")


def _parse_sidecar(payload: bytes) -> dict | None:
    try:
        meta = json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: "[[[[..."
        return None
    return meta if isinstance(meta, dict) else None


def _original_size(meta: dict) -> tuple[int, int] | None:
    """img2dataset's recorded original size; whole floats count too (a parquet column that
    older img2dataset versions typed float64 when its first rows were failed downloads).
    A size past the int32 the records store is no image's."""
    size = []
    for value in (meta.get("original_width"), meta.get("original_height")):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if (not isinstance(value, int) or isinstance(value, bool)
                or not 0 < value <= INT32_MAX):
            return None
        size.append(value)
    return size[0], size[1]


_SIZE_KEYS = ("width", "height", "original_width", "original_height")


def _as_downloaded(meta: dict) -> bool:
    """Whether img2dataset stored the downloaded bytes as they were: with
    `--disable_all_reencoding` its sidecar holds every size key, all null."""
    return all(key in meta and meta[key] is None for key in _SIZE_KEYS)


def _add_entry(index: ShardIndex, meta: dict | None, ref: ImageRef | None) -> None:
    """Adds one img2dataset sample (sidecar + image) to `index` or counts why it can't be."""
    if meta is None:
        index.ignored[BAD_SIDECAR] += 1
    elif meta.get("status", "success") != "success":
        return  # A failed download: its row is reported as missing_image.
    elif ref is None:
        index.ignored[SIDECAR_WITHOUT_IMAGE] += 1
    elif meta.get("_id") is None or str(meta["_id"]).strip() == "":
        index.ignored[SIDECAR_WITHOUT_ID] += 1
    else:
        sample_id = str(meta["_id"]).strip()  # as `records.row_id` reads the parquet's
        index.entries.append((sample_id, dataclasses.replace(
            ref, original_size=_original_size(meta), as_downloaded=_as_downloaded(meta))))


@contextlib.contextmanager
def counted_as(index: ShardIndex, reason: str, *errors: type[BaseException]
               ) -> Iterator[None]:
    """Around reading a damaged shard's part: `errors` count once as `reason` and the index
    keeps what was read; a failing storage (`STORAGE_ERRORS`, OSErrors too) still ends the
    build, as it does for single files."""
    try:
        yield
    except STORAGE_ERRORS:
        raise
    except errors:
        index.ignored[reason] += 1


def index_shard(shard: str, layout: str) -> ShardIndex:
    """Reads the sidecars of one img2dataset shard; never raises on bad content."""
    index = {FILES: _index_files_shard, WEBDATASET: _index_tar_shard,
             PARQUET: _index_parquet_shard}[layout]
    return index(shard)


def _index_files_shard(shard: str) -> ShardIndex:
    index = ShardIndex()
    sidecars: dict[str, epath.Path] = {}
    images: dict[str, epath.Path] = {}
    for path in sorted(epath.Path(shard).iterdir()):  # the first of two of one key is kept
        if path.suffix == ".json":
            index.ignored[DUPLICATE_IMAGE] += path.stem in sidecars
            sidecars.setdefault(path.stem, path)
        elif path.suffix.lower() in IMAGE_EXTENSIONS:
            index.ignored[DUPLICATE_IMAGE] += path.stem in images
            images.setdefault(path.stem, path)
    for key in sorted(sidecars):
        image = images.get(key)
        try:
            meta = _parse_sidecar(sidecars[key].read_bytes())
        except STORAGE_ERRORS:
            raise
        except OSError:  # e.g. a dangling link: counted as a bad sidecar, as a broken one
            meta = None
        _add_entry(index, meta, ImageRef(str(image)) if image else None)
    index.ignored[IMAGE_WITHOUT_SIDECAR] += len(images.keys() - sidecars.keys())
    return index


def _index_tar_shard(shard: str) -> ShardIndex:
    index = ShardIndex()
    sidecars: dict[str, bytes] = {}
    images: dict[str, ImageRef] = {}
    # A partially downloaded or damaged shard: what was readable is kept.
    with (counted_as(index, UNREADABLE_TAR, tarfile.TarError, OSError, EOFError),
          epath.Path(shard).open("rb") as f, tarfile.open(fileobj=f, mode="r:") as tar):
        for member in tar:
            if not member.isfile():
                continue
            # WebDataset convention: the key is the path up to the first dot of the name.
            folder, _, name = member.name.rpartition("/")
            stem, _, ext = name.partition(".")
            key = f"{folder}/{stem}" if folder else stem
            # Two members of one key: the first is kept, the other counted.
            if ext == "json":
                index.ignored[DUPLICATE_IMAGE] += key in sidecars
                sidecars.setdefault(key, tar.extractfile(member).read())
            elif f".{ext.lower()}" in IMAGE_EXTENSIONS:
                index.ignored[DUPLICATE_IMAGE] += key in images
                images.setdefault(key, ImageRef(shard, member.offset_data, member.size))
    for key in sorted(sidecars):
        _add_entry(index, _parse_sidecar(sidecars[key]), images.get(key))
    index.ignored[IMAGE_WITHOUT_SIDECAR] += len(images.keys() - sidecars.keys())
    return index


def _index_parquet_shard(shard: str) -> ShardIndex:
    """Reads the sidecar columns of every row (not the images): a row is a sample.

    A shard without a footer or an image column counts once as `unreadable_parquet`, and so
    does each row group whose sidecar columns do not read; the shard's other row groups are
    used (each image is later read from its own row group)."""
    index = ShardIndex()
    groups: dict[int, list[dict]] = {}
    with (counted_as(index, UNREADABLE_PARQUET, pa.ArrowException, OSError),
          epath.Path(shard).open("rb") as f):
        shard_file = pq.ParquetFile(f)
        columns = shard_file.schema_arrow.names
        column = _image_column(columns)
        if column is None:  # a partial download, or not img2dataset's
            raise pa.ArrowInvalid(f"{shard} has no image column {PARQUET_IMAGE_COLUMNS}")
        names = [n for n in _PARQUET_META_COLUMNS if n in columns]
        for group in range(shard_file.metadata.num_row_groups):
            with counted_as(index, UNREADABLE_PARQUET, pa.ArrowException, OSError):
                groups[group] = shard_file.read_row_group(group, columns=names).to_pylist()
    for group, metas in groups.items():
        for row, meta in enumerate(metas):
            _add_entry(index, meta, ImageRef(shard, offset=group, length=row, column=column))
    return index


def resolve_flat(images_dir: str, sample_id: str, extensions: Sequence[str]
                 ) -> ImageRef | None:
    """The original image `<images_dir>/<sample_id><ext>`, trying `extensions`
    (`DetectedLayout.flat_extensions`) in order.

    Probing by name needs no directory listing, which matters for millions of files. An `_id`
    that is not a plain file name (contains a path separator) cannot name a file here.
    """
    if "/" in sample_id or "\\" in sample_id or sample_id in (".", ".."):
        return None
    base = epath.Path(images_dir)
    for ext in extensions:
        path = base / f"{sample_id}{ext}"
        if path.is_file():
            return ImageRef(str(path))
    return None


def map_box(box: Box, original_size: tuple[int, int] | None, stored_size: tuple[int, int],
            resize_mode: str) -> Box:
    """Converts a box on the original image to the image img2dataset stored.

    Mirrors img2dataset's resizer: "border" scales the longer side to the target and pads to a
    centred square, "center_crop" scales the shorter side and crops the centre square, and the
    other modes scale each axis to the stored size. An image stored at its original size (no
    resize, or `--resize_only_if_bigger` on a small image) keeps the box unchanged.
    """
    if original_size is None or tuple(original_size) == tuple(stored_size):
        return box
    cw, ch, dx, dy = _placement(original_size, stored_size, resize_mode)
    fx, fy = cw / original_size[0], ch / original_size[1]
    x1, y1, x2, y2 = box
    return x1 * fx + dx, y1 * fy + dy, x2 * fx + dx, y2 * fy + dy


def picture_area(original_size: tuple[int, int] | None, stored_size: tuple[int, int],
                 resize_mode: str) -> tuple[int, int, int, int] | None:
    """The part of the stored image that holds the picture, (left, top, right, bottom), where
    "border" padded it to a square; None where all of it does."""
    if original_size is None or tuple(original_size) == tuple(stored_size):
        return None
    cw, ch, dx, dy = _placement(original_size, stored_size, resize_mode)
    if dx <= 0 and dy <= 0:
        return None
    return dx, dy, dx + cw, dy + ch


def _placement(original_size: tuple[int, int], stored_size: tuple[int, int],
               resize_mode: str) -> tuple[int, int, int, int]:
    """(width, height, left, top) of the resized picture within the stored image, as
    img2dataset's resizer places it (a negative offset: cropped off)."""
    (ow, oh), (sw, sh) = original_size, stored_size
    if resize_mode in ("border", "center_crop") and sw == sh and ow != oh:
        scale = sw / (max(ow, oh) if resize_mode == "border" else min(ow, oh))
        cw, ch = round(ow * scale), round(oh * scale)
        if resize_mode == "border":
            return cw, ch, (sw - cw) // 2, (sh - ch) // 2
        return cw, ch, -((cw - sw) // 2), -((ch - sh) // 2)
    return sw, sh, 0, 0
