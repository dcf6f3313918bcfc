from conftest import KERNEL_MATMULS, json_from_fresh_process

PROBE = KERNEL_MATMULS + """
import json
import jax, jax.numpy as jnp
from flax import nnx
from experiments.cpu_matmul import flops, products
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
                         attention="dot", platform="cpu", dtype=jnp.float32,
                         rngs=nnx.Rngs(0))
    graph, params = nnx.split(block)
    loss = lambda p, x: jnp.sum(nnx.merge(graph, p)(x, is_causal=causal) ** 2)
    x = jnp.ones((batch, seq, size.width))
    text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile().as_text()
    compiled[tower] = [f for f, _ in kernel_matmuls(text)]
print(json.dumps({tower: [sorted(listed[tower]), sorted(compiled[tower])] for tower in listed}))
"""


def test_cpu_matmul_lists_every_matmul_of_a_training_block():
    """`experiments/cpu_matmul.py` times a train step's block matmuls one by one; its per-step
    sum is only as good as its list. Per block of each tower (a size whose MLP is not 4x its
    width, so every kind of product has its own FLOPs), the listed products must be the dots
    XLA compiles for an encoder block's forward and backward (parameter and input gradients),
    one for one."""
    for tower, (listed, compiled) in json_from_fresh_process(PROBE).items():
        assert listed == compiled, tower
