"""Loading a training run back: its saved config, tokenizer and a checkpoint's params.

Shared by `python -m flipjax.evaluate`, `python -m flipjax.embed`, `python -m flipjax.export` and
the experiment scripts.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import ml_collections
from absl import logging

from flipjax.config import ConfigError, check
from flipjax.data.tokenizer import Tokenizer
from flipjax.models.two_towers import SIZE_FIELDS, tower_size
from flipjax.storage import storage_path
from flipjax.train import checkpoint
from flipjax.train.sharding import fit_mesh, make_mesh
from flipjax.train.step import TrainSetup

# The run's SentencePiece model, copied into the workdir when training starts.
TOKENIZER_FILE = "tokenizer.model"
# The build of the train split that the checkpoints' data position counts in
# (`flipjax.data.pipeline.split_build`).
TRAIN_DATA_FILE = "train_data.json"


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


# Model fields a checkpoint does not fix: how it is computed, or only how it was initialised
# (whether a learned bias exists is compared, not its initial value).
_FREE_MODEL_FIELDS = ("dtype", "remat", "attention", "temperature_init", "max_temperature",
                      "bias_init")


def _trained_fields(cfg: ml_collections.ConfigDict) -> dict[str, object]:
    """{field: value} of what a checkpoint fixes: every model field but the free ones, each
    tower's size as resolved (a placeholder and the variant's own value are one model) and
    patch, whether a learned bias exists, the input normalisation and the optimizer moments'
    dtype (the optimizer state restores too)."""
    model = cfg.model.to_dict()
    out: dict[str, object] = {f"model.{k}": v for k, v in model.items()
                              if k not in ("image", "text", *_FREE_MODEL_FIELDS)}
    for tower in ("image", "text"):
        size, patch = tower_size(cfg.model[tower], with_patch=tower == "image")
        out.update({f"model.{tower}.{k}": v for k, v in dataclasses.asdict(size).items()})
        out.update({f"model.{tower}.{k}": v for k, v in model[tower].items()
                    if k not in (*SIZE_FIELDS, "variant")})
        if patch is not None:
            out[f"model.{tower}.variant"] = f"patch {patch}"
    out["model.bias_init"] = None if cfg.model.get("bias_init") is None else "a learned bias"
    out["optim.mu_dtype"] = cfg.optim.get("mu_dtype")
    out.update({f"data.{k}": cfg.data.get(k) for k in ("mean", "std")})
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def check_describes_run(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Raises ConfigError naming the first field in which `config` (e.g. `flipjax.evaluate
    --config`) describes another model than the run in `workdir` trained (`_trained_fields`):
    its checkpoint would restore and compute something else (another GELU, mean or pooling),
    or fail inside Orbax. Compute choices (dtype, attention, remat) may differ. A workdir
    without config.json (a checkpoint copied alone) has nothing to compare: logged."""
    if not (storage_path(workdir) / "config.json").exists():
        logging.warning("%s has no config.json: the config cannot be checked against the "
                        "run's", workdir)
        return
    trained, given = _trained_fields(load_workdir_config(workdir)), _trained_fields(config)
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
    onto the shardings training used; the optimizer state comes along but isn't needed.
    `config` must describe the run's model (`check_describes_run`)."""
    check_describes_run(config, workdir)
    axes = fit_mesh(config.mesh, jax.device_count())
    if axes != list(config.mesh):
        logging.warning("config.mesh %s does not fit this machine's %d devices: restoring onto "
                        "%s", list(config.mesh), jax.device_count(), axes)
    mesh = make_mesh(axes)
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
