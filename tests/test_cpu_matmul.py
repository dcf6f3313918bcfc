import json
import subprocess
import sys

from conftest import REPO

# In a fresh process: importing experiments.profile_step imports experiments.throughput, which
# sets glibc's malloc options for the whole process (as its benchmarks need).
PROBE = """
import json
import jax, jax.numpy as jnp
from flax import nnx
from experiments.cpu_matmul import flops, products
from experiments.profile_step import hlo_computations, matmul_flops
from flipjax.models.layers import EncoderBlock
from flipjax.models.variants import SIZES

size, batch = SIZES["mu"], 2
listed = {}
for tower, _, equation, _, sizes, count in products("mu/16", batch, None):
    listed[tower] = listed.get(tower, 0) + flops(equation, sizes) * count / size.depth
compiled = {}
for tower, seq, causal in (("image", 197, False), ("text", 64, True)):
    block = EncoderBlock(size.width, size.mlp_dim, size.num_heads, gelu="exact", ln_eps=1e-5,
                         attention="auto", dtype=jnp.float32, rngs=nnx.Rngs(0))
    graph, params = nnx.split(block)
    loss = lambda p, x: jnp.sum(nnx.merge(graph, p)(x, is_causal=causal) ** 2)
    x = jnp.ones((batch, seq, size.width))
    text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile().as_text()
    computations = hlo_computations(text)
    flops_of = matmul_flops(computations)
    # The kernels XLA runs: the entry computation's dots and the fusions holding them.
    (entry,) = (body for name, body in computations.items() if name.startswith("main"))
    compiled[tower] = sum(flops_of[i[0]][0] for i in entry if i[0] in flops_of)
print(json.dumps({"listed": listed, "compiled": compiled}))
"""


def test_cpu_matmul_lists_every_matmul_of_a_training_block():
    """`experiments/cpu_matmul.py` times a train step's matmuls one by one; its per-step sum
    is only as good as its list. Per block of each tower, the listed products' FLOPs must be
    those of the dots XLA compiles for an encoder block's forward and backward (parameter and
    input gradients)."""
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True,
                            text=True, check=True, env={"JAX_PLATFORMS": "cpu",
                                                        "PATH": "/usr/bin:/bin"})
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["listed"] == found["compiled"]
