"""Device mesh and regex sharding rules (big_vision style).

`config.mesh` lists (axis name, size) with one size -1 meaning "all remaining devices", e.g.
`[("data", -1), ("fsdp", 1)]` on one host or `[("data", 16), ("fsdp", 16)]` on a v5e-256. An
optional `tensor` axis splits the transformer blocks Megatron-style (`TENSOR_PARALLEL_RULES`);
the batch is split over every other axis. `config.sharding_rules` lists (regex, strategy): each
train-state leaf takes the strategy of the first regex found in its name, e.g.
`[("opt_state/.*count", "replicate"), (".*", "fsdp")]`.

Strategies:
  "replicate": a full copy on every device.
  "fsdp": split the largest dimension that the `fsdp` axis divides, for arrays of at least
        `fsdp_min_size_mb` (small arrays are cheaper replicated than gathered).
  a tuple of mesh axes (None, a name, or a tuple of names), one per dimension counted from
        the last: `(None, "tensor")` splits a kernel's output dimension, for a (in, out)
        kernel and for scanned (depth, in, out) ones alike.

Activations are pinned by logical names (`flipjax.models.layers.constrain`) that
`activation_rules` maps onto this mesh.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from flipjax.train.tree_names import leaf_names

STRATEGIES = ("replicate", "fsdp")
TENSOR = "tensor"

# Megatron-style tensor parallelism for every EncoderBlock (and the MAP head): q/k/v and fc1
# split their output features, `out` and fc2 their input features, so each block needs one
# all-reduce after attention and one after the MLP. Put them before a catch-all fsdp rule.
TENSOR_PARALLEL_RULES = (
    (r"attn/(q|k|v)/kernel$", ("fsdp", TENSOR)),
    (r"attn/(q|k|v)/bias$", (TENSOR,)),
    (r"attn/out/kernel$", (TENSOR, "fsdp")),
    (r"mlp/fc1/kernel$", ("fsdp", TENSOR)),
    (r"mlp/fc1/bias$", (TENSOR,)),
    (r"mlp/fc2/kernel$", (TENSOR, "fsdp")),
)


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


def fit_mesh(axes: Sequence[tuple[str, int]], num_devices: int) -> list[tuple[str, int]]:
    """The mesh a saved run's parameters are restored onto on this machine (evaluation,
    embedding, export): `axes` as trained where they fit `num_devices`, else (a run trained on
    a pod, read on one host) the same axis names, so every sharding rule still names a mesh
    axis, with all devices on `fsdp` if there is one (the parameters and optimizer state stay
    sharded: a model that needed FSDP may not fit one device), else on the first batch axis,
    and 1 on the others. Training keeps its mesh exact."""
    try:
        mesh_shape(axes, num_devices)
        return list(axes)
    except ValueError:
        names = [name for name, _ in axes]
        batch_names = [name for name in names if name != TENSOR] or names
        widest = "fsdp" if "fsdp" in names else batch_names[0]
        return [(name, -1 if name == widest else 1) for name in names]


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


def check_tensor_groups(devices: np.ndarray, axis_names: Sequence[str]) -> None:
    """Raises ValueError unless each group of devices along the `tensor` axis of a mesh's
    `devices` array lies in one process: such devices share the same batch rows, and each
    process feeds only its own rows (`flipjax.data.pipeline.to_global`)."""
    if TENSOR not in axis_names:
        return
    groups = np.moveaxis(devices, list(axis_names).index(TENSOR), -1)
    groups = groups.reshape(-1, groups.shape[-1])
    for group in groups:
        if len({d.process_index for d in group}) > 1:
            raise ValueError(
                f"config.mesh: the tensor axis ({groups.shape[-1]} devices) spans processes "
                f"{sorted({d.process_index for d in group})}; its devices share batch rows, "
                "and each process feeds only its own, so keep each tensor group inside one "
                "process (make `tensor` the last mesh axis and no larger than a host's devices)")


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes that split the batch: all but `tensor`, whose devices share examples."""
    return tuple(name for name in mesh.axis_names if name != TENSOR)


