"""Loading a training run back: its saved config and a checkpoint's params.

Shared by `python -m flipjax.evaluate`, `python -m flipjax.embed`, `python -m flipjax.export` and
the experiment scripts.
"""

from __future__ import annotations

import json

import ml_collections

from flipjax.data.tokenizer import Tokenizer
from flipjax.storage import storage_path
from flipjax.train import checkpoint
from flipjax.train.sharding import make_mesh
from flipjax.train.step import TrainSetup


def load_workdir_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a run saved as WORKDIR/config.json, with fields added since filled in:
    runs saved before `model.remat` named a policy stored a bool, and had no `scan_layers`
    (nor `attention`)."""
    saved = json.loads((storage_path(workdir) / "config.json").read_text())
    model = saved["model"]
    if isinstance(model.get("remat"), bool):
        model["remat"] = "full" if model["remat"] else "none"
    model.setdefault("scan_layers", False)
    model.setdefault("attention", "auto")
    return ml_collections.ConfigDict(saved)


def restore_params(config: ml_collections.ConfigDict, workdir: str, step: int | None
                   ) -> tuple[dict, int, TrainSetup, Tokenizer]:
    """(params, step, setup, tokenizer) of the checkpoint at `step` (None: latest), restored
    onto the shardings training used; the optimizer state comes along but isn't needed."""
    mesh = make_mesh(config.mesh)
    tokenizer = Tokenizer(config.tokenizer.path, config.tokenizer.max_len)
    setup = TrainSetup(config, tokenizer.vocab_size, mesh)
    manager = checkpoint.make_manager(workdir, config.checkpoint)
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints")
    abstract = checkpoint.abstract_with_shardings(setup.abstract_state, setup.state_shardings)
    state = checkpoint.restore(manager, step, abstract, None)
    manager.close()
    return state["params"], step, setup, tokenizer
