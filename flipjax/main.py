"""Entry point: `python -m flipjax.main --config=configs/demo.py --workdir=DIR`.

Fields are overridden on the command line (`--config.total_steps=100`) and a config file may
take an argument after a colon (`--config=configs/base.py:batch=4096`). On a multi-host TPU VM
or GPU cluster pass `--distributed` (calls `jax.distributed.initialize()`) on every host.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Path to a config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and logs go.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host).")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    del argv
    import jax

    if FLAGS.distributed:
        jax.distributed.initialize()
    from flipjax.config import ConfigError
    from flipjax.train.trainer import train_and_evaluate

    logging.info("devices: %s", jax.devices())
    try:
        metrics = train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if jax.process_index() == 0:
        print("final metrics:")
        print(json.dumps({k: round(v, 4) for k, v in sorted(metrics.items())}, indent=2))


if __name__ == "__main__":
    app.run(main)
