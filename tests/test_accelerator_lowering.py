"""The train steps lower for TPU and for CUDA from this CPU host, sharded over
a (data, fsdp) mesh of 8 fake devices, with the fused attention kernel's
custom call in the lowered module (`jax.export`, nothing compiled).

Models at full size: CLIP ViT-L/14 at 224 px (257 tokens, the read-out layer
one query) and the SD 2.1 U-Net encoder on 512-px latents (64x64 = 4,096,
1,024 and 256 tokens of self-attention, a 77-token cross-attention context),
in bfloat16 (the accelerators' default, `config.model.dtype='auto'`).
"""


import jax
from jax import export
import jax.numpy as jnp
import pytest

from configs import synthetic
from reverse_sd import optim
from reverse_sd import pretrained
from reverse_sd import sharding
from reverse_sd import state as state_lib
from reverse_sd import train
from reverse_sd.models import reverse_model

import lowering

BATCH = 8
# The fused kernels' custom-call targets in the lowered module.
TPU_KERNEL = 'tpu_custom_call'
CUDNN_KERNEL = '__cudnn$fmha'
TRITON_KERNEL = '__gpu$xla.gpu.triton'
# Custom calls without export's compatibility guarantee; the checks apply
# to serialisation only (nothing is serialised here).
UNGUARANTEED = ('__cudnn$fmhaSoftmax', '__cudnn$fmhaSoftmaxBackward',
                TRITON_KERNEL)


def _config(case: str, attention: str):
  config = synthetic.get_config('')
  config.mesh.axes = ('data', 'fsdp')
  config.mesh.shape = (4, 2)
  config.mesh.param_preset = 'fsdp'
  config.mesh.fsdp_axis = 'fsdp'
  config.model.attention = attention
  config.vocab.loss_weight = 0.0
  if case == 'vit_l14':
    config.model.backbone, config.model.variant = 'vit', 'L/14'
    config.data.image_size = 224
  else:
    config.model.backbone, config.model.variant = 'sd_unet', 'sd2.1'
    config.model.sd_context = 'zeros'
    config.data.image_size = 512
  return config


def _batch_specs(config, model, mesh):
  batch_sharding = sharding.batch_sharding(mesh)
  side = config.data.image_size
  if config.model.backbone == reverse_model.WHITEBOX:
    # The U-Net trains on the cached VAE latents (frozen_features).
    _, vae = pretrained.read_configs(config.model)
    down = vae.downsample_factor
    inputs = {'features': jax.ShapeDtypeStruct(
        (BATCH, side // down, side // down, vae.latent_channels),
        jnp.float32, sharding=batch_sharding)}
  else:
    inputs = {'image': jax.ShapeDtypeStruct((BATCH, side, side, 3), jnp.uint8,
                                            sharding=batch_sharding)}
  del model
  inputs['embedding'] = jax.ShapeDtypeStruct((BATCH, 384), jnp.float32,
                                             sharding=batch_sharding)
  return inputs


def _lowered_train_step(case: str, platform: str, attention: str) -> str:
  """The MLIR text of the case's train step exported for `platform`."""
  config = _config(case, attention)
  mesh = sharding.make_mesh(config.mesh.axes, config.mesh.shape)
  model = pretrained.create_model(config.model, mesh=mesh,
                                  platform=platform)
  tx, schedule = optim.create_optimizer(
      config.optim, total_steps=1000,
      extra_groups=reverse_model.frozen_param_groups(config.model))
  image_shape = (config.data.image_size,) * 2 + (3,)
  if config.model.backbone == reverse_model.WHITEBOX:
    image_shape = (64, 64, 3)  # Parameter shapes do not depend on it.
  abstract = state_lib.abstract_train_state(model, tx, image_shape,
                                            jax.random.key(0))
  shardings = state_lib.state_shardings(
      mesh, abstract, state_lib.param_layout(config.mesh))
  state_specs = jax.tree.map(
      lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                           sharding=s), abstract, shardings)
  step = train.make_train_step(model, config.loss, schedule, mesh, shardings)
  exported = export.export(
      step, platforms=[platform],
      disabled_checks=[export.DisabledSafetyCheck.custom_call(name)
                       for name in UNGUARANTEED])(
                           state_specs, _batch_specs(config, model, mesh))
  return exported.mlir_module()


@pytest.mark.parametrize('case', ['vit_l14', 'sd21_unet'])
@pytest.mark.parametrize('platform,attention,kernel', [
    ('tpu', 'auto', TPU_KERNEL),
    ('cuda', 'auto', CUDNN_KERNEL),
    ('cuda', 'pallas_gpu', TRITON_KERNEL),
])
def test_train_step_lowers_with_the_fused_kernel(case, platform, attention,
                                                 kernel):
  if case == 'sd21_unet' and attention == 'pallas_gpu':
    pytest.skip('Pallas GPU attention cannot run the U-Net cross-attention '
                '(Q > T with padding); auto (cuDNN) is the GPU path.')
  with lowering.cudnn_present():
    text = _lowered_train_step(case, platform, attention)
  assert kernel in text, (
      f'{case} on {platform} (attention={attention!r}): no {kernel} custom '
      'call in the lowered train step')
  # The kernel runs per batch shard, and the mesh is not replicated away.
  assert 'mhlo.sharding' in text or 'sdy.sharding' in text
  if case == 'sd21_unet':
    # No [.., 4096, 4096] logits: the 64x64-latent self-attention is fused.
    assert 'x4096x4096x' not in text
