"""Keep freed host memory inside the process (glibc malloc), for training on XLA:CPU.

XLA:CPU allocates each execution's scratch buffer (`memory_analysis().temp_size_in_bytes`,
2.3 GiB for a ViT-B/16 CLIP train step at batch 8) when the step starts and frees it when the
step ends. glibc hands a block that large to the kernel on every free: blocks over its mmap
ceiling (32 MiB) are mmap'd, and XLA's worker threads allocate from secondary arenas, which mmap
anything over 64 MiB whatever the settings. So every step page-faults its whole scratch buffer
back in and the kernel zero-fills it again: on the 2-core development VM a ViT-B/16 encoder
block's forward + backward spent 140 of its ~700 ms in the kernel (45k page faults per step).

With one arena, no mmap and no trimming, freed blocks stay in the heap and the next step reuses
them (0 faults, 6 ms in the kernel): the whole B/16 train step went from 11.8 to 10.6 s
(`experiments/results/throughput.md`). The price is that the process keeps its peak heap size. A
ViT-S/16 train step (batch 8; an ad-hoc run of `experiments/throughput.py`'s flipjax stepper,
RSS from /proc/self/statm) reached it on its first step: from the second step on, no faults and
a flat RSS, to the 40th step with jax 0.12 (2.61 GiB, against 2.67 GiB without the setting) and
the 30th with jax 0.10 (2.77 GiB). A smaller step may take longer: the test's two-matmul probe
still grew the heap by a whole scratch buffer on a few steps, up to the 20th, while smaller
allocations split the freed one (`tests/test_host_memory.py`). On an accelerator host, where the
device holds the scratch buffers, there is nothing to gain, so configs enable it for CPU runs
only (`config.keep_freed_host_memory`).
"""

from __future__ import annotations

import ctypes
import ctypes.util

# glibc's mallopt options (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def keep_freed_host_memory() -> bool:
    """Sets glibc malloc to one arena, no mmap'd blocks and no trimming; False (and nothing
    changed) where the C library is not glibc, e.g. on macOS.

    Call it before JAX creates its CPU client (the first `jax.devices()` or computation): a
    thread that has already allocated keeps its arena, and with it the per-step mmap.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.gnu_get_libc_version  # noqa: B018 -- raises AttributeError unless glibc
    except (OSError, AttributeError, TypeError):
        return False
    # -1 converts to SIZE_MAX inside glibc: the heap's top is never given back.
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
    return all(libc.mallopt(option, value) == 1 for option, value in settings)
