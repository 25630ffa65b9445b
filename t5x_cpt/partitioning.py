"""Device mesh, logical-axis rules, the shardings of pytrees, and the batch's layout over hosts.

Layers name their dimensions with logical axes (see `t5x_cpt.model`); this module is the only
place that knows the mesh axes ('data', 'fsdp', 'tensor') and maps one onto the other through
`logical_axis_rules`, a gin-bindable function in the spirit of t5x's `standard_logical_axis_rules`.

On several TPU slices the mesh is hybrid: 'fsdp' and 'tensor' stay inside a slice (ICI) and only
'data' crosses the data-centre network (DCN) between slices, as MaxText's `dcn_data_parallelism`
does, because FSDP all-gathers and tensor-parallel reductions over DCN would be far slower.

Each host feeds only the batch rows its devices hold: `batch_shard_of_process` says which block of
the global batch that is, `check_global_batch` refuses batch sizes that do not divide over it.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
from typing import Any, Callable, Hashable, Iterator, Mapping, Sequence

import flax.linen as nn
import gin
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from t5x_cpt.errors import UserInputError

MESH_AXES = ("data", "fsdp", "tensor")

MeshAxes = str | tuple[str, ...] | None

# Parameters: embed over fsdp (ZeRO-3 style), the wide dimensions over tensor (Megatron style).
# Activations: batch over data and fsdp, the head / mlp / vocab dimensions over tensor.
_DEFAULT_RULES: tuple[tuple[str, MeshAxes], ...] = (
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("layers", None),
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
)


class MeshError(UserInputError, ValueError):
    """The mesh settings, the devices or the batch size do not fit together; the message names the numbers."""


@gin.configurable
def logical_axis_rules(overrides: Sequence[tuple[str, MeshAxes]] = ()) -> tuple[tuple[str, MeshAxes], ...]:
    """The logical -> mesh axis rules. `overrides` replaces the defaults of the names it lists.

    Example (gin): `logical_axis_rules.overrides = [("embed", None), ("activation_length", "tensor")]`.
    """
    rules = dict(_DEFAULT_RULES)
    for name, mesh_axes in overrides:
        mesh_axes = tuple(mesh_axes) if isinstance(mesh_axes, list) else mesh_axes
        for axis in (mesh_axes if isinstance(mesh_axes, tuple) else (mesh_axes,)):
            if axis is not None and axis not in MESH_AXES:
                raise MeshError(f"logical_axis_rules override {name!r} -> {mesh_axes!r}: unknown mesh axis "
                                f"{axis!r}; mesh axes are {MESH_AXES}")
        rules[name] = mesh_axes
    return tuple(rules.items())


# ----------------------------------------------------------------------------------------------
# The mesh


def resolve_mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int) -> tuple[int, int, int]:
    """Fills the (at most one) -1 axis so that the product equals num_devices, or says why not."""
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    fill = [name for name, size in sizes.items() if size == -1]
    bad = {name: size for name, size in sizes.items() if size != -1 and (not isinstance(size, int) or size < 1)}
    if bad:
        raise MeshError(f"mesh axis sizes must be positive integers or -1, got {bad}")
    if len(fill) > 1:
        raise MeshError(f"at most one mesh axis may be -1 (fill), got -1 for {fill}")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if fill:
        if num_devices % fixed:
            raise MeshError(f"mesh {sizes} cannot be filled: {num_devices} devices are not divisible by "
                            f"the fixed axes' product {fixed}")
        sizes[fill[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise MeshError(f"mesh {sizes} needs {fixed} devices but {num_devices} are available")
    return sizes["data"], sizes["fsdp"], sizes["tensor"]


def _slice_of(device: Any) -> int:
    # CPU and GPU devices carry no slice_index: all of them form one slice.
    return getattr(device, "slice_index", 0)


def devices_by_slice(devices: Sequence[Any]) -> dict[int, list[Any]]:
    """The devices grouped by their TPU slice (`slice_index`; one slice where devices have none)."""
    slices: dict[int, list[Any]] = collections.defaultdict(list)
    for device in devices:
        slices[_slice_of(device)].append(device)
    return dict(sorted(slices.items()))


@gin.configurable
def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, dcn_data: int = 1,
              devices: Sequence[Any] | None = None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh with Auto axis types over `devices` (default: all global devices).

    `data`, `fsdp` and `tensor` are the axis sizes within one slice (one of them may be -1 to fill
    the slice); `dcn_data` is the number of slices the 'data' axis spans over the data-centre
    network (-1: as many as there are slices). The mesh's 'data' axis has size `dcn_data * data`;
    'fsdp' and 'tensor' never leave a slice. On one slice (or on CPU/GPU, whose devices carry no
    slice index) this is the plain topology-aware mesh of `mesh_utils.create_device_mesh`.

    Raises MeshError, naming the numbers, when the devices span several slices and `dcn_data` is
    not their count, when the slices differ in size or the per-slice shape does not match the
    devices per slice, or when the resulting mesh does not hold every device exactly once.

    Auto axis types matter: `jax.make_mesh` defaults to Explicit axes, under which linen's logical
    sharding constraints fail.
    """
    devices = list(jax.devices() if devices is None else devices)
    slices = devices_by_slice(devices)
    num_slices = len(slices)
    if dcn_data != -1 and (not isinstance(dcn_data, int) or dcn_data < 1):
        raise MeshError(f"make_mesh.dcn_data must be a positive integer or -1 (one per slice), got {dcn_data!r}")
    dcn_data = num_slices if dcn_data == -1 else dcn_data
    if dcn_data != num_slices:
        raise MeshError(f"make_mesh.dcn_data={dcn_data} but the {len(devices)} devices span {num_slices} "
                        f"slice(s): set make_mesh.dcn_data={num_slices} (or -1)")
    sizes = {index: len(members) for index, members in slices.items()}
    if len(set(sizes.values())) > 1:
        raise MeshError(f"the slices differ in size (devices per slice_index: {sizes}); a hybrid mesh needs "
                        f"equal slices")
    per_slice = len(devices) // num_slices

    if num_slices == 1:
        shape = resolve_mesh_shape(data, fsdp, tensor, len(devices))
        device_grid = _single_slice_grid(shape, devices)
    else:
        try:
            ici_shape = resolve_mesh_shape(data, fsdp, tensor, per_slice)
        except MeshError as e:
            raise MeshError(f"per-slice mesh (make_mesh.data/fsdp/tensor) does not fit the {per_slice} devices "
                            f"of each of the {num_slices} slices: {e}") from e
        device_grid = _hybrid_grid(ici_shape, (dcn_data, 1, 1), devices)
    check_mesh_covers(device_grid, devices)
    axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    mesh = Mesh(device_grid, MESH_AXES, axis_types=axis_types)
    logging.info("%s", describe_mesh(mesh))
    return mesh


