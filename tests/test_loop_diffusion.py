"""The loop's diffusion core: schedule, DDIM, guidance, conditioning dropout,
the full U-Net (whose down path is the white-box encoder) and the
autoencoder."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reverse_sd.loop import diffusion
from reverse_sd.models import autoencoder
from reverse_sd.models import diffusion_unet
from reverse_sd.models import sd_unet
from reverse_sd.models import sd_vae
from reverse_sd.models import whitebox

TINY_UNET = sd_unet.UNetConfig(
    block_out_channels=(8, 16),
    down_block_types=(sd_unet.DOWN_BLOCK, sd_unet.CROSS_ATTN_DOWN_BLOCK),
    layers_per_block=(1, 2), num_attention_heads=(1, 2),
    transformer_layers_per_block=(1, 1), cross_attention_dim=12,
    in_channels=4, norm_num_groups=4)
TINY_VAE = sd_vae.VAEConfig(block_out_channels=(8, 8), layers_per_block=1,
                            norm_num_groups=4, latent_channels=4,
                            down_block_types=(sd_vae.DOWN_ENCODER_BLOCK,) * 2,
                            scaling_factor=0.5,
                            mid_block_add_attention=True)


def test_linear_schedule_matches_ddpm_formula():
  ab = diffusion.Schedule('linear', 10, 0.1, 0.5).alphas_cumprod()
  betas = np.linspace(0.1, 0.5, 10)
  np.testing.assert_allclose(ab, np.cumprod(1 - betas))
  sd = diffusion.Schedule('scaled_linear', 1000, 0.00085, 0.012)
  np.testing.assert_allclose(sd.alphas_cumprod(), whitebox.alphas_cumprod())


@pytest.mark.parametrize('kwargs', [dict(kind='cosine'),
                                    dict(num_train_timesteps=1),
                                    dict(beta_start=0.5, beta_end=0.1)])
def test_bad_schedule(kwargs):
  with pytest.raises(ValueError):
    diffusion.Schedule(**kwargs)


def test_ddim_timesteps_trailing():
  np.testing.assert_array_equal(diffusion.ddim_timesteps(4, 1000),
                                [999, 749, 499, 249])
  np.testing.assert_array_equal(diffusion.ddim_timesteps(1, 1000), [999])
  assert len(diffusion.ddim_timesteps(1000, 1000)) == 1000


def test_min_snr_weights_cap_the_clean_steps():
  """ab = 0.9 (SNR 9) is capped at gamma 5: weight 5/9; ab = 0.5 (SNR 1)
  and the noisier steps keep weight 1."""
  ab = np.array([0.9, 0.5, 0.1])
  t = jnp.arange(3)
  np.testing.assert_allclose(diffusion.loss_weights(t, ab, 'min_snr', 5.0),
                             [5 / 9, 1.0, 1.0], rtol=1e-6)
  np.testing.assert_array_equal(diffusion.loss_weights(t, ab, 'uniform'),
                                np.ones(3))
  with pytest.raises(ValueError, match='loss weighting'):
    diffusion.loss_weights(t, ab, 'snr')
  with pytest.raises(ValueError, match='gamma'):
    diffusion.loss_weights(t, ab, 'min_snr', 0.0)


def test_zero_terminal_snr_rescaling():
  """Lin et al. 2024: sqrt(alpha_bar) keeps its first value, ends at 0,
  and stays linear in the original's."""
  plain = diffusion.Schedule('scaled_linear', 1000, 0.00085, 0.012)
  rescaled = dataclasses.replace(plain, zero_terminal_snr=True,
                                 prediction='v')
  root, new = np.sqrt(plain.alphas_cumprod()), np.sqrt(
      rescaled.alphas_cumprod())
  assert new[-1] == 0.0 and new[0] == pytest.approx(root[0], rel=1e-12)
  np.testing.assert_allclose(new, (root - root[-1]) / (root[0] - root[-1])
                             * root[0], rtol=1e-12, atol=1e-15)
  assert np.all(np.diff(new) < 0)
  with pytest.raises(ValueError, match="needs prediction='v'"):
    dataclasses.replace(plain, zero_terminal_snr=True)
  with pytest.raises(ValueError, match='prediction'):
    dataclasses.replace(plain, prediction='x0')


