"""Device mesh and logical-axis sharding rules.

The mesh has three named axes: `data` (pure data parallel: params replicated), `fsdp` (data
parallel with params, grads and optimizer state sharded) and `tensor` (model parallel over
heads / mlp / vocab). Params carry logical axis names (rpo.models.param_axes); a short rule
table, kept in the experiment config, maps each logical name to a mesh axis (or None). A
mesh axis that does not divide a dimension, or is already used by an earlier dimension of
the same array, is dropped for that dimension (e.g. 1 kv head on a tensor axis of 2 is
replicated), so any model runs on any mesh.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# (logical name, mesh axis or tuple of mesh axes or None)
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", BATCH_AXES),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),
)


def rules_from_config(rules) -> tuple:
    """A config's sharding_rules (lists after a JSON round trip) as the tuple table above."""
    return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in rules)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence | None = None) -> Mesh:
    """A data x fsdp x tensor mesh; one size may be -1 to take the remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh shape {sizes} (data, fsdp, tensor): at most one size may be -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh shape {sizes}: {len(devices)} devices do not divide by {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"mesh shape {sizes} (data, fsdp, tensor) needs {int(np.prod(sizes))} devices, have {len(devices)}")
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def _as_tuple(axis) -> tuple[str, ...]:
    if axis is None:
        return ()
    return (axis,) if isinstance(axis, str) else tuple(axis)


def logical_to_spec(
    names: Iterable[str | None], shape: Sequence[int], mesh: Mesh, rules=DEFAULT_RULES
) -> PartitionSpec:
    """PartitionSpec for an array whose dims carry the given logical names."""
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, dim in zip(names, shape):
        axes = []
        size = 1
        for ax in _as_tuple(table.get(name)) if name is not None else ():
            if ax in used or mesh.shape[ax] == 1 or dim % (size * mesh.shape[ax]):
                continue
            axes.append(ax)
            size *= mesh.shape[ax]
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return PartitionSpec(*spec)


def tree_shardings(axes_tree, shapes_tree, mesh: Mesh, rules=DEFAULT_RULES):
    """NamedShardings for a tree of logical-name tuples and a matching tree of shapes."""
    is_names = lambda x: isinstance(x, tuple) and all(isinstance(n, (str, type(None))) for n in x)  # noqa: E731
    return jax.tree.map(
        lambda names, shape: NamedSharding(mesh, logical_to_spec(names, shape, mesh, rules)),
        axes_tree,
        shapes_tree,
        is_leaf=is_names,
    )


def param_shardings(model_config, mesh: Mesh, rules=DEFAULT_RULES):
    """Shardings of the model's params (a tree shaped like the params)."""
    from rpo.models import param_axes, param_shapes

    return tree_shardings(param_axes(model_config), param_shapes(model_config), mesh, rules)


def batch_axes(mesh: Mesh, rules=DEFAULT_RULES) -> tuple[str, ...]:
    """The mesh axes (of size > 1) that the rules' "batch" name maps to."""
    return tuple(a for a in _as_tuple(dict(rules).get("batch")) if mesh.shape[a] > 1)


def batch_sharding(mesh: Mesh, ndim: int, rules=DEFAULT_RULES, batch_dim: int = 0) -> NamedSharding:
    """Dim `batch_dim` (e.g. 1 for [micro-steps, B, ...]) over the batch axes, the rest replicated."""
    axes = batch_axes(mesh, rules)
    spec = [None] * ndim
    spec[batch_dim] = None if not axes else axes[0] if len(axes) == 1 else axes
    return NamedSharding(mesh, PartitionSpec(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(mesh, PartitionSpec())
