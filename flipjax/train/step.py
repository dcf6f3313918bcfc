"""The train state and the jitted train step.

The state is a plain pytree `{"step", "params", "opt_state"}` (params as an NNX pure dict), so
that sharding rules, Orbax and export all see the same '/'-named leaves. The step is a pure
function of (state, batch): `nnx.merge` rebuilds the model from the graph definition and the
params inside `jax.jit`, with the shardings of every input and output stated.
"""

from __future__ import annotations

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
from flipjax.train.losses import LOSSES
from flipjax.train.optimizer import make_optimizer
from flipjax.train.sharding import batch_sharding, infer_shardings, replicated

State = dict[str, Any]


class TrainSetup:
    """Everything derived from the config that the loop needs: graphdef, optimizer, shardings
    and the compiled functions."""

    def __init__(self, config: ml_collections.ConfigDict, vocab_size: int, mesh: Mesh):
        self.config, self.mesh = config, mesh
        model_cfg = config.model

        def params_fn() -> dict:
            return nnx.to_pure_dict(nnx.state(make_model(model_cfg, vocab_size=vocab_size,
                                                         seed=config.seed), nnx.Param))

        self.graphdef = nnx.graphdef(nnx.eval_shape(
            lambda: make_model(model_cfg, vocab_size=vocab_size, seed=config.seed)))
        abstract_params = jax.eval_shape(params_fn)
        self.tx, self.schedule = make_optimizer(config.optim, abstract_params,
                                                config.total_steps)

        def init_fn() -> State:
            params = params_fn()
            return {"step": jnp.zeros((), jnp.int32), "params": params,
                    "opt_state": self.tx.init(params)}

        self.abstract_state = jax.eval_shape(init_fn)
        self.state_shardings = infer_shardings(self.abstract_state, mesh, config.sharding_rules,
                                               config.fsdp_min_size_mb)
        self.batch_sharding = batch_sharding(mesh)
        self.init = jax.jit(init_fn, out_shardings=self.state_shardings)
        self.train_step = jax.jit(
            make_train_step(self.graphdef, self.tx, self.schedule, config),
            in_shardings=(self.state_shardings, self.batch_sharding),
            out_shardings=(self.state_shardings, replicated(mesh)), donate_argnums=0)

    def model(self, params: dict) -> TwoTowers:
        return nnx.merge(self.graphdef, params)


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, config: ml_collections.ConfigDict
                    ) -> Callable[[State, dict], tuple[State, dict]]:
    loss_impl = LOSSES[config.loss]
    mean, std = tuple(config.data.mean), tuple(config.data.std)
    max_log_t = (math.log(config.model.max_temperature) if config.model.max_temperature
                 else None)

    def loss_fn(params: dict, batch: dict) -> tuple[jax.Array, dict]:
        model: TwoTowers = nnx.merge(graphdef, params)
        zimg, ztxt = model(normalize_images(batch["image"], mean, std), batch["text"])
        scale, bias = model.logit_scale_and_bias()
        loss, metrics = loss_impl(zimg, ztxt, scale, bias)
        return loss, {**metrics, "temperature": scale, "bias": bias}

    def train_step(state: State, batch: dict) -> tuple[State, dict]:
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"],
                                                                            batch)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        if max_log_t is not None:
            params["t"] = jnp.minimum(params["t"], max_log_t)
        metrics.update(loss=loss, lr=schedule(state["step"]), grad_norm=optax.tree.norm(grads),
                       param_norm=optax.tree.norm(params))
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

    return train_step
