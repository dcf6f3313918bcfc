"""Flax NNX models: the ViT image tower, the text transformer and the two-tower model."""

from flipjax.models.two_towers import TwoTowers, embedding_dims, make_model

__all__ = ["TwoTowers", "embedding_dims", "make_model"]
