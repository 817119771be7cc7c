"""A run saved in a workdir, rebuilt: config, model, parameters, mesh.

(`checkpointing.py` saves and restores the train state with Orbax;
`trained_run.py` is the public API over this module.) Analysis and
prediction start from a workdir that `train.train_and_evaluate` wrote
(config.json, vocab.json when the vocabulary head is on, Orbax
checkpoints). `restore_run` rebuilds the model from the saved config, checks
that the checkpoint fits it (`checkpointing.check_compatible` names the
differing keys) and restores the parameters in their sharded layout:

  run = saved_run.restore_run(workdir)       # the latest checkpoint
  out = run.predict_step(run.params, {'image': images_BxHxWx3})
  run = run.at_step(4)                       # another step, same compiled step
"""

import dataclasses
import json
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np

from reverse_sd import checkpointing
from reverse_sd import evaluate
from reverse_sd import optim
from reverse_sd import pretrained
from reverse_sd import sharding
from reverse_sd import state as state_lib
from reverse_sd.data import preprocess
from reverse_sd.models import reverse_model
from reverse_sd.text import vocab as vocab_lib


@dataclasses.dataclass(frozen=True)
class Run:
  """A restored run. `params` are sharded over `mesh` like in training."""
  workdir: pathlib.Path
  config: ml_collections.ConfigDict
  model: Any
  params: Any
  mesh: Any
  predict_step: Callable  # (params, {'image': uint8 [B,H,W,3]}) -> outputs.
  vocabulary: vocab_lib.Vocabulary | None
  step: int
  steps: tuple[int, ...]  # Every checkpointed step in the workdir.
  input_shape: tuple[int, int, int]  # The model's image input (H, W, 3).
  abstract_state: Any = dataclasses.field(repr=False)
  state_shardings: Any = dataclasses.field(repr=False)

  def at_step(self, step: int) -> 'Run':
    """The same run with the parameters of checkpoint `step`."""
    if step == self.step:
      return self
    params = _restore_params(self.workdir, step, self.abstract_state,
                             self.state_shardings)
    return dataclasses.replace(self, params=params, step=step)

  def prepare_image(self, image: np.ndarray) -> np.ndarray:
    """Any uint8 (H, W, 3) image -> the model's input, as in training."""
    return prepare_image(image, self.config.data)


def model_input_shape(
    data_config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  """(H, W, 3) the model reads: input_size when > 0, else the stored size."""
  size = int(data_config.get('input_size', 0) or data_config.image_size)
  return (size, size, 3)


def prepare_image(image: np.ndarray,
                  data_config: ml_collections.ConfigDict) -> np.ndarray:
  """Resizes an image the way the data set stored it, then the read-time
  transform (CLIP's resize + centre crop when data.input_size > 0)."""
  stored = preprocess.resize_and_crop(
      image, int(data_config.image_size),
      data_config.get('resize_mode', 'center_crop'))
  if data_config.get('input_size', 0):
    return preprocess.clip_preprocess(stored, int(data_config.input_size))
  return stored


def load_run_config(workdir: str | pathlib.Path) -> ml_collections.ConfigDict:
  """The config a run saved in `workdir/config.json` (lists as tuples)."""
  path = pathlib.Path(workdir) / 'config.json'
  if not path.is_file():
    raise FileNotFoundError(
        f'{path} does not exist: {workdir} is not a reverse_sd run directory '
        '(a run writes config.json when it starts).')

  def tuples(value):
    if isinstance(value, list):
      return tuple(tuples(v) for v in value)
    if isinstance(value, dict):
      return {k: tuples(v) for k, v in value.items()}
    return value

  try:
    saved = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f'{path} is not valid JSON ({e}).') from e
  # Fields added to the base config after the run was made take their
  # defaults, so older workdirs stay readable. Imported here: `configs` is
  # the repository's config package, above the library.
  from configs import common  # pylint: disable=g-import-not-at-top
  merged = _merge(common.get_base_config().to_dict(), tuples(saved))
  return ml_collections.ConfigDict(merged)


def _merge(defaults: dict, saved: dict) -> dict:
  out = dict(defaults)
  for key, value in saved.items():
    if isinstance(value, dict) and isinstance(out.get(key), dict):
      out[key] = _merge(out[key], value)
    else:
      out[key] = value
  return out


