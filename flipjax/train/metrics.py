"""Training metrics to TensorBoard and to WORKDIR/metrics.jsonl (one JSON object per logged
step, with keys `step`, `train/loss`, ...), written by process 0 only."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping

import jax
from etils import epath
from tensorboardX import SummaryWriter

from flipjax.storage import is_url, storage_path, write_bytes_whole

# How often a metrics.jsonl on an object store is rewritten (and at close).
URL_REWRITE_SECONDS = 30.0


def lines_up_to(path: epath.Path, last_step: int) -> list[str]:
    """The complete lines of a metrics.jsonl logged at or before `last_step`, so a run resumed
    from that step's checkpoint leaves one line per step, as an uninterrupted run would."""
    if not path.exists():
        return []
    kept = []
    for number, line in enumerate(path.read_text().splitlines(keepends=True), 1):
        if not line.strip() or not line.endswith("\n"):  # blank, or cut short by a crash
            continue
        try:
            step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{number}: not a metrics line with a step ({e!r}); fix or "
                             "delete that line to resume") from None
        if step <= last_step:
            kept.append(line)
    return kept


class MetricWriter:
    """A local metrics.jsonl gets one appended line per logged step. An object store cannot
    append, so at a URL the file is rewritten whole, at most every `URL_REWRITE_SECONDS`, at
    each checkpoint (`flush`) and at close: rewriting at every step would upload a
    quadratically growing total."""

    def __init__(self, workdir: str, resumed_step: int):
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        root = storage_path(workdir)
        self.jsonl_path = root / "metrics.jsonl"
        lines = lines_up_to(self.jsonl_path, resumed_step)
        self._rewrite(lines)
        # Locally an open file to append to; at a URL every line, for the next rewrite.
        self.jsonl = None if is_url(root) else self.jsonl_path.open("a")
        self.lines = lines if self.jsonl is None else None
        self.tensorboard = SummaryWriter(str(root / "tensorboard"))

    def _rewrite(self, lines: list[str]) -> None:
        write_bytes_whole(self.jsonl_path, "".join(lines).encode())
        self.rewritten_at = time.monotonic()

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items()}
        for name, value in clean.items():
            if math.isfinite(value):
                self.tensorboard.add_scalar(name, value, step)
        line = json.dumps({"step": step, **clean}) + "\n"
        if self.jsonl is not None:
            self.jsonl.write(line)
            self.jsonl.flush()
        else:
            self.lines.append(line)
            if time.monotonic() - self.rewritten_at >= URL_REWRITE_SECONDS:
                self._rewrite(self.lines)

    def flush(self) -> None:
        """Writes out every line so far (a URL's are otherwise held for up to
        `URL_REWRITE_SECONDS`): called at each checkpoint, since a run resumed from it will not
        log those steps again."""
        if self.enabled and self.jsonl is None:
            self._rewrite(self.lines)

    def close(self) -> None:
        if not self.enabled:
            return
        self.flush()
        if self.jsonl is not None:
            self.jsonl.close()
        self.tensorboard.close()
