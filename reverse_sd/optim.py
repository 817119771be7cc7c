"""Optimiser: AdamW with warm-up + cosine decay, gradient clipping, and
per-tower parameter groups.

`config.optim.param_groups` is a tuple of (regex, lr_multiplier) pairs matched
with `re.search` against each parameter's '/'-joined path (e.g.
'backbone/layers_3/fc1/kernel'); the first match wins and unmatched
parameters train at the full learning rate. A multiplier of 0 freezes the
group: its gradients are zeroed before clipping (so they do not count in the
global norm), and it gets no AdamW update or weight decay.

Clipping is `optax.clip_by_global_norm`; the `grad_norm` metric is
`optax.tree.norm` of the same gradients, so XLA computes it once.
"""

from collections.abc import Sequence
import re

import jax
import ml_collections
import optax

from reverse_sd import sharding

FROZEN = 'frozen'
DEFAULT_GROUP = 'default'


def learning_rate_schedule(optim_config: ml_collections.ConfigDict,
                           total_steps: int) -> optax.Schedule:
  """Linear warm-up for `warmup_fraction` of the steps, then cosine decay."""
  if not 0.0 <= optim_config.warmup_fraction < 1.0:
    raise ValueError('config.optim.warmup_fraction must be in [0, 1); got '
                     f'{optim_config.warmup_fraction}.')
  warmup_steps = max(int(round(optim_config.warmup_fraction * total_steps)), 1)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=optim_config.lr,
      warmup_steps=warmup_steps,
      decay_steps=max(total_steps, warmup_steps + 1),
      end_value=optim_config.lr * optim_config.end_lr_fraction)


def _decay_mask(params):
  """Weight decay on matrices and kernels only, not on biases or norms."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def _check_groups(groups) -> list[tuple[re.Pattern, float]]:
  out = []
  for i, group in enumerate(groups):
    if len(group) != 2:
      raise ValueError(f'config.optim.param_groups[{i}]={group!r}; expected a '
                       '(regex, lr_multiplier) pair.')
    pattern, multiplier = group
    try:
      compiled = re.compile(pattern)
    except re.error as e:
      raise ValueError(f'config.optim.param_groups[{i}]: bad regex '
                       f'{pattern!r} ({e}).') from e
    if not isinstance(multiplier, (int, float)) or multiplier < 0:
      raise ValueError(f'config.optim.param_groups[{i}]: lr multiplier '
                       f'{multiplier!r} must be a number >= 0.')
    out.append((compiled, float(multiplier)))
  return out


def group_labels(params, groups: Sequence[tuple[str, float]]):
  """Each parameter's group label: 'frozen', 'lr_x<mult>' or 'default'."""
  compiled = _check_groups(groups)

  def label(path, _):
    name = sharding.path_str(path)
    for pattern, multiplier in compiled:
      if pattern.search(name):
        return FROZEN if multiplier == 0 else f'lr_x{multiplier:g}'
    return DEFAULT_GROUP

  return jax.tree_util.tree_map_with_path(label, params)


def create_optimizer(
    optim_config: ml_collections.ConfigDict, total_steps: int, *,
    extra_groups: Sequence[tuple[str, float]] = ()
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Returns (optimiser, learning-rate schedule of the default group).

  `extra_groups` go before config.optim.param_groups (so they win), e.g. the
  frozen backbone of a frozen-features run.
  """
  if optim_config.lr <= 0:
    raise ValueError(f'config.optim.lr must be > 0; got {optim_config.lr}.')
  schedule = learning_rate_schedule(optim_config, total_steps)
  groups = tuple(extra_groups) + tuple(optim_config.get('param_groups', ()))
  compiled = _check_groups(groups)

  def adamw(multiplier: float) -> optax.GradientTransformation:
    lr = schedule if multiplier == 1 else (
        lambda step: multiplier * schedule(step))
    return optax.adamw(lr, b1=optim_config.b1, b2=optim_config.b2,
                       weight_decay=optim_config.weight_decay,
                       mask=_decay_mask)

  chain = []
  if not compiled:
    if optim_config.grad_clip_norm > 0:
      chain.append(optax.clip_by_global_norm(optim_config.grad_clip_norm))
    chain.append(adamw(1.0))
    return optax.chain(*chain), schedule

  labels = lambda params: group_labels(params, groups)
  frozen = lambda params: jax.tree.map(lambda l: l == FROZEN, labels(params))
  # Frozen gradients are zeroed first, so they do not count in the norm.
  chain.append(optax.masked(optax.set_to_zero(), frozen))
  if optim_config.grad_clip_norm > 0:
    chain.append(optax.clip_by_global_norm(optim_config.grad_clip_norm))
  transforms = {DEFAULT_GROUP: adamw(1.0), FROZEN: optax.set_to_zero()}
  for _, multiplier in compiled:
    if multiplier > 0:
      transforms[f'lr_x{multiplier:g}'] = adamw(multiplier)
  chain.append(optax.multi_transform(transforms, labels))
  return optax.chain(*chain), schedule
