"""Reading FaceCaption-15M parquet rows and turning a (row, image) pair into an example.

These functions are shared by the local build and the Beam pipeline, so both modes apply the
same checks in the same order and produce the same records and the same skip counts:

  1. row checks (`parse_row`): missing `_id`, invalid UTF-8, empty caption, malformed or
     degenerate box;
  2. duplicates: the first row (in parquet order) of each `_id` that passed step 1 is kept;
  3. image checks (`make_example`): missing, unreadable or oversized image, an img2dataset
     image without its original size, box outside the image, face too small.

Splits are assigned by hashing `_id`, so a record's split never depends on the build mode, the
number of workers or which other rows exist, and one `_id` can only ever be in one split.

Nothing here imports TensorFlow Datasets; the functions run in pool workers and Beam workers.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from etils import epath

from tfds_builders import face_crop
from tfds_builders.face_crop import MISSING_ID, MISSING_IMAGE, UNKNOWN_ORIGINAL_SIZE, Skip
from tfds_builders.facecaption15m import layouts

# Columns of FaceCaption-v2.parquet. `url` is not needed to build the dataset.
ID_COLUMN = "_id"
CAPTION_COLUMN = "caption"
LAION_CAPTION_COLUMN = "laion_caption"
BOX_COLUMN = "box"
REQUIRED_COLUMNS = (ID_COLUMN, CAPTION_COLUMN, BOX_COLUMN)
SUPPORTED_SCHEMAS = (
    "FaceCaption-v2.parquet: _id (string), caption (list<string> or string), url (string), "
    "laion_caption (list<string> or string, optional), box (JSON string \"[x1, y1, x2, y2]\" "
    "or list of 4 numbers)"
)


class SchemaError(ValueError):
    """The parquet file is unreadable, or not a FaceCaption-15M version this builder
    understands; the message names the file."""


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t) \
        or pa.types.is_large_binary(t)


def _is_list_of(t: pa.DataType, predicate: Callable[[pa.DataType], bool]) -> bool:
    return (pa.types.is_list(t) or pa.types.is_large_list(t)) and predicate(t.value_type)


def check_schema(schema: pa.Schema, path: str) -> tuple[str, ...]:
    """Returns the columns to read, or raises SchemaError naming what is wrong.

    FaceCaption-v1's column names are not documented anywhere we could check, so rather than
    guess, any file without the v2 columns and types is rejected with a message listing both.
    """
    fields = {field.name: field.type for field in schema}
    problems = [f"missing column {name!r}" for name in REQUIRED_COLUMNS if name not in fields]
    checks = {
        ID_COLUMN: lambda t: _is_text(t) or pa.types.is_integer(t),
        CAPTION_COLUMN: lambda t: _is_text(t) or _is_list_of(t, _is_text),
        LAION_CAPTION_COLUMN: lambda t: _is_text(t) or _is_list_of(t, _is_text),
        BOX_COLUMN: lambda t: _is_text(t) or _is_list_of(
            t, lambda v: pa.types.is_integer(v) or pa.types.is_floating(v)),
    }
    for name, ok in checks.items():
        if name in fields and not ok(fields[name]):
            problems.append(f"column {name!r} has unsupported type {fields[name]}")
    if problems:
        found = ", ".join(f"{name} ({fields[name]})" for name in fields)
        raise SchemaError(f"Unsupported FaceCaption-15M parquet {path}: {'; '.join(problems)}.\n"
                          f"Supported: {SUPPORTED_SCHEMAS}.\nFound columns: {found}")
    return tuple(name for name in checks if name in fields)


@dataclasses.dataclass(frozen=True)
class RowGroup:
    """One parquet row group and the global index of its first row (a unit of parallel work)."""

    path: str
    index: int
    first_row: int
    num_rows: int


def parquet_metadata(path: epath.Path) -> pq.FileMetaData:
    """The parquet file's footer, or SchemaError naming the file: a cut-off download of the
    4 GB file ends without one."""
    try:
        with path.open("rb") as f:
            return pq.ParquetFile(f).metadata
    except (pa.ArrowException, OSError) as e:
        raise SchemaError(f"{path}: not a readable parquet file ({e}); if it is a partial "
                          "download, download it again") from None


def row_groups(path: epath.Path, metadata: pq.FileMetaData) -> list[RowGroup]:
    """The row groups of the parquet file at `path` (its `parquet_metadata`), in file order."""
    out, first = [], 0
    for i in range(metadata.num_row_groups):
        rows = metadata.row_group(i).num_rows
        out.append(RowGroup(str(path), i, first, rows))
        first += rows
    return out


def split_of(raw_id: bytes, split_fractions: Sequence[tuple[str, float]]) -> str:
    """Deterministic split of a record from a hash of its `_id` bytes (`id_bytes`)."""
    value = int.from_bytes(hashlib.sha256(raw_id).digest()[:8], "big") / 2.0**64
    cumulative = 0.0
    for name, fraction in split_fractions:
        cumulative += fraction
        if value < cumulative:
            return name
    return split_fractions[-1][0]


def id_bytes(value: object) -> bytes:
    """The bytes of an `_id` (parquet cell or sidecar value) that decide its split: the id as
    records and the join know it (text, surrounding whitespace stripped), so that two spellings
    of one id can never land in two splits; ids that are not UTF-8 hash as they are."""
    if value is None:
        return b""
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return value
    return str(value).strip().encode("utf-8")


# Rows per read within a row group: a parquet written in one row group (pyarrow before 15
# wrote up to 64M rows in one) would otherwise be read whole, 4 GB of captions at a time.
ROWS_PER_READ = 65536


def read_rows(group: RowGroup, columns: Sequence[str], split: str,
              split_fractions: Sequence[tuple[str, float]]) -> Iterator[tuple[int, dict]]:
    """Yields (global row index, raw cells) of the rows of `group` that belong to `split`,
    reading `ROWS_PER_READ` rows at a time.

    Text columns are read as raw bytes so that `parse_row` can reject invalid UTF-8 itself
    rather than have Arrow fail on the whole batch.
    """
    row = group.first_row
    try:
        with epath.Path(group.path).open("rb") as f:
            # buffer_size: column chunks are read in 8 MB pieces too, not whole.
            for batch in pq.ParquetFile(f, buffer_size=8 << 20).iter_batches(
                    batch_size=ROWS_PER_READ, row_groups=[group.index], columns=list(columns)):
                cells = {name: _text_as_bytes(batch.column(name)).to_pylist()
                         for name in columns}
                for i in range(batch.num_rows):
                    if split_of(id_bytes(cells[ID_COLUMN][i]), split_fractions) == split:
                        yield row + i, {name: cells[name][i] for name in columns}
                row += batch.num_rows
    except (pa.ArrowException, OSError) as e:
        raise SchemaError(f"{group.path}: row group {group.index} (rows {group.first_row} to "
                          f"{group.first_row + group.num_rows - 1}) is unreadable from row "
                          f"{row} ({e})") from None


def _text_as_bytes(column: pa.Array) -> pa.Array:
    """String (and list-of-string) columns as binary, others as they are."""
    if pa.types.is_string(column.type):
        return column.cast(pa.binary())
    if pa.types.is_large_string(column.type):
        return column.cast(pa.large_binary())
    if _is_list_of(column.type, pa.types.is_string):
        return column.cast(pa.list_(pa.binary()))
    if _is_list_of(column.type, pa.types.is_large_string):
        return column.cast(pa.list_(pa.large_binary()))
    return column


@dataclasses.dataclass(frozen=True)
class Row:
    """A parquet row that passed the row checks."""

    index: int
    id: str
    caption: str
    laion_caption: str
    box: tuple[float, float, float, float]


def _first_text(value: object) -> str:
    """`caption` is a list holding one string in v2; a plain string is accepted too."""
    if isinstance(value, list):
        value = value[0] if value else None
    return face_crop.decode_text(value)


def row_id(cells: dict) -> str:
    """The `_id` of a raw row as text; Skip(MISSING_ID) or Skip(INVALID_UTF8) if unusable."""
    raw_id = cells[ID_COLUMN]
    sample_id = face_crop.decode_text(raw_id if isinstance(raw_id, bytes | None) else str(raw_id))
    if not sample_id:
        raise Skip(MISSING_ID)
    return sample_id


def parse_row(index: int, sample_id: str, cells: dict) -> Row:
    """Validates the text and box of a raw row; raises Skip with the first problem found."""
    caption = _first_text(cells[CAPTION_COLUMN])
    if not caption:
        raise Skip(face_crop.EMPTY_CAPTION)
    laion_caption = _first_text(cells.get(LAION_CAPTION_COLUMN))
    box = face_crop.parse_box(cells[BOX_COLUMN])
    return Row(index, sample_id, caption, laion_caption, box)


@dataclasses.dataclass(frozen=True)
class ImageSettings:
    """Everything a worker needs to turn a joined record into an example (picklable)."""

    layout: str
    images_dir: str
    resize_mode: str
    spec: face_crop.CropSpec
    flat_extensions: tuple[str, ...]  # the flat layout's (`layouts.DetectedLayout`)


def make_example(row: Row, ref: layouts.ImageRef | None,
                 settings: ImageSettings) -> tuple[str, dict]:
    """Crops the face of `row` from its image and returns the TFDS (key, example).

    `ref` is the image found by the join, or None; for the flat layout it is resolved here,
    in the worker, because probing file names is I/O that should run in parallel.
    """
    if settings.layout == layouts.FLAT:
        ref = layouts.resolve_flat(settings.images_dir, row.id,
                                   settings.flat_extensions)
    if ref is None:
        raise Skip(MISSING_IMAGE)
    img = face_crop.open_image(ref.read(), settings.spec.max_pixels)
    if (ref.original_size is None and not ref.as_downloaded
            and settings.layout != layouts.FLAT and settings.resize_mode != "no"):
        raise Skip(UNKNOWN_ORIGINAL_SIZE)  # the stored image's size is not the box's frame
    stored_size = img.size
    original_size = ref.original_size or stored_size
    # Clipped to the photo first: a box off it is counted (box_outside_image), not cut from
    # the padding a "border" resize added, from which no context is taken either.
    visible = face_crop.clip_box(row.box, original_size)
    box = layouts.map_box(visible, original_size, stored_size, settings.resize_mode)
    area = layouts.picture_area(original_size, stored_size, settings.resize_mode)
    image = face_crop.crop_face(img, box, settings.spec, area)
    return row.id, {
        "image": image,
        "caption": row.caption,
        "laion_caption": row.laion_caption,
        "id": row.id,
        "box": np.array([round(v) for v in row.box], dtype=np.int32),
        "original_size": np.array(original_size, dtype=np.int32),
    }


def make_example_task(
        task: tuple[Row, layouts.ImageRef | None, ImageSettings]) -> tuple[str, dict]:
    """`make_example` taking one tuple, for `ordered_map` and Beam."""
    return make_example(*task)
