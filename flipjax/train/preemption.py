"""Preemption notices (SIGTERM, as TPU VMs and Kubernetes send before eviction).

The loop asks `reached(step)` after every step; when it says yes, the loop saves a checkpoint at
that step and stops with `PreemptedError`, and `flipjax.main` exits with `PREEMPTED_EXIT_CODE`.

With several processes every one must save at the same step, so there JAX's preemption service
(started by `jax.distributed.initialize`, which catches SIGTERM itself) agrees on the step. A
single process needs no agreement and catches SIGTERM here.
"""

from __future__ import annotations

import signal
import threading
from types import TracebackType

import jax
from jax.experimental import multihost_utils

# 128 + SIGTERM, what a shell reports for a process killed by SIGTERM: non-zero, so that job
# schedulers which restart failed jobs (Kubernetes, Slurm --requeue) restart this one.
PREEMPTED_EXIT_CODE = 143


class PreemptedError(Exception):
    """Training stopped at `step` on a preemption notice, after saving that step."""

    def __init__(self, step: int):
        saved = f"saved a checkpoint at step {step}" if step else "before its first step"
        super().__init__(f"preempted: {saved}; rerun the same command to resume")
        self.step = step


class PreemptionWatch:
    """Context manager; `reached(step)` is true once a preemption notice has arrived (and, with
    several processes, all of them have reached the agreed step).

    Made as soon as the run knows `start_step`, the step it starts from: with several
    processes each tells JAX's service where it stands, since a notice that comes before any
    process has (during a restore, or the resumed step's evaluations) is agreed at step 1,
    which a resumed run never reaches again: it would train on until killed."""

    def __init__(self, start_step: int):
        if jax.process_count() > 1:
            multihost_utils.reached_preemption_sync_point(start_step)
        self._notice = threading.Event()
        self._previous = None

    def __enter__(self) -> PreemptionWatch:
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, lambda *_: self._notice.set())
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def reached(self, step: int) -> bool:
        if jax.process_count() > 1:
            return multihost_utils.reached_preemption_sync_point(step)
        return self._notice.is_set()

    def interrupts(self) -> bool:
        """Whether a notice stops work inside an evaluation (between an evaluator's batches):
        on one process as soon as it arrives; several processes go on, as for `stops_now`."""
        return jax.process_count() == 1 and self._notice.is_set()

    def stops_now(self, step: int) -> bool:
        """Whether a notice stops the run where it stands outside a train step (setting up,
        evaluating `step`), `step` being saved: on one process as soon as it arrives.
        Several processes agree on a step only as they train, at the step after the one they
        report, so they go on to it and stop there."""
        return jax.process_count() == 1 and self.reached(step)
