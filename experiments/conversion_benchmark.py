"""Conversion benchmark: records/s (total and per core) of the local multi-process build of the
`facecaption15m` TFDS builder on real-size JPEGs with one real face each, per image layout.

    python -m experiments.conversion_benchmark                     # 2000 images, 1 and 2 workers
    python -m experiments.conversion_benchmark --num_images=50 --workers=1   # smoke test
    python -m experiments.conversion_benchmark --workers=2 --layouts=flat,webdataset,parquet

Why a made-up fixture and not the real download: FaceCaption-15M originals are only
distributed on request. What dominates conversion cost is decoding a 0.25-2 MP JPEG, cropping
and re-encoding a 256 px face, so the fixture reproduces exactly that: each image is an ORL face
photo (`tests/face_fixtures.py`), upscaled to a random size and pasted on a random-size
(500-1500 px a side) coloured, textured and noisy scene, saved as a quality-90 JPEG, with its
face box in a FaceCaption-v2-style parquet. Face sizes are spread (15-60% of the short side)
because the builder decodes JPEGs at reduced DCT scale when the face crop is large, so the face
size distribution changes the cost.

The `webdataset` and `parquet` layouts hold the same files as img2dataset's output formats
would with `--resize_mode no` (shards of 10000 samples; parquet row groups of 100 rows; rows in
a shuffled order, as img2dataset writes them when downloads finish), so the layouts differ
only in how an image is found and read.

The fixture is kept in `--workdir` and reused by later runs with the same size and seed (and by
`experiments/input_pipeline_benchmark.py`, which reads the 2-worker `flat` build). Writes
`experiments/results/conversion.md`.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from absl import app, flags
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Only light imports at module level: the build's "spawn" workers re-import this module as
# `__main__`, and that import is part of the timed build. The rest is imported where used.
from tfds_builders.parallel import ordered_map  # noqa: E402


def define_flags() -> None:
    """Defined only when run as a script, so that `input_pipeline_benchmark` can import the
    fixture and build helpers without their flags clashing with its own."""
    flags.DEFINE_integer("num_images", 2000, "Images (parquet rows) in the fixture.")
    flags.DEFINE_list("workers", ["1", "2"], "num_workers values to build with, one build each.")
    flags.DEFINE_list("layouts", ["flat"], "Image layouts to build from (flat, webdataset, "
                      "parquet), each with every num_workers.")
    flags.DEFINE_string("workdir", DEFAULT_WORKDIR,
                        "Where the fixture (manual_dir) and the builds go; kept between runs.")
    flags.DEFINE_integer("seed", 0, "Fixture seed.")
    flags.DEFINE_string("output", "experiments/results/conversion.md", "Markdown result file.")


FLAGS = flags.FLAGS

DEFAULT_WORKDIR = "workdirs/bench/conversion"
DATASET = "facecaption15m"
CONFIG = "flat"
MIN_SIDE, MAX_SIDE = 500, 1500
# The face inside a 92x112 ORL photo (x1, y1, x2, y2), as `face_fixtures.scene` boxes it.
ORL_FACE_BOX = (10, 14, 82, 104)

_HAIR = ["short black", "long blonde", "curly brown", "straight red", "grey", "wavy dark",
         "shoulder-length auburn", "cropped light brown", "thinning white", "braided black"]
_EYES = ["brown", "blue", "green", "hazel", "dark", "grey"]
_EXPRESSION = ["smiles warmly", "looks serious", "has a neutral expression", "laughs openly",
               "looks thoughtful", "raises an eyebrow", "frowns slightly", "grins at the camera"]
_EXTRA = ["wears glasses", "has a beard", "wears earrings", "has a moustache", "wears a hat",
          "wears lipstick", "has rosy cheeks", "has high cheekbones", "has bushy eyebrows",
          "wears a necktie", "has a double chin", "has bangs"]
_WHO = ["A young woman", "An old man", "A middle-aged woman", "A young man", "A teenage girl",
        "An elderly woman", "A man in his thirties", "A woman in her forties"]


def caption(rng: np.random.Generator) -> str:
    """A FaceCaption-like caption (1-3 sentences, 15-50 words) from a small attribute grammar,
    so the tokenizer of the input-pipeline benchmark has real vocabulary to learn and encode."""
    extras = rng.choice(_EXTRA, size=rng.integers(1, 4), replace=False)
    parts = [f"{rng.choice(_WHO)} with {rng.choice(_HAIR)} hair and {rng.choice(_EYES)} eyes "
             f"{rng.choice(_EXPRESSION)}."]
    parts.append("The person " + ", ".join(extras[:-1]) + (" and " if len(extras) > 1 else "")
                 + extras[-1] + ".")
    if rng.random() < 0.5:
        parts.append(f"The face is {rng.choice(['slightly', 'clearly', 'partly'])} turned "
                     f"{rng.choice(['left', 'right', 'towards the camera'])} and the lighting "
                     f"is {rng.choice(['soft', 'harsh', 'warm', 'dim', 'natural'])}.")
    return " ".join(parts)


def make_image(task: tuple[int, int, str]) -> tuple[str, list[int], int, int]:
    """Writes fixture image `i` to `images_dir/<_id>.jpg`; returns (_id, box, width, height).

    Module-level and one picklable argument so `ordered_map` can run it in worker processes:
    encoding ~2000 1 MP JPEGs takes about a minute on one core.
    """
    from tests.face_fixtures import ORL_SIZE, encode, orl_face

    i, seed, images_dir = task
    rng = np.random.default_rng([seed, i])
    width, height = (int(v) for v in rng.integers(MIN_SIDE, MAX_SIDE + 1, size=2))
    # Scene: a low-frequency colour field (upscaled 6x6 random colours) plus a gradient and a
    # tiled 128 px noise patch, so JPEG sizes are like photos' (~300 KB/MP) at ~50 ms an image.
    blobs = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize(
        (width, height), Image.Resampling.BICUBIC)
    noise = rng.normal(0, 6, (128, 128, 1)).astype(np.int16)
    pixels = np.asarray(blobs, np.int16) + np.tile(
        noise, (height // 128 + 1, width // 128 + 1, 1))[:height, :width]
    pixels += np.linspace(-40, 40, width).astype(np.int16)[None, :, None]
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    # Face: one of the 400 ORL photos, tinted, scaled to 15-60% of the short side.
    face = orl_face(int(rng.integers(400)))
    tint = rng.uniform(0.7, 1.0, size=3)
    face_rgb = Image.merge("RGB", [face.point(lambda v, t=t: v * t) for t in tint])
    scale = rng.uniform(0.15, 0.6) * min(width, height) / ORL_SIZE[1]
    fw, fh = round(ORL_SIZE[0] * scale), round(ORL_SIZE[1] * scale)
    face_rgb = face_rgb.resize((fw, fh), Image.Resampling.BICUBIC)
    x0, y0 = int(rng.integers(0, width - fw + 1)), int(rng.integers(0, height - fh + 1))
    img.paste(face_rgb, (x0, y0))
    box = [round(x0 + ORL_FACE_BOX[0] * scale), round(y0 + ORL_FACE_BOX[1] * scale),
           round(x0 + ORL_FACE_BOX[2] * scale), round(y0 + ORL_FACE_BOX[3] * scale)]
    sample_id = f"fc{i:08d}"
    (Path(images_dir) / f"{sample_id}.jpg").write_bytes(encode(img, quality=90))
    return sample_id, box, width, height


def sample_ids(n: int) -> list[int]:
    """Indices of `n` fixture rows such that every split gets at least one row.

    Splits are a hash of `_id` (0.5% each for validation and test), and a build fails on an
    empty split, so small smoke-test fixtures swap in a few rows that hash into the missing
    splits. At the default 2000 rows this changes nothing.
    """
    from tfds_builders.facecaption15m import records
    from tfds_builders.facecaption15m.builder import DEFAULT_SPLITS

    splits = [name for name, _ in DEFAULT_SPLITS]
    chosen = list(range(n))
    have = {records.split_of(records.id_bytes(f"fc{i:08d}"), DEFAULT_SPLITS) for i in chosen}
    k, slot = n, n - 1
    for split in splits:
        if split in have:
            continue
        while records.split_of(records.id_bytes(f"fc{k:08d}"), DEFAULT_SPLITS) != split:
            k += 1
        chosen[slot], slot, k = k, slot - 1, k + 1
    return chosen


def make_fixture(root: Path, num_images: int, seed: int) -> Path:
    """manual_dir with `FaceCaption-v2.parquet` and `images/<_id>.jpg`; reused if complete."""
    from tests.face_fixtures import Row, write_facecaption_parquet

    manual_dir = root / f"manual_n{num_images}_s{seed}"
    done = manual_dir / "DONE"
    if done.exists():
        print(f"reusing fixture {manual_dir}")
        return manual_dir
    shutil.rmtree(manual_dir, ignore_errors=True)
    images_dir = manual_dir / "images"
    images_dir.mkdir(parents=True)
    t0 = time.perf_counter()
    tasks = [(i, seed, str(images_dir)) for i in sample_ids(num_images)]
    made = list(ordered_map(make_image, tasks, num_workers=os.cpu_count() or 1, chunk_size=8))
    rng = np.random.default_rng(seed)
    rows = [Row(id=sample_id, caption=[caption(rng)], box=json.dumps(box),
                laion_caption=[f"photo of a person {i}"] if i % 2 else [])
            for i, (sample_id, box, _, _) in enumerate(made)]
    write_facecaption_parquet(manual_dir / "FaceCaption-v2.parquet", rows)
    sizes = np.array([(w, h, b[3] - b[1]) for _, b, w, h in made])
    megabytes = sum(f.stat().st_size for f in images_dir.iterdir()) / 1e6
    (manual_dir / "fixture.json").write_text(json.dumps({
        "images": len(made), "seconds": time.perf_counter() - t0, "megabytes": megabytes,
        "mean_megapixels": float((sizes[:, 0] * sizes[:, 1]).mean() / 1e6),
        "face_height_px": [int(sizes[:, 2].min()), int(np.median(sizes[:, 2])),
                           int(sizes[:, 2].max())]}))
    done.touch()
    print(f"made fixture {manual_dir} in {time.perf_counter() - t0:.0f} s")
    return manual_dir


SHARD_SAMPLES, ROW_GROUP = 10_000, 100  # img2dataset's defaults


def img2dataset_copy(manual_dir: Path, layout: str) -> Path:
    """`manual_dir` with its images in img2dataset's `layout` output (as downloaded with
    `--resize_mode no`: the sidecar's original size is the stored one); made once."""
    import io
    import tarfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    out = manual_dir.with_name(f"{manual_dir.name}_{layout}_shuffled")
    if (out / "DONE").exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    (out / "images").mkdir(parents=True)
    shutil.copy(manual_dir / "FaceCaption-v2.parquet", out)
    files = sorted((manual_dir / "images").iterdir())
    np.random.default_rng(0).shuffle(files)  # img2dataset writes as downloads finish
    for shard, start in enumerate(range(0, len(files), SHARD_SAMPLES)):
        samples = []
        for i, path in enumerate(files[start: start + SHARD_SAMPLES]):
            with Image.open(path) as img:
                width, height = img.size
            samples.append({"key": f"{shard:05d}{i:04d}", "status": "success", "_id": path.stem,
                            "width": width, "height": height, "original_width": width,
                            "original_height": height, "jpg": path.read_bytes()})
        name = out / "images" / f"{shard:05d}"
        if layout == "parquet":
            columns = {k: [s[k] for s in samples] for k in samples[0]}
            pq.write_table(pa.table(columns), f"{name}.parquet", row_group_size=ROW_GROUP)
            continue
        with tarfile.open(f"{name}.tar", "w") as tar:
            for sample in samples:
                meta = {k: v for k, v in sample.items() if k != "jpg"}
                for ext, data in (("json", json.dumps(meta).encode()), ("jpg", sample["jpg"])):
                    info = tarfile.TarInfo(f"{sample['key']}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    (out / "DONE").touch()
    return out


def build_dir(workdir: Path, num_images: int, seed: int, workers: int,
              layout: str = CONFIG) -> Path:
    suffix = "" if layout == CONFIG else f"_{layout}"
    return workdir / f"tfds_n{num_images}_s{seed}_w{workers}{suffix}"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run_build(manual_dir: Path, data_dir: Path, workers: int,
              layout: str = CONFIG) -> tuple[float, dict]:
    """Builds from scratch (a reused dataset would time nothing); returns (seconds, report)."""
    import tfds_builders

    shutil.rmtree(data_dir, ignore_errors=True)
    t0 = time.perf_counter()
    builder = tfds_builders.build(DATASET, str(data_dir), manual_dir=str(manual_dir),
                                  num_workers=workers, config=layout)
    seconds = time.perf_counter() - t0
    return seconds, json.loads((Path(builder.data_path) / "skipped.json").read_text())


def _table(header: list[str], rows: list[list]) -> str:
    """A markdown table (as `experiments.common.markdown_table`, which imports JAX)."""
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]) + "\n"


