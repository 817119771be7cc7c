"""Train state, its parameter layout and its sharded initialisation."""

from collections.abc import Sequence
import logging
from typing import Any

import flax.linen as nn
from flax.training import train_state
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import ml_collections
import optax

from reverse_sd import sharding
from reverse_sd.models import clip_text
from reverse_sd.models import sd_unet
from reverse_sd.models import vit

# The 'tensor_parallel' preset: every model's rules on the 'model' axis. Each
# rule names its own model's parameters, so one table serves all backbones.
TENSOR_PARALLEL_RULES = tuple(dict.fromkeys(
    (*vit.PARTITION_RULES, *clip_text.PARTITION_RULES,
     *sd_unet.PARTITION_RULES)))


class TrainState(train_state.TrainState):
  """Step, parameters and optimiser state (apply_fn and tx are static)."""


def param_layout(mesh_config: ml_collections.ConfigDict
                 ) -> sharding.ParamLayout:
  """The parameter layout `config.mesh` asks for (rules, preset, FSDP).

  Raises:
    ValueError: an unknown `param_preset`, a tensor-parallel preset without a
      'model' axis, or malformed `param_rules` (see
      `sharding.layout_from_config`).
  """
  return sharding.layout_from_config(mesh_config, TENSOR_PARALLEL_RULES)


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


def _as_layout(layout) -> sharding.ParamLayout:
  if isinstance(layout, sharding.ParamLayout):
    return layout
  return sharding.ParamLayout(rules=tuple(layout))  # Plain (regex, spec).


def state_shardings(mesh: Mesh, abstract_state: Any,
                    layout: sharding.ParamLayout | Sequence[sharding.Rule] = ()
                    ) -> Any:
  """NamedShardings of the train state, logging the bytes per device.

  Args:
    mesh: the device mesh.
    abstract_state: the train state's shapes (`abstract_train_state`).
    layout: a `sharding.ParamLayout` (`param_layout(config.mesh)`), or plain
      (regex, spec) rules.

  Returns:
    A pytree of NamedSharding with the structure of the state; the optimiser
    moments take their parameter's sharding.
  """
  layout = _as_layout(layout)
  shardings = sharding.state_layout_shardings(mesh, abstract_state, layout)
  logging.info(
      "Layout (preset %r, mesh %s): parameters %s; with the optimiser state "
      '%s.', layout.preset, dict(mesh.shape),
      sharding.describe(abstract_state.params, shardings.params),
      sharding.describe(abstract_state, shardings))
  return shardings


def create_train_state(
    model: nn.Module, tx: optax.GradientTransformation,
    image_shape: tuple[int, int, int], rng: jax.Array, mesh: Mesh,
    layout: sharding.ParamLayout | Sequence[sharding.Rule] = (), *,
    shardings: Any = None) -> tuple[TrainState, Any]:
  """Initialises the state directly in its sharded layout.

  Args:
    model: the model.
    tx: the optimiser.
    image_shape: (H, W, 3) of one input image.
    rng: the init key.
    mesh: the device mesh.
    layout: a `sharding.ParamLayout` or plain (regex, spec) rules; unused
      when `shardings` is given.
    shardings: the state's shardings when the caller has them already
      (from `state_shardings`).

  Returns:
    (state, state_shardings): the state and the NamedSharding of every leaf.
  """
  if shardings is None:
    abstract = abstract_train_state(model, tx, image_shape, rng)
    shardings = state_shardings(mesh, abstract, layout)
  init = jax.jit(_init_fn(model, tx, image_shape),
                 in_shardings=sharding.replicated(mesh),
                 out_shardings=shardings)
  return init(rng), shardings
