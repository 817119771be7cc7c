"""Train state and its sharded initialisation."""

from typing import Any

import flax.linen as nn
from flax.training import train_state
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import optax

from reverse_sd import sharding


class TrainState(train_state.TrainState):
  """Step, parameters and optimiser state (apply_fn and tx are static)."""


def abstract_train_state(model: nn.Module, tx: optax.GradientTransformation,
                         image_shape: tuple[int, int, int],
                         rng: jax.Array) -> Any:
  """Shapes and dtypes of the train state, without allocating it."""
  return jax.eval_shape(_init_fn(model, tx, image_shape), rng)


def _init_fn(model, tx, image_shape):
  def init(rng):
    images = jnp.zeros((1, *image_shape), jnp.uint8)
    params = model.init(rng, images)['params']
    return TrainState.create(apply_fn=model.apply, params=params, tx=tx)
  return init


def create_train_state(model: nn.Module, tx: optax.GradientTransformation,
                       image_shape: tuple[int, int, int], rng: jax.Array,
                       mesh: Mesh, param_rules=()) -> tuple[TrainState, Any]:
  """Initialises the state directly in its sharded layout.

  Returns:
    (state, state_shardings): the state and the NamedSharding of every leaf.
  """
  abstract = abstract_train_state(model, tx, image_shape, rng)
  shardings = sharding.tree_shardings(mesh, abstract, param_rules)
  init = jax.jit(_init_fn(model, tx, image_shape),
                 in_shardings=sharding.replicated(mesh),
                 out_shardings=shardings)
  return init(rng), shardings
