"""Transformer building blocks shared by the image and the text tower.

Every sub-module name here is chosen so that exporting to Hugging Face SigLIP/CLIP is a rename
table (see `flipjax/export`): `norm1`/`norm2` -> `layer_norm1/2`, `attn.{q,k,v,out}` ->
`self_attn.{q,k,v,out}_proj`, `mlp.fc1/fc2` -> `mlp.fc1/fc2`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

GELU_FLAVOURS: dict[str, Callable[[jax.Array], jax.Array]] = {
    # big_vision / SigLIP (`nn.gelu` default, HF `gelu_pytorch_tanh`).
    "tanh": functools.partial(jax.nn.gelu, approximate=True),
    # BERT / HF `gelu`.
    "exact": functools.partial(jax.nn.gelu, approximate=False),
    # OpenAI CLIP / HF `quick_gelu`.
    "quick": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


# Which activations `jax.checkpoint` keeps for the backward pass (`config.model.remat`); the
# rest are recomputed. "dots" keeps every projection's output (matmuls without a batch
# dimension) and recomputes norms, GELUs and the attention matrix: most of full remat's memory
# saving at a fraction of its recompute.
REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def constrain(x: jax.Array, *logical_axes: str | None) -> jax.Array:
    """Pins an activation's sharding by logical axis names ("batch", "seq", "embed", "mlp",
    "heads"), mapped to mesh axes by the rules the train step sets
    (`flipjax.train.sharding.activation_rules`). Outside those rules it does nothing, so the
    same model runs unsharded in evaluation and export."""
    return nn.with_logical_constraint(x, logical_axes)


def gelu_fn(flavour: str) -> Callable[[jax.Array], jax.Array]:
    if flavour not in GELU_FLAVOURS:
        raise ValueError(f"gelu must be one of {sorted(GELU_FLAVOURS)}, got {flavour!r}")
    return GELU_FLAVOURS[flavour]


def dense_matmul(x: jax.Array, kernel: jax.Array, platform: str) -> jax.Array:
    """x (..., in) @ kernel (in, out); for CPUs and GPUs (`platform`, a `jax.Device.platform`)
    computed over x flattened to (tokens, in).

    Why flatten: autodiff then takes the kernel's gradient as one (tokens, in) x
    (tokens, out) product. Over (batch, seq, in) arrays XLA:CPU fed that product a transposed
    copy of the output gradient instead, fused with the elementwise work that produced the
    gradient (the GELU derivative, the residual adds): a fusion that reads every input with a
    stride of the layer's width. A ViT-S/16 MLP's forward + backward at batch 8 took 65-94 ms
    that way and 31-34 ms flattened, for every GELU; with another loss, 51.5 and 48.3 ms
    (`experiments/results/throughput.md`). On an H100, B/16 in bf16 at batch 512 also trained
    2.7% faster flattened (204.6 -> 199.1 ms per step, `experiments/results/
    throughput_h100.md`), while its activations were laid out batch-minor (see
    `add_position_embedding`); since that was fixed, a GPU compile has the same transposes
    either way.
    The products and values are the same, and remat policies still see a plain dot. On a
    TPU the product keeps its (batch, seq) axes, as `nnx.Linear` computes it: there merging
    197 tokens into the batch axis costs relayout copies (TPU tiles the last two axes).
    Compiled for a v5e without one, `configs/base.py`'s step at 128 pairs per chip needs
    8.35 GiB of scratch per chip in this form and 10.16 GiB flattened
    (`experiments/results/tpu_compile.md`).

    Why the platform is an argument, decided when the model is built for its device
    (`make_model`), rather than `jax.default_backend()` at trace time: a deviceless compile
    for a TPU pod from a CPU host must get the TPU form. Nor `jax.lax.platform_dependent`,
    which picks the form when lowering: autodiff turns it into a `cond` whose residuals
    hide that the kernel is a scanned layer's own parameter, and a scanned ViT-S/16 step
    without remat then stacked a copy of its kernels: 1.45 instead of 1.28 GB of scratch at
    batch 8 on the CPU.
    """
    if platform == "tpu":
        return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
    return _matmul_over_tokens(x, kernel)


def _matmul_over_tokens(x: jax.Array, kernel: jax.Array, precision=None,
                        preferred_element_type=None) -> jax.Array:
    y = jnp.matmul(x.reshape(-1, x.shape[-1]), kernel, precision=precision,
                   preferred_element_type=preferred_element_type)
    return y.reshape(*x.shape[:-1], kernel.shape[-1])


def _dot_general_over_tokens(x: jax.Array, kernel: jax.Array, dimension_numbers, precision=None,
                             preferred_element_type=None, out_sharding=None) -> jax.Array:
    """`nnx.Linear`'s `dot_general` in `dense_matmul`'s CPU and GPU form; it takes the
    `precision` and `preferred_element_type` that the TPU form (`nnx.Linear`'s own) takes."""
    if dimension_numbers != (((x.ndim - 1,), (0,)), ((), ())) or out_sharding is not None:
        raise NotImplementedError("dense_matmul computes x @ kernel over x's last axis only, "
                                  "without an output sharding")
    return _matmul_over_tokens(x, kernel, precision, preferred_element_type)


def dense(in_features: int, out_features: int, *, platform: str, **kwargs) -> nnx.Linear:
    """`nnx.Linear` (same parameters, initialisation and names) computed as `dense_matmul`
    computes for `platform`. Every linear layer of the towers is built here; the patch
    embedding calls `dense_matmul` itself."""
    if platform == "tpu":  # nnx.Linear's own product, the batched form
        return nnx.Linear(in_features, out_features, **kwargs)
    return nnx.Linear(in_features, out_features, dot_general=_dot_general_over_tokens,
                      **kwargs)


def _logit_scale(q: jax.Array) -> np.float32:
    return np.float32(q.shape[-1] ** -0.5)


# How many keys are real: for every example (an int), per example (an int array (batch,)),
# or all of them (None); the keys after them are padding or masked.
NumKeys = int | jax.Array | None


def _attention_forward(q: jax.Array, k: jax.Array, v: jax.Array, is_causal: bool,
                       num_keys: NumKeys) -> tuple[jax.Array, jax.Array]:
    """Softmax attention and its probabilities; logits and softmax in float32 for any input
    dtype, as `jax.nn.dot_product_attention` does."""
    logits = jnp.einsum("bnqh,bnkh->bnqk", q, k, preferred_element_type=jnp.float32)
    logits *= _logit_scale(q)
    tq, tk = logits.shape[-2:]
    keep = jnp.tril(jnp.ones((tq, tk), bool)) if is_causal else np.ones((tq, tk), bool)
    if num_keys is not None:
        keep = keep & (np.arange(tk) < jnp.reshape(num_keys, (-1, 1, 1, 1)))
    if is_causal or num_keys is not None:  # finite: a masked logit's softmax is 0, never NaN
        logits = jnp.where(keep, logits, -0.7 * np.finfo(np.float32).max)
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bnqk,bnkh->bnqh", probs.astype(v.dtype), v), probs


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, is_causal: bool = False,
                          num_keys: NumKeys = None) -> jax.Array:
    """Multi-head softmax attention over heads-major arrays (batch, heads, seq, head_dim),
    attending to the first `num_keys` keys (all by default, or a count for every example or
    one per example; later keys are padding, or a single query's future under a causal mask).

    Why not `jax.nn.dot_product_attention`: its arrays are (batch, seq, heads, head_dim), so
    every batched matmul has batch dimensions that are not leading, and its gradient is
    autodiff's, which reduces over the (q, k) probabilities. Here the matmuls batch over the
    leading (batch, heads) and the backward is FlashAttention's: the softmax gradient needs only
    rowsum(dO * O), a reduction over head_dim. On the development CPU this took a ViT-B/16
    attention's forward + backward at batch 8 from 118 to 53 ms
    (`experiments/results/throughput.md`); the numbers are the same to float32 rounding.
    """
    return _attention_forward(q, k, v, is_causal, num_keys)[0]


