"""Evaluators declared in `config.evals.NAME = dict(type=..., every_steps=..., ...)`.

Each runs inside training at its interval (results under keys `NAME/...`) and at the end, and
from `python -m flipjax.evaluate` on a saved checkpoint. An evaluator may read another dataset
than training does: `dataset=`, `builder_config=`, `image_key=`, `text_key=` override
`config.data` fields for it.
"""

from __future__ import annotations

import ml_collections

from flipjax.data.tokenizer import Tokenizer
from flipjax.evaluate.features import Embedder, model_fingerprint
from flipjax.evaluate.linear_probe import LinearProbeEvaluator
from flipjax.evaluate.retrieval import RetrievalEvaluator
from flipjax.evaluate.zeroshot import ZeroShotAttributesEvaluator

EVALUATORS = {"retrieval": RetrievalEvaluator, "linear_probe": LinearProbeEvaluator,
              "zeroshot_attributes": ZeroShotAttributesEvaluator}
DATA_OVERRIDES = {"dataset": "name", "builder_config": "builder_config",
                  "image_key": "image_key", "text_key": "text_key", "data_dir": "data_dir",
                  "attribute_names": "attribute_names"}


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


def make_evaluators(config: ml_collections.ConfigDict, tokenizer: Tokenizer, graphdef,
                    mesh, cache_dir: str | None = None) -> dict:
    """{name: evaluator}; each evaluator has `.run(params, step=None) -> {metric: value}`.

    With `cache_dir` (e.g. WORKDIR/features) image features are cached on disk per checkpoint
    step, which `run` then needs to be given.
    """
    out = {}
    for name, eval_cfg in config.evals.items():
        data_cfg = evaluator_data_config(config, eval_cfg)
        embedder = Embedder(graphdef, mesh, data_cfg, eval_cfg.get("batch_size", 256),
                            fingerprint=model_fingerprint(config.model, data_cfg))
        out[name] = EVALUATORS[eval_cfg.type](eval_cfg, data_cfg, tokenizer, embedder,
                                              cache_dir=cache_dir)
    return out
