"""The paper-protocol scripts (`experiments/attribute_prediction.py`,
`experiments/retrieval_benchmarks.py`) run end to end on a saved run and the four evaluation
sets built from their miniature fixtures, and write their tables."""

from __future__ import annotations

import os
import subprocess
import sys

import face_fixtures as ff
import pytest
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


def test_attribute_prediction_script(run_and_data):
    workdir, data_dir, root = run_and_data
    text = run_script("experiments.attribute_prediction", workdir, data_dir, root / "attr.md")
    assert "images `squash`" in text
    lines = text.splitlines()
    for dataset, validation in (("celeba", "official"), ("lfwa", "carved from train")):
        for method in ("probe embedding", "probe layers", "probe flip_recipe"):
            assert any(line.startswith(f"| {dataset} | {method} |")
                       and f"| {validation} |" in line for line in lines), (dataset, method)
        assert any(line.startswith(f"| {dataset} | zero-shot |") for line in lines)
    assert "| Wearing_Necktie |" in text and "celeba_probe_layers" in text
    assert "| celeba | probe flip_recipe |" in text and "| 0.05 / 100 |" in text


def test_retrieval_benchmarks_script(run_and_data):
    workdir, data_dir, root = run_and_data
    text = run_script("experiments.retrieval_benchmarks", workdir, data_dir, root / "ret.md")
    assert any(line.startswith("| mm_celeba_hq |") for line in text.splitlines())
    assert any(line.startswith("| celeba_dialog |") for line in text.splitlines())
