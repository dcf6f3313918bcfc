"""Loading a training run back: its saved config, tokenizer and a checkpoint's params.

Shared by `python -m flipjax.evaluate`, `python -m flipjax.embed`, `python -m flipjax.export` and
the experiment scripts.
"""

from __future__ import annotations

import json

import ml_collections

from flipjax.config import ConfigError, check
from flipjax.data.tokenizer import Tokenizer
from flipjax.storage import storage_path
from flipjax.train import checkpoint
from flipjax.train.sharding import make_mesh
from flipjax.train.step import TrainSetup

# The run's SentencePiece model, copied into the workdir when training starts.
TOKENIZER_FILE = "tokenizer.model"


def load_workdir_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a run saved as WORKDIR/config.json, with these fields, added since, filled
    in: runs saved before `model.remat` named a policy stored a bool, and had no
    `scan_layers` (nor `attention`, `optim.mu_dtype` or `data.eval_resize`). (Runs older
    than the non-finite step counter in the train state do not restore at all.)"""
    path = storage_path(workdir) / "config.json"
    if not path.exists():
        raise ConfigError(f"{workdir}: no config.json here, so not the workdir of a training run "
                          "(python -m flipjax.main writes it when the run starts)")
    saved = json.loads(path.read_text())
    if not isinstance(saved.get("model"), dict) or "data" not in saved:
        raise ConfigError(f"{path} is not a flipjax run's config (an exported model's?); give "
                          "the training run's workdir")
    saved["data"].setdefault("eval_resize", "center_crop")
    model = saved["model"]
    if isinstance(model.get("remat"), bool):
        model["remat"] = "full" if model["remat"] else "none"
    model.setdefault("scan_layers", False)
    model.setdefault("attention", "auto")
    saved["optim"].setdefault("mu_dtype", None)  # float32 moments, as those runs had
    return ml_collections.ConfigDict(saved)


# Model fields a checkpoint does not fix: how it is computed, or only how it was initialised.
_FREE_MODEL_FIELDS = ("dtype", "remat", "attention", "temperature_init", "max_temperature")


def _leaves(tree: dict, prefix: str) -> dict[str, object]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}"
        out.update(_leaves(value, name) if isinstance(value, dict) else {name: value})
    return out


def check_describes_run(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Raises ConfigError naming the first field in which `config` (e.g. `flipjax.evaluate
    --config`) describes another model or input normalisation than the run in `workdir`
    trained with: its checkpoint would restore and compute something else (another GELU,
    mean or pooling), or fail inside Orbax. Compute choices (dtype, attention, remat) may
    differ."""
    saved = load_workdir_config(workdir)

    def fields(cfg: ml_collections.ConfigDict) -> dict[str, object]:
        model = {k: v for k, v in cfg.model.to_dict().items() if k not in _FREE_MODEL_FIELDS}
        out = _leaves(model, "model")
        out.update({f"data.{k}": cfg.data.get(k) for k in ("mean", "std")})
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    trained, given = fields(saved), fields(config)
    for field in sorted(trained.keys() | given.keys()):
        old, new = trained.get(field), given.get(field)
        check(old == new, field, f"{new!r} differs from {old!r} in {workdir}/config.json, "
              "the run this checkpoint was trained with; a config for it must keep the "
              "run's value")


def tokenizer_path(config: ml_collections.ConfigDict, workdir: str) -> str:
    """The tokenizer a run trained with: the copy training keeps in the workdir, so that a
    relative `tokenizer.path` or a tokenizer retrained since cannot change what ids mean (runs
    from before the copy: `config.tokenizer.path`)."""
    kept = storage_path(workdir) / TOKENIZER_FILE
    if kept.exists():
        return str(kept)
    if not storage_path(config.tokenizer.path).exists():
        raise ConfigError(f"config.tokenizer.path={config.tokenizer.path!r}: no such file, and "
                          f"{workdir} holds no {TOKENIZER_FILE} (runs keep a copy since they "
                          "started to); point it at the run's tokenizer (flipjax.export: "
                          "--tokenizer)")
    return config.tokenizer.path


def restore_params(config: ml_collections.ConfigDict, workdir: str, step: int | None
                   ) -> tuple[dict, int, TrainSetup, Tokenizer]:
    """(params, step, setup, tokenizer) of the checkpoint at `step` (None: latest), restored
    onto the shardings training used; the optimizer state comes along but isn't needed."""
    mesh = make_mesh(config.mesh)
    tokenizer = Tokenizer(tokenizer_path(config, workdir), config.tokenizer.max_len)
    setup = TrainSetup(config, tokenizer.vocab_size, mesh)
    manager = checkpoint.make_manager(workdir, config.checkpoint)
    saved = manager.all_steps()
    step = manager.latest_step() if step is None else step
    if step not in saved:
        raise ConfigError(f"no checkpoint at step {step} in {workdir}/checkpoints; "
                                f"saved steps: {sorted(saved) or 'none'}")
    abstract = checkpoint.abstract_with_shardings(setup.abstract_state, setup.state_shardings)
    state = checkpoint.restore(manager, step, abstract, None)
    manager.close()
    return state["params"], step, setup, tokenizer