def _single_slice_grid(shape: tuple[int, int, int], devices: list[Any]) -> np.ndarray:
    """The topology-aware grid of one slice; a plain reshape, with a warning, if the topology refuses."""
    errors = []
    for split_physical_axes in (False, True):
        try:
            return mesh_utils.create_device_mesh(shape, devices=devices,
                                                 allow_split_physical_axes=split_physical_axes)
        except (ValueError, NotImplementedError, AssertionError) as e:
            errors.append(str(e))
    # One slice only: the reshape is correct (every collective stays on ICI), merely less well laid out.
    logging.warning("mesh %s does not map onto the device topology (%s); using the devices in id order",
                    dict(zip(MESH_AXES, shape)), errors[-1])
    return np.asarray(devices, dtype=object).reshape(shape)


def _hybrid_grid(ici_shape: tuple[int, int, int], dcn_shape: tuple[int, int, int], devices: list[Any]) -> np.ndarray:
    """The ICI x DCN grid of several slices; no fallback, since a reshape could put fsdp on DCN."""
    error = None
    for split_physical_axes in (False, True):
        try:
            return mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices,
                                                        allow_split_physical_axes=split_physical_axes)
        except (ValueError, NotImplementedError, AssertionError) as e:
            error = e
    raise MeshError(f"per-slice mesh {dict(zip(MESH_AXES, ici_shape))} does not map onto the topology of a "
                    f"slice ({len(devices) // dcn_shape[0]} devices): {error}; choose other make_mesh sizes")