def test_v_target_and_its_ddim_step_by_hand():
  """v = sqrt(ab) eps - sqrt(1 - ab) x0; the v step recovers x0 and eps
  from (x_t, v) and matches the epsilon step given the true noise."""
  x0, eps = jnp.array([[0.3]]), jnp.array([[-0.7]])
  ab = np.array([0.64])  # sqrt 0.8, sqrt(1 - ab) 0.6.
  t = jnp.array([0])
  v = diffusion.training_target(x0, eps, t, ab, 'v')
  np.testing.assert_allclose(v, [[0.8 * -0.7 - 0.6 * 0.3]], rtol=1e-6)
  np.testing.assert_array_equal(
      diffusion.training_target(x0, eps, t, ab, 'epsilon'), eps)
  x_t = diffusion.add_noise(x0, eps, t, ab)
  for ab_prev in (0.81, 1.0):
    np.testing.assert_allclose(
        diffusion.ddim_step(x_t, v, 0.64, ab_prev, False, 'v'),
        diffusion.ddim_step(x_t, eps, 0.64, ab_prev, False, 'epsilon'),
        rtol=1e-5)
  # At SNR 0 (x_t is the noise) the v step's x0 is -v.
  np.testing.assert_allclose(
      diffusion.ddim_step(jnp.array([0.4]), jnp.array([-0.25]), 0.0, 1.0,
                          False, 'v'), [0.25], rtol=1e-6)


def test_v_min_snr_weights_keep_the_pure_noise_step():
  """v: min(SNR + 1, gamma) / (SNR + 1); SNR 0 keeps weight 1."""
  ab = np.array([0.9, 0.5, 0.0])  # SNR 9, 1, 0.
  t = jnp.arange(3)
  np.testing.assert_allclose(
      diffusion.loss_weights(t, ab, 'min_snr', 5.0, prediction='v'),
      [0.5, 1.0, 1.0], rtol=1e-6)


def test_v_sampler_from_pure_noise_with_oracle():
  """Zero terminal SNR: the first step's input is all noise, and an oracle
  v model lands on x_0 in one step or several."""
  schedule = diffusion.Schedule('scaled_linear', 100, 0.00085, 0.012,
                                zero_terminal_snr=True, prediction='v')
  ab = schedule.alphas_cumprod()
  x0 = jnp.linspace(-0.9, 0.9, 2 * 4 * 4 * 3).reshape(2, 4, 4, 3)
  noise = jax.random.normal(jax.random.key(0), x0.shape)
  x_t = diffusion.add_noise(x0, noise, jnp.array([99, 99]), ab)
  np.testing.assert_allclose(x_t, noise, atol=1e-6)

  def oracle(x, t, context):
    del context
    a = jnp.asarray(ab, jnp.float32)[t][:, None, None, None]
    eps = (x - jnp.sqrt(a) * x0) / jnp.sqrt(1 - a)
    return jnp.sqrt(a) * eps - jnp.sqrt(1 - a) * x0

  for steps in (1, 5):
    out = diffusion.sample(oracle, x_t, jnp.zeros((2, 3, 5)),
                           jnp.zeros((3, 5)), schedule=schedule,
                           num_steps=steps, guidance_scale=1.0, clip=False)
    np.testing.assert_allclose(out, x0, atol=1e-4)


