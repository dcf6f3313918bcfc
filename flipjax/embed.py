"""Embeds image files and text lines with a trained model:

    python -m flipjax.embed --workdir=DIR --images=DIR_OR_GLOB [--texts=FILE] --output=OUT.npz
        [--overwrite]

Reads WORKDIR/config.json and the latest checkpoint (or `--step`). OUT.npz holds the `step`,
L2-normalised `image_embeddings` (N, D) with `image_files`, and with `--texts`
`text_embeddings` (M, D) with `texts` (the file's non-blank lines; those longer than the text
tower's tokens are cut, with a warning). Images are local files, anything Pillow opens, any size
or mode; they get the eval preprocessing (RGB, then the run's `data.eval_resize` or
`--eval_resize`). A file Pillow can't read is reported and skipped, so one broken file doesn't
lose a large run. An existing OUT.npz is replaced only with `--overwrite`, and is checked for
before anything is embedded. `--texts` and `--output` may be URLs (gs://...), as a workdir may.
"""

from __future__ import annotations

import glob
import os
import sys

import jax
import numpy as np
from absl import app, flags, logging
from PIL import Image, ImageOps
from tqdm import tqdm

from flipjax.config import exit_on_config_error
from flipjax.data.pipeline import EVAL_RESIZES
from flipjax.evaluate.features import Embedder
from flipjax.storage import storage_path, write_npz_whole
from flipjax.train.workdir import load_workdir_config, restore_params
from tfds_builders.face_crop import Skip, to_rgb

flags.DEFINE_string("workdir", None, "The training run's workdir.")
flags.DEFINE_string("images", None, "A directory (searched recursively) or a glob.")
flags.DEFINE_string("texts", None, "A text file, one text per line.")
flags.DEFINE_string("output", None, "The .npz to write ('.npz' is added if missing).")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
flags.DEFINE_integer("batch_size", 64, "Images per batch (rounded up to the device count).",
                     lower_bound=1)
flags.DEFINE_enum("eval_resize", None, sorted(EVAL_RESIZES), "How images reach the model's "
                  "square input (default: the run's config.data.eval_resize).")
flags.DEFINE_bool("overwrite", False, "Replace an existing --output.")
flags.mark_flags_as_required(["workdir", "output"])
FLAGS = flags.FLAGS

def list_images(pattern: str) -> list[str]:
    """Every file under a directory (recursively), or the files a glob matches, sorted."""
    if os.path.isdir(pattern):  # its name may hold glob characters ("photos[1]")
        paths = glob.glob(os.path.join(glob.escape(pattern), "**", "*"), recursive=True)
    else:
        paths = glob.glob(pattern, recursive=True)
    return sorted(p for p in paths if os.path.isfile(p))


def load_image(path: str, size: int, resize: str) -> np.ndarray | None:
    """uint8 (size, size, 3) by `resize` (`EVAL_RESIZES`), or None (with a warning) if Pillow
    can't read the file."""
    try:
        with Image.open(path) as image:
            image.load()
            rgb = to_rgb(ImageOps.exif_transpose(image))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Skip) as e:
        print(f"skipping {path}: {e}", file=sys.stderr)
        return None
    return np.asarray(EVAL_RESIZES[resize](rgb, size), np.uint8)


def embed_files(embedder: Embedder, params: dict, paths: list[str], size: int, resize: str
                ) -> tuple[np.ndarray, list[str]]:
    """Embeddings of the readable files among `paths`, and those files' paths."""
    out, kept, batch, names = [], [], [], []
    for i, path in enumerate(tqdm(paths, desc="images", disable=None)):
        image = load_image(path, size, resize)
        if image is not None:
            batch.append(image)
            names.append(path)
        if batch and (len(batch) == embedder.batch_size or i == len(paths) - 1):
            out.append(embedder.images(params, np.stack(batch)))
            kept += names
            batch, names = [], []
    if not out:
        raise app.UsageError(f"none of the {len(paths)} files could be read as an image")
    return np.concatenate(out), kept


def main(argv: list[str]) -> None:
    del argv
    if not FLAGS.images and not FLAGS.texts:
        raise app.UsageError("give --images and/or --texts")
    output = FLAGS.output if FLAGS.output.endswith(".npz") else f"{FLAGS.output}.npz"
    if storage_path(output).exists() and not FLAGS.overwrite:  # before a long embedding
        raise app.UsageError(f"{output} exists; pass --overwrite to replace it")
    with exit_on_config_error():
        config = load_workdir_config(FLAGS.workdir)
        params, step, setup, tokenizer = restore_params(config, FLAGS.workdir, FLAGS.step)
    n = setup.mesh.size
    embedder = Embedder(setup.graphdef, setup.mesh, config.data, -(-FLAGS.batch_size // n) * n)
    out = {"step": np.asarray(step)}
    if FLAGS.images:
        paths = list_images(FLAGS.images)
        if not paths:
            raise app.UsageError(f"no files match --images={FLAGS.images}")
        emb, kept = embed_files(embedder, params, paths, config.data.image_size,
                                FLAGS.eval_resize or config.data.eval_resize)
        out.update(image_embeddings=emb, image_files=np.asarray(kept, dtype=str))
        logging.info("embedded %d of %d image files", len(kept), len(paths))
    if FLAGS.texts:
        # utf-8-sig: a byte-order mark (as some Windows editors write) is not text.
        lines = storage_path(FLAGS.texts).read_bytes().decode("utf-8-sig").split("\n")
        texts = [line.strip() for line in lines if line.strip()]  # strip() takes "\r" too
        if not texts:
            raise app.UsageError(f"--texts={FLAGS.texts} holds no text")
        cut = [text for text in texts if not tokenizer.fits(text)]
        if cut:
            logging.warning("%d of %d texts are longer than the text tower's %d tokens and are "
                            "cut to them, e.g. %r", len(cut), len(texts), tokenizer.max_len,
                            cut[0][:80])
        out.update(text_embeddings=embedder.texts(params, tokenizer.encode_batch(texts)),
                   texts=np.asarray(texts, dtype=str))
    if jax.process_index() == 0:
        write_npz_whole(storage_path(output), **out)
        print(f"wrote {output}: " + ", ".join(f"{k} {v.shape}" for k, v in out.items()))


if __name__ == "__main__":
    app.run(main)