def _attention_fwd(q, k, v, is_causal, num_keys):
    out, probs = _attention_forward(q, k, v, is_causal, num_keys)
    return out, (q, k, v, out, probs)


def _attention_bwd(is_causal, residuals, d_out):
    del is_causal  # masked probabilities are 0, so their gradient is too
    q, k, v, out, probs = residuals
    d_probs = jnp.einsum("bnqh,bnkh->bnqk", d_out, v, preferred_element_type=jnp.float32)
    # d softmax: P * (dP - rowsum(dP * P)), and rowsum(dP * P) = rowsum(dO * O).
    row = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), -1, keepdims=True)
    d_logits = (probs * (d_probs - row) * _logit_scale(q)).astype(q.dtype)
    dq = jnp.einsum("bnqk,bnkh->bnqh", d_logits, k)
    # dK and dV as (head_dim, k) products transposed afterwards: XLA:CPU runs these faster
    # than the same contraction written with the q axis shared.
    dk = jnp.einsum("bnqh,bnqk->bnhk", q, d_logits).swapaxes(-1, -2)
    dv = jnp.einsum("bnqh,bnqk->bnhk", d_out, probs.astype(d_out.dtype)).swapaxes(-1, -2)
    return dq, dk, dv, None  # no gradient for `num_keys`