def test_offset_noise_shifts_each_example_and_channel_as_a_whole():
  rng = jax.random.key(0)
  plain = diffusion.training_noise(rng, (64, 8, 8, 4))
  np.testing.assert_array_equal(plain, jax.random.normal(rng, (64, 8, 8, 4)))
  offset = diffusion.training_noise(rng, (64, 8, 8, 4), offset=0.5)
  shift = offset - diffusion.training_noise(jax.random.split(rng)[0],
                                            (64, 8, 8, 4))
  # One shift per (example, channel), the same at every position...
  np.testing.assert_allclose(shift, shift[:, :1, :1, :] * jnp.ones_like(
      shift), atol=1e-6)
  # ...drawn N(0, offset^2): its spread over the 256 draws is about 0.5.
  assert 0.4 < float(jnp.std(shift[:, 0, 0, :])) < 0.6
  assert float(jnp.std(plain)) == pytest.approx(1.0, abs=0.05)


def test_object_weights_pool_dilate_and_scale_the_mask():
  masks = np.zeros((2, 16, 16), np.float32)
  masks[0, 4:8, 4:8] = 1.0  # Latent cell (1, 1) at 4 px a cell.
  masks[0, 8:10, 8:12] = 1.0  # Half of cell (2, 2).
  weights = diffusion.object_weights(masks, 4, 3.0)
  assert weights.shape == (2, 4, 4) and weights.dtype == np.float32
  np.testing.assert_array_equal(weights[1], 1.0)
  expected = np.ones((4, 4), np.float32)
  expected[0:3, 0:3] = 4.0  # Cell (1, 1) and its neighbours: cover 1.
  expected[3, 1:4] = 2.5  # Next to cell (2, 2) only: cover 0.5.
  expected[1:3, 3] = 2.5
  np.testing.assert_array_equal(weights[0], expected)
  np.testing.assert_array_equal(diffusion.object_weights(masks, 4, 0.0), 1.0)


@pytest.mark.parametrize('shape,side,weight,match', [
    ((1, 16, 16), 4, -1.0, 'must be finite and >= 0'),
    ((1, 16, 16), 4, float('nan'), 'must be finite and >= 0'),
    ((1, 16, 16), 5, 1.0, 'do not pool to 5 x 5'),
    ((1, 16, 12), 4, 1.0, 'do not pool'),
])
def test_object_weights_refuse_bad_settings(shape, side, weight, match):
  with pytest.raises(ValueError, match=match):
    diffusion.object_weights(np.zeros(shape), side, weight)


def test_ddim_step_by_hand():
  """One step with made-up numbers, computed on paper."""
  x_t, eps = jnp.array([0.5]), jnp.array([0.2])
  ab_t, ab_prev = 0.64, 0.81  # sqrt: 0.8 and 0.9; sqrt(1-.): 0.6, sqrt(.19).
  x0 = (0.5 - 0.6 * 0.2) / 0.8  # 0.475
  expected = 0.9 * x0 + np.sqrt(0.19) * 0.2
  got = diffusion.ddim_step(x_t, eps, ab_t, ab_prev, clip=False)
  np.testing.assert_allclose(got, [expected], rtol=1e-6)
  # Clipping x0 re-derives the noise from the clipped x0.
  x_big = jnp.array([2.0])
  x0_clipped = 1.0
  eps_hat = (2.0 - 0.8 * x0_clipped) / 0.6
  np.testing.assert_allclose(
      diffusion.ddim_step(x_big, eps, ab_t, ab_prev, clip=True),
      [0.9 * x0_clipped + np.sqrt(0.19) * eps_hat], rtol=1e-6)


def test_sample_inverts_forward_process_with_oracle_denoiser():
  """With the true noise as the prediction, one DDIM step from t = T-1
  returns x_0 exactly (alpha_bar after the last step is 1)."""
  schedule = diffusion.Schedule('linear', 100, 1e-4, 0.02)
  ab = schedule.alphas_cumprod()
  x0 = jnp.linspace(-0.9, 0.9, 2 * 4 * 4 * 3).reshape(2, 4, 4, 3)
  noise = jax.random.normal(jax.random.key(0), x0.shape)
  x_t = diffusion.add_noise(x0, noise, jnp.array([99, 99]), ab)

  def oracle(x, t, context):
    del context
    a = jnp.asarray(ab, jnp.float32)[t][:, None, None, None]
    return (x - jnp.sqrt(a) * x0) / jnp.sqrt(1 - a)

  out = diffusion.sample(oracle, x_t, jnp.zeros((2, 3, 5)),
                         jnp.zeros((3, 5)), schedule=schedule, num_steps=1,
                         guidance_scale=1.0, clip=False)
  np.testing.assert_allclose(out, x0, atol=1e-5)
  # Several steps of the oracle land on x_0 too.
  out = diffusion.sample(oracle, x_t, jnp.zeros((2, 3, 5)),
                         jnp.zeros((3, 5)), schedule=schedule, num_steps=5,
                         guidance_scale=1.0, clip=False)
  np.testing.assert_allclose(out, x0, atol=1e-4)


