"""The referee: an attribute classifier for the synthetic corpus.

A small CNN trained on rendered images with the renderer's ground truth
(`synthetic_grammar.attribute_vector`). It then serves as a measuring
instrument: given an image (say, one a diffusion generator made from a
prompt) it says which shape, colour, size and position each object has, how
many objects there are, and the background colour, texture and style, so
that `accuracy` and `alignment` can score whether the image shows what its
prompt asks for, and `mean_pairwise_distance` of its features can score the
diversity of several samples of one prompt.

Labels are one class index per key of `LABEL_KEYS` ('count',
'object{k}/{group}' for the object slots in reading order, and the three
scene-wide groups), -1 where a slot is absent. Reports pool the object slots
into the groups of `GROUPS`.
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import functools
import json
import logging
import math
import pathlib
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from reverse_sd import checkpointing
from reverse_sd.data import synthetic_grammar as grammar

OBJECT_GROUPS: tuple[str, ...] = ('shape', 'colour', 'size', 'position')
SCENE_GROUPS: tuple[str, ...] = ('background_colour', 'texture', 'style')
# The reported groups; an object group pools its slots.
GROUPS: tuple[str, ...] = (*OBJECT_GROUPS, 'count', *SCENE_GROUPS)
LABEL_KEYS: tuple[str, ...] = (
    'count',
    *(f'object{slot}/{group}' for slot in range(1, grammar.MAX_OBJECTS + 1)
      for group in OBJECT_GROUPS),
    *SCENE_GROUPS,
)
ABSENT = -1
PREDICT_BATCH_SIZE = 256
RESULTS_FILE = 'referee.json'


def group_of(key: str) -> str:
  """The reported group of a label key ('object2/shape' -> 'shape')."""
  if key not in LABEL_KEYS:
    raise ValueError(f'Unknown referee label key {key!r}; expected one of '
                     f'{LABEL_KEYS}.')
  return key.split('/', 1)[-1]


def class_names(key: str) -> tuple[str, ...]:
  """The values of `key`, in class-index order."""
  group = group_of(key)
  if group == 'count':
    return tuple(str(n) for n in range(1, grammar.MAX_OBJECTS + 1))
  return grammar.ATTRIBUTE_GROUPS[group]


def num_classes(key: str) -> int:
  return len(class_names(key))


def _attribute_columns(key: str) -> np.ndarray:
  """Columns of the attribute vector that hold `key`'s values, in order."""
  if key == 'count':
    names = [f'count={n}' for n in class_names(key)]
  else:
    names = [f'{key}={value}' for value in class_names(key)]
  return np.array([grammar.ATTRIBUTE_INDEX[name] for name in names])


# --- Labels ------------------------------------------------------------------


def labels_from_attributes(attributes_NxA: np.ndarray
                           ) -> dict[str, np.ndarray]:
  """Class index per label key from attribute vectors.

  Args:
    attributes_NxA: [N, len(ATTRIBUTE_NAMES)] attribute counts, as
      `synthetic_grammar.attribute_vector` writes them.

  Returns:
    {key: int32 [N]} over LABEL_KEYS; -1 for object slots beyond the scene's
    object count.

  Raises:
    ValueError: a vector of the wrong length, or a key with no active value
      or several where exactly one is required.
  """
  attributes_NxA = np.asarray(attributes_NxA)
  if attributes_NxA.ndim != 2 or (attributes_NxA.shape[1] !=
                                  len(grammar.ATTRIBUTE_NAMES)):
    raise ValueError(
        'attributes must be [N, len(ATTRIBUTE_NAMES)] = [N, '
        f'{len(grammar.ATTRIBUTE_NAMES)}] vectors of '
        f'synthetic_grammar.attribute_vector, got shape '
        f'{attributes_NxA.shape}.')
  counts = _one_value(attributes_NxA, 'count', np.ones(len(attributes_NxA),
                                                      bool)) + 1
  labels = {}
  for key in LABEL_KEYS:
    if key == 'count':
      labels[key] = (counts - 1).astype(np.int32)
      continue
    required = np.ones(len(attributes_NxA), bool)
    if key.startswith('object'):
      slot = int(key[len('object'):key.index('/')])
      required = counts >= slot
    labels[key] = _one_value(attributes_NxA, key, required)
  return labels


