"""Evaluators declared in `config.evals.NAME = dict(type=..., every_steps=..., ...)`.

Each runs inside training at its interval (results under keys `NAME/...`) and at the end, and
from `python -m flipjax.evaluate` on a saved checkpoint. An evaluator may read another dataset
than training does: `dataset=`, `builder_config=`, `image_key=`, `text_key=` override
`config.data` fields for it.
"""

from __future__ import annotations

import ml_collections

from flipjax.data.tokenizer import Tokenizer
from flipjax.evaluate.features import Embedder
from flipjax.evaluate.retrieval import RetrievalEvaluator

EVALUATORS = {"retrieval": RetrievalEvaluator}
DATA_OVERRIDES = {"dataset": "name", "builder_config": "builder_config",
                  "image_key": "image_key", "text_key": "text_key", "data_dir": "data_dir"}


def evaluator_data_config(config: ml_collections.ConfigDict,
                          eval_cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    data_cfg = ml_collections.ConfigDict(config.data.to_dict())
    for eval_field, data_field in DATA_OVERRIDES.items():
        if eval_cfg.get(eval_field) is not None:
            data_cfg[data_field] = eval_cfg[eval_field]
    return data_cfg


def make_evaluators(config: ml_collections.ConfigDict, tokenizer: Tokenizer, graphdef,
                    mesh) -> dict:
    """{name: evaluator}; each evaluator has `.run(params) -> {metric: value}`."""
    out = {}
    for name, eval_cfg in config.evals.items():
        data_cfg = evaluator_data_config(config, eval_cfg)
        embedder = Embedder(graphdef, mesh, data_cfg, eval_cfg.get("batch_size", 256))
        out[name] = EVALUATORS[eval_cfg.type](eval_cfg, data_cfg, tokenizer, embedder)
    return out
