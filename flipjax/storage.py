"""Where runs, datasets and tokenizers live: a local path, or a URL such as `gs://BUCKET/...`.

Everything flipjax reads or writes outside the dataset itself goes through `etils.epath`, as
Orbax and TFDS do, so a workdir, `data.data_dir` or `tokenizer.path` on Cloud Storage works
like a local one (`pip install "flipjax[gcs]"`: gcsfs for epath, google-cloud-storage for
TensorBoard's writer). As in Orbax, epath reads local paths under /gs/, /s3/ and /az/ as URLs.
Two things stay local: the image files `flipjax.embed` reads, and Hugging Face model
directories (`flipjax.export`'s output, `config.init_from`), which transformers writes and
reads as local folders.
Object stores have no append (gcsfs silently overwrites) and no atomic rename, so files there
are written whole: to a temporary name, then moved over the old one.
"""

from __future__ import annotations

import io
import os
import uuid

import numpy as np
from etils import epath


def is_url(path: str | os.PathLike) -> bool:
    """Whether `path` is on an object store rather than a local file system."""
    return "://" in os.fspath(path)


def storage_path(path: str | os.PathLike) -> epath.Path:
    """`path` as an `epath.Path`: a URL as it is, a local path made absolute (Orbax wants
    absolute directories; `os.path.abspath("gs://b/run")` would be a local folder "gs:")."""
    return epath.Path(path if is_url(path) else os.path.abspath(path))


def write_bytes_whole(path: epath.Path, data: bytes) -> None:
    """Writes `data` to a temporary file beside `path` (named uniquely, so that two writers of
    the same file don't collide), then moves it over `path`: a reader, or a crash, never sees a
    partly written file. A local file reaches the disk before the move (a power cut leaves the
    old file or the new one); a failed write leaves no temporary file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        if is_url(path):
            tmp.write_bytes(data)
        else:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_npz_whole(path: epath.Path, **arrays: np.ndarray) -> None:
    """`np.savez` of `arrays` to `path` (a URL too), written whole (`write_bytes_whole`)."""
    npz = io.BytesIO()
    np.savez(npz, **arrays)
    write_bytes_whole(path, npz.getvalue())
