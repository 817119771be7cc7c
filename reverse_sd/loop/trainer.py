"""A small resumable training loop for the loop's own models.

The autoencoder, the diffusion generator and the decoder fine-tune of the
miniature loop each minimise one loss over batches that are a pure function
of the step. `train` runs that with the project's habits: AdamW with warm-up
and cosine decay (`reverse_sd.optim.learning_rate_schedule`), an exponential
moving average of the parameters, one jitted state-donating step with
explicit shardings (parameters replicated, the batch split over the mesh's
'data' axis), and Orbax checkpoints (`reverse_sd.checkpointing`) every
`checkpoint_every` steps. Rerunning in the same workdir resumes from the
latest checkpoint and continues the same batch stream; a finished run
returns its parameters without training. A checkpoint written for another
model fails with the differing keys named.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import functools
import json
import logging
import pathlib
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from reverse_sd import checkpointing
from reverse_sd import optim
from reverse_sd import sharding


# (params, batch, rng) -> (scalar loss, metrics dict).
LossFn = Callable[[Any, dict[str, jax.Array], jax.Array],
                  tuple[jax.Array, dict[str, jax.Array]]]


@flax.struct.dataclass
class LoopState:
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any


@dataclasses.dataclass(frozen=True)
class Schedule:
  """How long and how fast to train."""
  steps: int
  lr: float
  warmup_fraction: float = 0.05
  end_lr_fraction: float = 0.05
  weight_decay: float = 0.0
  clip_norm: float = 1.0
  ema_decay: float = 0.999
  checkpoint_every: int = 500
  log_every: int = 100


def optimizer(schedule: Schedule):
  """(AdamW with clipping, its learning-rate schedule) for `schedule`."""
  lr = optim.learning_rate_schedule(ml_collections.ConfigDict(dict(
      lr=schedule.lr, warmup_fraction=schedule.warmup_fraction,
      end_lr_fraction=schedule.end_lr_fraction)), schedule.steps)
  return optax.chain(optax.clip_by_global_norm(schedule.clip_norm),
                     optax.adamw(lr, weight_decay=schedule.weight_decay)), lr


def initial_state(params: Any, tx: optax.GradientTransformation
                  ) -> LoopState:
  """Step 0: `params` as the parameters and the EMA (separate buffers: the
  step donates the whole state) and the optimiser's initial state."""
  copy = lambda tree: jax.tree.map(lambda x: jnp.array(x, copy=True), tree)
  return LoopState(step=jnp.zeros((), jnp.int32), params=copy(params),
                   ema_params=copy(params), opt_state=tx.init(params))


def abstract_state(params: Any, tx: optax.GradientTransformation
                   ) -> LoopState:
  """`initial_state`'s shapes and dtypes (`params` may be abstract)."""
  return jax.eval_shape(functools.partial(initial_state, tx=tx), params)


def state_shardings(mesh: jax.sharding.Mesh, state: Any) -> Any:
  """The state's shardings: every leaf replicated over `mesh`."""
  replicated = sharding.replicated(mesh)
  return jax.tree.map(lambda _: replicated, state)


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation,
                    lr: optax.Schedule, ema_decay: float, seed: int,
                    mesh: jax.sharding.Mesh, shardings: Any):
  """The jitted (state, batch) -> (state, metrics) step of `train`.

  The state, sharded as `shardings`, is donated; the batch is split over
  the mesh's batch axes; the metrics (with 'loss', 'lr' and 'grad_norm'
  added) come back replicated.

  Args:
    loss_fn: (params, batch, rng) -> (scalar loss, metrics dict).
    tx: the optimiser (`optimizer`).
    lr: its learning-rate schedule.
    ema_decay: the decay of the parameters' moving average.
    seed: step s draws from `fold_in(key(seed), s)`.
    mesh: the device mesh.
    shardings: the state's shardings (`state_shardings`).
  """

  def step_fn(state, batch):
    rng = jax.random.fold_in(jax.random.key(seed), state.step)
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, batch, rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = optax.incremental_update(params, state.ema_params,
                                   1.0 - ema_decay)
    metrics = dict(metrics, loss=loss, lr=lr(state.step),
                   grad_norm=optax.tree.norm(grads))
    return LoopState(state.step + 1, params, ema, opt_state), metrics

  return jax.jit(step_fn, in_shardings=(shardings,
                                        sharding.batch_sharding(mesh)),
                 out_shardings=(shardings, sharding.replicated(mesh)),
                 donate_argnums=0)


