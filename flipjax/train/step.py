"""The train state and the jitted train step.

The state is a plain pytree `{"step", "params", "opt_state", "nonfinite_steps"}` (params as an
NNX pure dict), so
that sharding rules, Orbax and export all see the same '/'-named leaves. The step is a pure
function of (state, batch): `nnx.merge` rebuilds the model from the graph definition and the
params inside `jax.jit`, with the shardings of every input and output stated.

A step whose loss or gradient is not finite leaves params and optimizer state unchanged and
counts itself in `nonfinite_steps`, so no checkpoint ever holds non-finite parameters; the loop
then raises or carries on (`config.nonfinite`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh

from flipjax.data.pipeline import normalize_images
from flipjax.models import TwoTowers, make_model
from flipjax.train.grad_cache import grad_cache_value_and_grad
from flipjax.train.losses import LOSSES, LossFn
from flipjax.train.optimizer import FROZEN, make_optimizer, param_groups
from flipjax.train.sharded_losses import make_sharded_loss
from flipjax.train.sharding import (
    activation_sharding,
    batch_sharding,
    infer_shardings,
    replicated,
)

State = dict[str, Any]


class TrainSetup:
    """Everything derived from the config that the loop needs: graphdef, optimizer, shardings
    and the compiled functions."""

    def __init__(self, config: ml_collections.ConfigDict, vocab_size: int, mesh: Mesh):
        self.mesh = mesh
        # The model is built for the mesh's devices, not JAX's default ones: its attention
        # "auto" and its layers' platform forms (`make_model`).
        build = functools.partial(make_model, config.model, vocab_size=vocab_size,
                                  seed=config.seed, device=mesh.devices.flat[0])

        def params_fn() -> dict:
            return nnx.to_pure_dict(nnx.state(build(), nnx.Param))

        self.graphdef = nnx.graphdef(nnx.eval_shape(build))
        abstract_params = jax.eval_shape(params_fn)
        self.tx, self.schedule = make_optimizer(config.optim, abstract_params,
                                                config.total_steps)

        def init_fn() -> State:
            params = params_fn()
            return {"step": jnp.zeros((), jnp.int32), "params": params,
                    "opt_state": self.tx.init(params),
                    "nonfinite_steps": jnp.zeros((), jnp.int32)}

        self.abstract_state = jax.eval_shape(init_fn)
        self.state_shardings = infer_shardings(self.abstract_state, mesh, config.sharding_rules,
                                               config.fsdp_min_size_mb)
        self.batch_sharding = batch_sharding(mesh)
        # The global batch the step takes, for lowering it without data (deviceless compiles).
        n, size = config.data.global_batch_size, config.data.image_size
        self.abstract_batch = {
            "image": jax.ShapeDtypeStruct((n, size, size, 3), jnp.uint8,
                                          sharding=self.batch_sharding),
            "text": jax.ShapeDtypeStruct((n, config.model.text.max_len), jnp.int32,
                                         sharding=self.batch_sharding)}
        self.init = jax.jit(init_fn, out_shardings=self.state_shardings)
        self.train_step = jax.jit(
            make_train_step(self.graphdef, self.tx, self.schedule, config, mesh),
            in_shardings=(self.state_shardings, self.batch_sharding),
            out_shardings=(self.state_shardings, replicated(mesh)), donate_argnums=0)


def make_loss(config: ml_collections.ConfigDict, mesh: Mesh) -> LossFn:
    """`config.loss` computed as `config.loss_impl` says: "global" under plain jit, or
    "sharded" with shard_map over `mesh` (O(B^2/n) memory per device instead of up to O(B^2))."""
    if config.loss_impl == "sharded":
        return make_sharded_loss(config.loss, mesh)
    return LOSSES[config.loss]


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, config: ml_collections.ConfigDict, mesh: Mesh
                    ) -> Callable[[State, dict], tuple[State, dict]]:
    """The pure (state, batch) -> (state, metrics) step. `mesh` (the one the step is jitted
    over) is needed by `loss_impl="sharded"` and keeps GradCache micro-batches on it."""
    loss_impl = make_loss(config, mesh)
    accum = config.grad_accum_steps
    rows = batch_sharding(mesh)
    mean, std = tuple(config.data.mean), tuple(config.data.std)
    max_log_t = (math.log(config.model.max_temperature) if config.model.max_temperature
                 else None)

    def trainable(params: dict) -> dict:
        """Frozen leaves (`optim.frozen_regex`) as constants: their gradients are zeros by
        construction, so the gradient norm and the finiteness check are the trained
        parameters', and XLA drops the backward work only they needed (a frozen tower's)."""
        groups = param_groups(params, config.optim)
        return jax.tree.map(lambda p, g: jax.lax.stop_gradient(p) if g == FROZEN else p,
                            params, groups)

    def embed(params: dict, batch: dict) -> tuple[jax.Array, jax.Array]:
        model: TwoTowers = nnx.merge(graphdef, trainable(params))
        return model(normalize_images(batch["image"], mean, std), batch["text"])

    def contrastive(params: dict, zimg: jax.Array, ztxt: jax.Array) -> tuple[jax.Array, dict]:
        scale, bias = nnx.merge(graphdef, trainable(params)).logit_scale_and_bias()
        loss, metrics = loss_impl(zimg, ztxt, scale, bias)
        return loss, {**metrics, "temperature": scale, "bias": bias}

    def loss_fn(params: dict, batch: dict) -> tuple[jax.Array, dict]:
        return contrastive(params, *embed(params, batch))

    def train_step(state: State, batch: dict) -> tuple[State, dict]:
        with activation_sharding(mesh):
            return update(state, batch)

    def update(state: State, batch: dict) -> tuple[State, dict]:
        if accum > 1:
            (loss, metrics), grads = grad_cache_value_and_grad(
                embed, contrastive, state["params"], batch, accum, rows)
        else:
            (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                state["params"], batch)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def apply(params: dict, opt_state: Any) -> tuple[dict, Any]:
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            if max_log_t is not None:
                params["t"] = jnp.minimum(params["t"], max_log_t)
            return params, opt_state

        # A branch rather than a select between old and new: the update happens in place in
        # the donated buffers, where a select kept the old state alive and XLA copied every
        # leaf (S/16 on CPU: scratch 1.52 -> 1.35 GiB without those copies).
        params, opt_state = jax.lax.cond(finite, apply, lambda p, o: (p, o),
                                         state["params"], state["opt_state"])
        nonfinite = state["nonfinite_steps"] + (~finite).astype(jnp.int32)
        # The rate this step applied: the optimizer's own count, which skipped steps don't advance.
        applied_lr = schedule(state["step"] - state["nonfinite_steps"])
        metrics.update(loss=loss, lr=applied_lr, grad_norm=grad_norm,
                       param_norm=optax.tree.norm(params), nonfinite_steps=nonfinite)
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state,
                "nonfinite_steps": nonfinite}, metrics

    return train_step
