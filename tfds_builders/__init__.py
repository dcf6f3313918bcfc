"""TFDS dataset builders for flipjax, written as ArrayRecord so that reading needs no TensorFlow.

Build from the command line (see `python -m tfds_builders --help`) or from Python with `build()`.
Once built, a dataset is read with plain TFDS and no builder code, e.g.
`tfds.data_source("synthetic_faces/tiny", split="train", data_dir=DIR)`.

Builders are listed in `BUILDERS` as "module:ClassName" strings and imported only when used, so
importing this package stays cheap (no TFDS import). Every builder class listed here must accept
a `num_workers: int` keyword argument in its constructor (it may ignore it).
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import tensorflow_datasets as tfds

BUILDERS: dict[str, str] = {
    "synthetic_faces": "tfds_builders.synthetic_faces:SyntheticFaces",
    "facecaption15m": "tfds_builders.facecaption15m.builder:FaceCaption15M",
    "celeba": "tfds_builders.celeba:CelebA",
    "lfwa": "tfds_builders.lfwa:LFWA",
    "mm_celeba_hq": "tfds_builders.mm_celeba_hq:MMCelebAHQ",
    "celeba_dialog": "tfds_builders.celeba_dialog:CelebADialog",
}


def builder_class(name: str) -> type[tfds.core.DatasetBuilder]:
    """Imports and returns the builder class registered under `name` in `BUILDERS`."""
    if name not in BUILDERS:
        raise ValueError(f"unknown builder {name!r}; known builders: {', '.join(sorted(BUILDERS))}")
    module_name, class_name = BUILDERS[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


# Fields every TFDS BuilderConfig has that version and describe a config, not shape its data.
_TFDS_CONFIG_FIELDS = frozenset({"version", "release_notes", "supported_versions",
                                 "description", "tags"})


# The annotations builder configs use (as strings: their modules postpone annotations).
_ANNOTATED_TYPES = {"str": str, "int": int, "float": float, "bool": bool, "None": type(None)}


def _tuples(value: object) -> object:
    """Lists, nested ones too, as tuples: what `ast.literal_eval` gives for [...]."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list | tuple) else value


def _field_value(config: tfds.core.BuilderConfig, field: str, text: str) -> object:
    """`text` as a value of `config`'s `field`, read as its declared type: a field that may
    be text takes the text as it is ("2024" stays a folder name; "None" is None where the
    field may be None), another field a Python literal ("0.3", "(('a', 1.0),)") of its type,
    an int standing for a float and a list for a tuple; any other type is a ValueError
    naming the field. A field of an annotation not listed here takes any literal."""
    declared = next(f.type for f in dataclasses.fields(config) if f.name == field)
    kinds = [kind.strip() for kind in str(declared).split("|")]
    known = all(k in _ANNOTATED_TYPES or k.startswith("tuple[") for k in kinds)
    types = tuple(tuple if k.startswith("tuple[") else _ANNOTATED_TYPES[k] for k in kinds
                  ) if known else ()
    if str in types and not (text == "None" and type(None) in types):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    if float in types and type(value) is int:
        value = float(value)
    if tuple in types and isinstance(value, list):
        value = _tuples(value)
    if types and (not isinstance(value, types) or (type(value) is bool and bool not in types)):
        raise ValueError(f"{field}={text!r} is {type(value).__name__} {value!r}; the field "
                         f"is declared {declared}")
    return value


def configured(name: str, config: str | None, overrides: dict[str, str]
               ) -> tfds.core.BuilderConfig:
    """Builder `name`'s config `config` (default: its first) with `overrides` (field -> text,
    read as the field's type: `_field_value`) set. The config's own checks run on the new
    values.

    `overrides` must give the result a `name` of its own: TFDS keeps one config per name, and
    the dataset is written and read under it (`NAME/CONFIG_NAME`, flipjax's
    `data.builder_config`)."""
    configs = builder_class(name).BUILDER_CONFIGS
    by_name = {c.name: c for c in configs}
    if not configs or (config is not None and config not in by_name):
        raise ValueError(f"{name} has no builder config {config!r} to set fields of; its "
                         f"configs: {', '.join(by_name) or 'none'}")
    base = by_name[config] if config is not None else configs[0]
    settable = {f.name for f in dataclasses.fields(base) if f.init} - _TFDS_CONFIG_FIELDS
    unknown = sorted(set(overrides) - settable)
    if unknown:
        raise ValueError(f"{name} config {base.name!r} has no field {', '.join(unknown)}; "
                         f"settable: {', '.join(sorted(settable))}")
    new_name = overrides.get("name")
    if new_name is None or new_name in by_name:
        raise ValueError(f"set a new config name with name=NAME too (not one of "
                         f"{', '.join(by_name)}): the dataset is written and read under it")
    values = {k: _field_value(base, k, v) for k, v in overrides.items()}
    changed = ", ".join(f"{k}={v!r}" for k, v in values.items() if k != "name")
    return dataclasses.replace(base, description=f"{base.description} With {changed}.",
                               **values)


def build(name: str, data_dir: str, manual_dir: str | None = None, num_workers: int = 1,
          config: str | tfds.core.BuilderConfig | None = None,
          beam_pipeline_options: str | None = None) -> tfds.core.DatasetBuilder:
    """Builds dataset `name` (config `config`: a name, a config object such as `configured`
    returns, or None for the default) into `data_dir`.

    The dataset is written as ArrayRecord, which supports random access through
    `tfds.data_source` / Grain without TensorFlow. An already built dataset is reused, so this is
    cheap to call at the start of every training run. `manual_dir` is where builders look for
    files that must be downloaded by hand (e.g. licensed face datasets). `num_workers` > 1 starts
    "spawn" worker processes, so a calling script needs the usual `if __name__ == "__main__":`
    guard. `beam_pipeline_options` ("runner=DataflowRunner,project=P,...") builds through Apache
    Beam instead, for builders that support it (facecaption15m).
    """
    import tensorflow_datasets as tfds

    builder = builder_class(name)(
        data_dir=data_dir, config=config, file_format="array_record", num_workers=num_workers)
    beam_options = None
    if beam_pipeline_options:
        from apache_beam.options.pipeline_options import PipelineOptions

        beam_options = PipelineOptions([f"--{o}" for o in beam_pipeline_options.split(",") if o])
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=manual_dir, try_download_gcs=False, beam_options=beam_options))
    return builder