def check_mesh_covers(mesh_or_grid: Mesh | np.ndarray, devices: Sequence[Any] | None = None) -> None:
    """Raises MeshError unless the mesh holds each of `devices` (default: all global devices) exactly once."""
    grid = mesh_or_grid.devices if isinstance(mesh_or_grid, Mesh) else mesh_or_grid
    held = list(np.asarray(grid, dtype=object).flat)
    expected = list(jax.devices() if devices is None else devices)
    counts = collections.Counter(held)
    repeated = sorted(_device_id(d) for d, n in counts.items() if n > 1)
    missing = sorted(_device_id(d) for d in set(expected) - set(counts))
    foreign = sorted(_device_id(d) for d in set(counts) - set(expected))
    if repeated or missing or foreign:
        raise MeshError(f"the mesh holds {len(held)} device entries but there are {len(expected)} devices: "
                        f"missing ids {missing[:8]} ({len(missing)}), unknown ids {foreign[:8]} ({len(foreign)}), "
                        f"repeated ids {repeated[:8]} ({len(repeated)})")


def _device_id(device: Any) -> Any:
    return getattr(device, "id", device)


def describe_mesh(mesh: Mesh) -> str:
    """One line: the axis sizes, how 'data' splits over slices, and the devices per slice and process."""
    devices = list(mesh.devices.flat)
    slices = devices_by_slice(devices)
    processes = collections.Counter(getattr(d, "process_index", 0) for d in devices)
    axes = " ".join(f"{name}={size}" for name, size in mesh.shape.items())
    per_slice = sorted({len(members) for members in slices.values()})
    per_process = sorted(set(processes.values()))
    text = (f"mesh {axes} over {len(devices)} devices: {len(slices)} slice(s) x "
            f"{'/'.join(map(str, per_slice))} devices per slice, {len(processes)} process(es) x "
            f"{'/'.join(map(str, per_process))} devices per process")
    if len(slices) > 1 and "data" in mesh.shape:
        data_axis = mesh.axis_names.index("data")
        first_of_each = np.moveaxis(mesh.devices, data_axis, 0).reshape(mesh.shape["data"], -1)[:, 0]
        dcn = len({_slice_of(d) for d in first_of_each})
        text += f"; data = {dcn} across slices (DCN) x {mesh.shape['data'] // dcn} within a slice"
    return text


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules=None) -> Iterator[None]:
    """Context in which linen's logical constraints resolve against `mesh` and `rules`."""
    rules = logical_axis_rules() if rules is None else rules
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


# ----------------------------------------------------------------------------------------------
# Shardings of pytrees


def _divisible_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh, where: str) -> PartitionSpec:
    """Drops mesh axes that do not divide a dimension (replicating it instead), with a warning."""
    entries = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
        kept = []
        for name in names:
            size = mesh.shape[name]
            if dim % (size * math.prod(mesh.shape[k] for k in kept)) == 0:
                kept.append(name)
            else:
                logging.warning("%s: dimension %d is not divisible by mesh axis %r (size %d); replicating it",
                                where, dim, name, size)
        entries.append(None if not kept else (kept[0] if len(kept) == 1 else tuple(kept)))
    return PartitionSpec(*entries)


def logical_to_shardings(boxed_tree: Any, mesh: Mesh, rules=None) -> Any:
    """NamedShardings for a tree of (abstract) arrays boxed with logical names (nn.Partitioned).

    Leaves without logical names are replicated. The result has the structure of the unboxed tree.
    """
    rules = logical_axis_rules() if rules is None else rules

    def one(path, leaf):
        where = jax.tree_util.keystr(path)
        if isinstance(leaf, nn.LogicallyPartitioned):
            mesh_spec = nn.logical_to_mesh_axes(leaf.names, rules)
            return NamedSharding(mesh, _divisible_spec(mesh_spec, leaf.value.shape, mesh, where))
        if isinstance(leaf, nn.Partitioned):
            return NamedSharding(mesh, _divisible_spec(PartitionSpec(*leaf.names), leaf.value.shape, mesh, where))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree_util.tree_map_with_path(
        one, boxed_tree, is_leaf=lambda x: isinstance(x, (nn.LogicallyPartitioned, nn.Partitioned)))


