"""Orbax checkpoints holding the train state and the Grain iterator together.

Saves are asynchronous and written to a temporary directory that is renamed only when complete,
so a crash (even SIGKILL) mid-write leaves the previous checkpoint restorable. Restoring the
iterator with the model makes a resumed run see exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp

from flipjax.config import ConfigError
from flipjax.storage import storage_path


def make_manager(workdir: str, cfg: ml_collections.ConfigDict) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=cfg.keep, enable_async_checkpointing=cfg.async_save, create=True)
    return ocp.CheckpointManager(storage_path(workdir) / "checkpoints",
                                 item_names=("state", "iter"), options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_iter: Any) -> bool:
    """Starts an (async) save of `state` and the iterator at `step`; returns whether it did."""
    return manager.save(step, force=True, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), iter=grain.checkpoint.CheckpointSave(data_iter)))


def abstract_with_shardings(state: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        state, shardings)


def check_same_processes(manager: ocp.CheckpointManager, step: int) -> None:
    """Raises ConfigError unless the checkpoint holds this process's iterator state: Grain
    saves one per process (`process_I-of-N.json`), positions within this process's rows."""
    name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    saved = sorted(p.name for p in (manager.directory / str(step) / "iter").glob("process_*"))
    if saved and name not in saved:
        count = saved[0].split("-of-")[-1].removesuffix(".json")
        raise ConfigError(f"{manager.directory}/{step}: the data position was saved by "
                         f"{count} process(es) ({saved[0]}, ...), and this run has "
                         f"{jax.process_count()}; resume with as many processes (hosts), or export "
                         "the weights (python -m flipjax.export) and start a new run from them "
                         "(config.init_from)")


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any,
            data_iter: Any | None) -> Any:
    """Restores the state at `step` onto the shardings in `abstract_state`, and the iterator
    in place when one is given. Each on its own: a state that does not fit the config is a
    ConfigError saying which fields decide its shapes, and a damaged iterator state is not
    mistaken for one."""
    if data_iter is not None:  # before minutes of restoring the state on a pod
        check_same_processes(manager, step)
    try:
        state = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state))).state
    except (ValueError, KeyError) as e:
        # Orbax names the array and both shapes, deep in its own traceback.
        raise ConfigError(
            f"{manager.directory}: the checkpoint at step {step} does not fit this config's "
            "train state; was the run started with other model sizes, tokenizer vocabulary, "
            "model.scan_layers or optim.mu_dtype (see the workdir's config.json)? "
            f"({type(e).__name__}: {str(e)[:300]})") from e
    if data_iter is not None:
        manager.restore(step, args=ocp.args.Composite(
            iter=grain.checkpoint.CheckpointRestore(data_iter)))
    return state