def test_guidance_combines_conditional_and_unconditional():
  def denoise(x, t, context):
    assert t.shape == (x.shape[0],)
    return jnp.broadcast_to(context.sum(axis=(1, 2))[:, None, None, None],
                            x.shape)

  x = jnp.zeros((2, 1, 1, 1))
  context = jnp.array([[[1.0]], [[3.0]]])
  null = jnp.array([[0.5]])
  for scale, expected in [(1.0, [1.0, 3.0]), (0.0, [0.5, 0.5]),
                          (3.0, [0.5 + 3 * 0.5, 0.5 + 3 * 2.5])]:
    eps = diffusion.guided_output(denoise, x, 7, context, null, scale)
    np.testing.assert_allclose(eps.ravel(), expected)


def test_conditioning_dropout_rate_and_rows():
  context = jnp.ones((4000, 2, 3))
  null = jnp.zeros((2, 3))
  out = diffusion.drop_context(jax.random.key(1), context, null, 0.1)
  dropped = np.asarray((out == 0).all(axis=(1, 2)))
  kept = np.asarray((out == 1).all(axis=(1, 2)))
  assert (dropped | kept).all()  # Whole rows only.
  assert 0.08 < dropped.mean() < 0.12
  assert not np.asarray(diffusion.drop_context(jax.random.key(1), context,
                                               null, 0.0) == 0).any()


@pytest.mark.parametrize('steps,scale,eta', [
    (0, 3.0, 0.0), (1001, 3.0, 0.0), (2.5, 3.0, 0.0), (10, -1.0, 0.0),
    (10, float('nan'), 0.0), (10, 1e6, 0.0), (10, 3.0, -0.5),
    (10, 3.0, 1.5), (10, 3.0, float('nan'))])
def test_sampler_settings_out_of_range_fail_first(steps, scale, eta):
  called = []
  with pytest.raises(ValueError, match='num_steps|guidance_scale|eta'):
    diffusion.sample(lambda *a: called.append(1), jnp.zeros((1, 2, 2, 1)),
                     jnp.zeros((1, 2, 3)), jnp.zeros((2, 3)),
                     schedule=diffusion.Schedule(), num_steps=steps,
                     guidance_scale=scale, eta=eta,
                     keys_B=jax.vmap(jax.random.key)(jnp.arange(1)))
  assert not called


def test_ddim_step_with_eta_by_hand():
  """Song et al. (2021) eq. 12: sigma from the two alpha_bars; eta = 1
  from a pure-noise step (ab_t = 0) draws x_t' = sqrt(ab') x0 + sqrt(1 -
  ab') z, the forward process at t'."""
  x_t, v, z = jnp.float32(0.4), jnp.float32(-0.2), jnp.float32(0.7)
  ab, ab_prev, eta = 0.3, 0.6, 0.5
  x0 = np.sqrt(ab) * 0.4 - np.sqrt(1 - ab) * -0.2
  eps = np.sqrt(1 - ab) * 0.4 + np.sqrt(ab) * -0.2
  sigma = eta * np.sqrt((1 - ab_prev) / (1 - ab)) * np.sqrt(1 - ab / ab_prev)
  expected = (np.sqrt(ab_prev) * x0 +
              np.sqrt(1 - ab_prev - sigma**2) * eps + sigma * 0.7)
  got = diffusion.ddim_step(x_t, v, ab, ab_prev, clip=False, prediction='v',
                            eta=eta, noise=z)
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  got = diffusion.ddim_step(x_t, v, 0.0, ab_prev, clip=False, prediction='v',
                            eta=1.0, noise=z)
  np.testing.assert_allclose(  # x0 = -v at ab_t = 0.
      got, np.sqrt(ab_prev) * 0.2 + np.sqrt(1 - ab_prev) * 0.7, rtol=1e-5)