def batch_sharding(mesh: Mesh, rules=None) -> NamedSharding:
    """Sharding of a [batch, length] input: batch over the axes 'activation_batch' maps to."""
    rules = logical_axis_rules() if rules is None else rules
    spec = nn.logical_to_mesh_axes(("activation_batch", "activation_length"), rules)
    return NamedSharding(mesh, spec)


def replicated(mesh: Mesh) -> NamedSharding:
    """The fully replicated sharding over `mesh`."""
    return NamedSharding(mesh, PartitionSpec())


# ----------------------------------------------------------------------------------------------
# The batch's layout over hosts


def _bounds(index: slice, size: int) -> tuple[int, int]:
    start, stop, step = index.indices(size)
    if step != 1:
        raise MeshError(f"strided shard index {index} is not a block")
    return start, stop


def process_row_blocks(device_indices: Mapping[Any, tuple[slice, ...]], global_shape: Sequence[int],
                       process_of: Callable[[Any], Hashable] = lambda d: d.process_index,
                       ) -> dict[Hashable, tuple[int, int]]:
    """The block of rows [start, stop) each process's devices hold, whole along every other dimension.

    `device_indices` maps each device to its index tuple into an array of `global_shape` (as
    `Sharding.devices_indices_map` returns it); `process_of` gives a device's process. Raises
    MeshError when the union of a process's pieces is not one contiguous block of whole rows.
    """
    shape = tuple(global_shape)
    pieces: dict[Hashable, list[list[tuple[int, int]]]] = collections.defaultdict(list)
    for device, index in device_indices.items():
        index = tuple(index) + (slice(None),) * (len(shape) - len(index))
        pieces[process_of(device)].append([_bounds(i, n) for i, n in zip(index, shape)])
    return {process: _row_block(process, boxes, shape) for process, boxes in sorted(pieces.items())}


def _row_block(process: Hashable, boxes: list[list[tuple[int, int]]], shape: tuple[int, ...]) -> tuple[int, int]:
    """The rows a union of boxes covers, if it is exactly [start, stop) x everything else."""
    # Exact union on the grid of the boxes' own boundaries (a handful of cells, not the array's size).
    edges = [sorted({0, size} | {b for box in boxes for b in box[dim]}) for dim, size in enumerate(shape)]
    covered = np.zeros([len(e) - 1 for e in edges], dtype=bool)
    for box in boxes:
        covered[tuple(slice(e.index(lo), e.index(hi)) for e, (lo, hi) in zip(edges, box))] = True
    rest = tuple(range(1, covered.ndim))
    whole_rows, touched_rows = covered.all(axis=rest), covered.any(axis=rest)
    row_edges = edges[0]
    partial = np.flatnonzero(touched_rows & ~whole_rows)
    if partial.size:
        rows = f"{row_edges[partial[0]]}..{row_edges[partial[-1] + 1]}"
        raise MeshError(f"process {process} holds only part of rows {rows} of the {shape} batch (the length "
                        f"dimension is split across hosts); a host must hold whole sequences: do not map "
                        f"'activation_length' to a mesh axis that spans hosts")
    runs = np.flatnonzero(np.diff(np.concatenate([[0], whole_rows.astype(np.int8), [0]])))
    spans = [(row_edges[a], row_edges[b]) for a, b in zip(runs[::2], runs[1::2])]
    if len(spans) != 1:
        raise MeshError(f"process {process} holds batch rows {spans} of {shape[0]}: not one contiguous block, "
                        f"so it cannot read one shard of the data; lay the mesh out so that each host's devices "
                        f"are adjacent along the batch axes ('data', 'fsdp')")
    return spans[0]


