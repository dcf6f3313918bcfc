"""Training metrics to TensorBoard and to WORKDIR/metrics.jsonl (one JSON object per logged
step, with keys `step`, `train/loss`, ...), written by process 0 only."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

import jax
from etils import epath
from tensorboardX import SummaryWriter

from flipjax.storage import storage_path, write_bytes_whole


def lines_up_to(path: epath.Path, last_step: int) -> list[str]:
    """The lines of a metrics.jsonl logged at or before `last_step`, so a run resumed from that
    step's checkpoint leaves one line per step, as an uninterrupted run would."""
    if not path.exists():
        return []
    return [line for line in path.read_text().splitlines(keepends=True)
            if line.strip() and json.loads(line)["step"] <= last_step]


class MetricWriter:
    """The jsonl is rewritten whole at every logged step (a few hundred KB over a long run),
    since an object store such as GCS cannot append."""

    def __init__(self, workdir: str, resumed_step: int):
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        root = storage_path(workdir)
        self.jsonl_path = root / "metrics.jsonl"
        self.lines = lines_up_to(self.jsonl_path, resumed_step)
        write_bytes_whole(self.jsonl_path, "".join(self.lines).encode())
        self.tensorboard = SummaryWriter(str(root / "tensorboard"))

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items()}
        for name, value in clean.items():
            if math.isfinite(value):
                self.tensorboard.add_scalar(name, value, step)
        self.lines.append(json.dumps({"step": step, **clean}) + "\n")
        write_bytes_whole(self.jsonl_path, "".join(self.lines).encode())

    def close(self) -> None:
        if self.enabled:
            self.tensorboard.close()
