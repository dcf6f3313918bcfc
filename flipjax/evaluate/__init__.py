"""Evaluators declared in `config.evals.NAME = dict(type=..., every_steps=..., ...)`.

Each runs inside training at its interval (results under keys `NAME/...`) and at the end, and
from `python -m flipjax.evaluate` on a saved checkpoint. An evaluator may read another dataset
than training does: `dataset=`, `builder_config=`, `data_dir=`, `image_key=`, `text_key=` and
`eval_resize=` (how its images are brought to the model's size: "center_crop" or "squash" as
FLIP evaluates CelebA) override those `config.data` fields for it, and `attribute_names=` names
its attributes where the dataset's metadata does not (`DATA_OVERRIDES`).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import ml_collections
from absl import logging
from flax import nnx
from jax.sharding import Mesh

from flipjax.config import ConfigError
from flipjax.data.pipeline import data_source
from flipjax.data.tokenizer import Tokenizer
from flipjax.evaluate.features import Embedder, model_fingerprint
from flipjax.evaluate.linear_probe import LinearProbeEvaluator
from flipjax.evaluate.retrieval import RetrievalEvaluator
from flipjax.evaluate.zeroshot import ZeroShotAttributesEvaluator

# Images per evaluation batch where an evaluator's `batch_size` does not say.
EVAL_BATCH_SIZE = 256
EVALUATORS = {"retrieval": RetrievalEvaluator, "linear_probe": LinearProbeEvaluator,
              "zeroshot_attributes": ZeroShotAttributesEvaluator}
# Fields every evaluator takes; each type adds its own (its `Config` dataclass).
COMMON_FIELDS = ("type", "every_steps", "batch_size")
DATA_OVERRIDES = {"dataset": "name", "builder_config": "builder_config",
                  "image_key": "image_key", "text_key": "text_key", "data_dir": "data_dir",
                  "attribute_names": "attribute_names", "eval_resize": "eval_resize"}


def evaluator_data_config(config: ml_collections.ConfigDict,
                          eval_cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    data_cfg = ml_collections.ConfigDict(config.data.to_dict())
    if eval_cfg.get("dataset") not in (None, data_cfg.name):
        # Another dataset: the training set's builder config (e.g. synthetic "tiny") doesn't
        # apply to it.
        data_cfg.builder_config = None
    for eval_field, data_field in DATA_OVERRIDES.items():
        if eval_cfg.get(eval_field) is not None:
            data_cfg[data_field] = eval_cfg[eval_field]
    return data_cfg


def evaluator_config(name: str, eval_cfg: ml_collections.ConfigDict) -> Any:
    """The evaluator's own fields of `config.evals.NAME` as its type's `Config` dataclass,
    defaults filled in (a None, an unset placeholder, takes the default too; sequences become
    tuples, as a config read back from JSON holds lists).

    A field that is not one of its type's is a ConfigError: misspelt, it would otherwise
    leave its default in force, unnoticed. So is a missing required field, or a value the
    dataclass refuses."""
    prefix = f"config.evals.{name}"
    config_cls = EVALUATORS[eval_cfg.type].Config
    own = [f.name for f in dataclasses.fields(config_cls)]
    known = (*COMMON_FIELDS, *DATA_OVERRIDES, *own)
    for field in eval_cfg:
        if field not in known:
            close = difflib.get_close_matches(field, known, n=1)
            raise ConfigError(f"{prefix}.{field}: not a field of a {eval_cfg.type!r} evaluator"
                              + (f" (did you mean {close[0]!r}?)" if close else "")
                              + f"; its fields: {sorted(known)}")
    values = {k: tuple(v) if isinstance(v, list | tuple) else v
              for k, v in eval_cfg.items() if k in own and v is not None}
    for field in dataclasses.fields(config_cls):
        if field.name not in values and field.default is dataclasses.MISSING:
            raise ConfigError(f"{prefix}.{field.name}: required by a {eval_cfg.type!r} "
                              "evaluator, and not set")
    try:
        return config_cls(**values)
    except ValueError as e:
        raise ConfigError(f"{prefix}: {e}") from None


def make_evaluators(config: ml_collections.ConfigDict, tokenizer: Tokenizer,
                    graphdef: nnx.GraphDef, mesh: Mesh, cache_dir: str | None = None,
                    interrupted: Callable[[], bool] = lambda: False) -> dict:
    """{name: evaluator}; each evaluator has `.run(params, step=None) -> {metric: value}`.

    With `cache_dir` (e.g. WORKDIR/features) image features are cached on disk per checkpoint
    step, which `run` then needs to be given. `run` raises `EvaluationInterruptedError` at the
    next batch it embeds once `interrupted()` is true (a training run's preemption notice).

    Each evaluator's fields are checked against those of its type (`evaluator_config`), and
    every split it reads is opened and checked for records and the features it needs: a typo
    stops the run before training rather than at the first evaluation.
    """
    out = {}
    for name, eval_cfg in config.evals.items():
        data_cfg = evaluator_data_config(config, eval_cfg)
        evaluator_cls = EVALUATORS[eval_cfg.type]
        fields = evaluator_config(name, eval_cfg)
        prefix = f"config.evals.{name}"
        for field, split, keys in evaluator_cls.reads(fields, data_cfg):
            data_source(data_cfg, split, f"{prefix}.{field}",
                        {f"{prefix}.{key_field}": key for key_field, key in keys.items()})
        embedder = Embedder(graphdef, mesh, data_cfg,
                            eval_cfg.get("batch_size") or EVAL_BATCH_SIZE,
                            fingerprint=model_fingerprint(config.model, data_cfg),
                            interrupted=interrupted)
        try:
            out[name] = evaluator_cls(fields, data_cfg, tokenizer, embedder, cache_dir=cache_dir)
        except ValueError as e:
            raise ConfigError(f"{prefix}: {e}") from e
    return out


def run_evaluators(evaluators: dict, params: dict, step: int, names: set[str] | None = None
                   ) -> Iterator[dict[str, float]]:
    """Runs the evaluators named in `names` (default: all) on `params` at checkpoint `step`,
    yielding each one's results as {"NAME/metric": value} (also logged) when it finishes: a
    caller keeps those of the evaluators that ran before one that fails."""
    for name, evaluator in evaluators.items():
        if names is None or name in names:
            results = {f"{name}/{k}": v for k, v in evaluator.run(params, step=step).items()}
            logging.info("step %d eval: %s", step, json.dumps(results))
            yield results


def missing_evaluations(evals: ml_collections.ConfigDict, step: int, total_steps: int,
                        logged: Mapping[str, float]) -> set[str]:
    """The evaluators due at checkpoint `step` (every one at the last step) whose results
    `logged` (that step's metrics line) lacks: a run that stopped while evaluating a step
    it had saved reruns them when it resumes from that step, rather than skipping them."""
    due = {n for n, e in evals.items() if step % e.every_steps == 0 or step >= total_steps}
    return {n for n in due if not any(k.startswith(f"{n}/") for k in logged)}
