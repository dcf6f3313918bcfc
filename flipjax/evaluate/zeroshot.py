"""Zero-shot attribute classification: no training, only prompts.

For each attribute the image is called positive if its embedding is closer (cosine) to the
positive prompt set than to the negative one; each set is the mean of its L2-normalised prompt
embeddings, renormalised (prompt ensembling). Reports accuracy per attribute, their mean and
the mean balanced accuracy, which is what separates a real signal from always answering the
majority side on rare attributes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import ml_collections
import numpy as np
from absl import logging

from flipjax.data.pipeline import data_source
from flipjax.data.tokenizer import Tokenizer
from flipjax.evaluate.features import Embedder, image_features
from flipjax.evaluate.linear_probe import multilabel_metrics
from flipjax.evaluate.prompts import attribute_names, prompts_for


def ensemble(text_emb: np.ndarray) -> np.ndarray:
    """Mean of L2-normalised prompt embeddings, renormalised."""
    z = text_emb / np.linalg.norm(text_emb, axis=-1, keepdims=True)
    mean = z.mean(axis=0)
    return mean / np.linalg.norm(mean)


def zeroshot_predict(image_emb: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """(N, A) 0/1 predictions from (A, D) positive and negative class embeddings."""
    return (image_emb @ pos.T > image_emb @ neg.T).astype(np.int32)


def class_embeddings(embed_texts: Callable[[list[str]], np.ndarray], names: Sequence[str]
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(A, D) ensembled positive and negative embeddings; `embed_texts` maps list[str] to
    (n, D) embeddings and is called once for all prompts."""
    sets = [prompts_for(n) for n in names]
    flat = [p for pos, neg in sets for p in pos + neg]
    emb = embed_texts(flat)
    pos, neg, i = [], [], 0
    for p, n in sets:
        pos.append(ensemble(emb[i: i + len(p)]))
        neg.append(ensemble(emb[i + len(p): i + len(p) + len(n)]))
        i += len(p) + len(n)
    return np.stack(pos), np.stack(neg)


@dataclasses.dataclass(frozen=True)
class ZeroShotConfig:
    """A `zeroshot_attributes` evaluator's fields (`config.evals.NAME`), with their defaults."""

    split: str = "test"
    label_key: str = "attributes"
    attributes: tuple[str, ...] = ()  # the names to score; empty: all the dataset's


class ZeroShotAttributesEvaluator:
    """`type="zeroshot_attributes"`: the fields of `ZeroShotConfig`."""

    Config = ZeroShotConfig

    @staticmethod
    def reads(cfg: ZeroShotConfig, data_cfg: ml_collections.ConfigDict
              ) -> list[tuple[str, str, dict[str, str]]]:
        """(split field, split, {key field: feature}) of the records `run` reads."""
        return [("split", cfg.split,
                 {"image_key": data_cfg.image_key, "label_key": cfg.label_key})]

    def __init__(self, cfg: ZeroShotConfig, data_cfg: ml_collections.ConfigDict,
                 tokenizer: Tokenizer, embedder: Embedder,
                 cache_dir: str | None = None):
        self.cfg, self.data_cfg, self.tokenizer, self.embedder = cfg, data_cfg, tokenizer, embedder
        self.cache_dir = cache_dir
        label = data_source(data_cfg, cfg.split).dataset_info.features[cfg.label_key]
        self.names = attribute_names(data_cfg, label.shape[0], cfg.split)
        unknown = [n for n in cfg.attributes if n not in self.names]
        if unknown:
            raise ValueError(f"attributes {unknown} are not attributes of dataset "
                             f"{data_cfg.name!r}, which has {self.names}")
        # Checked here, not at the first evaluation (which would stop a training run).
        try:
            prompts = {n: prompts_for(n) for n in self.names
                       if not cfg.attributes or n in cfg.attributes}
        except KeyError as e:
            raise ValueError(e.args[0]) from None
        # A prompt cut to max_len can lose the words that tell it from its opposite.
        cut = sorted({n for n, sets in prompts.items() for p in sets[0] + sets[1]
                      if not tokenizer.fits(p)})
        if cut:
            logging.warning("zero-shot prompts of %s are longer than the text length %d and "
                            "are cut: their positive and negative prompts may read alike",
                            cut, tokenizer.max_len)

    def run(self, params: dict, step: int | None = None) -> dict[str, float]:
        cfg = self.cfg
        data = image_features(self.embedder, params, self.data_cfg, cfg.split, cfg.label_key,
                              cache_dir=self.cache_dir, step=step)
        keep = [i for i, n in enumerate(self.names)
                if not cfg.attributes or n in cfg.attributes]
        names = [self.names[i] for i in keep]
        pos, neg = class_embeddings(
            lambda texts: self.embedder.texts(params, self.tokenizer.encode_batch(texts)), names)
        pred = zeroshot_predict(data["features"], pos, neg)
        return multilabel_metrics(pred, data["labels"][:, keep], names)