def checkpoint_steps(workdir: str | pathlib.Path) -> list[int]:
  """The checkpointed steps of `workdir`, oldest first (may be empty)."""
  manager = checkpointing.create_manager(workdir, read_only=True)
  try:
    return sorted(manager.all_steps())
  finally:
    manager.close()


def load_vocabulary(workdir: pathlib.Path, config: ml_collections.ConfigDict
                    ) -> vocab_lib.Vocabulary | None:
  """The run's vocab.json when its vocabulary head is on, else None."""
  if config.vocab.loss_weight <= 0:
    return None
  path = workdir / 'vocab.json'
  if not path.is_file():
    raise FileNotFoundError(
        f'{path} does not exist, but {workdir}/config.json has '
        f'vocab.loss_weight={config.vocab.loss_weight} (a vocabulary head); '
        'the run writes vocab.json when it starts.')
  return vocab_lib.Vocabulary.load(path)


def _abstract_state(config, model, input_shape):
  """The train state's shapes, built like `train._setup` builds them.

  The optimiser state's structure does not depend on the number of steps,
  so any positive count gives the same tree.
  """
  tx, _ = optim.create_optimizer(
      config.optim, max(int(config.train.num_steps), 1),
      extra_groups=reverse_model.frozen_param_groups(config.model))
  return state_lib.abstract_train_state(model, tx, input_shape,
                                        jax.random.key(config.seed))


def _restore_params(workdir, step, abstract_state, state_shardings):
  manager = checkpointing.create_manager(workdir, read_only=True)
  try:
    steps = sorted(manager.all_steps())
    if step not in steps:
      raise ValueError(f'No checkpoint of step {step} in '
                       f'{checkpointing.checkpoint_dir(workdir)}; it has '
                       f'steps {steps}.')
    state, _ = checkpointing.restore(manager, step, abstract_state,
                                     state_shardings)
  finally:
    manager.close()
  return state.params


def restore_run(workdir: str | pathlib.Path, step: int | None = None, *,
             mesh: Any = None) -> Run:
  """Rebuilds the run in `workdir` at checkpoint `step` (default: latest).

  Args:
    workdir: a folder written by `train.train_and_evaluate`.
    step: the checkpoint to restore; None takes the latest.
    mesh: the device mesh; default: the one the run's config describes.

  Raises:
    FileNotFoundError: no config.json, no checkpoints, or a missing vocab.json.
    ValueError: no checkpoint of `step` (the message lists those present), or
      a checkpoint that does not fit the config's model (the message names
      the differing keys and shapes).
  """
  workdir = pathlib.Path(workdir).resolve()  # Orbax needs absolute paths.
  config = load_run_config(workdir)
  steps = checkpoint_steps(workdir)
  if not steps:
    raise FileNotFoundError(
        f'No checkpoints in {checkpointing.checkpoint_dir(workdir)}: the run '
        'in this workdir has not saved one yet (train it first: python -m '
        f'reverse_sd.main --workdir={workdir} ...).')
  step = steps[-1] if step is None else int(step)
  if step not in steps:
    raise ValueError(f'No checkpoint of step {step} in '
                     f'{checkpointing.checkpoint_dir(workdir)}; it has steps '
                     f'{steps}.')
  vocabulary = load_vocabulary(workdir, config)
  if mesh is None:
    mesh = sharding.make_mesh(config.mesh.axes, config.mesh.shape)
  model = pretrained.create_model(
      config.model, vocab_size=len(vocabulary) if vocabulary else 0,
      vocab_head_input=config.vocab.head_input, mesh=mesh)
  input_shape = model_input_shape(config.data)
  abstract = _abstract_state(config, model, input_shape)
  state_shardings = state_lib.state_shardings(
      mesh, abstract, state_lib.param_layout(config.mesh))
  params = _restore_params(workdir, step, abstract, state_shardings)
  return Run(workdir=workdir, config=config, model=model, params=params,
             mesh=mesh,
             predict_step=evaluate.make_predict_step(
                 model, mesh, state_shardings.params,
                 micro_batch=config.eval.get('micro_batch', -1)),
             vocabulary=vocabulary, step=step, steps=tuple(steps),
             input_shape=input_shape, abstract_state=abstract,
             state_shardings=state_shardings)


def data_batch_multiple(run: Run) -> int:
  """Batch sizes of `run.predict_step` must be multiples of this."""
  return sharding.batch_shards(run.mesh) * jax.process_count()
