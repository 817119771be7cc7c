"""Device mesh, parameter partition rules and host-to-global batch transfer.

The mesh comes from the config (default: one `data` axis over all devices).
Parameters are placed by regex rules over their '/'-joined path; the batch is
split along the `data` axis. Axes are `Auto`, so jit's `in_shardings` and
`out_shardings` state the layout and XLA inserts the collectives. The same
code runs on one CPU, on 8 fake CPU devices and on a pod slice.
"""

from collections.abc import Sequence
import re
from typing import Any

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
import numpy as np

DATA_AXIS = 'data'


def make_mesh(axes: Sequence[str], shape: Sequence[int],
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds a mesh; a -1 in `shape` takes all devices not used by others."""
  devices = list(devices if devices is not None else jax.devices())
  axes, shape = tuple(axes), list(shape)
  if len(axes) != len(shape):
    raise ValueError(f'mesh.axes {axes} and mesh.shape {tuple(shape)} differ '
                     'in length.')
  if DATA_AXIS not in axes:
    raise ValueError(f'mesh.axes {axes} must contain {DATA_AXIS!r}.')
  if shape.count(-1) > 1:
    raise ValueError(f'mesh.shape {tuple(shape)}: at most one -1.')
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    if len(devices) % known:
      raise ValueError(f'mesh.shape {tuple(shape)} does not divide '
                       f'{len(devices)} devices.')
    shape[shape.index(-1)] = len(devices) // known
  if int(np.prod(shape)) != len(devices):
    raise ValueError(f'mesh.shape {tuple(shape)} needs {int(np.prod(shape))} '
                     f'devices; {len(devices)} are present.')
  return jax.make_mesh(tuple(shape), axes,
                       axis_types=(AxisType.Auto,) * len(axes),
                       devices=devices)


def path_str(path: tuple[Any, ...]) -> str:
  """'/'-joined readable form of a pytree key path."""
  parts = []
  for key in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return '/'.join(parts)


def tree_shardings(mesh: Mesh, abstract_tree: Any,
                   rules: Sequence[tuple[str, Sequence[str | None]]] = ()):
  """NamedShardings for every leaf of `abstract_tree` by regex path rules.

  Args:
    mesh: the device mesh.
    abstract_tree: a pytree of arrays or ShapeDtypeStructs.
    rules: (regex, partition spec) pairs matched with `re.search` against the
      leaf's '/'-joined path; the first match wins; no match: replicated.

  Returns:
    A pytree of NamedSharding matching `abstract_tree`.
  """
  compiled = [(re.compile(pattern), tuple(spec)) for pattern, spec in rules]

  def sharding_for(path, leaf):
    name = path_str(path)
    ndim = len(getattr(leaf, 'shape', ()))
    for pattern, spec in compiled:
      if pattern.search(name):
        if len(spec) > ndim:
          raise ValueError(f'Partition rule {pattern.pattern!r} gives spec '
                           f'{spec} to {name!r} of rank {ndim}.')
        return NamedSharding(mesh, P(*spec))
    return NamedSharding(mesh, P())

  return jax.tree_util.tree_map_with_path(sharding_for, abstract_tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over the data axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def host_to_global(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str,
                                                                     jax.Array]:
  """Makes global arrays from this process's rows of a global batch."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def check_batch_divisible(global_batch_size: int, mesh: Mesh) -> None:
  """Raises a clear error when the batch does not split over the devices."""
  data_size = mesh.shape[DATA_AXIS]
  if global_batch_size % data_size or global_batch_size % jax.process_count():
    raise ValueError(
        f'Global batch size {global_batch_size} must be divisible by the '
        f'{data_size} devices of mesh axis {DATA_AXIS!r} and by the '
        f'{jax.process_count()} processes.')
