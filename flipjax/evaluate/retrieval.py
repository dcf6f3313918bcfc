"""Image<->text retrieval Recall@K over a whole gallery (COCO protocol: any number of captions
per image; an image query is answered if any of its captions is in the top K, a caption query if
its own image is).

Ranks are counted, not sorted. For each query we count the gallery items scoring above its best
correct item and the items tied with it (within `TIE_TOLERANCE`), and report the recall expected
when ties are broken uniformly at random. Ties are common in face caption sets: attribute
captions such as "She is smiling." repeat word for word across images, and identical strings
embed identically; a collapsed tower ties everything. Counting ties for the query would score a
text tower that ignores its input at 100% image->text R@1; counting them against it would
penalise a model for a gallery's duplicates. The expected value gives the constant tower chance
level and splits a duplicate's credit evenly. Scores are computed in blocks of queries sized
from a memory budget, so a 30k-image x 300k-caption gallery never materialises: with the default
256 MiB budget an image->text block is ~180 rows of 300k float32 scores (+ a same-shaped bool
comparison), where the full matrix would take 36 GB.
"""

from __future__ import annotations

import dataclasses

import ml_collections
import numpy as np

from flipjax.data.tokenizer import Tokenizer
from flipjax.evaluate.features import Embedder, embed_split

BLOCK_BYTES = 1 << 28


# Scores (cosine similarities) this close count as tied: identical embeddings can come out of
# a matrix product a few float32 roundings apart (a one-row block, the edge of a tile).
TIE_TOLERANCE = 1e-6


