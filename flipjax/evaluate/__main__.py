"""Evaluates a saved checkpoint: `python -m flipjax.evaluate --workdir=DIR [--config=FILE]
[--step=N]`.

Runs every evaluator in `config.evals` (the training config's, WORKDIR/config.json, unless
`--config` names another, e.g. one that adds probes: it must describe the trained model and its
input normalisation, or a ConfigError names the field) on the checkpoint at `--step` (default:
the latest) and writes WORKDIR/eval_step_<N>.json. Image features are cached in
WORKDIR/features, so re-running with other probe settings embeds nothing again.
"""

from __future__ import annotations

import json

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from flipjax.config import exit_on_config_error, parse_flags, validate_evals
from flipjax.evaluate import make_evaluators, run_evaluators
from flipjax.storage import storage_path, write_bytes_whole
from flipjax.train.sharding import batch_shards, fit_mesh, make_mesh
from flipjax.train.workdir import load_workdir_config, restore_params

config_flags.DEFINE_config_file("config", None, "Config file (default WORKDIR/config.json).")
flags.DEFINE_string("workdir", None, "The training run's workdir.")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
flags.mark_flags_as_required(["workdir"])
FLAGS = flags.FLAGS


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str,
                        step: int | None = None) -> tuple[int, dict[str, float]]:
    """Runs every evaluator on a checkpoint; returns (step, {"NAME/metric": value})."""
    # Before any restoring; on the mesh `restore_params` restores onto.
    validate_evals(config, batch_shards(make_mesh(fit_mesh(config.mesh, jax.device_count()))))
    params, step, setup, tokenizer = restore_params(config, workdir, step)
    evaluators = make_evaluators(config, tokenizer, setup.graphdef, setup.mesh,
                                 cache_dir=str(storage_path(workdir) / "features"))
    return step, {k: v for results in run_evaluators(evaluators, params, step)
                  for k, v in results.items()}


def main(argv: list[str]) -> None:
    del argv
    with exit_on_config_error():
        config = FLAGS.config or load_workdir_config(FLAGS.workdir)
        step, results = evaluate_checkpoint(config, FLAGS.workdir, FLAGS.step)
    if jax.process_index() == 0:
        path = storage_path(FLAGS.workdir) / f"eval_step_{step}.json"
        write_bytes_whole(path, json.dumps({"step": step, "results": results}, indent=2,
                                           sort_keys=True).encode())
        logging.info("wrote %s", path)
        print(json.dumps({k: round(v, 3) for k, v in sorted(results.items())}, indent=2))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