def test_ancestral_sampler_draws_each_sample_from_its_own_key():
  """With eta > 0 a sample is a function of its key alone (not of its
  batch), differs from the deterministic sample, and needs keys."""
  schedule = diffusion.Schedule(kind='scaled_linear', beta_start=0.00085,
                                beta_end=0.012, zero_terminal_snr=True,
                                prediction='v')
  denoise = lambda x, t, c: 0.5 * x + c[:, :1, :1, None].mean()
  noise = jax.random.normal(jax.random.key(1), (3, 4, 4, 2))
  context = jnp.ones((3, 2, 3))
  keys = jax.vmap(jax.random.key)(jnp.arange(3))
  run = functools.partial(diffusion.sample, denoise, schedule=schedule,
                          num_steps=5, guidance_scale=1.0, clip=False)
  batch = run(noise, context, jnp.zeros((2, 3)), eta=1.0, keys_B=keys)
  alone = run(noise[1:2], context[1:2], jnp.zeros((2, 3)), eta=1.0,
              keys_B=keys[1:2])
  np.testing.assert_allclose(batch[1:2], alone, rtol=1e-5, atol=1e-6)
  deterministic = run(noise, context, jnp.zeros((2, 3)))
  assert np.abs(np.asarray(batch - deterministic)).max() > 1e-2
  with pytest.raises(ValueError, match='keys_B'):
    run(noise, context, jnp.zeros((2, 3)), eta=1.0)


def _unet_inputs(batch=2, size=8):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(batch, size, size, 4)), jnp.float32)
  context = jnp.asarray(rng.normal(size=(batch, 5, 12)), jnp.float32)
  return x, jnp.array([3, 500]), context


def test_full_unet_down_path_is_the_whitebox_encoder():
  unet = diffusion_unet.DiffusionUNet(TINY_UNET)
  x, t, context = _unet_inputs()
  params = unet.init(jax.random.key(0), x, t, context)['params']
  eps = unet.apply({'params': params}, x, t, context)
  assert eps.shape == x.shape and eps.dtype == jnp.float32
  encoder = sd_unet.UNetEncoder(TINY_UNET)
  encoder_params = params[diffusion_unet.ENCODER]
  # The encoder subtree is exactly a UNetEncoder's tree.
  abstract = jax.eval_shape(encoder.init, jax.random.key(0), x, t, context)
  assert (jax.tree.structure(abstract['params']) ==
          jax.tree.structure(encoder_params))
  features = encoder.apply({'params': encoder_params}, x, t, context)
  inside = unet.apply({'params': params}, x, t, context,
                      method=lambda m, *a: m.encoder(*a))
  np.testing.assert_array_equal(features, inside)
  # And it is what the white-box backbone computes at t = 0.
  backbone = whitebox.WhiteBoxBackbone(TINY_UNET, TINY_VAE,
                                       whitebox.Constant(np.asarray(
                                           context[0])))
  latents = x
  bb_params = backbone.init(jax.random.key(1), latents)['params']
  assert (jax.tree.structure(bb_params['unet']) ==
          jax.tree.structure(encoder_params))
  bb_params = {'params': dict(bb_params, unet=encoder_params)}
  pooled = backbone.apply(bb_params, latents)
  direct = encoder.apply({'params': encoder_params}, latents, 0,
                         jnp.broadcast_to(context[0], (2, 5, 12)))
  np.testing.assert_allclose(pooled, direct.max(axis=(1, 2)), rtol=1e-6)


