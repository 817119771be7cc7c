"""The miniature loop's steps lower for TPU and for CUDA from this CPU host
(`jax.export`, nothing compiled), at the loop's default (full-size) shapes:
64-px images, 16x16x8 latents, a [B, 40, 384] MiniLM context, a batch of 8
split over the 'data' axis of the 8 fake devices (tests/conftest.py).

Lowered: the loop trainer's step (`loop.trainer.make_train_step`) on the
autoencoder's and the denoiser's losses, the generator's DDIM sampler with
classifier-free guidance and the decode (`Generator._sample`), and the
referee's train step and prediction.

The loop builds its models with the default attention op (XLA's) on every
platform: they run in float32 (which cuDNN's fused attention does not take)
and the U-Net attends only at its 4x4 stage (16 queries and a 40-token
context, which the Pallas TPU kernel would pad to 128 each). What the op
layer's 'auto' would choose for the same U-Net on each platform (bfloat16,
as `pretrained.create_model(..., platform=...)` builds the reverse models)
must lower too, with its fused kernel.
"""

# The loop's jitted functions as it runs them: Generator._sample,
# referee._train_step_fn and referee._predict_fn.
# pylint: disable=protected-access

import jax
from jax import export
import jax.numpy as jnp
import numpy as np
import pytest

from configs import loop as loop_config
from reverse_sd import sharding
from reverse_sd.loop import generator
from reverse_sd.loop import referee
from reverse_sd.loop import trainer
from reverse_sd.models import autoencoder as autoencoder_lib
from reverse_sd.models import diffusion_unet
from reverse_sd.ops import attention as attention_ops
from reverse_sd.text import minilm

import lowering

BATCH = 8
PLATFORMS = ('tpu', 'cuda')
# The fused attention kernels' custom-call targets in a lowered module.
FUSED_KERNEL = {'tpu': 'tpu_custom_call', 'cuda': '__cudnn$fmha'}
# Custom calls without export's compatibility guarantee; the checks apply
# to serialisation only (nothing is serialised here).
UNGUARANTEED = ('__cudnn$fmhaSoftmax', '__cudnn$fmhaSoftmaxBackward')


def _export(fn, platform: str, *args) -> export.Exported:
  with lowering.cudnn_present():
    return export.export(
        fn, platforms=[platform],
        disabled_checks=[export.DisabledSafetyCheck.custom_call(name)
                         for name in UNGUARANTEED])(*args)


def _assert_split_over_the_mesh(exported: export.Exported) -> str:
  """The module's text; it runs on all 8 devices with sharding annotations
  (the mesh was not replicated away)."""
  text = exported.mlir_module()
  assert exported.nr_devices == BATCH
  assert 'mhlo.sharding' in text or 'sdy.sharding' in text
  return text


def _specs(abstract, shardings):
  return jax.tree.map(lambda leaf, s: jax.ShapeDtypeStruct(
      leaf.shape, leaf.dtype, sharding=s), abstract, shardings)


def _batch_spec(shape, dtype, mesh):
  return jax.ShapeDtypeStruct((BATCH, *shape), dtype,
                              sharding=sharding.batch_sharding(mesh))


def _replicated_specs(abstract, mesh):
  return _specs(abstract, jax.tree.map(lambda _: sharding.replicated(mesh),
                                       abstract))


@pytest.fixture(scope='module')
def config():
  return loop_config.get_config('')


@pytest.fixture(scope='module')
def mesh():
  """`loop.trainer.train`'s default: every device on 'data'."""
  mesh = sharding.make_mesh(('data',), (-1,))
  assert mesh.size == BATCH, 'tests/conftest.py makes 8 fake CPU devices'
  return mesh


@pytest.fixture(scope='module')
def unet_params(config):
  return jax.eval_shape(lambda: generator.init_denoiser(config)[1])


@pytest.fixture(scope='module')
def ae_params(config):
  return jax.eval_shape(lambda: generator.init_autoencoder(config)[1])


def _null_context(config):
  return np.zeros((config.text.context_length, minilm.EMBEDDING_DIM),
                  np.float32)


def _train_step_module(loss_fn, params, batch, section, mesh, platform: str,
                       metrics: tuple[str, ...]) -> str:
  """The loop trainer's step on `loss_fn`, exported; the module's text.

  The step returns a state of the input state's tree and shapes, and the
  loss's `metrics` with the trainer's own, as scalars.
  """
  tx, lr = trainer.optimizer(trainer.Schedule(
      steps=section.steps, lr=section.lr, ema_decay=section.ema_decay))
  abstract = trainer.abstract_state(params, tx)
  shardings = trainer.state_shardings(mesh, abstract)
  step = trainer.make_train_step(loss_fn, tx, lr, section.ema_decay, 0, mesh,
                                 shardings)
  exported = _export(step, platform, _specs(abstract, shardings), batch)
  new_state, out_metrics = jax.tree.unflatten(exported.out_tree,
                                              exported.out_avals)
  shape = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype), tree)
  assert shape(new_state) == shape(abstract)
  assert sorted(out_metrics) == sorted(
      (*metrics, 'loss', 'lr', 'grad_norm'))
  assert all(m.shape == () for m in out_metrics.values())
  return _assert_split_over_the_mesh(exported)


