"""Image<->text retrieval Recall@K over a whole gallery (COCO protocol: any number of captions
per image; an image query is answered if any of its captions is in the top K).

Scores are computed in blocks of queries, so a 30k x 300k gallery never materialises.
"""

from __future__ import annotations

import numpy as np

from flipjax.evaluate.features import Embedder, embed_split


def ranks_image_to_text(img: np.ndarray, txt: np.ndarray, caption_owner: np.ndarray,
                        block: int = 1024) -> np.ndarray:
    """For each image, how many captions score strictly above its best own caption."""
    ranks = np.empty(len(img), np.int64)
    for s in range(0, len(img), block):
        scores = img[s: s + block] @ txt.T
        own = caption_owner[None, :] == np.arange(s, s + len(scores))[:, None]
        best_own = np.where(own, scores, -np.inf).max(axis=1)
        ranks[s: s + block] = (scores > best_own[:, None]).sum(axis=1)
    return ranks


def ranks_text_to_image(img: np.ndarray, txt: np.ndarray, caption_owner: np.ndarray,
                        block: int = 4096) -> np.ndarray:
    """For each caption, how many images score strictly above the image it describes."""
    ranks = np.empty(len(txt), np.int64)
    for s in range(0, len(txt), block):
        scores = txt[s: s + block] @ img.T
        own = scores[np.arange(len(scores)), caption_owner[s: s + block]]
        ranks[s: s + block] = (scores > own[:, None]).sum(axis=1)
    return ranks


def recall_at_k(img: np.ndarray, txt: np.ndarray, caption_owner: np.ndarray,
                ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """{'i2t_R@1': ..., 't2i_R@1': ..., ...} in percent."""
    i2t = ranks_image_to_text(img, txt, caption_owner)
    t2i = ranks_text_to_image(img, txt, caption_owner)
    out = {}
    for k in ks:
        out[f"i2t_R@{k}"] = 100.0 * float(np.mean(i2t < k))
        out[f"t2i_R@{k}"] = 100.0 * float(np.mean(t2i < k))
    return out


class RetrievalEvaluator:
    """Recall@K of a split's images against its captions."""

    def __init__(self, cfg, data_cfg, tokenizer, embedder: Embedder):
        self.cfg, self.data_cfg, self.tokenizer, self.embedder = cfg, data_cfg, tokenizer, embedder

    def run(self, params: dict) -> dict[str, float]:
        emb = embed_split(self.embedder, params, self.data_cfg, self.cfg.split, self.tokenizer,
                          text_key=self.cfg.get("text_key", self.data_cfg.text_key))
        return recall_at_k(emb["image"], emb["text"], emb["caption_owner"])