def _one_value(attributes_NxA: np.ndarray, key: str,
               required_N: np.ndarray) -> np.ndarray:
  """The active value's index where required (exactly one), -1 elsewhere."""
  values_NxC = attributes_NxA[:, _attribute_columns(key)].astype(np.int64)
  active_N = (values_NxC > 0).sum(axis=1)
  wrong = np.flatnonzero(required_N & (active_N != 1) |
                         ~required_N & (active_N != 0))
  if wrong.size:
    row = int(wrong[0])
    active = [class_names(key)[c] for c in np.flatnonzero(values_NxC[row])]
    expected = 'exactly one' if required_N[row] else 'none (absent slot)'
    raise ValueError(
        f'Attribute vector {row} has active values {active} for {key!r}, '
        f'expected {expected} ({wrong.size} vectors are inconsistent; are '
        'they synthetic_grammar.attribute_vector outputs?).')
  return np.where(required_N, values_NxC.argmax(axis=1),
                  ABSENT).astype(np.int32)


def _check_label_dict(name: str, values: Mapping[str, np.ndarray]) -> int:
  """Checks a {key: [N]} dict over LABEL_KEYS; returns N."""
  missing = [k for k in LABEL_KEYS if k not in values]
  if missing:
    raise ValueError(f'{name} lacks the label keys {missing}.')
  sizes = {k: np.shape(values[k]) for k in LABEL_KEYS}
  if len(set(sizes.values())) != 1 or len(sizes['count']) != 1:
    raise ValueError(f'{name} must hold one [N] vector per key, got shapes '
                     f'{sizes}.')
  return sizes['count'][0]


def _check_pair(predicted: Mapping[str, np.ndarray],
                labels: Mapping[str, np.ndarray]) -> int:
  n_predicted = _check_label_dict('predicted', predicted)
  n_labels = _check_label_dict('labels', labels)
  if n_predicted != n_labels:
    raise ValueError(f'predicted has {n_predicted} examples, labels '
                     f'{n_labels}.')
  return n_labels


# --- Metrics -----------------------------------------------------------------


def accuracy(predicted: Mapping[str, np.ndarray],
             labels: Mapping[str, np.ndarray]) -> dict[str, float]:
  """Per group, the share of present target values the prediction matches.

  Object groups pool their slots. A group without any present label (cannot
  happen for real scenes) gets NaN.
  """
  _check_pair(predicted, labels)
  hits = dict.fromkeys(GROUPS, 0)
  totals = dict.fromkeys(GROUPS, 0)
  for key in LABEL_KEYS:
    present = np.asarray(labels[key]) != ABSENT
    hits[group_of(key)] += int(np.sum(
        present & (np.asarray(predicted[key]) == np.asarray(labels[key]))))
    totals[group_of(key)] += int(np.sum(present))
  return {g: hits[g] / totals[g] if totals[g] else math.nan for g in GROUPS}


def chance(labels: Mapping[str, np.ndarray]) -> dict[str, float]:
  """Per group, the accuracy of always answering its most frequent value."""
  _check_label_dict('labels', labels)
  pooled = {g: [] for g in GROUPS}
  for key in LABEL_KEYS:
    values = np.asarray(labels[key])
    pooled[group_of(key)].append(values[values != ABSENT])
  result = {}
  for group, parts in pooled.items():
    values = np.concatenate(parts)
    result[group] = (np.bincount(values).max() / len(values) if len(values)
                     else math.nan)
  return result


def uniform_chance() -> dict[str, float]:
  """Per group, the accuracy of a uniformly random answer."""
  return {g: 1.0 / num_classes(next(k for k in LABEL_KEYS if group_of(k) == g))
          for g in GROUPS}


def alignment(predicted: Mapping[str, np.ndarray],
              labels: Mapping[str, np.ndarray]) -> np.ndarray:
  """Per example, the share of its present target attributes matched.

  Returns:
    float32 [N] in [0, 1]; the targets are the keys whose label is not -1
    (an example always has at least count and the scene-wide keys).
  """
  n = _check_pair(predicted, labels)
  hits_N = np.zeros(n, np.int64)
  present_N = np.zeros(n, np.int64)
  for key in LABEL_KEYS:
    present = np.asarray(labels[key]) != ABSENT
    hits_N += present & (np.asarray(predicted[key]) == np.asarray(labels[key]))
    present_N += present
  return (hits_N / np.maximum(present_N, 1)).astype(np.float32)


