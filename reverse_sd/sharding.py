"""Device mesh, parameter partition rules and host-to-global batch transfer.

The mesh comes from the config (default: one `data` axis over all devices).
Parameters are placed by a `ParamLayout`: explicit regex rules over their
'/'-joined path (`config.mesh.param_rules`), then a named preset
(`config.mesh.param_preset`: 'fsdp', 'tensor_parallel' or both); the
optimiser state follows the parameters. The batch is split along the `data`
axis. Axes are `Auto`, so jit's `in_shardings` and `out_shardings` state the
layout and XLA inserts the collectives. The same code runs on one CPU, on 8
fake CPU devices and on a pod slice.
"""

from collections.abc import Sequence
import dataclasses
import math
import re
from typing import Any

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
import numpy as np

DATA_AXIS = 'data'
FSDP_AXIS = 'fsdp'  # A mesh axis for FSDP apart from 'data' (optional).
# The mesh axes that split the batch (those the mesh has).
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)
MODEL_AXIS = 'model'  # The axis of the models' tensor-parallel rules.

FSDP = 'fsdp'
TENSOR_PARALLEL = 'tensor_parallel'
FSDP_TENSOR_PARALLEL = 'fsdp+tensor_parallel'
# config.mesh.param_preset values; '' places parameters by param_rules only.
PRESETS = ('', FSDP, TENSOR_PARALLEL, FSDP_TENSOR_PARALLEL)
DEFAULT_FSDP_MIN_SIZE = 2**16

# (regex over the '/'-joined path, partition spec): a spec entry per leading
# dimension, each None, a mesh axis name or a tuple of axis names.
Rule = tuple[str, Sequence[str | Sequence[str] | None]]


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


@dataclasses.dataclass(frozen=True)
class ParamLayout:
  """Where each array of the train state lives on the mesh.

  A parameter takes the spec of the first of `rules` whose regex matches its
  path (final: nothing else applies); else the spec of the first matching
  `preset_rules`, else replicated; then, with `fsdp_axis`, an array of at
  least `fsdp_min_size` elements is also split over `fsdp_axis` along its
  largest dimension that is still free and that the axis size divides.

  Attributes:
    rules: explicit (regex, spec) pairs (`config.mesh.param_rules`).
    preset_rules: the preset's (regex, spec) pairs (tensor parallelism).
    fsdp_axis: the mesh axis of ZeRO-3 style sharding; None: none.
    fsdp_min_size: arrays with fewer elements are not split by FSDP.
    preset: the preset's name, for messages.
  """
  rules: tuple[Rule, ...] = ()
  preset_rules: tuple[Rule, ...] = ()
  fsdp_axis: str | None = None
  fsdp_min_size: int = DEFAULT_FSDP_MIN_SIZE
  preset: str = ''


def layout_from_config(mesh_config, tensor_parallel_rules: Sequence[Rule]
                       ) -> ParamLayout:
  """The `ParamLayout` that `config.mesh` asks for, with clear errors.

  Args:
    mesh_config: `config.mesh` (axes, param_rules, param_preset, fsdp_axis,
      fsdp_min_size; missing preset fields take their defaults).
    tensor_parallel_rules: the models' rules on the `model` axis, used by
      the 'tensor_parallel' presets.

  Raises:
    ValueError: an unknown preset (the message lists the valid ones), a
      tensor-parallel preset without a 'model' axis, an FSDP axis that is not
      in `config.mesh.axes`, or malformed `param_rules`.
  """
  axes = tuple(mesh_config.axes)
  preset = mesh_config.get('param_preset', '') or ''
  if preset not in PRESETS:
    raise ValueError(
        f'config.mesh.param_preset={preset!r} is not a preset; expected one '
        f"of {', '.join(repr(p) for p in PRESETS)} ('' = param_rules only, "
        'everything else replicated).')
  rules = _check_rules(mesh_config.get('param_rules', ()),
                       'config.mesh.param_rules')
  preset_rules = ()
  if preset in (TENSOR_PARALLEL, FSDP_TENSOR_PARALLEL):
    if MODEL_AXIS not in axes:
      raise ValueError(
          f'config.mesh.param_preset={preset!r} shards over a {MODEL_AXIS!r} '
          f'mesh axis, but config.mesh.axes={axes} has none; e.g. '
          f'--config.mesh.axes="(\'data\',\'model\')" '
          '--config.mesh.shape="(-1,4)".')
    preset_rules = _check_rules(tensor_parallel_rules,
                                'the tensor-parallel PARTITION_RULES')
  fsdp_axis = None
  min_size = int(mesh_config.get('fsdp_min_size', DEFAULT_FSDP_MIN_SIZE))
  if preset in (FSDP, FSDP_TENSOR_PARALLEL):
    fsdp_axis = mesh_config.get('fsdp_axis', DATA_AXIS)
    if fsdp_axis not in axes:
      raise ValueError(f'config.mesh.fsdp_axis={fsdp_axis!r} is not one of '
                       f'config.mesh.axes={axes}.')
    if preset == FSDP_TENSOR_PARALLEL and fsdp_axis == MODEL_AXIS:
      raise ValueError(f'config.mesh.param_preset={preset!r} needs an '
                       f'fsdp_axis other than {MODEL_AXIS!r} (the tensor-'
                       'parallel axis); the default is \'data\'.')
    if min_size < 1:
      raise ValueError(f'config.mesh.fsdp_min_size={min_size} must be >= 1.')
  return ParamLayout(rules=rules, preset_rules=preset_rules,
                     fsdp_axis=fsdp_axis, fsdp_min_size=min_size,
                     preset=preset)


