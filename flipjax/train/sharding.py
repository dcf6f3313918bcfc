"""Device mesh and regex sharding rules (big_vision style).

`config.mesh` lists (axis name, size) with one size -1 meaning "all remaining devices", e.g.
`[("data", -1), ("fsdp", 1)]` on one host or `[("data", 16), ("fsdp", 16)]` on a v5e-256.
The batch is split over every mesh axis. `config.sharding_rules` lists (regex, strategy): each
train-state leaf takes the strategy of the first regex found in its name, e.g.
`[("opt_state/.*count", "replicate"), (".*", "fsdp")]`.

Strategies:
  replicate: a full copy on every device.
  fsdp: split the largest dimension that the `fsdp` axis divides, for arrays of at least
        `fsdp_min_size_mb` (small arrays are cheaper replicated than gathered).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from flipjax.train.tree_names import leaf_names

STRATEGIES = ("replicate", "fsdp")


def mesh_shape(axes: Sequence[tuple[str, int]], num_devices: int) -> tuple[int, ...]:
    """Resolves the single -1 in `axes` so that the sizes multiply to `num_devices`."""
    sizes = [int(size) for _, size in axes]
    if sizes.count(-1) > 1:
        raise ValueError(f"config.mesh may hold at most one -1, got {list(axes)}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"config.mesh {list(axes)}: {num_devices} devices are not "
                             f"divisible by the fixed axes' product {known}")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(f"config.mesh {list(axes)} has {math.prod(sizes)} slots but there are "
                         f"{num_devices} devices; set one axis to -1 or fix the sizes")
    return tuple(sizes)


def make_mesh(axes: Sequence[tuple[str, int]], devices: Sequence[jax.Device] | None = None
              ) -> Mesh:
    """A mesh with Auto axis types, so XLA propagates shardings through plain code."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(axes, len(devices))
    names = tuple(name for name, _ in axes)
    if devices == list(jax.devices()):
        return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names))
    return Mesh(np.asarray(devices).reshape(shape), names,
                axis_types=(AxisType.Auto,) * len(names))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over every mesh axis."""
    return NamedSharding(mesh, PartitionSpec(mesh.axis_names))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def fsdp_spec(shape: tuple[int, ...], axis_size: int, itemsize: int,
              min_size_mb: float) -> PartitionSpec:
    if axis_size == 1 or math.prod(shape) * itemsize < min_size_mb * 2**20:
        return PartitionSpec()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % axis_size == 0:
            spec = [None] * len(shape)
            spec[dim] = "fsdp"
            return PartitionSpec(*spec)
    return PartitionSpec()


def infer_shardings(tree: Any, mesh: Mesh, rules: Sequence[tuple[str, str]],
                    min_size_mb: float) -> Any:
    """A tree of NamedShardings for `tree` (arrays or ShapeDtypeStructs) from regex rules."""
    compiled = []
    for pattern, strategy in rules:
        if strategy not in STRATEGIES:
            raise ValueError(f"config.sharding_rules: unknown strategy {strategy!r} for "
                             f"{pattern!r}; known: {STRATEGIES}")
        compiled.append((re.compile(pattern), strategy))
    fsdp_size = dict(zip(mesh.axis_names, mesh.devices.shape, strict=True)).get("fsdp", 1)

    def sharding(name: str, leaf: Any) -> NamedSharding:
        strategy = next((s for rx, s in compiled if rx.search(name)), "replicate")
        if strategy == "replicate" or not getattr(leaf, "shape", ()):
            return replicated(mesh)
        itemsize = np.dtype(leaf.dtype).itemsize
        return NamedSharding(mesh, fsdp_spec(tuple(leaf.shape), fsdp_size, itemsize,
                                             min_size_mb))

    return jax.tree.map(sharding, leaf_names(tree), tree)
