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


GPU_KERNEL_NAMES = r"""
import json
from experiments.profile_step import by_kernel_name, hlo_computations
hlo = (
    "HloModule m\n\n"
    "ENTRY %main.4 (p: f32[2,3]) -> f32[2,3] {\n"
    "  %p = f32[2,3]{1,0} parameter(0)\n"
    "  ROOT %loop_add_fusion.3 = f32[2,3]{1,0} fusion(%p), kind=kLoop, calls=%fused_add\n"
    "}\n")
shapes = by_kernel_name({name: shape for body in hlo_computations(hlo).values()
                         for name, shape, *_ in body})
print(json.dumps(shapes))
"""


def test_profile_step_finds_a_gpu_kernel_under_its_hlo_instruction():
    """A GPU trace names the kernel of HLO instruction `fusion.3` `fusion_3`: the session-25
    H200 profile listed no output shapes because the lookup used the HLO names alone (run in
    a fresh process: the script's flags clash with other modules' in the test process)."""
    shapes = json_from_fresh_process(GPU_KERNEL_NAMES)
    assert shapes["loop_add_fusion_3"] == shapes["loop_add_fusion.3"] == "f32[2,3]{1,0}"
