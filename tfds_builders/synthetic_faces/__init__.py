"""`synthetic_faces`: procedurally rendered faces with attributes and captions (see builder)."""

from tfds_builders.synthetic_faces.attributes import ATTRIBUTE_NAMES
from tfds_builders.synthetic_faces.synthetic_faces import SyntheticFaces

__all__ = ["ATTRIBUTE_NAMES", "SyntheticFaces"]
