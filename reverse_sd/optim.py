"""Optimiser: AdamW with warm-up + cosine decay, gradient clipping, and
per-tower parameter groups.

`config.optim.param_groups` is a tuple of (regex, lr_multiplier) pairs matched
with `re.search` against each parameter's '/'-joined path (e.g.
'backbone/layers_3/fc1/kernel'); the first match wins and unmatched
parameters train at the full learning rate. A multiplier of 0 freezes the
group: its gradients are zeroed before clipping (so they do not count in the
global norm), and it gets no AdamW update or weight decay.

The global norm of the gradients (clipping, and the `grad_norm` metric) is
`global_norm`, computed as `config.optim.grad_norm` says:
  'auto'        on the CPU backend in a one-device process, with float32
                gradients, one fused C++ pass over every gradient
                (`models/cpu_sum_squares.cc`; XLA:CPU materialises the
                squares, then runs a tree of reduce-window loops);
                `optax.tree.norm` elsewhere. On
                several devices the kernel would see gathered gradients, so
                'auto' keeps XLA's reduction there.
  'xla'         always `optax.tree.norm`.
  'cpu_kernel'  the kernel, or an error saying why it cannot run.
The kernel sums in float32 chunks of 16K values and adds the chunk totals in
double, in a fixed order; `optax.tree.norm` differs from it by rounding.
"""

from collections.abc import Sequence
import re

import jax
import jax.numpy as jnp
import ml_collections
import optax

from reverse_sd import sharding
from reverse_sd.models import cpu_kernels

FROZEN = 'frozen'
DEFAULT_GROUP = 'default'
GRAD_NORMS = ('auto', 'xla', 'cpu_kernel')


@jax.custom_jvp
def _sum_squares(*leaves):
  """sum_i sum(leaves[i] ** 2) of float32 arrays as one FFI call."""
  return jax.ffi.ffi_call('rsd_sum_squares',
                          jax.ShapeDtypeStruct((), jnp.float32),
                          vmap_method='sequential')(*leaves)


@_sum_squares.defjvp
def _sum_squares_jvp(primals, tangents):
  return _sum_squares(*primals), 2 * sum(
      jnp.vdot(x, t) for x, t in zip(primals, tangents))


def _kernel_unavailable(leaves, impl: str) -> str | None:
  """Why `global_norm` cannot use the kernel on `leaves` (None: it can)."""
  if impl == 'auto' and jax.device_count() > 1:
    return (f'{jax.device_count()} devices (the kernel would gather sharded '
            'gradients)')
  dtypes = sorted({str(x.dtype) for x in leaves if x.dtype != jnp.float32})
  if dtypes:
    return f'dtypes {dtypes} (the kernel is float32)'
  return cpu_kernels.unavailable_reason()


def global_norm(tree, impl: str = 'auto') -> jax.Array:
  """The L2 norm of all arrays of `tree` together (`optax.tree.norm`).

  Args:
    tree: a pytree of arrays.
    impl: 'auto', 'xla' or 'cpu_kernel' (`GRAD_NORMS`; the module docstring).

  Returns:
    A float32 scalar (the arrays' dtype with 'xla').
  """
  if impl not in GRAD_NORMS:
    raise ValueError(f'config.optim.grad_norm={impl!r}; expected one of '
                     f'{GRAD_NORMS}.')
  leaves = jax.tree.leaves(tree)
  if impl == 'xla' or not leaves:
    return optax.tree.norm(tree)
  reason = _kernel_unavailable(leaves, impl)
  if reason is None:
    return jnp.sqrt(_sum_squares(*leaves))
  if impl == 'cpu_kernel':
    raise ValueError(f"config.optim.grad_norm='cpu_kernel' cannot run: "
                     f'{reason}.')
  unavailable = cpu_kernels.unavailable_reason()
  if unavailable and jax.default_backend() == 'cpu':
    cpu_kernels.warn_unavailable('The fused gradient norm', 'optax.tree.norm',
                                 unavailable)
  return optax.tree.norm(tree)


def clip_by_global_norm(max_norm: float,
                        impl: str = 'auto') -> optax.GradientTransformation:
  """`optax.clip_by_global_norm` with the norm of `global_norm(.., impl)`."""

  def update_fn(updates, state, params=None):
    del params
    g_norm = global_norm(updates, impl)
    trigger = g_norm < max_norm

    def clip_fn(t):
      return jax.lax.select(trigger, t,
                            (t / g_norm.astype(t.dtype)) * max_norm)

    return jax.tree.map(clip_fn, updates), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


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
  grad_norm = optim_config.get('grad_norm', 'auto')
  if grad_norm not in GRAD_NORMS:
    raise ValueError(f'config.optim.grad_norm={grad_norm!r}; expected one of '
                     f'{GRAD_NORMS}.')

  def adamw(multiplier: float) -> optax.GradientTransformation:
    lr = schedule if multiplier == 1 else (
        lambda step: multiplier * schedule(step))
    return optax.adamw(lr, b1=optim_config.b1, b2=optim_config.b2,
                       weight_decay=optim_config.weight_decay,
                       mask=_decay_mask)

  chain = []
  if not compiled:
    if optim_config.grad_clip_norm > 0:
      chain.append(clip_by_global_norm(optim_config.grad_clip_norm, grad_norm))
    chain.append(adamw(1.0))
    return optax.chain(*chain), schedule

  labels = lambda params: group_labels(params, groups)
  frozen = lambda params: jax.tree.map(lambda l: l == FROZEN, labels(params))
  # Frozen gradients are zeroed first, so they do not count in the norm.
  chain.append(optax.masked(optax.set_to_zero(), frozen))
  if optim_config.grad_clip_norm > 0:
    chain.append(clip_by_global_norm(optim_config.grad_clip_norm, grad_norm))
  transforms = {DEFAULT_GROUP: adamw(1.0), FROZEN: optax.set_to_zero()}
  for _, multiplier in compiled:
    if multiplier > 0:
      transforms[f'lr_x{multiplier:g}'] = adamw(multiplier)
  chain.append(optax.multi_transform(transforms, labels))
  return optax.chain(*chain), schedule
