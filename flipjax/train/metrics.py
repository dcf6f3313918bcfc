"""Training metrics to TensorBoard and to WORKDIR/metrics.jsonl (one JSON object per logged
step, with keys `step`, `train/loss`, ...), written by process 0 only."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Collection, Mapping

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
            if not isinstance(step, int):
                raise TypeError(f"step {step!r} is not an integer")
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{number}: not a metrics line with a step ({e!r}); fix or "
                             "delete that line to resume") from None
        if step <= last_step:
            kept.append(line)
    return kept


def _finite_or_none(value: float | None) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


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
        last = json.loads(lines[-1]) if lines else {}
        self.resumed_line = last if last.get("step") == resumed_step else {}
        self.last_line = self.resumed_line  # what `amend` adds to
        # Locally an open file to append to; at a URL every line, for the next rewrite.
        self.jsonl = None if is_url(root) else self.jsonl_path.open("a")
        self.lines = lines if self.jsonl is None else None
        # purge_step: TensorBoard drops the events a resumed run logs again, as lines_up_to.
        self.tensorboard = SummaryWriter(str(root / "tensorboard"),
                                         purge_step=resumed_step + 1)

    def _rewrite(self, lines: list[str]) -> None:
        write_bytes_whole(self.jsonl_path, "".join(lines).encode())
        self.rewritten_at = time.monotonic()

    def logged_at_resume(self) -> dict:
        """The metrics line of the step the run resumed from ({} when none was logged, or on
        another process than 0)."""
        return self.resumed_line if self.enabled else {}

    def amend(self, step: int, metrics: Mapping[str, float]) -> None:
        """Adds `metrics` (an evaluation's results) to the line of `step`, the last one logged
        or, on a resume, the step resumed from (writing it if the run stopped before it was),
        and writes it out: one line per step stays, and a run killed while evaluating keeps
        the results so far."""
        if not self.enabled:
            return
        logged = self.last_line.get("step") == step
        previous = {k: v for k, v in self.last_line.items() if k != "step"} if logged else {}
        line = self._line(step, {**previous, **metrics}, scalars=metrics)
        if self.jsonl is None:  # the lines held for the next rewrite, this step's replaced
            self.lines = (self.lines[:-1] if logged else self.lines) + [line]
        else:  # one whole rewrite: a kill leaves the old line or the new one, never neither
            self._rewrite(lines_up_to(self.jsonl_path, step - 1) + [line])
            self.jsonl.close()
            self.jsonl = self.jsonl_path.open("a")
        self.flush()

    def write(self, step: int, metrics: Mapping[str, float | None],
              scalars: Collection[str] | None = None) -> None:
        """Logs `metrics` as the line of `step`, and those named in `scalars` (default: all)
        to TensorBoard. A non-finite value (a skipped step's loss), or a None (a null read
        back from a line), is null in the line, as NaN is not JSON (jq refuses it), and is
        left out of TensorBoard."""
        if not self.enabled:
            return
        line = self._line(step, metrics, scalars)
        if self.jsonl is not None:
            self.jsonl.write(line)
            self.jsonl.flush()
        else:
            self.lines.append(line)
            if time.monotonic() - self.rewritten_at >= URL_REWRITE_SECONDS:
                self._rewrite(self.lines)

    def _line(self, step: int, metrics: Mapping[str, float | None],
              scalars: Collection[str] | None) -> str:
        """The JSON line of `step` (now `last_line`), its `scalars` sent to TensorBoard."""
        values = {k: _finite_or_none(v) for k, v in metrics.items()}
        for name in values if scalars is None else scalars:
            if values[name] is not None:
                self.tensorboard.add_scalar(name, values[name], step)
        self.last_line = {"step": step, **values}
        return json.dumps(self.last_line, allow_nan=False) + "\n"

    def flush(self) -> None:
        """Writes out every line and TensorBoard event so far (a URL's lines are otherwise held
        for up to `URL_REWRITE_SECONDS`, TensorBoard's events for up to two minutes): called at
        each checkpoint, since a run resumed from it will not log those steps again."""
        if not self.enabled:
            return
        if self.jsonl is None:
            self._rewrite(self.lines)
        self.tensorboard.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        self.flush()
        if self.jsonl is not None:
            self.jsonl.close()
        self.tensorboard.close()
