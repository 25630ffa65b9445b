"""Device mesh, logical-axis rules and the shardings of pytrees.

Layers name their dimensions with logical axes (see `t5x_cpt.model`); this module is the only
place that knows the mesh axes ('data', 'fsdp', 'tensor') and maps one onto the other through
`logical_axis_rules`, a gin-bindable function in the spirit of t5x's `standard_logical_axis_rules`.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Iterator, Sequence

import flax.linen as nn
import gin
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

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
                raise ValueError(f"logical_axis_rules override {name!r} -> {mesh_axes!r}: unknown mesh axis "
                                 f"{axis!r}; mesh axes are {MESH_AXES}")
        rules[name] = mesh_axes
    return tuple(rules.items())


def resolve_mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int) -> tuple[int, int, int]:
    """Fills the (at most one) -1 axis so that the product equals num_devices, or says why not."""
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    fill = [name for name, size in sizes.items() if size == -1]
    bad = {name: size for name, size in sizes.items() if size != -1 and (not isinstance(size, int) or size < 1)}
    if bad:
        raise ValueError(f"mesh axis sizes must be positive integers or -1, got {bad}")
    if len(fill) > 1:
        raise ValueError(f"at most one mesh axis may be -1 (fill), got -1 for {fill}")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if fill:
        if num_devices % fixed:
            raise ValueError(f"mesh {sizes} cannot be filled: {num_devices} devices are not divisible by "
                             f"the fixed axes' product {fixed}")
        sizes[fill[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ValueError(f"mesh {sizes} needs {fixed} devices but {num_devices} are available")
    return sizes["data"], sizes["fsdp"], sizes["tensor"]


@gin.configurable
def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh with Auto axis types, one axis may be -1 to fill.

    Auto axis types matter: `jax.make_mesh` defaults to Explicit axes, under which linen's logical
    sharding constraints fail.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(data, fsdp, tensor, len(devices))
    try:
        from jax.experimental import mesh_utils
        device_grid = mesh_utils.create_device_mesh(shape, devices=devices)
    except (ValueError, NotImplementedError, AssertionError):
        device_grid = np.asarray(devices, dtype=object).reshape(shape)
    axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return Mesh(device_grid, MESH_AXES, axis_types=axis_types)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules=None) -> Iterator[None]:
    """Context in which linen's logical constraints resolve against `mesh` and `rules`."""
    rules = logical_axis_rules() if rules is None else rules
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


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
    return NamedSharding(mesh, PartitionSpec())