dot_product_attention.defvjp(_attention_fwd, _attention_bwd)


def heads_major_attention(q: jax.Array, k: jax.Array, v: jax.Array, is_causal: bool = False,
                          num_keys: NumKeys = None) -> jax.Array:
    """`dot_product_attention` for (batch, seq, heads, head_dim) arrays: transposed to heads
    major and back, the heads-major copies pinned to the "heads" sharding."""
    heads_major = lambda y: constrain(y.transpose(0, 2, 1, 3), "batch", "heads", "seq", None)
    out = dot_product_attention(heads_major(q), heads_major(k), heads_major(v), is_causal,
                                num_keys)
    return out.transpose(0, 2, 1, 3)


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, is_causal: bool = False,
                    num_keys: NumKeys = None, *, implementation: str = "cudnn") -> jax.Array:
    """Multi-head softmax attention over (batch, seq, heads, head_dim) arrays with cuDNN's
    fused kernel, which keeps neither the (q, k) logits nor the probabilities in memory. Only
    the first `num_keys` keys (all by default; a count, or one per example) are attended to.

    cuDNN's fused backward refused the image tower's 197 tokens on an H200 with jax 0.11.2
    (`NotImplementedError: Unsupported sequence length Q 197, KV 197`,
    experiments/results/throughput_h200.md): it wants even lengths, and a ViT with a class
    token has an odd number of tokens. `Encoder` therefore pads its tokens once for all its
    layers (`needs_even_length`); an odd length that still arrives here (the single query of
    a MAP head or of a pooled last block) is padded by one: a zero query row, sliced off the
    output, and a zero key that the kernel's padding mask (`key_value_seq_lengths`) hides, so
    every query attends to exactly its own keys. `implementation="xla"` runs the same padding
    through XLA, which is how the CPU tests check it.
    """
    b, tq, tk = q.shape[0], q.shape[1], k.shape[1]
    even = lambda x: jnp.pad(x, [(0, 0), (0, x.shape[1] % 2), (0, 0), (0, 0)])
    if num_keys is None and tk % 2 == 0:
        kv_lengths = None
    else:
        kv_lengths = jnp.broadcast_to(jnp.asarray(tk if num_keys is None else num_keys,
                                                  jnp.int32), (b,))
    out = jax.nn.dot_product_attention(even(q), even(k), even(v), is_causal=is_causal,
                                       key_value_seq_lengths=kv_lengths,
                                       implementation=implementation)
    return out[:, :tq]


