"""Apache Beam version of the FaceCaption-15M build, for Dataflow, Spark, Flink or DirectRunner.

The local build holds an `_id` -> image index in memory; here the join is a CoGroupByKey, so
nothing scales with the dataset on any single machine. Per split:

    parquet row groups --ReadRows--> (_id, Row | None) --\
                                                          CoGroupByKey --Pair, CropFaces--> examples
    img2dataset shards --IndexShards--> (_id, ImageRef) -/

For img2dataset's parquet output the (row, image) pairs are grouped by image row group before
cropping, so that each group is read once.

The row and image checks are the functions of `records` and `layouts`, as in the local build,
so both modes write the same records. Skip reasons are Beam counters in the builder's
namespace (named as in `builder_utils`), which the builder turns into `skipped.json`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics

from tfds_builders.builder_utils import IGNORED, RECORDS_READ, SKIPPED
from tfds_builders.face_crop import DUPLICATE_ID, Skip, capture_skip
from tfds_builders.facecaption15m import layouts, records


class _ReadRows(beam.DoFn):
    """Row group -> (_id, Row) for usable rows of the split, (_id, None) for rejected ones.

    The None markers let the join tell "image of a rejected row" from "image of no row".
    """

    def __init__(self, namespace: str, columns: Sequence[str], split: str,
                 split_fractions: Sequence[tuple[str, float]]) -> None:
        self._namespace = namespace
        self._columns = tuple(columns)
        self._split = split
        self._fractions = tuple(split_fractions)

    def process(self, group: records.RowGroup) -> Iterator[tuple[str, records.Row | None]]:
        read = Metrics.counter(self._namespace, RECORDS_READ)
        for row_index, cells in records.read_rows(group, self._columns, self._split,
                                                  self._fractions):
            read.inc()
            sample_id = None
            try:
                sample_id = records.row_id(cells)
                row = records.parse_row(row_index, sample_id, cells)
            except Skip as e:
                Metrics.counter(self._namespace, f"{SKIPPED}/{e.reason}").inc()
                if sample_id is not None:
                    yield sample_id, None
                continue
            yield sample_id, row


class _IndexShards(beam.DoFn):
    """img2dataset shard -> (_id, ImageRef) for the images whose `_id` hashes to the split."""

    def __init__(self, namespace: str, layout: str, split: str,
                 split_fractions: Sequence[tuple[str, float]], count_problems: bool) -> None:
        self._namespace = namespace
        self._layout = layout
        self._split = split
        self._fractions = tuple(split_fractions)
        self._count_problems = count_problems

    def process(self, shard: str) -> Iterator[tuple[str, layouts.ImageRef]]:
        index = layouts.index_shard(shard, self._layout)
        if self._count_problems:  # Every split reads every shard; count problems only once.
            for reason, n in index.ignored.items():
                Metrics.counter(self._namespace, f"{IGNORED}/{reason}").inc(n)
        for sample_id, ref in index.entries:
            if records.split_of(records.id_bytes(sample_id), self._fractions) == self._split:
                yield sample_id, ref


class _PairRowWithImage(beam.DoFn):
    """(_id, {"rows": [...], "images": [...]}) -> (row, image or None), resolving duplicates
    the way the local build does: first row in parquet order, first image in shard order."""

    def __init__(self, namespace: str) -> None:
        self._namespace = namespace

    def _count(self, group: str, reason: str, n: int = 1) -> None:
        if n:
            Metrics.counter(self._namespace, f"{group}/{reason}").inc(n)

    def process(self, element: tuple[str, dict[str, list[Any]]]
                ) -> Iterator[tuple[records.Row, layouts.ImageRef | None]]:
        _, grouped = element
        markers = list(grouped["rows"])
        rows = sorted((r for r in markers if r is not None), key=lambda r: r.index)
        images = sorted(grouped.get("images", ()), key=lambda ref: ref.position)
        self._count(IGNORED, layouts.DUPLICATE_IMAGE, max(0, len(images) - 1))
        if not markers:
            self._count(IGNORED, layouts.NOT_IN_PARQUET, min(1, len(images)))
            return
        if not rows:
            return
        self._count(SKIPPED, DUPLICATE_ID, len(rows) - 1)
        yield rows[0], images[0] if images else None


def _by_row_group(pair: tuple[records.Row, layouts.ImageRef | None]) -> tuple[tuple, tuple]:
    """Keys a pair by its image's parquet row group (a row without image by its own id)."""
    row, ref = pair
    return ((ref.path, ref.offset) if ref is not None else (row.id, -1)), pair


def _rows_in_group_order(keyed: tuple[tuple, Any]) -> list:
    return sorted(keyed[1], key=lambda pair: pair[1].length if pair[1] is not None else -1)


class _CropFaces(beam.DoFn):
    """(row, image or None) -> (key, example), or a skip counted by reason."""

    def __init__(self, namespace: str, settings: records.ImageSettings) -> None:
        self._namespace = namespace
        self._settings = settings

    def process(self, pair: tuple[records.Row, layouts.ImageRef | None]
                ) -> Iterator[tuple[str, dict]]:
        ok, value = capture_skip(records.make_example_task, (*pair, self._settings))
        if ok:
            yield value
        else:
            Metrics.counter(self._namespace, f"{SKIPPED}/{value}").inc()


def generate_examples(*, namespace: str, split: str, split_fractions: Sequence[tuple[str, float]],
                      groups: list[records.RowGroup], columns: Sequence[str],
                      settings: records.ImageSettings, shards: list[str],
                      count_index_problems: bool) -> beam.PTransform:
    """The PTransform (PBegin -> (key, example)) that TFDS runs for one split."""

    @beam.ptransform_fn
    def _examples(pipeline: beam.pvalue.PBegin) -> beam.PCollection:
        rows = (pipeline
                | "RowGroups" >> beam.Create(groups)
                | "ReadRows" >> beam.ParDo(_ReadRows(namespace, columns, split, split_fractions)))
        joined: dict[str, beam.PCollection] = {"rows": rows}
        if settings.layout != layouts.FLAT:
            joined["images"] = (
                pipeline
                | "Shards" >> beam.Create(shards)
                | "IndexShards" >> beam.ParDo(_IndexShards(
                    namespace, settings.layout, split, split_fractions, count_index_problems)))
        pairs = (joined
                 | "JoinOnId" >> beam.CoGroupByKey()
                 | "PairRowWithImage" >> beam.ParDo(_PairRowWithImage(namespace)))
        if settings.layout == layouts.PARQUET:
            # A parquet image is read with its row group: bring a group's rows together so
            # that the worker reads each group once (`layouts._parquet_row_group`), not once
            # per image as the join's order would.
            pairs = (pairs
                     | "KeyByRowGroup" >> beam.Map(_by_row_group)
                     | "GroupByRowGroup" >> beam.GroupByKey()
                     | "RowsInGroupOrder" >> beam.FlatMap(_rows_in_group_order))
        return pairs | "CropFaces" >> beam.ParDo(_CropFaces(namespace, settings))

    return _examples()