def write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Path(path).write_text(text)
    print(f"wrote {path}")


def main(argv: list[str]) -> None:
    del argv
    workdir = Path(FLAGS.workdir)
    manual_dir = make_fixture(workdir, FLAGS.num_images, FLAGS.seed)
    fixture = json.loads((manual_dir / "fixture.json").read_text())
    results = []
    for layout in FLAGS.layouts:
        source = manual_dir if layout == CONFIG else img2dataset_copy(manual_dir, layout)
        for workers in (int(w) for w in FLAGS.workers):
            data_dir = build_dir(workdir, FLAGS.num_images, FLAGS.seed, workers, layout)
            seconds, report = run_build(source, data_dir, workers, layout)
            written = sum(report["records_written"].values())
            results.append((layout, workers, seconds, report, written))
            print(f"{layout}, num_workers={workers}: {written} records in {seconds:.1f} s "
                  f"({written / seconds:.1f} records/s)", flush=True)

    value = lambda name: (",".join(FLAGS[name].value) if isinstance(FLAGS[name].value, list)
                          else FLAGS[name].value)
    command = "python -m experiments.conversion_benchmark " + " ".join(
        f"--{name}={value(name)}" for name in ("num_images", "workers", "layouts", "seed"))
    rows = []
    for layout, workers, seconds, report, written in results:
        rate = written / seconds
        rows.append([layout, workers, report["records_read"], written, f"{seconds:.1f}",
                     f"{rate:.1f}", f"{rate / min(workers, os.cpu_count() or 1):.1f}"])
    first = results[0][3]
    skipped = ", ".join(f"{k}: {v}" for k, v in first["skipped"].items()) or "none"
    ignored = ", ".join(f"{k}: {v}" for k, v in first["ignored_images"].items()) or "none"
    splits = ", ".join(f"{k}: {v}" for k, v in first["records_written"].items())
    # The reports name their dataset config (the layout); the counts must agree.
    counts = lambda report: {k: v for k, v in report.items() if k != "dataset"}
    same = all(counts(r[3]) == counts(first) for r in results)
    text = f"""# FaceCaption-15M conversion benchmark (local build)

`{command}`

Machine: {os.cpu_count()} cores (`nproc`), {cpu_model()}; Python {platform.python_version()}.
Load average at the end: {', '.join(f'{v:.2f}' for v in os.getloadavg())}.

Fixture: {fixture['images']} JPEGs (quality 90), {MIN_SIDE}-{MAX_SIDE} px a side, mean \
{fixture['mean_megapixels']:.2f} MP, {fixture['megabytes']:.0f} MB in all; one ORL face each, \
face box height min/median/max {'/'.join(str(v) for v in fixture['face_height_px'])} px; \
made in {fixture['seconds']:.0f} s (not part of the timings). Build: \
`tfds_builders.build("{DATASET}", data_dir, manual_dir=..., num_workers=N, config=LAYOUT)` \
from an empty data_dir, 256 px crops, ArrayRecord output; time = the whole \
`download_and_prepare` (parquet reads, crops in the worker pool, TFDS shuffle and write).
The img2dataset layouts hold the same JPEGs ({SHARD_SAMPLES} samples a shard, parquet row groups
of {ROW_GROUP} rows, rows shuffled as downloads finish); their copies are made once, outside the
timings. A parquet image is read with its row group: the build visits a split's images in shard
order and each worker keeps its last groups, so a group is read about once per worker.

""" + _table(["layout", "num_workers", "records read", "records written", "seconds",
                         "records/s", "records/s per core"], rows) + f"""
records/s per core = records/s / num_workers. The parent process also works (parquet reading,
the join, TFDS serialisation and the ArrayRecord write), so with num_workers = nproc the worker
pool and the parent share the cores. The builder starts a fresh "spawn" pool for each of the 3
splits (train 99%, validation and test 0.5% each) and reads the parquet once per split, so a
num_workers > 1 build pays ~3 pool start-ups (about a second each here) that a 13M-row build
amortises but a {fixture['images']}-row one does not.

Skip report (`skipped.json`): splits written {splits}; skipped: {skipped}; ignored images:
{ignored}. {'Identical for every build.' if same else 'Reports DIFFER between builds.'}
"""
    write(FLAGS.output, text)


if __name__ == "__main__":
    define_flags()
    app.run(main)