def _done_file(workdir: pathlib.Path) -> pathlib.Path:
  return workdir / 'train_done.json'


def train(workdir: str | pathlib.Path, *, name: str, init_params: Any,
          loss_fn: LossFn,
          make_batch: Callable[[int], dict[str, np.ndarray]],
          schedule: Schedule, seed: int = 0,
          mesh: jax.sharding.Mesh | None = None) -> tuple[Any, Any]:
  """Trains (or resumes, or loads) and returns (params, ema_params).

  Args:
    workdir: the run's folder (checkpoints/, train_done.json).
    name: the model's name in log lines.
    init_params: the initial parameters (also the checkpoint's layout).
    loss_fn: (params, batch, rng) -> (scalar loss, metrics dict).
    make_batch: step -> host batch (numpy); the stream a resumed run
      continues.
    schedule: steps, learning rate, EMA and checkpoint cadence.
    seed: the per-step rng's seed.
    mesh: the device mesh (default: every device on 'data').
  """
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  if schedule.steps < 1:
    raise ValueError(f'{name}: steps must be positive, got {schedule.steps}')
  mesh = mesh or sharding.make_mesh(('data',), (-1,))
  tx, lr = optimizer(schedule)
  state = initial_state(init_params, tx)
  shardings = state_shardings(mesh, state)
  state = jax.device_put(state, shardings)
  manager = checkpointing.create_manager(workdir, max_to_keep=2)
  start = 0
  if manager.latest_step() is not None:
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    state, _ = checkpointing.restore(manager, manager.latest_step(),
                                     abstract, shardings)
    start = checkpointing.step_of(state)
    if start >= schedule.steps:
      manager.close()
      if not _done_file(workdir).exists():  # Killed right after the save.
        _done_file(workdir).write_text(json.dumps(
            {'name': name, 'steps': start, 'train_time_s': None}) + '\n')
      logging.info('%s: trained already (step %d in %s).', name, start,
                   workdir)
      return state.params, state.ema_params
    logging.info('%s: resuming at step %d of %d.', name, start,
                 schedule.steps)

  step_jit = make_train_step(loss_fn, tx, lr, schedule.ema_decay, seed,
                             mesh, shardings)
  began = time.perf_counter()
  window = time.perf_counter()
  try:
    for step in range(start, schedule.steps):
      batch = sharding.host_to_global(make_batch(step), mesh)
      state, metrics = step_jit(state, batch)
      done = step + 1
      if done % schedule.log_every == 0 or done == schedule.steps:
        metrics = jax.device_get(metrics)
        rate = schedule.log_every / max(time.perf_counter() - window, 1e-9)
        window = time.perf_counter()
        logging.info('%s step %d/%d: %s (%.2f steps/s)', name, done,
                     schedule.steps, ', '.join(
                         f'{k} {float(v):.4g}' for k, v in
                         sorted(metrics.items())), rate)
      if done % schedule.checkpoint_every == 0 or done == schedule.steps:
        checkpointing.save(manager, done, state, {'step': done})
  finally:
    # An exception (Ctrl-C, a failing batch) still lands the last save.
    manager.wait_until_finished()
    manager.close()
  _done_file(workdir).write_text(json.dumps(
      {'name': name, 'steps': schedule.steps,
       'train_time_s': round(time.perf_counter() - began, 1)}) + '\n')
  return state.params, state.ema_params


def load(workdir: str | pathlib.Path, init_params: Any) -> tuple[Any, Any]:
  """The (params, ema_params) of a finished run, as host arrays.

  Raises:
    FileNotFoundError: the workdir holds no checkpoint.
    ValueError: the checkpoint's parameters do not fit `init_params` (a
      checkpoint of another config); the message names the keys.
  """
  workdir = pathlib.Path(workdir)
  if not checkpointing.checkpoint_dir(workdir).exists():
    raise FileNotFoundError(f'No checkpoint in {workdir}/checkpoints: train '
                            'this stage first.')
  step, saved = checkpointing.load_state_arrays(workdir)
  check_fits(saved['params'], init_params,
             f'{checkpointing.checkpoint_dir(workdir)}/{step}')
  return saved['params'], saved['ema_params']


def check_fits(saved: Any, expected: Any, where: str) -> None:
  """Raises ValueError naming the keys where two parameter trees differ."""
  problem = checkpointing.describe_mismatch(
      checkpointing.leaf_shapes(saved), checkpointing.leaf_shapes(expected),
      f'{where} does not fit this config (written with another config?):')
  if problem:
    raise ValueError(problem)