def batch_shards(mesh: Mesh) -> int:
    """How many ways the batch splits: the devices along `batch_axes`."""
    return math.prod(mesh.shape[axis] for axis in batch_axes(mesh))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over `batch_axes`."""
    return NamedSharding(mesh, PartitionSpec(batch_axes(mesh)))


@contextlib.contextmanager
def activation_sharding(mesh: Mesh) -> Iterator[None]:
    """Within a traced function: makes `constrain` pin activations onto `mesh`."""
    with (jax.sharding.use_abstract_mesh(mesh.abstract_mesh),
          nnx.logical_axis_rules(activation_rules(mesh))):
        yield


def activation_rules(mesh: Mesh) -> list[tuple[str, Any]]:
    """Logical activation axes -> mesh axes (flax logical-axis rules): the batch over
    `batch_axes`, attention heads and MLP features over `tensor` when the mesh has one."""
    tensor = TENSOR if TENSOR in mesh.axis_names else None
    return [("batch", batch_axes(mesh)), ("seq", None), ("embed", None), ("heads", tensor),
            ("mlp", tensor)]


def process0_flag(flag: bool) -> bool:
    """Process 0's `flag`, on every process: for decisions (build or wait, embed or read a
    cache) that every process must take alike, since the jitted work and collectives after them
    run on all of them."""
    if jax.process_count() == 1:
        return flag
    return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag)))


def every_process(flag: bool) -> bool:
    """Whether `flag` holds on every process: for a check that one process can fail alone (on
    its own copy of the data), which must stop all of them rather than leave the others
    waiting in a collective."""
    if jax.process_count() == 1:
        return flag
    return bool(np.all(multihost_utils.process_allgather(np.int32(flag))))


@contextlib.contextmanager
def fails_together(what: str) -> Iterator[None]:
    """Raises on every process when the block raised on process 0, where a run's shared files
    are written (the data it builds, metrics.jsonl, config.json, the tokenizer copy): the
    others would go on into a collective and wait there for process 0 until a timeout, with
    an unrelated error. Process 0 re-raises its own error; the others say `what` failed."""
    failure = None
    try:
        yield
    except BaseException as e:  # noqa: BLE001 - told to the others first (^C too), re-raised
        failure = e
    if not process0_flag(failure is None) and failure is None:
        raise RuntimeError(f"process 0 failed to {what}; its log has the error")
    if failure is not None:
        raise failure


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


def explicit_spec(shape: tuple[int, ...], dims: Sequence[Any], axis_sizes: dict[str, int]
                  ) -> PartitionSpec:
    """`dims` (one mesh-axis entry per dimension, counted from the last) as a PartitionSpec;
    an entry whose axes are missing from the mesh or don't divide the dimension is dropped,
    so the same rules serve every mesh."""
    spec: list[Any] = [None] * len(shape)
    for offset, axes in enumerate(reversed(tuple(dims)), start=1):
        if offset > len(shape) or axes is None:
            continue
        names = _axis_names(axes)
        if all(n in axis_sizes for n in names):
            size = math.prod(axis_sizes[n] for n in names)
            if size > 1 and shape[-offset] % size == 0:
                spec[-offset] = axes
    return PartitionSpec(*spec)


def _axis_names(axes: str | Sequence[str]) -> tuple[str, ...]:
    """The mesh axis names of one explicit-dims entry ("fsdp" or ("data", "fsdp"))."""
    return (axes,) if isinstance(axes, str) else tuple(axes)


def check_strategy(pattern: str, strategy: Any, mesh_axes: Sequence[str]) -> None:
    """Raises ValueError for a rule that cannot work on a mesh with `mesh_axes`; explicit dims
    may also name `fsdp` and `tensor`, which are dropped where the mesh lacks them."""
    if isinstance(strategy, str):
        if strategy not in STRATEGIES:
            raise ValueError(f"config.sharding_rules: unknown strategy {strategy!r} for "
                             f"{pattern!r}; use one of {STRATEGIES} or a tuple of mesh axes")
        return
    if not all(a is None or isinstance(a, str | tuple | list) for a in strategy):
        raise ValueError(f"config.sharding_rules: {pattern!r} has dims {strategy!r}; each "
                         "entry must be None, a mesh axis name or a tuple of names")
    known = {*mesh_axes, "fsdp", TENSOR}
    unknown = sorted({n for a in strategy if a is not None for n in _axis_names(a)} - known)
    if unknown:
        raise ValueError(f"config.sharding_rules: {pattern!r} names mesh axes {unknown} that "
                         f"are not in config.mesh {sorted(mesh_axes)} nor the optional "
                         f"'fsdp'/'{TENSOR}'")


def infer_shardings(tree: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]],
                    min_size_mb: float) -> Any:
    """A tree of NamedShardings for `tree` (arrays or ShapeDtypeStructs) from regex rules."""
    compiled = []
    for pattern, strategy in rules:
        check_strategy(pattern, strategy, mesh.axis_names)
        compiled.append((re.compile(pattern), strategy))
    axis_sizes = dict(zip(mesh.axis_names, mesh.devices.shape, strict=True))

    def sharding(name: str, leaf: Any) -> NamedSharding:
        strategy = next((s for rx, s in compiled if rx.search(name)), "replicate")
        shape = tuple(getattr(leaf, "shape", ()))
        if strategy == "replicate" or not shape:
            return replicated(mesh)
        if strategy == "fsdp":
            # Sized as float32 whatever the dtype, so a bf16 Adam moment shards as its param.
            fsdp = axis_sizes.get("fsdp", 1)
            spec = fsdp_spec(shape, fsdp, 4, min_size_mb)
            big = math.prod(shape) * 4 >= min_size_mb * 2**20
            if spec == PartitionSpec() and fsdp > 1 and big:
                logging.warning("%s %s: no dimension divisible by fsdp=%d, replicated on every "
                                "device (%.0f MiB each)", name, shape, fsdp,
                                math.prod(shape) * 4 / 2**20)
            return NamedSharding(mesh, spec)
        return NamedSharding(mesh, explicit_spec(shape, strategy, axis_sizes))

    return jax.tree.map(sharding, leaf_names(tree), tree)
