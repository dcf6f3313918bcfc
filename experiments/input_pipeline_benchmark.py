"""Input-pipeline benchmark: flipjax's Grain training pipeline against an equivalent PyTorch
DataLoader, both reading the same ArrayRecord face crops, in images/s and images/s per core.

    python -m experiments.conversion_benchmark       # first: builds the dataset read here
    python -m experiments.input_pipeline_benchmark   # ~1 min after that; 2000-image build
    python -m experiments.input_pipeline_benchmark --batches=3 --warmup=1 --repeats=1  # smoke

Both pipelines do the same work per image: read a record of `facecaption15m/flat` (256 px face
JPEGs from the conversion benchmark) through `tfds.data_source`, decode it with PIL, take a
torchvision-style random resized crop (scale 0.8-1, ratio 0.9-1.1, bicubic) to 224 px, flip
half the images, tokenise the caption to 64 ids with the same SentencePiece model (trained here
on the build's captions), and stack batches of uint8 images and int32 ids.
  * Grain: `flipjax.data.pipeline.make_train_dataset` with `configs/base.py`'s data config
    pointed at that build; workers are `mp_prefetch` processes, threads are Grain read threads.
  * PyTorch: a map-style `Dataset` over the same `tfds.data_source` with the crop and flip
    written in PIL, a `RandomSampler`, numpy collate, `DataLoader(num_workers=...)`.
Each configuration is timed over `--batches` batches after `--warmup` batches (which absorb
worker start-up), best of `--repeats`. "Per core" divides by the CPU time the pipeline actually
used (its process and its workers, user + system, from psutil), so it does not depend on how
many cores were idle, and it is the figure that scales to a bigger host.

Then, from `experiments/results/throughput.md` (ViT-B/16 + B text: ~140 GFLOPs per pair per
train step) and bf16 peaks at 40% MFU, it states how many host cores at the measured rate per
core keep one TPU v5e chip and one H100 fed. Writes `experiments/results/input_pipeline.md`.
"""

from __future__ import annotations

import gc
import math
import os
import platform
import random
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import psutil
from absl import app, flags
from torch.utils.data import Dataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import conversion_benchmark  # noqa: E402

flags.DEFINE_string("data_dir", None, "TFDS data_dir holding facecaption15m/flat; default: the "
                    "2-worker build of experiments/conversion_benchmark.py (built if missing).")
flags.DEFINE_string("conversion_workdir", conversion_benchmark.DEFAULT_WORKDIR,
                    "conversion_benchmark's --workdir, to find (or make) its build.")
flags.DEFINE_integer("num_images", 2000, "conversion_benchmark's --num_images, likewise.")
flags.DEFINE_string("workdir", "workdirs/bench/input_pipeline", "Where the tokenizer goes.")
flags.DEFINE_integer("vocab_size", 1000, "SentencePiece vocabulary (a ceiling, BPE).")
flags.DEFINE_integer("batch", 32, "Batch size of both pipelines.")
flags.DEFINE_integer("warmup", 8, "Untimed batches first (worker start-up, caches).")
flags.DEFINE_integer("batches", 60, "Timed batches per configuration.")
flags.DEFINE_integer("repeats", 2, "Runs per configuration; the best is reported.")
flags.DEFINE_list("workers", ["0", "2"], "Worker process counts, for both pipelines.")
flags.DEFINE_integer("grain_threads", 2, "Also time Grain with 0 workers and this many read "
                     "threads (Grain's in-process parallelism; 0 or 1: skip).")
flags.DEFINE_string("output", "experiments/results/input_pipeline.md", "Markdown result file.")
FLAGS = flags.FLAGS

NAME, CONFIG = "facecaption15m", "flat"
B16_GFLOPS_PER_PAIR = 140.0  # experiments/results/throughput.md, XLA cost of one train step.
MFU = 0.40
PEAKS_TFLOPS = {"TPU v5e chip (197 TFLOP/s bf16)": 197.0,
                "H100 SXM (989 TFLOP/s dense bf16)": 989.0}


# --------------------------------------------------------------------------- PyTorch pipeline