def batch_shards(device_indices: Mapping[Any, tuple[slice, ...]], global_shape: Sequence[int],
                 process_of: Callable[[Any], Hashable] = lambda d: d.process_index,
                 ) -> dict[Hashable, tuple[int, int]]:
    """For every process, (shard_index, num_shards): which of the equal data shards its devices hold.

    The processes' row blocks (see `process_row_blocks`) must be equal-sized and either identical
    or disjoint, and together cover the batch. num_shards is the number of distinct blocks (the
    data-parallel degree across hosts); processes holding the same block get the same index and must
    read identical data. Raises MeshError, naming the blocks, otherwise.
    """
    blocks = process_row_blocks(device_indices, global_shape, process_of)
    batch = int(tuple(global_shape)[0])
    lengths = {process: stop - start for process, (start, stop) in blocks.items()}
    if len(set(lengths.values())) > 1:
        raise MeshError(f"the hosts hold batch blocks of different sizes {lengths} (rows per process) of "
                        f"{batch}; every host must hold the same number of rows")
    distinct = sorted(set(blocks.values()))
    for (start, stop), (next_start, next_stop) in zip(distinct, distinct[1:]):
        if next_start < stop:
            raise MeshError(f"the hosts' batch blocks {start}..{stop} and {next_start}..{next_stop} overlap "
                            f"without being identical; every two hosts must hold the same rows or disjoint rows")
    if sum(stop - start for start, stop in distinct) != batch:
        raise MeshError(f"the hosts' batch blocks {distinct} do not cover the {batch} rows of the batch")
    rank = {block: i for i, block in enumerate(distinct)}
    return {process: (rank[block], len(distinct)) for process, block in blocks.items()}


def batch_shard_of_process(sharding: jax.sharding.Sharding, global_shape: Sequence[int],
                           process_index: int | None = None) -> tuple[int, int]:
    """(shard_index, num_shards): the contiguous block of batch rows the devices of a process hold.

    `sharding` is the sharding of a [batch, length] input (e.g. `batch_sharding(mesh)`) and
    `global_shape` its global shape; `process_index` defaults to `jax.process_index()`. The process
    reads rows [shard_index * rows, (shard_index + 1) * rows) with rows = batch // num_shards.
    Several processes may share a shard (e.g. when 'tensor' spans hosts): they must read the same data.
    Raises MeshError, with the numbers, when the layout is not of this form or the process holds none.
    """
    process_index = jax.process_index() if process_index is None else process_index
    shards = batch_shards(sharding.devices_indices_map(tuple(global_shape)), global_shape)
    if process_index not in shards:
        raise MeshError(f"process {process_index} holds no device of the batch sharding "
                        f"(processes holding it: {sorted(shards)})")
    return shards[process_index]


def _mesh_axes_of(entry: MeshAxes) -> tuple[str, ...]:
    return () if entry is None else (entry if isinstance(entry, tuple) else (entry,))


def check_global_batch(global_batch: int, mesh: Mesh, rules=None, process_count: int | None = None) -> int:
    """Raises MeshError, naming the numbers, unless `global_batch` divides over the batch layout.

    Checks that the mesh's devices belong to exactly `process_count` processes (default:
    `jax.process_count()`), that `global_batch` divides over the devices of the mesh axes the batch
    is split over, and over the data shards of `batch_shards`. Returns the number of data shards.
    """
    process_count = jax.process_count() if process_count is None else process_count
    sharding = batch_sharding(mesh, rules)
    processes = sorted({getattr(d, "process_index", 0) for d in mesh.devices.flat})
    if processes != list(range(process_count)):
        raise MeshError(f"the mesh's {mesh.devices.size} devices belong to processes {processes[:8]} "
                        f"({len(processes)}) but there are {process_count} processes")
    spec = tuple(sharding.spec) + (None, None)
    batch_axes = _mesh_axes_of(spec[0])
    batch_devices = math.prod(mesh.shape[a] for a in batch_axes)
    if not isinstance(global_batch, (int, np.integer)) or global_batch < 1 or global_batch % batch_devices:
        split = " x ".join(f"{a}={mesh.shape[a]}" for a in batch_axes) or "none"
        raise MeshError(f"global batch {global_batch} does not divide over the {batch_devices} devices the batch "
                        f"is split over ({split}): use a multiple of {batch_devices}")
    length = math.prod(mesh.shape[a] for a in _mesh_axes_of(spec[1]))  # any length the layout divides
    shape = (int(global_batch), length)
    shards = batch_shards(sharding.devices_indices_map(shape), shape)
    num_shards = next(iter(shards.values()))[1]
    if global_batch % num_shards:
        raise MeshError(f"global batch {global_batch} does not divide over the {num_shards} data shards "
                        f"of the {process_count} hosts")
    return num_shards
