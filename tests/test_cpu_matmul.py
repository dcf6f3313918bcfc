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
from flipjax.models.variants import Size

size, batch, image_tokens = Size(width=32, depth=2, mlp_dim=96, num_heads=2), 2, 50
listed = {"image": [], "text": []}
for tower, _, equation, _, sizes, count in products(size, image_tokens, batch, None):
    per_block, rest = divmod(count, size.depth)
    assert not rest, count
    listed[tower] += [flops(equation, sizes)] * per_block
compiled = {}
for tower, seq, causal in (("image", image_tokens, False), ("text", 64, True)):
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
    compiled[tower] = [flops_of[i[0]][0] for i in entry if i[0] in flops_of]
print(json.dumps({tower: [sorted(listed[tower]), sorted(compiled[tower])] for tower in listed}))
"""


def test_cpu_matmul_lists_every_matmul_of_a_training_block():
    """`experiments/cpu_matmul.py` times a train step's block matmuls one by one; its per-step
    sum is only as good as its list. Per block of each tower (a size whose MLP is not 4x its
    width, so every kind of product has its own FLOPs), the listed products must be the dots
    XLA compiles for an encoder block's forward and backward (parameter and input gradients),
    one for one."""
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True,
                            text=True, check=True, env={"JAX_PLATFORMS": "cpu",
                                                        "PATH": "/usr/bin:/bin"})
    found = json.loads(result.stdout.strip().splitlines()[-1])
    for tower, (listed, compiled) in found.items():
        assert listed == compiled, tower