def torch_random_resized_crop(image, size: int, scale: tuple[float, float],
                              ratio: tuple[float, float]):
    """torchvision's `RandomResizedCrop.get_params` + a PIL bicubic resize of the box.

    Written out with PIL and `random` because torchvision is not installed; it is the algorithm
    `flipjax.data.pipeline.random_resized_crop` implements, so both pipelines do equal work.
    """
    from PIL import Image

    w, h = image.size
    area = w * h
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * random.uniform(*scale)
        aspect = math.exp(random.uniform(*log_ratio))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            x0, y0 = random.randint(0, w - cw), random.randint(0, h - ch)
            return image.resize((size, size), Image.BICUBIC, box=(x0, y0, x0 + cw, y0 + ch))
    s = min(w, h)  # Fallback: central square.
    x0, y0 = (w - s) / 2, (h - s) / 2
    return image.resize((size, size), Image.BICUBIC, box=(x0, y0, x0 + s, y0 + s))


class TorchFaces(Dataset):
    """Map-style PyTorch dataset over the ArrayRecord build.

    The data source is opened lazily in each process that reads, as a PyTorch user would for a
    file-backed dataset, so nothing open is copied into forked workers.
    """

    def __init__(self, data_dir: str, tokenizer, size: int, scale: tuple[float, float],
                 ratio: tuple[float, float], flip: bool, length: int):
        self.data_dir, self.tokenizer, self.size = data_dir, tokenizer, size
        self.scale, self.ratio, self.flip, self.length = scale, ratio, flip, length
        self._source = None

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        import io

        import tensorflow_datasets as tfds
        from PIL import Image

        from flipjax.data.tokenizer import text_of

        if self._source is None:
            self._source = tfds.data_source(f"{NAME}/{CONFIG}", split="train",
                                            data_dir=self.data_dir)
        record = self._source[index]
        image = Image.open(io.BytesIO(record["image"])).convert("RGB")
        image = torch_random_resized_crop(image, self.size, self.scale, self.ratio)
        if self.flip and random.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        return {"image": np.asarray(image, np.uint8),
                "text": self.tokenizer.encode(text_of(record["caption"]))}