def _check_rules(rules, source: str) -> tuple[Rule, ...]:
  out = []
  for i, rule in enumerate(rules):
    if len(rule) != 2 or isinstance(rule[1], str):
      raise ValueError(f'{source}[{i}]={rule!r}; expected a (regex, '
                       "partition spec) pair, e.g. ('fc1/kernel$', "
                       "(None, 'model')).")
    pattern, spec = rule
    try:
      re.compile(pattern)
    except re.error as e:
      raise ValueError(f'{source}[{i}]: bad regex {pattern!r} ({e}).') from e
    out.append((pattern, tuple(tuple(a) if isinstance(a, (list, tuple))
                                else a for a in spec)))
  return tuple(out)


def _check_spec(mesh: Mesh, name: str, shape: tuple[int, ...], spec,
                origin: str) -> None:
  """Raises when `spec` does not fit the array `name` of `shape`."""
  if len(spec) > len(shape):
    raise ValueError(f'{origin} gives spec {spec} to {name!r} of rank '
                     f'{len(shape)} (shape {shape}).')
  for dim, axes in enumerate(spec):
    if axes is None:
      continue
    names = (axes,) if isinstance(axes, str) else tuple(axes)
    missing = [a for a in names if a not in mesh.shape]
    if missing:
      raise ValueError(f'{origin} gives {name!r} the spec {spec}, but the '
                       f'mesh has no axis {missing[0]!r} (its axes: '
                       f'{tuple(mesh.axis_names)}).')
    size = math.prod(mesh.shape[a] for a in names)
    if shape[dim] % size:
      raise ValueError(
          f'{origin} splits dimension {dim} of {name!r} (shape {shape}) over '
          f'mesh axis {axes!r} of size {size}, which does not divide '
          f'{shape[dim]}; change the mesh shape or the rule.')


def _add_fsdp(spec: tuple, shape: tuple[int, ...], mesh: Mesh, axis: str,
              min_size: int) -> tuple:
  """`spec` with `axis` on the largest free dimension its size divides."""
  size = mesh.shape[axis]
  if size == 1 or math.prod(shape) < min_size:
    return spec
  used = {a for entry in spec if entry is not None
          for a in ((entry,) if isinstance(entry, str) else entry)}
  if axis in used:
    return spec
  full = list(spec) + [None] * (len(shape) - len(spec))
  # Largest dimension first; among equal ones the last (as big_vision does).
  for dim in sorted(range(len(shape)), key=lambda d: (shape[d], d),
                    reverse=True):
    if full[dim] is None and shape[dim] % size == 0:
      full[dim] = axis
      return tuple(full)
  return spec


def _leaf_spec(mesh: Mesh, name: str, shape: tuple[int, ...],
               layout: ParamLayout, compiled) -> tuple:
  explicit, preset = compiled
  for pattern, spec in explicit:
    if pattern.search(name):
      _check_spec(mesh, name, shape, spec,
                  f'Partition rule {pattern.pattern!r}')
      return spec
  out = ()
  for pattern, spec in preset:
    if pattern.search(name):
      _check_spec(mesh, name, shape, spec,
                  f'Preset {layout.preset!r} rule {pattern.pattern!r}')
      out = spec
      break
  if layout.fsdp_axis is not None:
    out = _add_fsdp(out, shape, mesh, layout.fsdp_axis, layout.fsdp_min_size)
  return out


def _compile(layout: ParamLayout):
  return ([(re.compile(p), tuple(s)) for p, s in layout.rules],
          [(re.compile(p), tuple(s)) for p, s in layout.preset_rules])


