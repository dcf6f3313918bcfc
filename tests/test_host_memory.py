import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

from flipjax.train.host_memory import keep_freed_host_memory

# Runs in a fresh process (the setting must precede JAX's CPU client): a step with a 64 MiB
# intermediate; the median page faults of an execution after the first few. The median, since
# a host may reclaim idle pages now and then on its own (this VM's DAMON pageout does).
PROBE = """
import json, resource, statistics, sys
from flipjax.train.host_memory import keep_freed_host_memory
if sys.argv[1] == "keep":
    assert keep_freed_host_memory()
import jax, jax.numpy as jnp
x, w = jnp.ones((4096, 256)), jnp.ones((256, 4096))
step = jax.jit(lambda x, w: jnp.tanh(x @ w) @ w.T).lower(x, w).compile()
faults = []
for _ in range(12):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    jax.block_until_ready(step(x, w))
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"temp_pages": step.memory_analysis().temp_size_in_bytes / 4096,
                  "faults": statistics.median(faults[3:])}))
"""


def page_faults(mode: str) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], env=env, cwd=REPO, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_kept_host_memory_stops_per_step_page_faults():
    """Without the setting every execution faults its scratch buffer back in; with it the
    buffer is reused and (almost) nothing faults."""
    plain, kept = page_faults("plain"), page_faults("keep")
    assert plain["temp_pages"] >= 16384
    assert plain["faults"] > 0.5 * plain["temp_pages"], plain
    assert kept["faults"] < 0.05 * kept["temp_pages"], kept


@pytest.mark.skipif(sys.platform.startswith("linux"), reason="glibc is the C library here")
def test_keep_freed_host_memory_is_a_no_op_without_glibc():
    assert keep_freed_host_memory() is False
