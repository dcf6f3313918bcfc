"""Training metrics to TensorBoard and to WORKDIR/metrics.jsonl (one JSON object per logged
step, with keys `step`, `train/loss`, ...), written by process 0 only."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping

import jax
from tensorboardX import SummaryWriter


def truncate_jsonl(path: str, last_step: int) -> None:
    """Drops lines logged after `last_step`, so a run resumed from that step's checkpoint
    leaves one line per step, as an uninterrupted run would."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        kept = [line for line in f if line.strip() and json.loads(line)["step"] <= last_step]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)


class MetricWriter:
    def __init__(self, workdir: str, resumed_step: int):
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
        truncate_jsonl(self.jsonl_path, resumed_step)
        self.jsonl = open(self.jsonl_path, "a")  # noqa: SIM115 - kept open for the run
        self.tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items()}
        for name, value in clean.items():
            if math.isfinite(value):
                self.tensorboard.add_scalar(name, value, step)
        self.jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        self.jsonl.flush()

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tensorboard.close()