def tree_shardings(mesh: Mesh, abstract_tree: Any,
                   rules: Sequence[Rule] = (), *,
                   layout: ParamLayout | None = None):
  """NamedShardings for every leaf of `abstract_tree` by regex path rules.

  Args:
    mesh: the device mesh.
    abstract_tree: a pytree of arrays or ShapeDtypeStructs.
    rules: (regex, partition spec) pairs matched with `re.search` against the
      leaf's '/'-joined path; the first match wins; no match: replicated.
    layout: instead of `rules`, a full `ParamLayout` (presets, FSDP).

  Returns:
    A pytree of NamedSharding matching `abstract_tree`.

  Raises:
    ValueError: a spec longer than the leaf's rank, naming an axis the mesh
      lacks, or splitting a dimension its axes' size does not divide (the
      message names the rule, the leaf, its shape and the axis size).
  """
  if layout is None:
    layout = ParamLayout(rules=tuple(rules))
  elif rules:
    raise ValueError('Pass rules or a layout, not both.')
  compiled = _compile(layout)

  def sharding_for(path, leaf):
    shape = tuple(getattr(leaf, 'shape', ()))
    return NamedSharding(mesh, P(*_leaf_spec(mesh, path_str(path), shape,
                                             layout, compiled)))

  return jax.tree_util.tree_map_with_path(sharding_for, abstract_tree)


def state_layout_shardings(mesh: Mesh, abstract_state: Any,
                           layout: ParamLayout):
  """NamedShardings of a train state whose optimiser state follows `params`.

  The rules see each parameter's path below `params` (e.g.
  'backbone/layers_3/fc1/kernel', as `config.optim.param_groups` do). Every
  other leaf whose path ends in a parameter's path and that has its shape
  (AdamW's mu and nu, under any optax chain or multi_transform) gets that
  parameter's sharding; the rest (the step, counts) are replicated, or split
  by FSDP alone when they are large.

  Args:
    mesh: the device mesh.
    abstract_state: a train state (with a `params` attribute) of arrays or
      ShapeDtypeStructs.
    layout: the parameter layout.

  Returns:
    A pytree of NamedSharding with the structure of `abstract_state`.
  """
  param_shardings = tree_shardings(mesh, abstract_state.params,
                                   layout=layout)
  by_path = {}
  for (path, leaf), leaf_sharding in zip(
      jax.tree_util.tree_leaves_with_path(abstract_state.params),
      jax.tree_util.tree_leaves(param_shardings)):
    by_path[path_str(path)] = (tuple(leaf.shape), leaf_sharding)

  def sharding_for(path, leaf):
    shape = tuple(getattr(leaf, 'shape', ()))
    parts = path_str(path).split('/')
    for start in range(len(parts)):  # Longest suffix first.
      found = by_path.get('/'.join(parts[start:]))
      if found is not None and found[0] == shape:
        return found[1]
    spec = ()
    if layout.fsdp_axis is not None:
      spec = _add_fsdp(spec, shape, mesh, layout.fsdp_axis,
                       layout.fsdp_min_size)
    return NamedSharding(mesh, P(*spec))

  return jax.tree_util.tree_map_with_path(sharding_for, abstract_state)


def per_device_bytes(abstract_tree: Any, shardings: Any) -> int:
  """Bytes of `abstract_tree` that each device holds in `shardings`."""
  total = 0
  for leaf, leaf_sharding in zip(jax.tree_util.tree_leaves(abstract_tree),
                                 jax.tree_util.tree_leaves(shardings)):
    shard = leaf_sharding.shard_shape(tuple(leaf.shape))
    total += math.prod(shard) * np.dtype(leaf.dtype).itemsize
  return total


def _format_bytes(num_bytes: float) -> str:
  for unit in ('B', 'KiB', 'MiB', 'GiB'):
    if num_bytes < 1024 or unit == 'GiB':
      return f'{num_bytes:.1f} {unit}' if unit != 'B' else f'{num_bytes} B'
    num_bytes /= 1024
  raise AssertionError('unreachable')


def describe(abstract_tree: Any, shardings: Any) -> str:
  """One line: total bytes, bytes per device and how many arrays are split.

  E.g. '1.2 GiB in all, 310.5 MiB per device (4.0x less than replicated);
  392 of 398 arrays split'.
  """
  leaves = jax.tree_util.tree_leaves(abstract_tree)
  total = sum(math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
              for leaf in leaves)
  per_device = per_device_bytes(abstract_tree, shardings)
  split = sum(1 for s in jax.tree_util.tree_leaves(shardings)
              if any(entry is not None for entry in s.spec))
  ratio = total / per_device if per_device else 1.0
  return (f'{_format_bytes(total)} in all, {_format_bytes(per_device)} per '
          f'device ({ratio:.1f}x less than replicated); {split} of '
          f'{len(leaves)} arrays split')


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
  """The mesh's axes that split the batch: 'data', and 'fsdp' if it has
  one."""
  return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def batch_shards(mesh: Mesh) -> int:
  """How many ways the batch is split (the product of `batch_axes`)."""
  return math.prod(mesh.shape[a] for a in batch_axes(mesh))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over the batch axes."""
  return NamedSharding(mesh, P(batch_axes(mesh)))


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
  data_size = batch_shards(mesh)
  if global_batch_size % data_size or global_batch_size % jax.process_count():
    raise ValueError(
        f'Global batch size {global_batch_size} must be divisible by the '
        f'{data_size} devices of mesh axes {batch_axes(mesh)} and by the '
        f'{jax.process_count()} processes.')