def block_rows(gallery_size: int, max_bytes: int) -> int:
    """Query rows per block: a row costs 4 bytes of score and 1 byte of comparison per item."""
    return max(1, max_bytes // (5 * max(1, gallery_size)))


def _tolerance(best: np.ndarray) -> np.ndarray:
    return np.where(np.isfinite(best), TIE_TOLERANCE * np.maximum(1.0, np.abs(best)), 0.0)


def _count_above_and_level(scores: np.ndarray, best: np.ndarray
                           ) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the items scoring above `best` and those within its tie tolerance (including
    the correct items themselves). Overwrites `scores`, so a block needs no second array."""
    tol = _tolerance(best)[:, None]
    scores -= best[:, None]
    above = (scores > tol).sum(axis=1)
    np.abs(scores, out=scores)
    return above, (scores <= tol).sum(axis=1)


@dataclasses.dataclass(frozen=True)
class Ranks:
    """Where each query's correct answers land in the gallery, ties kept apart.

    `above`: items scoring strictly above the query's best correct item; `tied`: other items
    scoring the same as it; `tied_own`: correct items with that best score (1 or more; 0 for a
    query with no correct item, which is never answered).
    """

    above: np.ndarray
    tied: np.ndarray
    tied_own: np.ndarray

    def hit_rate(self, k: int) -> np.ndarray:
        """Per query, the probability that a correct item is in the top `k` when tied items are
        ordered uniformly at random.

        The `tied + tied_own` items take places `above`, `above + 1`, ... in random order; the
        query misses when the first `k - above` of them are all wrong, with probability
        prod_{i < k - above} (tied - i) / (tied + tied_own - i).
        """
        slots = k - self.above
        tied = self.tied.astype(np.float64)
        total = tied + self.tied_own
        miss = np.ones(len(self.above))
        for i in range(k):
            factor = np.clip(tied - i, 0, None) / np.maximum(total - i, 1)
            miss *= np.where(i < slots, factor, 1.0)
        return np.where((slots > 0) & (self.tied_own > 0), 1.0 - miss, 0.0)


def ranks_image_to_text(img: np.ndarray, txt: np.ndarray, caption_owner: np.ndarray,
                        max_bytes: int = BLOCK_BYTES) -> Ranks:
    """For each image, the captions above, and tied with, its best own caption."""
    order = np.argsort(caption_owner, kind="stable")
    sorted_owner = caption_owner[order]
    above, tied, tied_own = (np.zeros(len(img), np.int64) for _ in range(3))
    block = block_rows(len(txt), max_bytes)
    for s in range(0, len(img), block):
        e = min(len(img), s + block)
        scores = img[s:e] @ txt.T
        # The best own score comes from this same product, so rounding can't make a caption
        # outrank itself.
        own = order[np.searchsorted(sorted_owner, s): np.searchsorted(sorted_owner, e)]
        rows = caption_owner[own] - s
        best_own = np.full(e - s, -np.inf, scores.dtype)
        np.maximum.at(best_own, rows, scores[rows, own])
        own_gap = np.abs(scores[rows, own] - best_own[rows])
        np.add.at(tied_own[s:e], rows, own_gap <= _tolerance(best_own)[rows])
        above[s:e], level = _count_above_and_level(scores, best_own)
        tied[s:e] = level - tied_own[s:e]
    return Ranks(above, tied, tied_own)


def ranks_text_to_image(img: np.ndarray, txt: np.ndarray, caption_owner: np.ndarray,
                        max_bytes: int = BLOCK_BYTES) -> Ranks:
    """For each caption, the images above, and tied with, the image it describes."""
    above, tied = np.empty(len(txt), np.int64), np.empty(len(txt), np.int64)
    block = block_rows(len(img), max_bytes)
    for s in range(0, len(txt), block):
        scores = txt[s: s + block] @ img.T
        own = scores[np.arange(len(scores)), caption_owner[s: s + block]]
        above[s: s + block], level = _count_above_and_level(scores, own)
        tied[s: s + block] = level - 1
    return Ranks(above, tied, np.ones(len(txt), np.int64))


def recall_at_k(img: np.ndarray, txt: np.ndarray, caption_owner: np.ndarray,
                ks: tuple[int, ...] = (1, 5, 10), max_bytes: int = BLOCK_BYTES
                ) -> dict[str, float]:
    """{'i2t_R@1': ..., 't2i_R@1': ..., ..., 'mean_R': ...} in percent, and the numbers of
    images and captions ranked; image queries are the images that have at least one caption.
    Non-finite embeddings (a diverged checkpoint) raise ValueError rather than rank in some
    arbitrary way."""
    for name, emb in (("image", img), ("text", txt)):
        if not np.isfinite(emb).all():
            bad = int((~np.isfinite(emb).all(axis=1)).sum())
            raise ValueError(f"{bad} of {len(emb)} {name} embeddings hold NaN or Inf; "
                             "retrieval needs finite embeddings (is the checkpoint diverged?)")
    has_caption = np.bincount(caption_owner, minlength=len(img)) > 0
    i2t = ranks_image_to_text(img, txt, caption_owner, max_bytes)
    t2i = ranks_text_to_image(img, txt, caption_owner, max_bytes)
    out = {}
    for k in ks:
        out[f"i2t_R@{k}"] = 100.0 * float(np.mean(i2t.hit_rate(k)[has_caption]))
        out[f"t2i_R@{k}"] = 100.0 * float(np.mean(t2i.hit_rate(k)))
    out["mean_R"] = float(np.mean(list(out.values())))
    # How many were ranked: recall over a handful of images is near 100% whatever the model.
    out.update(num_images=float(has_caption.sum()), num_captions=float(len(txt)))
    return out


@dataclasses.dataclass(frozen=True)
class RetrievalConfig:
    """A `retrieval` evaluator's fields (`config.evals.NAME`)."""

    split: str


class RetrievalEvaluator:
    """Recall@K of a split's images against its captions (one `text_key` string or a list)."""

    Config = RetrievalConfig

    @staticmethod
    def reads(cfg: RetrievalConfig, data_cfg: ml_collections.ConfigDict
              ) -> list[tuple[str, str, dict[str, str]]]:
        """(split field, split, {key field: feature}) of the records `run` reads."""
        return [("split", cfg.split,
                 {"image_key": data_cfg.image_key, "text_key": data_cfg.text_key})]

    def __init__(self, cfg: RetrievalConfig, data_cfg: ml_collections.ConfigDict,
                 tokenizer: Tokenizer, embedder: Embedder,
                 cache_dir: str | None = None):
        del cache_dir  # Text embeddings depend on the tokenizer too; retrieval is cheap to redo.
        self.cfg, self.data_cfg, self.tokenizer, self.embedder = cfg, data_cfg, tokenizer, embedder

    def run(self, params: dict, step: int | None = None) -> dict[str, float]:
        del step
        emb = embed_split(self.embedder, params, self.data_cfg, self.cfg.split, self.tokenizer,
                          text_key=self.data_cfg.text_key)
        return recall_at_k(emb["image"], emb["text"], emb["caption_owner"])
