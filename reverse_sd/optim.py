"""Optimiser: AdamW with warm-up + cosine decay and gradient clipping."""

import jax
import ml_collections
import optax


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


def create_optimizer(
    optim_config: ml_collections.ConfigDict,
    total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Returns (optimiser, learning-rate schedule)."""
  if optim_config.lr <= 0:
    raise ValueError(f'config.optim.lr must be > 0; got {optim_config.lr}.')
  schedule = learning_rate_schedule(optim_config, total_steps)
  chain = []
  if optim_config.grad_clip_norm > 0:
    chain.append(optax.clip_by_global_norm(optim_config.grad_clip_norm))
  chain.append(optax.adamw(schedule, b1=optim_config.b1, b2=optim_config.b2,
                           weight_decay=optim_config.weight_decay,
                           mask=_decay_mask))
  return optax.chain(*chain), schedule
