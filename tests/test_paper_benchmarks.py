"""The paper-protocol scripts (`experiments/attribute_prediction.py`,
`experiments/retrieval_benchmarks.py`) run end to end on a saved run and the four evaluation
sets built from their miniature fixtures, and write their tables."""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys

import face_fixtures as ff
import pytest
import tensorflow_datasets as tfds
from conftest import REPO, load_config
from test_eval_builders import build
from test_evaluate_cli import save_initial_run

from tfds_builders.celeba import CelebA
from tfds_builders.celeba_dialog import CelebADialog
from tfds_builders.lfwa import LFWA
from tfds_builders.mm_celeba_hq import MMCelebAHQ


@pytest.fixture(scope="module")
def run_and_data(tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("paper")
    data_dir = root / "tfds"
    for cls, make in ((CelebA, ff.make_celeba), (LFWA, ff.make_lfwa),
                      (MMCelebAHQ, ff.make_mm_celeba_hq), (CelebADialog, ff.make_celeba_dialog)):
        build(cls, make(root / cls.name), data_dir)
    config = load_config()
    config.data.data_dir, config.tokenizer.path = tiny_data
    workdir = str(root / "run")
    save_initial_run(config, workdir)
    return workdir, str(data_dir), root


def run_script(module: str, workdir: str, data_dir: str, out) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", module, f"--workdir={workdir}", f"--data_dir={data_dir}",
         f"--out={out}", "--batch_size=16"],
        cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True,
        timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out.read_text()


def split_size(name: str, split: str, data_dir: str) -> int:
    return len(tfds.data_source(name, split=split, data_dir=data_dir))


def row(text: str, *first_cells: str) -> list[str]:
    """The cells of the table row of `text` that starts with `first_cells`."""
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| " + " | ".join(first_cells) + " |")]
    assert len(rows) == 1, (first_cells, text)
    return rows[0]


def test_attribute_prediction_script(run_and_data):
    workdir, data_dir, root = run_and_data
    text = run_script("experiments.attribute_prediction", workdir, data_dir, root / "attr.md")
    assert "images `squash`" in text
    # The features of this run's tower (the tiny config's: 2 blocks, MAP pooling).
    assert ("patch mean and max of blocks 1 and the last, block 2, with the last's MAP-pooled "
            "vector (`pool='map'`: no class token) (5 vectors)") in text
    size = functools.partial(split_size, data_dir=data_dir)
    for method in ("probe embedding", "probe layers", "probe flip_recipe"):
        # CelebA's official splits; LFWA's validation carved from its train split.
        # LFWA's validation carved from its train split, where a grid is searched; FLIP's
        # recipe (one head) trains on all of it.
        celeba, lfwa = row(text, "celeba", method), row(text, "lfwa", method)
        assert celeba[6] == "official"
        assert celeba[7] == "/".join(str(size("celeba", s))
                                     for s in ("train", "validation", "test"))
        train, val, test = map(int, lfwa[7].split("/"))
        assert (train + val, test) == (size("lfwa", "train"), size("lfwa", "test"))
        one_head = method == "probe flip_recipe"
        assert lfwa[6] == ("none: one head, nothing chosen" if one_head
                           else "carved from train")
        assert (val == 0) == one_head
    assert row(text, "celeba", "zero-shot") and row(text, "lfwa", "zero-shot")
    assert "| Wearing_Necktie |" in text and "celeba_probe_layers" in text
    assert row(text, "celeba", "probe flip_recipe")[5] == "0.05 / 100"


def test_retrieval_benchmarks_script(run_and_data):
    workdir, data_dir, root = run_and_data
    text = run_script("experiments.retrieval_benchmarks", workdir, data_dir, root / "ret.md")
    for name in ("mm_celeba_hq", "celeba_dialog"):  # the gallery: the test split's images
        assert int(row(text, name)[-2]) == split_size(name, "test", data_dir)


def test_a_dataset_not_built_is_one_line(run_and_data, tmp_path):
    workdir, data_dir, _ = run_and_data
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.retrieval_benchmarks", f"--workdir={workdir}",
         f"--data_dir={data_dir}", "--builder_config=full", f"--out={tmp_path / 'ret.md'}"],
        cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True,
        timeout=600)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert re.match(r"error: config\.evals\.\w+\.split='test' \(dataset '\w+/full' in ",
                    proc.stderr), proc.stderr