# The implementations `config.model.attention` names, each `(q, k, v, is_causal, num_keys)`
# over (batch, seq, heads, head_dim) arrays. "dot" is plain XLA and runs on every backend;
# "cudnn" is cuDNN's fused flash-attention kernel, for NVIDIA GPUs from Ampere on in 16-bit
# compute. The config may also say "auto": "cudnn" where it runs, else "dot"
# (`resolve_attention`).
ATTENTION_IMPLEMENTATIONS: dict[str, Callable[..., jax.Array]] = {
    "dot": heads_major_attention,
    "cudnn": cudnn_attention,
}
# The implementations that run only on even sequence lengths (padding odd ones themselves).
EVEN_LENGTH_ATTENTIONS = frozenset({"cudnn"})


def cudnn_attention_runs_here(dtype: jnp.dtype | type, device: jax.Device | None = None) -> bool:
    """Whether `device` (by default JAX's first) is a CUDA GPU that cuDNN's fused attention
    supports (compute capability 8.0+) and `dtype` is 16-bit."""
    device = device or jax.devices()[0]
    return (device.platform == "gpu" and "cuda" in device.client.platform_version.lower()
            and float(getattr(device, "compute_capability", 0)) >= 8.0
            and jnp.dtype(dtype).itemsize == 2)


def resolve_attention(name: str, dtype: jnp.dtype | type, device: jax.Device | None = None
                      ) -> str:
    """The implementation "auto" stands for on `device` (by default JAX's first; a train step
    passes its mesh's) and compute dtype; other names of `ATTENTION_IMPLEMENTATIONS` pass
    through.

    `make_model` resolves it, once, from the same device as the `platform` that
    `dense_matmul` and `add_residual` take; the layers take the resolved name."""
    if name == "auto":
        return "cudnn" if cudnn_attention_runs_here(dtype, device) else "dot"
    if name not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention must be 'auto' or one of {sorted(ATTENTION_IMPLEMENTATIONS)}"
                         f", got {name!r}")
    return name


