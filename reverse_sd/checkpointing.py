"""Orbax checkpoints of the train state and the data position.

One CheckpointManager per workdir holds two items per step: `state` (the
sharded TrainState) and `data` (JSON: examples consumed by the train stream,
so a resumed run continues the same stream). Restoring checks the saved tree
against the model's before reading any array, so a checkpoint of another
model fails with the differing keys and shapes named.
"""

import logging
import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from reverse_sd import sharding as sharding_lib


def checkpoint_dir(workdir: str | pathlib.Path) -> pathlib.Path:
  return pathlib.Path(workdir).resolve() / 'checkpoints'


def create_manager(workdir: str | pathlib.Path, *, max_to_keep: int = 3,
                   read_only: bool = False) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                         create=not read_only,
                                         read_only=read_only)
  # Handlers named up front, so a fresh manager can read metadata and
  # restore without being told each item's type again.
  return ocp.CheckpointManager(
      checkpoint_dir(workdir), options=options,
      item_handlers={'state': ocp.StandardCheckpointHandler(),
                     'data': ocp.JsonCheckpointHandler()})


def save(manager: ocp.CheckpointManager, step: int, state: Any,
         data_position: dict[str, Any], *, force: bool = False) -> bool:
  """Saves asynchronously; call `manager.wait_until_finished()` before exit."""
  return manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=ocp.args.JsonSave(data_position)), force=force)


def leaf_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """'/'-joined path -> shape of every leaf."""
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  return {sharding_lib.path_str(path): tuple(getattr(leaf, 'shape', ()))
          for path, leaf in leaves}


def check_compatible(manager: ocp.CheckpointManager, step: int,
                     abstract_state: Any) -> None:
  """Raises a clear error when the checkpoint was written by another model."""
  problem = (f'Checkpoint {manager.directory}/{step} has no readable train '
             'state (is it a reverse_sd checkpoint?)')
  try:
    metadata = manager.item_metadata(step)['state']
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f'{problem}: {type(e).__name__}: {e}') from e
  if metadata is None:
    raise ValueError(problem + '.')
  saved = leaf_shapes(metadata)
  expected = leaf_shapes(abstract_state)
  problem = describe_mismatch(
      saved, expected,
      f'Checkpoint {manager.directory}/{step} does not fit this model '
      '(was it written with another config?).')
  if problem:
    raise ValueError(problem +
                     '\n  Use a fresh --workdir, or the config that wrote it.')


def describe_mismatch(saved: dict[str, tuple[int, ...]],
                      expected: dict[str, tuple[int, ...]],
                      header: str) -> str:
  """'' when two path -> shape maps agree; else `header` and the missing,
  extra and differently shaped keys (at most 5 of each)."""
  missing = sorted(set(expected) - set(saved))
  extra = sorted(set(saved) - set(expected))
  mismatched = sorted(k for k in set(saved) & set(expected)
                      if saved[k] != expected[k])
  if not (missing or extra or mismatched):
    return ''
  lines = [header]
  if missing:
    lines.append(f'  missing in checkpoint ({len(missing)}): {missing[:5]}')
  if extra:
    lines.append(f'  not in model ({len(extra)}): {extra[:5]}')
  for key in mismatched[:5]:
    lines.append(f'  shape of {key}: checkpoint {saved[key]}, model '
                 f'{expected[key]}')
  return '\n'.join(lines)


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any,
            state_shardings: Any) -> tuple[Any, dict[str, Any]]:
  """Restores (state, data_position) of `step` into the given shardings."""
  check_compatible(manager, step, abstract_state)
  target = jax.tree.map(
      lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s),
      abstract_state, state_shardings)
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(target),
      data=ocp.args.JsonRestore()))
  logging.info('Restored checkpoint %s/%d.', manager.directory, step)
  return restored['state'], dict(restored['data'])


def step_of(state: Any) -> int:
  return int(np.asarray(jax.device_get(state.step)))


def load_state_arrays(workdir: str | pathlib.Path,
                      step: int | None = None) -> tuple[int, Any]:
  """Reads a saved train state as host arrays, without building the model.

  For analysis and tests: no config, mesh or abstract state is needed.

  Returns:
    (step, state): the step read (the latest if `step` is None) and the
    state as nested dicts of arrays ('params', 'opt_state', 'step').
  """
  manager = create_manager(workdir, read_only=True)
  steps = manager.all_steps()
  if not steps:
    raise FileNotFoundError(f'No checkpoints in {checkpoint_dir(workdir)}.')
  step = manager.latest_step() if step is None else step
  if step not in steps:
    raise ValueError(f'No checkpoint of step {step} in '
                     f'{checkpoint_dir(workdir)}; it has {sorted(steps)}.')
  # Restore onto one local device, whatever devices and processes wrote it
  # (the saved shardings may name devices of processes that are gone).
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(
      lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                        sharding=device),
      manager.item_metadata(step)['state'])
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(target)))
  manager.close()
  return step, jax.device_get(restored['state'])
