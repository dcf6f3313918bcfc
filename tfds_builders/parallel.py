"""Order-preserving process-pool map with bounded memory, for local (non-Beam) builds.

`multiprocessing.Pool.imap` reads its whole input iterable ahead of the workers, which for a
13M-row parquet means holding every task in memory. `ordered_map` instead keeps a fixed number
of chunks in flight, so memory stays flat however long the input is. Results come back in input
order, so a local build is deterministic whatever the number of workers.

This module deliberately imports nothing heavy: "spawn" workers import the module of the mapped
function, and a light import keeps worker start-up fast.
"""

from __future__ import annotations

import collections
import itertools
import multiprocessing
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def _apply_chunk(fn: Callable[[T], R], chunk: list[T]) -> list[R]:
    return [fn(item) for item in chunk]


def ordered_map(fn: Callable[[T], R], items: Iterable[T], num_workers: int,
                chunk_size: int = 16, chunks_per_worker: int = 4) -> Iterator[R]:
    """Yields `fn(item)` for each item, in order, using `num_workers` processes.

    With `num_workers <= 1` everything runs in the calling process, which keeps tests and
    debugging simple. `fn` must be picklable (a module-level function or a partial of one).
    Workers are spawned rather than forked because the caller may run threads (JAX, tqdm, Beam)
    that a fork would copy in a locked state. A worker that dies (a decoder's segfault, the
    OOM killer) raises BrokenProcessPool here, where `multiprocessing.Pool` waited forever.
    """
    if num_workers <= 1:
        yield from map(fn, items)
        return
    max_pending = num_workers * chunks_per_worker
    iterator = iter(items)
    pool = ProcessPoolExecutor(num_workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        pending: collections.deque = collections.deque()
        while chunk := list(itertools.islice(iterator, chunk_size)):
            pending.append(pool.submit(_apply_chunk, fn, chunk))
            if len(pending) >= max_pending:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()
    finally:  # an error or a consumer that stops early doesn't wait for the queued chunks
        pool.shutdown(wait=False, cancel_futures=True)
