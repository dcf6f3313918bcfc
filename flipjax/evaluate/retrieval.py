"""Image<->text retrieval Recall@K over a whole gallery (COCO protocol: any number of captions
per image; an image query is answered if any of its captions is in the top K, a caption query if
its own image is).

Ranks are counted, not sorted: a query's rank is how many gallery items score strictly above its
best correct item (ties are resolved in the query's favour). Scores are computed in blocks of
queries sized from a memory budget, so a 30k-image x 300k-caption gallery never materialises:
with the default 256 MiB budget an image->text block is ~180 rows of 300k float32 scores
(+ a same-shaped bool comparison), where the full matrix would take 36 GB.
"""

from __future__ import annotations

import ml_collections
import numpy as np

from flipjax.data.tokenizer import Tokenizer
from flipjax.evaluate.features import Embedder, embed_split

BLOCK_BYTES = 1 << 28


def block_rows(gallery_size: int, max_bytes: int) -> int:
    """Query rows per block: a row costs 4 bytes of score and 1 byte of comparison per item."""
    return max(1, max_bytes // (5 * max(1, gallery_size)))


def ranks_image_to_text(img: np.ndarray, txt: np.ndarray, caption_owner: np.ndarray,
                        max_bytes: int = BLOCK_BYTES) -> np.ndarray:
    """For each image, how many captions score strictly above its best own caption; images
    without a caption get rank len(txt) (never retrieved)."""
    order = np.argsort(caption_owner, kind="stable")
    sorted_owner = caption_owner[order]
    ranks = np.empty(len(img), np.int64)
    block = block_rows(len(txt), max_bytes)
    for s in range(0, len(img), block):
        e = min(len(img), s + block)
        scores = img[s:e] @ txt.T
        # The best own score comes from this same product, so rounding can't make a caption
        # outrank itself.
        own = order[np.searchsorted(sorted_owner, s): np.searchsorted(sorted_owner, e)]
        best_own = np.full(e - s, -np.inf, scores.dtype)
        np.maximum.at(best_own, caption_owner[own] - s, scores[caption_owner[own] - s, own])
        ranks[s:e] = np.where(np.isfinite(best_own),
                              (scores > best_own[:, None]).sum(axis=1), len(txt))
    return ranks


def ranks_text_to_image(img: np.ndarray, txt: np.ndarray, caption_owner: np.ndarray,
                        max_bytes: int = BLOCK_BYTES) -> np.ndarray:
    """For each caption, how many images score strictly above the image it describes."""
    ranks = np.empty(len(txt), np.int64)
    block = block_rows(len(img), max_bytes)
    for s in range(0, len(txt), block):
        scores = txt[s: s + block] @ img.T
        own = scores[np.arange(len(scores)), caption_owner[s: s + block]]
        ranks[s: s + block] = (scores > own[:, None]).sum(axis=1)
    return ranks


def recall_at_k(img: np.ndarray, txt: np.ndarray, caption_owner: np.ndarray,
                ks: tuple[int, ...] = (1, 5, 10), max_bytes: int = BLOCK_BYTES
                ) -> dict[str, float]:
    """{'i2t_R@1': ..., 't2i_R@1': ..., ..., 'mean_R': ...} in percent; image queries are the
    images that have at least one caption."""
    has_caption = np.bincount(caption_owner, minlength=len(img)) > 0
    i2t = ranks_image_to_text(img, txt, caption_owner, max_bytes)[has_caption]
    t2i = ranks_text_to_image(img, txt, caption_owner, max_bytes)
    out = {}
    for k in ks:
        out[f"i2t_R@{k}"] = 100.0 * float(np.mean(i2t < k))
        out[f"t2i_R@{k}"] = 100.0 * float(np.mean(t2i < k))
    out["mean_R"] = float(np.mean(list(out.values())))
    return out


class RetrievalEvaluator:
    """Recall@K of a split's images against its captions (one `text_key` string or a list)."""

    def __init__(self, cfg: ml_collections.ConfigDict, data_cfg: ml_collections.ConfigDict,
                 tokenizer: Tokenizer, embedder: Embedder,
                 cache_dir: str | None = None):
        del cache_dir  # Text embeddings depend on the tokenizer too; retrieval is cheap to redo.
        self.cfg, self.data_cfg, self.tokenizer, self.embedder = cfg, data_cfg, tokenizer, embedder

    def run(self, params: dict, step: int | None = None) -> dict[str, float]:
        del step
        emb = embed_split(self.embedder, params, self.data_cfg, self.cfg.split, self.tokenizer,
                          text_key=self.cfg.get("text_key", self.data_cfg.text_key))
        return recall_at_k(emb["image"], emb["text"], emb["caption_owner"])
