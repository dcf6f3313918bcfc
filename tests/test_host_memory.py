import statistics
import sys

import pytest
from conftest import json_from_fresh_process

from flipjax.train import host_memory
from flipjax.train.host_memory import keep_freed_host_memory

# Runs in a fresh process (the setting must precede JAX's CPU client): a step with a 64 MiB
# intermediate, run STEPS times; prints the page faults of each execution.
PROBE = """
import json, resource, sys
from flipjax.train.host_memory import keep_freed_host_memory
if sys.argv[1] == "keep":
    assert keep_freed_host_memory()
import jax, jax.numpy as jnp
x, w = jnp.ones((4096, 256)), jnp.ones((256, 4096))
step = jax.jit(lambda x, w: jnp.tanh(x @ w) @ w.T).lower(x, w).compile()
faults = []
for _ in range(int(sys.argv[2])):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    jax.block_until_ready(step(x, w))
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"temp_pages": step.memory_analysis().temp_size_in_bytes / 4096,
                  "faults": faults}))
"""
# With the setting the heap still grows by a scratch buffer on a few early steps, while
# other allocations fragment the freed one (seen here up to step 20 of 40, then never again
# in 300 steps); so the steady state is judged on the last 20 steps, by their median, since
# a host may also reclaim idle pages now and then on its own (this VM's DAMON pageout does).
STEPS, STEADY = 40, 20
# XLA's own dot kernels, and XNNPACK's, which XLA:CPU may pick instead (different scratch
# allocations around the same 64 MiB buffer).
DOT_KERNELS = {"xla": "", "xnnpack": "--xla_cpu_experimental_xnn_fusion_type=dot"}


def steady_page_faults(mode: str, xla_flags: str) -> tuple[float, float]:
    """(scratch buffer pages, median page faults of a steady-state execution)."""
    probe = json_from_fresh_process(PROBE, mode, str(STEPS), XLA_FLAGS=xla_flags)
    return probe["temp_pages"], statistics.median(probe["faults"][-STEADY:])


def transparent_huge_pages_always() -> bool:
    """Whether Linux backs every large anonymous mapping with 2 MiB pages: then a fault maps
    512 pages at once, and fault counts no longer measure pages."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[always]" in f.read()
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
@pytest.mark.skipif(transparent_huge_pages_always(),
                    reason="transparent huge pages 'always': faults are not pages")
@pytest.mark.parametrize("dot_kernels", DOT_KERNELS)
def test_kept_host_memory_stops_per_step_page_faults(dot_kernels):
    """Without the setting every execution faults its scratch buffer back in; with it the
    buffer is reused and (almost) nothing faults."""
    temp_pages, plain = steady_page_faults("plain", DOT_KERNELS[dot_kernels])
    assert temp_pages >= 16384
    assert plain > 0.5 * temp_pages, plain
    temp_pages, kept = steady_page_faults("keep", DOT_KERNELS[dot_kernels])
    assert kept < 0.05 * temp_pages, kept


def test_keep_freed_host_memory_is_a_no_op_without_glibc(monkeypatch):
    """A C library without glibc's symbols (macOS's, musl's): False, and malloc untouched."""
    calls = []

    class OtherLibc:
        def mallopt(self, *args: int) -> int:
            calls.append(args)
            return 1

    monkeypatch.setattr(host_memory.ctypes, "CDLL", lambda name: OtherLibc())
    assert keep_freed_host_memory() is False and calls == []