def numpy_collate(items: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stacks to numpy, which is what Grain's `batch` returns (and what JAX wants)."""
    return {k: np.stack([item[k] for item in items]) for k in items[0]}


def torch_batches(data_cfg, tokenizer, workers: int, total_batches: int) -> Iterator[dict]:
    import tensorflow_datasets as tfds
    import torch
    from torch.utils.data import DataLoader, RandomSampler

    length = len(tfds.data_source(f"{NAME}/{CONFIG}", split="train", data_dir=data_cfg.data_dir))
    faces = TorchFaces(data_cfg.data_dir, tokenizer, data_cfg.image_size,
                       tuple(data_cfg.augment.crop_scale), tuple(data_cfg.augment.crop_ratio),
                       data_cfg.augment.flip, length)
    # Reshuffles every epoch and runs for as many samples as needed, like Grain's
    # shuffle().repeat(), so no epoch boundary restarts the workers mid-measurement.
    sampler = RandomSampler(faces, num_samples=total_batches * FLAGS.batch,
                            generator=torch.Generator().manual_seed(0))
    # "spawn": with the default fork, workers segfaulted here once the parent had opened the
    # ArrayRecord data source (for len()). Worker start-up falls in the untimed warm-up.
    loader = DataLoader(faces, batch_size=FLAGS.batch, sampler=sampler, num_workers=workers,
                        collate_fn=numpy_collate, drop_last=True,
                        multiprocessing_context="spawn" if workers else None)
    return iter(loader)


# --------------------------------------------------------------------------- Grain pipeline


def grain_batches(data_cfg, tokenizer, workers: int, threads: int) -> Iterator[dict]:
    from flipjax.data.pipeline import make_train_dataset

    data_cfg.num_workers, data_cfg.read_threads = workers, threads
    return iter(make_train_dataset(data_cfg, tokenizer, seed=0))


# --------------------------------------------------------------------------- measurement


def cpu_seconds(proc: psutil.Process) -> float:
    """User + system CPU seconds of `proc` and its live descendants (the workers)."""
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def measure(make_iterator: Callable[[], Iterator[dict]]) -> dict[str, float]:
    """Warm-up, then wall and CPU time of `--batches` batches; shuts the workers down after."""
    proc = psutil.Process()
    t_start = time.perf_counter()
    iterator = make_iterator()
    for _ in range(FLAGS.warmup):
        batch = next(iterator)
    startup = time.perf_counter() - t_start
    assert batch["image"].shape[1:] == (224, 224, 3) and batch["image"].dtype == np.uint8
    cpu0, t0 = cpu_seconds(proc), time.perf_counter()
    for _ in range(FLAGS.batches):
        batch = next(iterator)
    wall, cpu = time.perf_counter() - t0, cpu_seconds(proc) - cpu0
    del iterator, batch
    gc.collect()
    time.sleep(1.0)  # Let the workers exit before the next configuration starts.
    images = FLAGS.batches * FLAGS.batch
    return {"startup_s": startup, "wall_s": wall, "cpu_s": cpu, "images_per_s": images / wall,
            "images_per_cpu_s": images / cpu}


# --------------------------------------------------------------------------- setup and report


def dataset_dir() -> str:
    if FLAGS.data_dir:
        return FLAGS.data_dir
    root, n, seed = Path(FLAGS.conversion_workdir), FLAGS.num_images, 0
    workers = os.cpu_count() or 1
    data_dir = conversion_benchmark.build_dir(root, n, seed, workers)
    if not (data_dir / NAME / CONFIG).exists():
        print(f"{data_dir} missing: building it (run experiments/conversion_benchmark.py first "
              "to keep this out of the benchmark's run time)")
        manual_dir = conversion_benchmark.make_fixture(root, n, seed)
        conversion_benchmark.run_build(manual_dir, data_dir, workers)
    return str(data_dir)


def tokenizer_for(data_dir: str):
    from flipjax.data.tokenizer import Tokenizer, dataset_texts, train_sentencepiece

    path = os.path.join(FLAGS.workdir, f"{NAME}_{CONFIG}_spm{FLAGS.vocab_size}.model")
    stamp = Path(path + ".source")
    if not os.path.exists(path) or not stamp.exists() or stamp.read_text() != data_dir:
        train_sentencepiece(dataset_texts(NAME, data_dir, "train", "caption", CONFIG), path,
                            FLAGS.vocab_size)
        stamp.write_text(data_dir)
    return Tokenizer(path, max_len=64)


def data_config(data_dir: str):
    from configs.base import get_config

    cfg = get_config(f"batch={FLAGS.batch}").data
    cfg.name, cfg.builder_config, cfg.data_dir = NAME, CONFIG, data_dir
    cfg.prefetch_batches = 2
    return cfg


def cpu_model() -> str:
    return conversion_benchmark.cpu_model()


def main(argv: list[str]) -> None:
    del argv
    data_dir = dataset_dir()
    tokenizer = tokenizer_for(data_dir)
    data_cfg = data_config(data_dir)
    workers = [int(w) for w in FLAGS.workers]
    total = FLAGS.warmup + FLAGS.batches
    # (pipeline, workers, threads per process, iterator factory).
    configs = [("PyTorch DataLoader", w, 1,
                lambda w=w: torch_batches(data_cfg, tokenizer, w, total)) for w in workers]
    configs += [("Grain (flipjax)", w, 1,
                 lambda w=w: grain_batches(data_cfg, tokenizer, w, 1)) for w in workers]
    if FLAGS.grain_threads > 1:
        configs.append(("Grain (flipjax)", 0, FLAGS.grain_threads,
                        lambda: grain_batches(data_cfg, tokenizer, 0, FLAGS.grain_threads)))
    best: dict[tuple[str, int, int], dict[str, float]] = {}
    for repeat in range(FLAGS.repeats):
        for name, w, threads, factory in configs:
            r = measure(factory)
            key = (name, w, threads)
            if key not in best or r["images_per_s"] > best[key]["images_per_s"]:
                best[key] = r
            print(f"[{repeat}] {name}, {w} workers, {threads} threads: "
                  f"{r['images_per_s']:.1f} images/s, {r['images_per_cpu_s']:.1f} images per "
                  f"CPU-s ({r['cpu_s'] / r['wall_s']:.2f} cores busy)", flush=True)
    write_report(best, data_dir, tokenizer.vocab_size)


def write_report(best: dict[tuple[str, int, int], dict[str, float]], data_dir: str,
                 vocab: int) -> None:
    from importlib.metadata import version

    rows = []
    for (name, w, threads), r in best.items():
        rows.append([name, w, threads, f"{r['images_per_s']:.1f}", f"{r['cpu_s']:.2f}",
                     f"{r['cpu_s'] / r['wall_s']:.2f}", f"{r['images_per_cpu_s']:.1f}",
                     f"{r['startup_s']:.1f}"])
    header_main = ["pipeline", "workers", "threads/process", "images/s", "CPU s", "cores busy",
                   "images/s per core (images per CPU-s)", "start-up + warm-up s"]
    verdict = []
    for w in (int(v) for v in FLAGS.workers):
        g, t = best[("Grain (flipjax)", w, 1)], best[("PyTorch DataLoader", w, 1)]
        ok = g["images_per_s"] >= t["images_per_s"]
        verdict.append(
            f"* {w} workers: Grain {g['images_per_s']:.1f} vs PyTorch {t['images_per_s']:.1f} "
            f"images/s ({g['images_per_s'] / t['images_per_s']:.2f}x), per CPU-second "
            f"{g['images_per_cpu_s']:.1f} vs {t['images_per_cpu_s']:.1f} "
            f"({g['images_per_cpu_s'] / t['images_per_cpu_s']:.2f}x): target "
            f"{'met' if ok else 'NOT met'}.")
    top_w = max(int(v) for v in FLAGS.workers)
    per_core = {"Grain": best[("Grain (flipjax)", top_w, 1)]["images_per_cpu_s"],
                "PyTorch": best[("PyTorch DataLoader", top_w, 1)]["images_per_cpu_s"]}
    feed = []
    for chip, tflops in PEAKS_TFLOPS.items():
        need = tflops * 1e12 * MFU / (B16_GFLOPS_PER_PAIR * 1e9)
        feed.append([chip, f"{need:,.0f}",
                     *(f"{need / rate:.1f} (→ {math.ceil(need / rate)})"
                       for rate in per_core.values())])
    header = ["accelerator", f"pairs/s at {MFU:.0%} MFU",
              *(f"host cores, {k} ({v:.0f} images/CPU-s)" for k, v in per_core.items())]
    command = ("python -m experiments.input_pipeline_benchmark "
               f"--batch={FLAGS.batch} --warmup={FLAGS.warmup} --batches={FLAGS.batches} "
               f"--repeats={FLAGS.repeats} --workers={','.join(FLAGS.workers)} "
               f"--grain_threads={FLAGS.grain_threads}")
    table = conversion_benchmark._table
    text = f"""# Input pipeline benchmark: Grain (flipjax) vs PyTorch DataLoader

`{command}`

Machine: {os.cpu_count()} cores (`nproc`), {cpu_model()}; Python {platform.python_version()}, \
grain {version('grain')}, torch {version('torch')}. \
Load average at the end: {', '.join(f'{v:.2f}' for v in os.getloadavg())}.

Data: `{NAME}/{CONFIG}` train split in `{data_dir}` (256 px face JPEGs from the conversion \
benchmark's fixture), read through `tfds.data_source`. Per image: decode, random resized crop \
to 224 px (scale 0.8-1, ratio 0.9-1.1, bicubic), flip with p=0.5, caption to 64 SentencePiece \
ids (BPE, {vocab} pieces, trained on the build's captions); batches of {FLAGS.batch}. \
Timed: {FLAGS.batches} batches ({FLAGS.batches * FLAGS.batch} images) after {FLAGS.warmup} \
warm-up batches, best of {FLAGS.repeats}.

""" + table(header_main, rows) + f"""
"workers" 0 = the main process (Grain: `num_workers=0`, no `mp_prefetch`; PyTorch:
`num_workers=0`); n > 0 = n `mp_prefetch`/DataLoader worker processes. CPU s is user + system
time of the process and its workers during the timed batches (psutil); images/s per core =
images / CPU s, i.e. the rate of one fully busy core, independent of idle cores or other load.
Worker counts include the parent's share: with workers the parent only receives batches. Both
pipelines buffer a few batches ahead (Grain: `prefetch_batches` 2 per reader,
`mp_prefetch`'s per-worker buffer; PyTorch: `prefetch_factor` 2 per worker), which can flatter a
short timed window slightly and equally for both. PyTorch workers use "spawn": forked ones
segfaulted once the parent had opened the ArrayRecord data source.

Target (Grain at least the PyTorch pipeline's rate):
{chr(10).join(verdict)}

## Host cores to feed one accelerator (B/16)

ViT-B/16 + B text costs ~{B16_GFLOPS_PER_PAIR:.0f} GFLOPs per image-text pair per train step
(`experiments/results/throughput.md`, XLA cost analysis). At {MFU:.0%} MFU of the bf16 peak a
chip consumes peak x MFU / 140 GFLOPs pairs/s; cores = that / the measured images per
CPU-second with {top_w} workers:

""" + table(header, feed) + """
(→ n: rounded up to whole cores.) These cores are for the input pipeline alone (the training
loop, host-to-device copies and checkpointing need their own), are this machine's vCPUs, and
assume the rate per core stays flat as workers are added.
"""
    conversion_benchmark.write(FLAGS.output, text)


if __name__ == "__main__":
    app.run(main)
