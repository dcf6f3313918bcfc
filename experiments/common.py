"""Shared by the experiment scripts: load a run, run evaluator configs on it, write markdown.

Scripts run from the repository root as modules, e.g. `python -m experiments.synthetic_eval`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Sequence

import ml_collections

from flipjax.data.tokenizer import Tokenizer
from flipjax.evaluate import make_evaluators
from flipjax.train.step import TrainSetup
from flipjax.train.workdir import load_workdir_config, restore_params


@dataclasses.dataclass
class Run:
    config: ml_collections.ConfigDict
    params: dict
    step: int
    setup: TrainSetup
    tokenizer: Tokenizer
    workdir: str


def benchmark_parser(doc: str, *, datasets: str, out: str) -> argparse.ArgumentParser:
    """The flags every paper-benchmark script takes: the run (workdir, step), where its
    datasets are built, which and in which builder config, the feature batch size and the
    output file."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--data_dir", required=True, help="Where the datasets are built.")
    parser.add_argument("--datasets", default=datasets)
    parser.add_argument("--builder_config", default=None, help="The datasets' builder config "
                        "(`tfds_builders build NAME --config=...`), e.g. full; default: the "
                        "default one.")
    parser.add_argument("--step", type=int, default=None)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--out", default=out)
    return parser


def load_run(workdir: str, step: int | None = None) -> Run:
    """The saved config and a checkpoint's params (the latest if `step` is None)."""
    config = load_workdir_config(workdir)
    params, step, setup, tokenizer = restore_params(config, workdir, step)
    return Run(config, params, step, setup, tokenizer, workdir)


def evaluate(run: Run, evals: dict, params: dict | None = None, *, cache: bool = True
             ) -> dict[str, dict[str, float]]:
    """{name: results} of evaluator configs `evals` (as in `config.evals`) on `params` (default
    the run's). With `cache`, features go to WORKDIR/features keyed by the run's step, so only
    pass it for the run's own params."""
    config = ml_collections.ConfigDict(run.config.to_dict())
    config.evals = evals
    evaluators = make_evaluators(config, run.tokenizer, run.setup.graphdef, run.setup.mesh,
                                 cache_dir=os.path.join(run.workdir, "features") if cache
                                 else None)
    params = run.params if params is None else params
    return {name: e.run(params, step=run.step) for name, e in evaluators.items()}


def fmt(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    print(f"wrote {path}")
