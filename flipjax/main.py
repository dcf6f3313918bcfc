"""Entry point: `python -m flipjax.main --config=configs/demo.py --workdir=DIR`.

Fields are overridden on the command line (`--config.total_steps=100`) and a config file may
take an argument after a colon (`--config=configs/base.py:batch=4096`). On a multi-host TPU VM
or GPU cluster pass `--distributed` (calls `jax.distributed.initialize()`) on every host; where
nothing tells JAX the cluster layout (several processes on one CPU machine, a bare cluster) add
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I`.

Exit codes: 0 done, 2 bad config, 143 preempted (SIGTERM) after saving a checkpoint: rerun the
same command to resume.
"""

from __future__ import annotations

import json
import logging as std_logging
import sys

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Path to a config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and logs go.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host).")
flags.DEFINE_string("coordinator_address", None,
                    "With --distributed: process 0's HOST:PORT, when not auto-detected.")
flags.DEFINE_integer("num_processes", None, "With --distributed: the number of processes.")
flags.DEFINE_integer("process_id", None, "With --distributed: this process's index.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


class OwnInfoOnly(std_logging.Filter):
    """Keeps libraries' INFO chatter (Orbax logs every array write) out of the run's log;
    their warnings and errors still show."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or "site-packages" not in record.pathname


def main(argv: list[str]) -> None:
    del argv
    from flipjax.train.host_memory import keep_freed_host_memory

    # Before JAX starts its CPU client, whose threads would keep their malloc arenas.
    # `get`: config files written before the field existed mean False.
    if FLAGS.config.get("keep_freed_host_memory", False) and not keep_freed_host_memory():
        logging.warning("keep_freed_host_memory: not glibc, malloc left as it is")
    import jax

    logging.get_absl_handler().addFilter(OwnInfoOnly())

    if FLAGS.distributed:
        jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                                   num_processes=FLAGS.num_processes,
                                   process_id=FLAGS.process_id)
    from flipjax.config import exit_on_config_error
    from flipjax.train.preemption import PREEMPTED_EXIT_CODE, PreemptedError
    from flipjax.train.trainer import train_and_evaluate

    logging.info("devices: %s", jax.devices())
    try:
        with exit_on_config_error():
            metrics = train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except PreemptedError as e:
        print(e, file=sys.stderr)
        sys.exit(PREEMPTED_EXIT_CODE)
    if jax.process_index() == 0:
        # Per-attribute results ("probe/acc/Smiling") are in WORKDIR/metrics.jsonl.
        summary = {k: round(v, 4) for k, v in sorted(metrics.items()) if k.count("/") == 1}
        print("final metrics:")
        print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    from flipjax.config import parse_flags

    app.run(main, flags_parser=parse_flags)