def mean_pairwise_distance(features_PxSxF: np.ndarray) -> float:
  """Diversity: mean over prompts of the mean pairwise L2 distance.

  Args:
    features_PxSxF: referee features of S >= 2 samples for each of P >= 1
      prompts.
  """
  features_PxSxF = np.asarray(features_PxSxF, np.float64)
  if features_PxSxF.ndim != 3 or features_PxSxF.shape[0] < 1 or (
      features_PxSxF.shape[1] < 2):
    raise ValueError('features must be [P, S, F] with P >= 1 prompts and '
                     f'S >= 2 samples each, got shape {features_PxSxF.shape}.')
  diffs_PxSxSxF = features_PxSxF[:, :, None] - features_PxSxF[:, None]
  distances_PxSxS = np.sqrt(np.sum(diffs_PxSxSxF**2, axis=-1))
  s = features_PxSxF.shape[1]
  # The diagonal is zero, so the off-diagonal mean is sum / (S (S - 1)).
  per_prompt_P = distances_PxSxS.sum(axis=(1, 2)) / (s * (s - 1))
  return float(per_prompt_P.mean())


# --- Model -------------------------------------------------------------------


class RefereeNet(nn.Module):
  """Small CNN: stride-2 conv stages down to 4x4, a feature layer, heads.

  The feature layer reads the flattened 4x4 map (where things are) and the
  global max and mean of every stage (what is there).

  Attributes:
    base_width: channels of the first stage; each stage doubles them up to
      4 * base_width.
    feature_dim: width of the feature layer (`Referee.features`).
    norm: GroupNorm after each convolution (faster, steadier training).
  """

  base_width: int = 32
  feature_dim: int = 256
  norm: bool = True

  def _conv(self, x: jax.Array, width: int, strides: int, name: str
            ) -> jax.Array:
    x = nn.Conv(width, (3, 3), strides=strides, use_bias=not self.norm,
                name=name)(x)
    if self.norm:
      x = nn.GroupNorm(num_groups=min(8, width // 4), name=name + '_norm')(x)
    return nn.relu(x)

  @nn.compact
  def __call__(self, images_BxHxWx3: jax.Array
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    x = images_BxHxWx3.astype(jnp.float32) / 127.5 - 1.0
    x = self._conv(x, self.base_width, 1, 'stem')
    # Down to 4x4 whatever the image size: position needs a spatial map, so
    # the feature layer reads the flattened map, not a global average.
    num_stages = max(1, int(math.log2(images_BxHxWx3.shape[1] // 4)))
    pooled = []
    for stage in range(num_stages):
      width = self.base_width * min(2**(stage + 1), 4)
      x = self._conv(x, width, 2, f'stage{stage}_down')
      x = self._conv(x, width, 1, f'stage{stage}_conv')
      # Global max and mean of every stage: what is drawn, wherever it is,
      # so shape and colour need not be learned once per position.
      pooled.append(jnp.max(x, axis=(1, 2)))
      pooled.append(jnp.mean(x, axis=(1, 2)))
    x = jnp.concatenate([x.reshape((x.shape[0], -1)), *pooled], axis=-1)
    features_BxF = nn.relu(nn.Dense(self.feature_dim, name='features')(x))
    logits = {
        key: nn.Dense(num_classes(key),
                      name='head_' + key.replace('/', '_'))(features_BxF)
        for key in LABEL_KEYS}
    return features_BxF, logits


def loss_fn(logits: Mapping[str, jax.Array],
            labels: Mapping[str, jax.Array]) -> jax.Array:
  """Sum over keys of the cross-entropy, mean over present labels."""
  total = jnp.zeros((), jnp.float32)
  for key in LABEL_KEYS:
    present_B = labels[key] != ABSENT
    losses_B = optax.softmax_cross_entropy_with_integer_labels(
        logits[key], jnp.where(present_B, labels[key], 0))
    total += jnp.sum(jnp.where(present_B, losses_B, 0.0)) / jnp.maximum(
        jnp.sum(present_B), 1)
  return total


def _check_images(images_NxHxWx3: np.ndarray,
                  image_size: int | None = None) -> np.ndarray:
  images_NxHxWx3 = np.asarray(images_NxHxWx3)
  if images_NxHxWx3.dtype != np.uint8 or images_NxHxWx3.ndim != 4 or (
      images_NxHxWx3.shape[-1] != 3):
    raise ValueError('images must be uint8 [N, H, W, 3], got '
                     f'{images_NxHxWx3.dtype} {images_NxHxWx3.shape}.')
  if images_NxHxWx3.shape[0] == 0:
    raise ValueError('images is empty (N = 0).')
  height, width = images_NxHxWx3.shape[1:3]
  if height != width or height < 8:
    raise ValueError(f'images must be square and at least 8 px, got '
                     f'{height}x{width}.')
  if image_size is not None and height != image_size:
    raise ValueError(f'This referee reads {image_size}x{image_size} images, '
                     f'got {height}x{width}.')
  return images_NxHxWx3


# --- The trained referee -----------------------------------------------------


@functools.cache
def _predict_fn(model: RefereeNet):
  """Jitted (features, argmax per key), one compilation per network."""

  def apply(params, images_BxHxWx3):
    features_BxF, logits = model.apply({'params': params}, images_BxHxWx3)
    predicted = {k: jnp.argmax(v, axis=-1).astype(jnp.int32)
                 for k, v in logits.items()}
    return features_BxF, predicted
  return jax.jit(apply)


@dataclasses.dataclass
class Referee:
  """A trained referee: the network, its parameters and its image size."""

  model: RefereeNet
  params: Any
  image_size: int

  def _apply(self, params, images_BxHxWx3):
    return _predict_fn(self.model)(params, images_BxHxWx3)

  def _run(self, images_NxHxWx3: np.ndarray
           ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    images_NxHxWx3 = _check_images(images_NxHxWx3, self.image_size)
    n = len(images_NxHxWx3)
    batch = min(PREDICT_BATCH_SIZE, n)
    features, predicted = [], {k: [] for k in LABEL_KEYS}
    for start in range(0, n, batch):
      chunk = images_NxHxWx3[start:start + batch]
      # Pad the last batch, so every call has one shape (one compilation).
      padded = np.concatenate(
          [chunk, np.zeros((batch - len(chunk), *chunk.shape[1:]),
                           np.uint8)])
      features_BxF, predicted_B = jax.device_get(
          self._apply(self.params, padded))
      features.append(features_BxF[:len(chunk)])
      for key in LABEL_KEYS:
        predicted[key].append(predicted_B[key][:len(chunk)])
    return (np.concatenate(features).astype(np.float32),
            {k: np.concatenate(v) for k, v in predicted.items()})

  def predict(self, images_NxHxWx3: np.ndarray) -> dict[str, np.ndarray]:
    """{key: int32 [N]} class indices; slots beyond the predicted count -1."""
    _, predicted = self._run(images_NxHxWx3)
    counts_N = predicted['count'] + 1
    for slot in range(1, grammar.MAX_OBJECTS + 1):
      for group in OBJECT_GROUPS:
        key = f'object{slot}/{group}'
        predicted[key] = np.where(counts_N >= slot, predicted[key],
                                  ABSENT).astype(np.int32)
    return predicted

  def features(self, images_NxHxWx3: np.ndarray) -> np.ndarray:
    """float32 [N, F] feature-layer activations (for diversity)."""
    return self._run(images_NxHxWx3)[0]

  @classmethod
  def load(cls, workdir: str | pathlib.Path) -> Referee:
    """The referee of the latest checkpoint in `workdir`."""
    manager = checkpointing.create_manager(workdir, read_only=True)
    try:
      step = manager.latest_step()
      if step is None:
        raise FileNotFoundError(
            f'No referee checkpoint in {checkpointing.checkpoint_dir(workdir)}'
            ' (train one with reverse_sd.loop.referee.train).')
      state, _, setup = _restore(manager, step)
    finally:
      manager.close()
    return _referee(setup, state['params'])


# --- Training ----------------------------------------------------------------


def _optimizer() -> optax.GradientTransformation:
  """AdamW without its learning rate, which `_learning_rate` applies."""
  return optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(1e-4))


def _learning_rate(step: jax.Array, lr: jax.Array, steps: jax.Array
                   ) -> jax.Array:
  """Cosine decay from `lr` to 0 over `steps`.

  Traced, not baked into the step: runs of other lengths and peak rates
  share one compilation.
  """
  progress = jnp.minimum(step / jnp.maximum(steps, 1), 1.0)
  return lr * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))


def _model(setup: Mapping[str, Any]) -> RefereeNet:
  return RefereeNet(setup['base_width'], setup['feature_dim'], setup['norm'])


def _init_state(setup: Mapping[str, Any], seed: int) -> dict[str, Any]:
  model = _model(setup)
  size = setup['image_size']
  params = model.init(jax.random.PRNGKey(seed),
                      jnp.zeros((1, size, size, 3), jnp.uint8))['params']
  return {'params': params, 'opt_state': _optimizer().init(params),
          'step': jnp.zeros((), jnp.int32)}


def _referee(setup: Mapping[str, Any], params: Any) -> Referee:
  return Referee(_model(setup), params, setup['image_size'])


def _device() -> jax.sharding.Sharding:
  return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def _restore(manager, step: int) -> tuple[Any, dict[str, Any],
                                          dict[str, Any]]:
  """(state, data position, setup) of `step`; the setup builds the model."""
  data = dict(manager.restore(step, args=ocp.args.Composite(
      data=ocp.args.JsonRestore()))['data'] or {})
  if 'setup' not in data:
    raise ValueError(f'Checkpoint {manager.directory}/{step} is not a '
                     'referee checkpoint (its data item has no "setup").')
  setup = data['setup']
  abstract = jax.eval_shape(lambda: _init_state(setup, 0))
  shardings = jax.tree.map(lambda _: _device(), abstract)
  state, data = checkpointing.restore(manager, step, abstract, shardings)
  return state, data, setup


def batch_indices(seed: int, step: int, batch_size: int, n: int) -> np.ndarray:
  """Example indices of `step`: epochs of seeded permutations, concatenated.

  A pure function of its arguments, so a resumed run reads the same stream.
  """
  positions = np.arange(step * batch_size, (step + 1) * batch_size)
  epochs = positions // n
  indices = np.empty(batch_size, np.int64)
  for epoch in np.unique(epochs):
    permutation = np.random.default_rng([seed, int(epoch)]).permutation(n)
    mask = epochs == epoch
    indices[mask] = permutation[positions[mask] % n]
  return indices


def train(images_NxHxWx3: np.ndarray, attributes_NxA: np.ndarray, *,
          workdir: str | pathlib.Path, steps: int, batch_size: int = 128,
          lr: float = 2e-3, seed: int = 0, log_every: int = 100,
          base_width: int = 32, feature_dim: int = 256,
          norm: bool = True) -> Referee:
  """Trains a referee (or loads the finished one in `workdir`).

  Saves a checkpoint every quarter of the steps and at the end; a killed
  run resumes from the last save and reads the same batches as an
  uninterrupted one. Writes `workdir/referee.json`.

  Args:
    images_NxHxWx3: uint8 rendered images.
    attributes_NxA: their `synthetic_grammar.attribute_vector`s.
    workdir: checkpoints and referee.json go here.
    steps: optimiser steps (cosine schedule over them).
    batch_size: examples per step.
    lr: peak AdamW learning rate.
    seed: parameters and data order.
    log_every: steps between loss logs.
    base_width: see RefereeNet.
    feature_dim: see RefereeNet.
    norm: see RefereeNet.

  Returns:
    The trained Referee.
  """
  images_NxHxWx3 = _check_images(images_NxHxWx3)
  labels = labels_from_attributes(attributes_NxA)
  if len(labels['count']) != len(images_NxHxWx3):
    raise ValueError(f'{len(images_NxHxWx3)} images but '
                     f'{len(labels["count"])} attribute vectors.')
  if steps < 1 or batch_size < 1:
    raise ValueError(f'steps and batch_size must be >= 1, got {steps}, '
                     f'{batch_size}.')
  workdir = pathlib.Path(workdir)
  setup = {'image_size': int(images_NxHxWx3.shape[1]), 'steps': steps,
           'batch_size': batch_size, 'lr': lr, 'seed': seed,
           'base_width': base_width, 'feature_dim': feature_dim,
           'norm': norm}
  manager = checkpointing.create_manager(workdir)
  start_time = time.time()
  try:
    state, first_step = _resume(manager, workdir, setup)
    if first_step < steps:
      state = _train_loop(manager, state, first_step, setup, images_NxHxWx3,
                          labels, log_every)
    manager.wait_until_finished()
  finally:
    manager.close()
  if first_step < steps:
    _write_results(workdir, setup, time.time() - start_time, first_step)
  return _referee(setup, state['params'])


def _resume(manager, workdir: pathlib.Path, setup: dict[str, Any]
            ) -> tuple[dict[str, Any], int]:
  """The state to continue from and its step (0 for a fresh run)."""
  step = manager.latest_step()
  if step is None:
    # Committed to the device a restored state lives on, so that a fresh
    # and a resumed run share one compiled step.
    return jax.device_put(_init_state(setup, setup['seed']),
                          _device()), 0
  state, _, saved_setup = _restore(manager, step)
  if saved_setup != setup:
    differing = {k: (saved_setup.get(k), v) for k, v in setup.items()
                 if saved_setup.get(k) != v}
    raise ValueError(
        f'{checkpointing.checkpoint_dir(workdir)} holds a referee trained '
        f'with other settings (saved, requested): {differing}. Use a fresh '
        'workdir or the same settings.')
  logging.info('Referee: resuming from step %d of %d.', step, setup['steps'])
  return state, step


@functools.cache
def _train_step_fn(model: RefereeNet):
  """The jitted train step, one compilation per network and batch shape."""
  tx = _optimizer()

  def train_step(state, images_BxHxWx3, labels_B, lr, steps):
    def objective(params):
      _, logits = model.apply({'params': params}, images_BxHxWx3)
      return loss_fn(logits, labels_B)
    loss, grads = jax.value_and_grad(objective)(state['params'])
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    scale = -_learning_rate(state['step'], lr, steps)
    updates = jax.tree.map(lambda u: scale * u, updates)
    return {'params': optax.apply_updates(state['params'], updates),
            'opt_state': opt_state, 'step': state['step'] + 1}, loss
  return jax.jit(train_step, donate_argnums=0)


def _train_loop(manager, state: dict[str, Any], first_step: int,
                setup: dict[str, Any], images_NxHxWx3: np.ndarray,
                labels: dict[str, np.ndarray], log_every: int
                ) -> dict[str, Any]:
  """Runs steps first_step..setup['steps'] - 1, saving each quarter."""
  step_fn = _train_step_fn(_model(setup))
  lr = np.float32(setup['lr'])
  steps_i32 = np.int32(setup['steps'])
  steps = setup['steps']
  save_every = max(1, steps // 4)
  n = len(images_NxHxWx3)
  for step in range(first_step, steps):
    indices = batch_indices(setup['seed'], step, setup['batch_size'], n)
    state, loss = step_fn(state, images_NxHxWx3[indices],
                          {k: v[indices] for k, v in labels.items()},
                          lr, steps_i32)
    done = step + 1
    if log_every and (done % log_every == 0 or done == steps):
      logging.info('Referee step %d/%d: loss %.4f', done, steps, float(loss))
    if done % save_every == 0 or done == steps:
      checkpointing.save(manager, done, state,
                         {'examples_seen': done * setup['batch_size'],
                          'setup': setup}, force=done == steps)
  return state


def _write_results(workdir: pathlib.Path, setup: dict[str, Any],
                   time_s: float, first_step: int) -> None:
  results = {'steps': setup['steps'], 'image_size': setup['image_size'],
             'time_s': round(time_s, 3), 'resumed_from_step': first_step,
             'setup': setup}
  path = workdir / RESULTS_FILE
  temporary = path.with_suffix('.json.tmp')
  temporary.write_text(json.dumps(results, indent=2) + '\n')
  temporary.replace(path)
