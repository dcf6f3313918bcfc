"""`facecaption15m`: face crops of FaceCaption-15M joined with their captions.

The builder class lives in `tfds_builders.facecaption15m.builder`. This package file imports
nothing so that process-pool workers, which import the light `layouts` and `records` modules,
do not pay for importing TensorFlow Datasets.
"""