@pytest.mark.parametrize('platform', PLATFORMS)
def test_autoencoder_train_step_lowers(config, mesh, ae_params, platform):
  model = autoencoder_lib.AutoencoderKL(generator.vae_config(config))
  size = config.corpus.image_size
  batch = {'images': _batch_spec((size, size, 3), jnp.uint8, mesh)}
  text = _train_step_module(generator.autoencoder_loss_fn(model, config),
                            ae_params, batch, config.autoencoder, mesh,
                            platform, ('l1', 'mse', 'kl'))
  assert FUSED_KERNEL[platform] not in text


def _denoiser_step_module(model, config, mesh, unet_params, platform):
  """The lowered train step of `model` on the denoiser's loss: latents,
  float16 MiniLM contexts and (with an object weight) the per-position
  loss weights, split over the mesh."""
  length = config.text.context_length
  latent_shape = generator.latent_shape(config)
  batch = {
      'latents': _batch_spec(latent_shape, jnp.float32, mesh),
      'contexts': _batch_spec((length, minilm.EMBEDDING_DIM), jnp.float16,
                              mesh)}
  if config.generator.object_weight:
    batch['weights'] = _batch_spec(latent_shape[:2], jnp.float32, mesh)
  loss_fn = generator.denoiser_loss_fn(model, config, _null_context(config))
  return _train_step_module(loss_fn, unet_params, batch, config.generator,
                            mesh, platform, ('mse',))


@pytest.mark.parametrize('platform', PLATFORMS)
def test_denoiser_train_step_lowers(config, mesh, unet_params, platform):
  """The loop's U-Net (float32, XLA attention at its 4x4 stage) with
  conditioning dropout and the Min-SNR loss weights."""
  model = diffusion_unet.DiffusionUNet(generator.unet_config(config))
  assert model.attention.implementation == attention_ops.XLA
  text = _denoiser_step_module(model, config, mesh, unet_params, platform)
  assert FUSED_KERNEL[platform] not in text


@pytest.mark.parametrize('platform', PLATFORMS)
def test_denoiser_with_the_platforms_auto_attention_lowers_fused(
    config, mesh, unet_params, platform):
  """The same U-Net with the op that `pretrained.create_model(...,
  platform=...)` would give it ('auto' on the mesh), in bfloat16: the
  fused kernel takes the 16-token self- and the 40-token cross-attention
  (Pallas TPU padded to 128 and masked; cuDNN as is)."""
  attention = attention_ops.choose(attention_ops.AUTO, platform, mesh)
  model = diffusion_unet.DiffusionUNet(generator.unet_config(config),
                                       dtype=jnp.bfloat16,
                                       attention=attention)
  text = _denoiser_step_module(model, config, mesh, unet_params, platform)
  assert FUSED_KERNEL[platform] in text, (
      f"'auto' attention on {platform} fell back to XLA at the loop's shapes")


@pytest.mark.parametrize('platform', PLATFORMS)
def test_generator_sampling_lowers(config, mesh, ae_params, unet_params,
                                   platform):
  """DDIM (the config's 20 steps, guidance 3) and the decode, on abstract
  parameters, the keys and contexts split over 'data'."""
  gen = generator.Generator(config, _replicated_specs(ae_params, mesh), 1.0,
                            _replicated_specs(unet_params, mesh),
                            _null_context(config))
  keys = _batch_spec((), jax.random.key(0).dtype, mesh)
  contexts = _batch_spec((config.text.context_length, minilm.EMBEDDING_DIM),
                         jnp.float16, mesh)
  exported = _export(gen._sample, platform, gen.unet_params, gen.ae_params,
                     keys, contexts, config.sampler.num_steps,
                     config.sampler.guidance_scale, 1.0)  # eta: the noisy path.
  _assert_split_over_the_mesh(exported)
  size = config.corpus.image_size
  (images,) = exported.out_avals
  assert (images.shape, images.dtype) == ((BATCH, size, size, 3), jnp.uint8)


@pytest.mark.parametrize('platform', PLATFORMS)
def test_referee_train_step_and_prediction_lower(config, mesh, platform):
  """At 64 px, the config's width. The loop runs the referee on one device;
  its jits take their inputs' shardings, here the batch split over 'data'."""
  size = config.corpus.image_size
  setup = {'image_size': size, 'base_width': config.referee.base_width,
           'feature_dim': 256, 'norm': True}
  model = referee._model(setup)
  state = _replicated_specs(
      jax.eval_shape(lambda: referee._init_state(setup, 0)), mesh)
  images = _batch_spec((size, size, 3), jnp.uint8, mesh)
  labels = {key: _batch_spec((), jnp.int32, mesh)
            for key in referee.LABEL_KEYS}
  scalar = lambda dtype: jax.ShapeDtypeStruct(
      (), dtype, sharding=sharding.replicated(mesh))
  train_step = _export(referee._train_step_fn(model), platform, state,
                       images, labels, scalar(jnp.float32),
                       scalar(jnp.int32))
  _assert_split_over_the_mesh(train_step)
  new_state, loss = jax.tree.unflatten(train_step.out_tree,
                                       train_step.out_avals)
  shape = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype), tree)
  assert shape(new_state) == shape(state)
  assert loss.shape == ()
  predict = _export(referee._predict_fn(model), platform, state['params'],
                    images)
  _assert_split_over_the_mesh(predict)
  features, predicted = jax.tree.unflatten(predict.out_tree,
                                           predict.out_avals)
  assert features.shape == (BATCH, 256)
  assert set(predicted) == set(referee.LABEL_KEYS)
