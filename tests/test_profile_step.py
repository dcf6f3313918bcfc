from conftest import KERNEL_MATMULS, json_from_fresh_process

PROBE = KERNEL_MATMULS + """
import json
import jax, jax.numpy as jnp
x, w, b = jnp.ones((2, 6, 8)), jnp.ones((8, 5)), jnp.ones((2, 6, 5))
def step(x, w, b):
    y = jnp.tanh(x.reshape(12, 8) @ w)
    return jnp.einsum("bij,bkj->bik", y.reshape(2, 6, 5), b)
kernels = kernel_matmuls(jax.jit(step).lower(x, w, b).compile().as_text())
print(json.dumps({"total": sum(f for f, _ in kernels), "shapes": sorted(s for _, s in kernels)}))
"""


def test_profile_step_reads_matmul_flops_and_shapes_from_compiled_hlo():
    """The kernel-speed table of `experiments/profile_step.py` rests on these FLOPs: each
    kernel's dots (its own, or those of the fusion it runs), 2 x output size x contracted
    size, and their operand shapes."""
    found = json_from_fresh_process(PROBE)
    assert found["total"] == 2 * 12 * 5 * 8 + 2 * (2 * 6 * 6) * 5
    assert found["shapes"] == ["[12, 8]x[8, 5]", "[2, 6, 5]x[2, 6, 5]"]