def test_full_unet_uses_its_skips_and_context():
  unet = diffusion_unet.DiffusionUNet(TINY_UNET)
  x, t, context = _unet_inputs()
  params = unet.init(jax.random.key(0), x, t, context)['params']
  assert sorted(k for k in params if k.startswith('up_blocks')) == [
      'up_blocks_0', 'up_blocks_1']
  # Up block 0 mirrors the 2-layer cross-attention block: 3 resnets.
  assert sorted(params['up_blocks_0']) == [
      'attentions_0', 'attentions_1', 'attentions_2', 'resnets_0',
      'resnets_1', 'resnets_2', 'upsamplers_0']
  base = unet.apply({'params': params}, x, t, context)
  other = unet.apply({'params': params}, x, t, context + 1.0)
  assert not np.allclose(base, other)


def test_autoencoder_round_trip_shapes_and_encoder_tree():
  model = autoencoder.AutoencoderKL(TINY_VAE)
  images = jnp.zeros((2, 16, 16, 3))
  params = model.init(jax.random.key(0), images)['params']
  recon, mean, logvar = model.apply({'params': params}, images)
  assert recon.shape == images.shape
  assert mean.shape == logvar.shape == (2, 8, 8, 4)
  latents = model.apply({'params': params}, images, method='encode')
  np.testing.assert_allclose(latents, mean * TINY_VAE.scaling_factor,
                             rtol=1e-6)
  assert model.apply({'params': params}, latents,
                     method='decode').shape == images.shape
  encoder_abstract = jax.eval_shape(sd_vae.VAEEncoder(TINY_VAE).init,
                                    jax.random.key(0), images)['params']
  assert (jax.tree.structure(encoder_abstract) ==
          jax.tree.structure(params[autoencoder.ENCODER]))


def test_pooled_context_is_mean_pooling_over_real_tokens():
  rng = np.random.default_rng(3)
  states = rng.normal(size=(2, 6, 12)).astype(np.float32)
  mask = np.array([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]], np.float32)
  padded = states * mask[..., None]  # The generator's contexts: zeros pad.
  expected = (padded.sum(1) / mask.sum(1, keepdims=True))
  expected /= np.linalg.norm(expected, axis=-1, keepdims=True)
  np.testing.assert_allclose(sd_unet.pooled_context(jnp.asarray(padded)),
                             expected, rtol=1e-5)


def test_projection_class_embedding_conditions_every_call_the_same_way():
  config = dataclasses.replace(TINY_UNET,
                               projection_class_embeddings_input_dim=12)
  unet = diffusion_unet.DiffusionUNet(config)
  x, t, context = _unet_inputs()
  params = unet.init(jax.random.key(0), x, t, context)['params']
  assert 'class_embedding' in params[diffusion_unet.ENCODER]
  default = unet.apply({'params': params}, x, t, context)
  explicit = unet.apply({'params': params}, x, t, context,
                        sd_unet.pooled_context(context))
  np.testing.assert_allclose(default, explicit, rtol=1e-6)
  other = unet.apply({'params': params}, x, t, context,
                     -sd_unet.pooled_context(context))
  assert not np.allclose(default, other)
  with pytest.raises(ValueError, match='class_labels have shape'):
    unet.apply({'params': params}, x, t, context, jnp.zeros((2, 5)))
  # The white-box backbone feeds its encoder the same pooled context.
  backbone = whitebox.WhiteBoxBackbone(
      config, TINY_VAE, whitebox.Constant(np.asarray(context[0])))
  bb = backbone.init(jax.random.key(1), x)['params']
  bb = dict(bb, unet=params[diffusion_unet.ENCODER])
  pooled = backbone.apply({'params': bb}, x)
  direct = sd_unet.UNetEncoder(config).apply(
      {'params': params[diffusion_unet.ENCODER]}, x, 0,
      jnp.broadcast_to(context[0], context.shape))
  np.testing.assert_allclose(pooled, direct.max(axis=(1, 2)), rtol=1e-5)
