import json
import subprocess
import sys

from conftest import REPO

# In a fresh process: importing experiments.profile_step imports experiments.throughput, which
# sets glibc's malloc options for the whole process (as its benchmarks need).
PROBE = """
import json
import jax, jax.numpy as jnp
from experiments.profile_step import hlo_computations, matmul_flops
x, w, b = jnp.ones((2, 6, 8)), jnp.ones((8, 5)), jnp.ones((2, 6, 5))
def step(x, w, b):
    y = jnp.tanh(x.reshape(12, 8) @ w)
    return jnp.einsum("bij,bkj->bik", y.reshape(2, 6, 5), b)
text = jax.jit(step).lower(x, w, b).compile().as_text()
computations = hlo_computations(text)
flops = matmul_flops(computations)
# The kernels XLA runs are the entry computation's instructions (a dot, or a fusion holding one).
(entry,) = (body for name, body in computations.items() if name.startswith("main"))
kernels = [flops[i[0]] for i in entry if i[0] in flops]
print(json.dumps({"total": sum(f for f, _ in kernels), "shapes": sorted(s for _, s in kernels)}))
"""


def test_profile_step_reads_matmul_flops_and_shapes_from_compiled_hlo():
    """The kernel-speed table of `experiments/profile_step.py` rests on these FLOPs: each
    kernel's dots (its own, or those of the fusion it runs), 2 x output size x contracted
    size, and their operand shapes."""
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True,
                            text=True, check=True, env={"JAX_PLATFORMS": "cpu",
                                                        "PATH": "/usr/bin:/bin"})
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["total"] == 2 * 12 * 5 * 8 + 2 * (2 * 6 * 6) * 5
    assert found["shapes"] == ["[12, 8]x[8, 5]", "[2, 6, 5]x[2, 6, 5]"]