class Attention(nnx.Module):
    """Multi-head attention with separate q/k/v/out projections (1:1 with HF's layout),
    initialised as big_vision's (xavier-uniform kernels over width -> width, zero biases)."""

    def __init__(self, width: int, num_heads: int, *, attention: str, platform: str, dtype,
                 rngs: nnx.Rngs):
        if width % num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {num_heads}")
        if attention not in ATTENTION_IMPLEMENTATIONS:  # "auto" is resolved by `make_model`.
            raise ValueError(f"attention must be one of {sorted(ATTENTION_IMPLEMENTATIONS)}, "
                             f"got {attention!r}")
        self.num_heads, self.platform = num_heads, platform
        self.implementation = attention
        linear = functools.partial(dense, width, width, platform=platform, dtype=dtype,
                                   kernel_init=nnx.initializers.xavier_uniform(), rngs=rngs)
        self.q, self.k, self.v, self.out = linear(), linear(), linear(), linear()

    def __call__(self, x: jax.Array, context: jax.Array | None = None, *,
                 is_causal: bool = False, num_keys: NumKeys = None) -> jax.Array:
        """`num_keys`: attend to the first that many tokens of `context` only (default all; a
        count, or one per example), as `dot_product_attention` says."""
        context = x if context is None else context
        b, tq, d = x.shape
        q, k, v = (constrain(y.reshape(b, y.shape[1], self.num_heads, d // self.num_heads),
                             "batch", "seq", "heads", None)
                   for y in (self.q(x), self.keys(context), self.v(context)))
        y = ATTENTION_IMPLEMENTATIONS[self.implementation](q, k, v, is_causal, num_keys)
        return self.out(y.reshape(b, tq, d))

    def keys(self, context: jax.Array) -> jax.Array:
        """`self.k(context)`, with no gradient for the key bias: it is exactly zero.

        Why: the key bias adds q . bias to every logit of a query's row, the same for every
        key, and softmax is unchanged by that (masked keys included), so the bias affects
        nothing and its true gradient is zero. Autodiff would still sum the key gradients
        over every token to compute it, a pass over an activation in every layer: 2.5 GB
        per B/16 step in bf16 at batch 512 on an H100 (`experiments/gpu_layouts.py`). The
        parameter stays, so checkpoints and the Hugging Face layout are unchanged."""
        kernel, bias = self.k.kernel[...], jax.lax.stop_gradient(self.k.bias[...])
        context, kernel, bias = self.k.promote_dtype((context, kernel, bias), dtype=self.k.dtype)
        return dense_matmul(context, kernel, self.platform) + bias


class Mlp(nnx.Module):
    """fc1, GELU, fc2. The GELU is rematerialised (`jax.checkpoint`): its backward recomputes
    the activation from its input instead of keeping an intermediate (the tanh GELU's tanh)
    as large as the hidden layer.

    Why: the GELU is memory-bound, so recomputing it costs little, while the kept
    intermediate cost a write, a read and its memory in every layer. Compiled for an H100
    (`experiments/gpu_layouts.py`'s deviceless compile), B/16 in bf16 at batch 512 needs
    35.6 instead of 44.1 GiB of scratch, and its memory-bound kernels move 36 GB less per step
    (tanh GELU; cuBLASLt then computes bias + GELU in fc1's epilogue, so 27 GB less in all;
    exact GELU: 18 GB less). On an H200 the step compiled with 35.7 GiB and trained at
    38.3% MFU (40.7-41.1% with XLA's dot merger off; `experiments/results/throughput_h200.md`,
    with two other changes since the last timing, so not this one's share). On the
    development CPU, S/16 at batch 8: 0.87 instead of 1.14 GiB, and steps 2-4% shorter
    (`experiments/results/gpu_layouts.md`)."""

    def __init__(self, width: int, mlp_dim: int, *, gelu: str, platform: str, dtype,
                 rngs: nnx.Rngs):
        # big_vision's MlpBlock: xavier-uniform kernels (lecun-normal, nnx's default, starts
        # fc1 1.6x wider for B/16), biases at N(0, 1e-6).
        linear = functools.partial(dense, platform=platform, dtype=dtype, rngs=rngs,
                                   kernel_init=nnx.initializers.xavier_uniform(),
                                   bias_init=nnx.initializers.normal(1e-6))
        self.fc1, self.fc2 = linear(width, mlp_dim), linear(mlp_dim, width)
        self.act = jax.checkpoint(gelu_fn(gelu))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(constrain(self.act(self.fc1(x)), "batch", "seq", "mlp"))


def add_residual(x: jax.Array, branch: jax.Array, platform: str) -> jax.Array:
    """x + branch, where `branch` is a layer's output (its last op a matmul). On CPUs and
    GPUs the forward pass keeps the add out of that matmul; the gradient is the plain sum's.

    Why: XLA:GPU folds such an add into cuBLAS's matmul (the C operand, beta = 1), which
    writes the sum over x in place. x is still needed (the backward of the LayerNorm that
    fed the branch reads it), so XLA first copies it: a copy of the residual stream at every
    residual add. Kept apart, the add is fused with the next LayerNorm's statistics, which
    read x and the branch once. Compiled for an H100 (`experiments/gpu_layouts.py`), B/16 in
    bf16 at batch 512 with unrolled layers: 9.1 GB of copies gone, about as many bytes more
    in that fusion, and 4.3 GB less read by the matmuls (their C operands); with scanned
    layers and `remat="dots"` about 6 GB more (the attention's output bias is then added
    apart from the residual, forward and in the backward's recompute). Not yet timed on a
    GPU. On the development CPU S/16 steps were 2-10% shorter with unrolled layers and 2-5%
    with scan and `remat="dots"` (alternate runs, `experiments/results/gpu_layouts.md`).
    On a TPU the add stays fusable into the matmul, where it costs no copy (not measured
    there). `platform` is the device's, as for `dense_matmul`."""
    if platform == "tpu":
        return x + branch
    return x + _unfused(branch)


@jax.custom_vjp
def _unfused(y: jax.Array) -> jax.Array:
    """y, which XLA may not fuse into the op that produced it (forward only)."""
    return jax.lax.optimization_barrier(y)


_unfused.defvjp(lambda y: (_unfused(y), None), lambda _, grad: (grad,))


class EncoderBlock(nnx.Module):
    """Pre-LN transformer block, as in ViT, CLIP and SigLIP."""

    def __init__(self, width: int, mlp_dim: int, num_heads: int, *, gelu: str, ln_eps: float,
                 attention: str, platform: str, dtype, rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(width, epsilon=ln_eps, dtype=dtype, rngs=rngs)
        self.attn = Attention(width, num_heads, attention=attention, platform=platform,
                              dtype=dtype, rngs=rngs)
        self.norm2 = nnx.LayerNorm(width, epsilon=ln_eps, dtype=dtype, rngs=rngs)
        self.mlp = Mlp(width, mlp_dim, gelu=gelu, platform=platform, dtype=dtype, rngs=rngs)
        self.platform = platform

    def __call__(self, x: jax.Array, *, is_causal: bool = False, num_keys: NumKeys = None,
                 position: int | jax.Array | None = None) -> jax.Array:
        """`position` (an index, or one per example): the block's output at that token only,
        (B, 1, width). Its attention still reads every token as a key, but only that token is
        a query and goes through the MLP."""
        h = self.norm1(x)
        if position is None:
            x = add_residual(x, self.attn(h, is_causal=is_causal, num_keys=num_keys),
                             self.platform)
        else:
            if is_causal:  # a single query at `position` sees exactly the keys up to it
                num_keys, is_causal = position + 1, False
            x = add_residual(token_at(x, position),
                             self.attn(token_at(h, position), context=h, num_keys=num_keys),
                             self.platform)
        x = add_residual(x, self.mlp(self.norm2(x)), self.platform)
        return constrain(x, "batch", "seq", "embed")


class Encoder(nnx.Module):
    """A stack of `EncoderBlock`s followed by a final LayerNorm.

    `platform` (the `jax.Device.platform` the model is built for) picks the forms of
    `dense_matmul` and `add_residual`. `remat` names a `REMAT_POLICIES` entry applied to each
    block. `scan=True` stores the blocks
    stacked (every leaf of `layers` gains a leading depth axis) and runs them with `nnx.scan`, so
    XLA compiles one block instead of `depth` copies; `unstack_layers` turns such params into
    the per-layer layout (`layers/{i}/...`) that export and the unscanned model use.

    An attention kernel that needs even lengths (cuDNN's) gets its odd-length input (a ViT's
    197 tokens) padded once here, a masked zero token carried through every layer and sliced
    off at the end, rather than once per layer: on an H100 each layer's pads and slices of
    q, k, v and the output were memory-bound copies of the whole activation.

    A tower that pools one token (a class token, the last text token, each caption's EOS)
    asks for that token alone (`position`): then the last block computes its queries,
    attention rows and MLP for that token only, since no other token's output is read. For a
    ViT that skips ~84% of the last block, ~7% of the tower's FLOPs at depth 12. Only
    unrolled layers do this: scanned ones run every block in full, since taking the last
    block out of the scan slices the stacked parameters and concatenates their gradients
    every step, which for B/16 at batch 8 on the CPU took the scanned step's scratch memory
    from 1.57 to 2.10 GiB (`remat="dots"`).
    """

    def __init__(self, width: int, depth: int, mlp_dim: int, num_heads: int, *, gelu: str,
                 ln_eps: float, remat: str, scan: bool, attention: str, platform: str, dtype,
                 rngs: nnx.Rngs):
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {sorted(REMAT_POLICIES)}, got {remat!r}")
        def make_block(block_rngs: nnx.Rngs) -> EncoderBlock:
            return EncoderBlock(width, mlp_dim, num_heads, gelu=gelu, ln_eps=ln_eps,
                                attention=attention, platform=platform, dtype=dtype,
                                rngs=block_rngs)

        if scan:
            self.layers = nnx.split_rngs(splits=depth)(
                nnx.vmap(make_block, in_axes=0, out_axes=0))(rngs)
        else:
            self.layers = nnx.List([make_block(rngs) for _ in range(depth)])
        self.encoder_norm = nnx.LayerNorm(width, epsilon=ln_eps, dtype=dtype, rngs=rngs)
        self.remat, self.scan = remat, scan
        self.needs_even_length = attention in EVEN_LENGTH_ATTENTIONS

    def __call__(self, x: jax.Array, *, is_causal: bool = False,
                 position: int | jax.Array | None = None) -> jax.Array:
        """Every token's output (B, N, width), or with `position` (an index into the N tokens,
        negative counting from the end, or an int array of one per example) that token's
        output alone, (B, width)."""
        num_tokens = x.shape[1]
        if is_static_index(position) and not -num_tokens <= position < num_tokens:
            raise IndexError(f"position {position} is out of range for {num_tokens} tokens")
        position = None if position is None else position % num_tokens
        x, num_keys = self._pad_for_attention(x)

        def apply(block: EncoderBlock, y: jax.Array) -> jax.Array:
            return block(y, is_causal=is_causal, num_keys=num_keys)

        def apply_at_position(block: EncoderBlock, y: jax.Array) -> jax.Array:
            return block(y, is_causal=is_causal, num_keys=num_keys, position=position)

        if self.remat != "none":
            apply = nnx.remat(apply, policy=REMAT_POLICIES[self.remat])
            apply_at_position = nnx.remat(apply_at_position, policy=REMAT_POLICIES[self.remat])
        if self.scan:
            x = nnx.scan(apply, in_axes=(0, nnx.Carry), out_axes=nnx.Carry)(self.layers, x)
            x = x[:, :num_tokens] if position is None else token_at(x, position)
        elif position is None:
            for block in self.layers:
                x = apply(block, x)
            x = x[:, :num_tokens]
        else:
            for block in self.layers[:-1]:
                x = apply(block, x)
            x = apply_at_position(self.layers[-1], x)
        x = self.encoder_norm(x)
        return x if position is None else x[:, 0]

    def _pad_for_attention(self, x: jax.Array) -> tuple[jax.Array, int | None]:
        """(x, num_keys) as the blocks take them: an odd-length input padded with one masked
        zero token where the attention kernel needs even lengths (num_keys: the real tokens),
        else as it is (None)."""
        num_tokens = x.shape[1]
        if not (self.needs_even_length and num_tokens % 2 == 1):
            return x, None
        return jnp.pad(x, [(0, 0), (0, 1), (0, 0)]), num_tokens

    def block_summaries(self, x: jax.Array, summarize: Callable[[jax.Array], jax.Array]
                        ) -> tuple[jax.Array, jax.Array]:
        """(`summarize` of every block's output, stacked: (depth, ...), index i being block
        i + 1's; the final (normed) output tokens). Probes on intermediate layers (FLIP's
        attribute head) read these; each block's tokens are summarised as they are made, so a
        scanned encoder never holds all of them."""
        num_tokens = x.shape[1]
        x, num_keys = self._pad_for_attention(x)

        def apply(block: EncoderBlock, y: jax.Array) -> tuple[jax.Array, jax.Array]:
            y = block(y, num_keys=num_keys)
            return y, summarize(y[:, :num_tokens])

        if self.scan:
            x, per_block = nnx.scan(apply, in_axes=(0, nnx.Carry),
                                    out_axes=(nnx.Carry, 0))(self.layers, x)
        else:
            outputs = []
            for block in self.layers:
                x, summary = apply(block, x)
                outputs.append(summary)
            per_block = jnp.stack(outputs)
        return per_block, self.encoder_norm(x[:, :num_tokens])


def is_static_index(position: int | jax.Array | None) -> bool:
    return isinstance(position, int | np.integer)


def token_at(x: jax.Array, position: int | jax.Array) -> jax.Array:
    """x[:, position] as (B, 1, width), for an index or an int array of one per example."""
    if is_static_index(position):
        return x[:, position:position + 1]
    return jnp.take_along_axis(x, position[:, None, None], axis=1)


def _map_encoder_layers(params: dict, convert: Callable[[dict], dict]) -> dict:
    """Applies `convert` to every `encoder/layers` subtree of an NNX pure dict."""
    out = {}
    for key, value in params.items():
        if isinstance(value, dict):
            if key == "encoder" and "layers" in value:
                value = {**value, "layers": convert(value["layers"])}
            out[key] = _map_encoder_layers(value, convert)
        else:
            out[key] = value
    return out


def _is_per_layer(layers: dict) -> bool:
    return all(str(k).isdigit() for k in layers)


def has_stacked_layers(params: dict) -> bool:
    """Whether `params` holds scanned (stacked) encoder layers."""
    stacked = []
    _map_encoder_layers(params, lambda layers: stacked.append(not _is_per_layer(layers)) or layers)
    return any(stacked)


def unstack_layers(params: dict) -> dict:
    """Per-layer params (`encoder/layers/{i}/...`) from scanned ones (`encoder/layers/...` with
    a leading depth axis); per-layer params pass through unchanged."""
    def convert(layers: dict) -> dict:
        if _is_per_layer(layers):
            return layers
        depth = jax.tree.leaves(layers)[0].shape[0]
        return {i: jax.tree.map(lambda a, i=i: a[i], layers) for i in range(depth)}

    return _map_encoder_layers(params, convert)


def _stack(*layers: jax.Array | np.ndarray) -> jax.Array | np.ndarray:
    """Host arrays stack on the host; anything else (sharded device arrays, perhaps spread
    over processes) stacks on device."""
    if all(isinstance(x, np.ndarray) for x in layers):
        return np.stack(layers)
    return jnp.stack(layers)


def stack_layers(params: dict) -> dict:
    """The inverse of `unstack_layers`: scanned params from per-layer ones."""
    def convert(layers: dict) -> dict:
        if not _is_per_layer(layers):
            return layers
        blocks = [layers[i] for i in sorted(layers, key=int)]
        return jax.tree.map(_stack, *blocks)

    return _map_encoder_layers(params, convert)


def normal_param(shape: tuple[int, ...], stddev: float, rngs: nnx.Rngs) -> nnx.Param:
    return nnx.Param(jax.random.normal(rngs.params(), shape, jnp.float32) * stddev)


@jax.custom_vjp
def add_position_embedding(x: jax.Array, table: jax.Array) -> jax.Array:
    """x (B, N, D) + table (1, N, D) in x's dtype, whose gradient for `table` is a matmul over
    the batch (ones (B,) @ dx) instead of autodiff's reduction over it.

    Why: with the reduction, XLA:GPU laid the gradient out batch-minor (the reduced axis
    minor), and that layout spread through the elementwise ops to every activation of the
    tower's residual stream, forward and backward, while the matmuls take
    tokens batch-major: a transpose at nearly every matmul of unrolled layers (scanned ones
    choose their loop body's layouts apart). On an H100, B/16 in bf16 at batch 512 spent 28
    of its 199 ms per step in such transposes; with this, a step took 178.8 ms
    (`experiments/results/throughput_h100.md`, `gpu_layouts.md`). The values and gradients
    are the same."""
    return x + table


def _add_position_embedding_forward(x: jax.Array, table: jax.Array) -> tuple[jax.Array, None]:
    return x + table, None


def _add_position_embedding_backward(_: None, grad: jax.Array) -> tuple[jax.Array, jax.Array]:
    ones = jnp.ones(grad.shape[:1], grad.dtype)
    table_grad = jnp.einsum("b,bnd->nd", ones, grad, preferred_element_type=jnp.float32)
    return grad, table_grad[None].astype(grad.dtype)


add_position_embedding.defvjp(_add_position_embedding_forward, _add_position_embedding_backward)
