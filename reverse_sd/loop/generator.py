"""The loop's text-to-image generator: a latent diffusion model in miniature.

Stable Diffusion's design at a size that trains on two CPU cores:

  autoencoder   `models/autoencoder.AutoencoderKL`, a small KL autoencoder
                (64 px RGB <-> 16 x 16 x 8 latents), trained here on the
                rendered corpus; its latents are scaled to unit variance
                (SD's `scaling_factor`, measured on the training images).
  text encoder  the frozen all-MiniLM-L6-v2 (`reverse_sd.text.minilm`): the
                last layer's token states of the prompt, [L, 384], padded
                positions zeroed. The empty prompt's states are the
                unconditional context of classifier-free guidance.
  denoiser      `models/diffusion_unet.DiffusionUNet`: the SD U-Net family
                (the `sd_unet` encoder blocks + the up path), predicting v
                (or the noise) on a zero-terminal-SNR schedule, trained
                with conditioning dropout and a loss weighted where the
                object is (the renderer's masks).
  sampler       DDIM (`reverse_sd.loop.diffusion`), steps and guidance
                scale from the config.

Each trainer (`train_autoencoder`, `train_denoiser`) checkpoints and resumes
through `reverse_sd.loop.trainer`. `Generator` holds the trained parts and
samples: an image is a pure function of (parameters, prompt, seed, index),
whatever the batch it is drawn in.
"""

from __future__ import annotations

from collections.abc import Sequence
import functools
import json
import logging
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from reverse_sd.data import synthetic
from reverse_sd.loop import diffusion
from reverse_sd.loop import trainer
from reverse_sd.models import autoencoder as autoencoder_lib
from reverse_sd.models import diffusion_unet
from reverse_sd.models import sd_unet
from reverse_sd.models import sd_vae
from reverse_sd.text import minilm

SCALING_FILE = 'latent_scaling.json'


# --- Shapes from the config ----------------------------------------------------


def vae_config(config: ml_collections.ConfigDict,
               scaling_factor: float = 1.0) -> sd_vae.VAEConfig:
  """The autoencoder's shape (`config.autoencoder`)."""
  ae = config.autoencoder
  return sd_vae.VAEConfig(
      block_out_channels=tuple(ae.block_out_channels),
      layers_per_block=ae.layers_per_block,
      norm_num_groups=ae.norm_num_groups,
      latent_channels=ae.latent_channels,
      down_block_types=(sd_vae.DOWN_ENCODER_BLOCK,) * len(
          ae.block_out_channels),
      scaling_factor=float(scaling_factor),
      mid_block_add_attention=ae.mid_block_attention)


def unet_config(config: ml_collections.ConfigDict) -> sd_unet.UNetConfig:
  """The denoiser's shape (`config.generator`): an SD U-Net whose context is
  MiniLM's token states (cross_attention_dim 384)."""
  gen = config.generator
  blocks = len(gen.block_out_channels)
  return sd_unet.UNetConfig(
      block_out_channels=tuple(gen.block_out_channels),
      down_block_types=tuple(gen.down_block_types),
      layers_per_block=(gen.layers_per_block,) * blocks,
      num_attention_heads=tuple(gen.num_attention_heads),
      transformer_layers_per_block=(1,) * blocks,
      cross_attention_dim=minilm.EMBEDDING_DIM,
      in_channels=config.autoencoder.latent_channels,
      norm_num_groups=gen.norm_num_groups,
      # The prompt's sentence embedding (pooled from the context) added to
      # the time embedding: diffusers' class_embed_type='projection'.
      projection_class_embeddings_input_dim=(
          minilm.EMBEDDING_DIM if gen.get('pooled_text_embedding', False)
          else None))


def noise_schedule(config: ml_collections.ConfigDict) -> diffusion.Schedule:
  """The forward process and prediction type of `config.generator` (a
  record from before the options: epsilon, no terminal rescaling)."""
  gen = config.generator
  return diffusion.Schedule(kind=gen.schedule,
                            num_train_timesteps=gen.num_train_timesteps,
                            beta_start=gen.beta_start, beta_end=gen.beta_end,
                            zero_terminal_snr=gen.get('zero_terminal_snr',
                                                      False),
                            prediction=gen.get('prediction', 'epsilon'))


def latent_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  side = config.corpus.image_size // (2 ** (
      len(config.autoencoder.block_out_channels) - 1))
  return (side, side, config.autoencoder.latent_channels)


# --- Text contexts ---------------------------------------------------------------


def prompt_contexts(encoder: minilm.SentenceEncoder, prompts: Sequence[str],
                    length: int, batch_size: int = 256) -> np.ndarray:
  """MiniLM's last token states of each prompt: float16 [N, length, 384].

  Prompts are truncated to `length` tokens ([CLS] ... [SEP]); padding rows
  are zero, so a short prompt attends to zeros there.
  """
  ids = encoder.tokenize(list(prompts))
  out = np.zeros((len(ids), length, minilm.EMBEDDING_DIM), np.float16)
  states_fn = jax.jit(lambda p, i, m: encoder.model.apply({'params': p}, i, m)
                      * m[..., None])
  for start in range(0, len(ids), batch_size):
    chunk = ids[start:start + batch_size]
    ids_BxL = np.zeros((batch_size, length), np.int32)
    mask_BxL = np.zeros((batch_size, length), np.int32)
    for row, token_ids in enumerate(chunk):
      token_ids = token_ids[:length - 1] + token_ids[-1:] if len(
          token_ids) > length else token_ids
      ids_BxL[row, :len(token_ids)] = token_ids
      mask_BxL[row, :len(token_ids)] = 1
    states = states_fn(encoder.params, ids_BxL, mask_BxL)
    out[start:start + len(chunk)] = np.asarray(states[:len(chunk)],
                                               np.float16)
  return out


# --- Training ------------------------------------------------------------------


def _schedule(section: ml_collections.ConfigDict) -> trainer.Schedule:
  return trainer.Schedule(steps=section.steps, lr=section.lr,
                          ema_decay=section.ema_decay,
                          checkpoint_every=section.checkpoint_every,
                          log_every=section.log_every)


def _to_unit(images_BxHxWx3):
  return images_BxHxWx3.astype(jnp.float32) / 127.5 - 1.0


def init_autoencoder(config) -> tuple[autoencoder_lib.AutoencoderKL, Any]:
  model = autoencoder_lib.AutoencoderKL(vae_config(config))
  size = config.corpus.image_size
  params = model.init(jax.random.key(config.seed),
                      jnp.zeros((1, size, size, 3)))['params']
  return model, params


def autoencoder_loss_fn(model: autoencoder_lib.AutoencoderKL,
                        config: ml_collections.ConfigDict
                        ) -> trainer.LossFn:
  """The autoencoder's loss (see `train_autoencoder`) as (params, batch,
  rng) -> (loss, metrics); batch['images'] uint8 [B, H, W, 3]."""
  ae = config.autoencoder
  for key in ('mse_weight', 'kl_weight'):
    if not (np.isfinite(ae[key]) and ae[key] >= 0):
      raise ValueError(f'autoencoder.{key}={ae[key]!r} must be a finite '
                       'number >= 0 (a loss weight)')

  def loss_fn(params, batch, rng):
    images = _to_unit(batch['images'])
    recon, mean, logvar = model.apply({'params': params}, images, rng)
    l1 = jnp.abs(recon - images).mean()
    mse = jnp.square(recon - images).mean()
    kl = 0.5 * (mean**2 + jnp.exp(logvar) - 1.0 - logvar).mean()
    loss = l1 + ae.mse_weight * mse + ae.kl_weight * kl
    return loss, {'l1': l1, 'mse': mse, 'kl': kl}
  return loss_fn


def train_autoencoder(workdir: pathlib.Path, images_NxHxWx3: np.ndarray,
                      config: ml_collections.ConfigDict) -> tuple[Any, float]:
  """Trains the KL autoencoder; returns (EMA params, latent scaling factor).

  Loss: L1 + `mse_weight` x MSE reconstruction + `kl_weight` x the KL to
  N(0, I) (SD's recipe with a squared term in place of the perceptual and
  adversarial ones: L1 alone lets a small object's colour go, since the
  background's pixels outnumber it). The scaling factor is
  1 / std of the latent means over up to 2,000 training images.
  """
  ae = config.autoencoder
  model, params = init_autoencoder(config)
  loss_fn = autoencoder_loss_fn(model, config)
  make_batch = _index_stream(len(images_NxHxWx3), ae.batch_size,
                             config.seed, lambda idx: {
                                 'images': images_NxHxWx3[idx]})
  _, ema = trainer.train(workdir, name='autoencoder', init_params=params,
                         loss_fn=loss_fn, make_batch=make_batch,
                         schedule=_schedule(ae), seed=config.seed)
  scaling_path = workdir / SCALING_FILE
  if scaling_path.exists():
    scaling = json.loads(scaling_path.read_text())['scaling_factor']
  else:
    sample = images_NxHxWx3[:2000]
    means = encode_images(model, ema, sample, scaling_factor=1.0)
    scaling = float(1.0 / np.std(means))
    scaling_path.write_text(json.dumps({'scaling_factor': scaling,
                                        'latent_std': float(np.std(means))})
                            + '\n')
  return ema, scaling


def encode_images(model: autoencoder_lib.AutoencoderKL, params: Any,
                  images_NxHxWx3: np.ndarray, *, scaling_factor: float,
                  batch_size: int = 256) -> np.ndarray:
  """uint8 images -> scaled latents (the encoder's mean), float32."""
  encode = jax.jit(lambda p, x: model.apply(
      {'params': p}, _to_unit(x), method=lambda m, y: m.encoder(y)[0]))
  out = []
  for start in range(0, len(images_NxHxWx3), batch_size):
    out.append(np.asarray(encode(params,
                                 images_NxHxWx3[start:start + batch_size])))
  return np.concatenate(out) * scaling_factor


def decode_latents(model: autoencoder_lib.AutoencoderKL, params: Any,
                   latents_NxhxwxC: np.ndarray, *, scaling_factor: float,
                   batch_size: int = 256) -> np.ndarray:
  """Scaled latents -> uint8 images (the inverse of `encode_images`)."""
  decode = jax.jit(lambda p, z: model.apply(
      {'params': p}, z / scaling_factor, method=lambda m, x: m.decoder(x)))
  out = []
  for start in range(0, len(latents_NxhxwxC), batch_size):
    images = decode(params, latents_NxhxwxC[start:start + batch_size])
    out.append(np.asarray(jnp.clip(jnp.round((images + 1.0) * 127.5), 0,
                                   255).astype(jnp.uint8)))
  return np.concatenate(out)


def _index_stream(num_examples: int, batch_size: int, seed: int, gather):
  """step -> batch: epoch e's permutation is a pure function of (seed, e),
  so a resumed run continues the same stream."""
  if num_examples < batch_size:
    raise ValueError(f'{num_examples} training examples; the batch size is '
                     f'{batch_size}')
  per_epoch = num_examples // batch_size

  @functools.lru_cache(maxsize=2)
  def permutation(epoch):
    return np.random.default_rng([seed, epoch]).permutation(num_examples)

  def make_batch(step):
    epoch, k = divmod(step, per_epoch)
    return gather(np.sort(permutation(epoch)[k * batch_size:
                                             (k + 1) * batch_size]))
  return make_batch


def denoiser_seed(config: ml_collections.ConfigDict) -> int:
  """The seed of the denoiser's init and batch order: the loop's, moved by
  `config.generator.seed` (another run of the same setting, over the same
  corpus, autoencoder and referee)."""
  return config.seed + 1000 * config.generator.get('seed', 0)


def init_denoiser(config) -> tuple[diffusion_unet.DiffusionUNet, Any]:
  model = diffusion_unet.DiffusionUNet(unet_config(config))
  params = model.init(
      jax.random.key(denoiser_seed(config) + 1),
      jnp.zeros((1, *latent_shape(config))),
      jnp.zeros((1,), jnp.int32),
      jnp.zeros((1, config.text.context_length, minilm.EMBEDDING_DIM))
  )['params']
  return model, params


def denoiser_loss_fn(model: diffusion_unet.DiffusionUNet,
                     config: ml_collections.ConfigDict,
                     null_context_LxD: np.ndarray | jax.Array,
                     trainable: str = '') -> trainer.LossFn:
  """The denoiser's loss (see `train_denoiser`) as (params, batch, rng) ->
  (loss, metrics); batch: 'latents' [B, h, w, C], 'contexts' [B, L, D] and,
  with `config.generator.object_weight` > 0, 'weights' [B, h, w]
  (`diffusion.object_weights`).

  Epsilon or v prediction (`config.generator.prediction`) at uniform random
  timesteps, weighted per example by `diffusion.loss_weights`
  (`config.generator.loss_weighting`) and per position by the batch's
  'weights' (normalised to mean 1 in each example), with
  conditioning dropout to `null_context_LxD`. `trainable='decoder'` stops
  the gradient at `params['encoder']`. The 'mse' metric is unweighted.
  """
  gen = config.generator
  schedule = noise_schedule(config)
  alphas = schedule.alphas_cumprod()
  null = jnp.asarray(null_context_LxD, jnp.float32)
  diffusion.training_noise(jax.random.key(0), (1, 1, 1, 1),
                           gen.noise_offset)  # Fails here on a bad offset.
  object_weight = gen.get('object_weight', 0.0)
  diffusion.object_weights(np.zeros((1, 1, 1)), 1, object_weight)  # Checks.

  def loss_fn(params, batch, rng):
    if trainable == 'decoder':
      params = dict(params, **{diffusion_unet.ENCODER: jax.lax.stop_gradient(
          params[diffusion_unet.ENCODER])})
    rng_t, rng_noise, rng_drop = jax.random.split(rng, 3)
    x0 = batch['latents']
    t = jax.random.randint(rng_t, (x0.shape[0],), 0, gen.num_train_timesteps)
    noise = diffusion.training_noise(rng_noise, x0.shape, gen.noise_offset)
    context = diffusion.drop_context(
        rng_drop, batch['contexts'].astype(jnp.float32), null,
        gen.context_dropout)
    output = model.apply({'params': params},
                         diffusion.add_noise(x0, noise, t, alphas), t, context)
    target = diffusion.training_target(x0, noise, t, alphas,
                                       schedule.prediction)
    squared = (output - target)**2
    mse_B = jnp.mean(squared, axis=(1, 2, 3))
    if object_weight:
      if 'weights' not in batch:
        raise ValueError(f'object_weight={object_weight} needs the batch\'s '
                         "'weights' (diffusion.object_weights)")
      where_BxHxW = batch['weights'] / jnp.mean(batch['weights'], axis=(1, 2),
                                                keepdims=True)
      loss_B = jnp.mean(where_BxHxW[..., None] * squared, axis=(1, 2, 3))
    else:
      loss_B = mse_B
    weights_B = diffusion.loss_weights(t, alphas, gen.loss_weighting,
                                       gen.min_snr_gamma, schedule.prediction)
    return jnp.mean(weights_B * loss_B), {'mse': jnp.mean(mse_B)}
  return loss_fn


def train_denoiser(workdir: pathlib.Path, latents_NxhxwxC: np.ndarray,
                   contexts_NxLxD: np.ndarray, null_context_LxD: np.ndarray,
                   config: ml_collections.ConfigDict, *,
                   object_masks_NxHxW: np.ndarray | None = None,
                   init_params: Any = None,
                   trainable: str = '') -> tuple[Any, Any]:
  """Trains the denoiser (epsilon or v prediction, conditioning dropout, the
  per-timestep loss weights of `config.generator.loss_weighting`, the
  per-position ones of `config.generator.object_weight`).

  Args:
    workdir: the run's folder.
    latents_NxhxwxC: the training images' scaled latents.
    contexts_NxLxD: their prompts' contexts.
    null_context_LxD: the empty prompt's context.
    config: the loop config (`config.generator` for shape and schedule).
    object_masks_NxHxW: the training images' object cover
      (`synthetic_render.object_mask`); needed when
      `config.generator.object_weight` > 0, unused otherwise.
    init_params: start from these (default: a fresh init).
    trainable: '' trains everything; 'decoder' keeps `params['encoder']`
      frozen (the reused encoder's decoder fine-tune).

  Returns:
    (params, ema_params).
  """
  gen = config.generator
  model, params = init_denoiser(config)
  if init_params is not None:
    trainer.check_fits(init_params, params, 'init_params')
    params = init_params
  loss_fn = denoiser_loss_fn(model, config, null_context_LxD, trainable)
  arrays = {'latents': latents_NxhxwxC, 'contexts': contexts_NxLxD}
  object_weight = gen.get('object_weight', 0.0)
  if object_weight:
    if object_masks_NxHxW is None or (len(object_masks_NxHxW) !=
                                      len(latents_NxhxwxC)):
      raise ValueError(
          f'object_weight={object_weight} needs one object mask per '
          f'training latent ({len(latents_NxhxwxC)}), got '
          f'{None if object_masks_NxHxW is None else len(object_masks_NxHxW)}')
    arrays['weights'] = diffusion.object_weights(
        object_masks_NxHxW, latents_NxhxwxC.shape[1], object_weight)
  make_batch = _index_stream(len(latents_NxhxwxC), gen.batch_size,
                             denoiser_seed(config),
                             lambda idx: {k: v[idx] for k, v in arrays.items()})
  section = gen if not trainable else config.reuse
  return trainer.train(workdir, name=f'denoiser{"/" + trainable if trainable else ""}',
                       init_params=params, loss_fn=loss_fn,
                       make_batch=make_batch, schedule=_schedule(section),
                       seed=denoiser_seed(config) + 1)


# --- Sampling --------------------------------------------------------------------


def example_seeds(seed: int, split: str, indices: np.ndarray) -> np.ndarray:
  """The sampling seed of each example: a pure function of (seed, split,
  index), so an image does not depend on its batch or shard."""
  split_id = synthetic.SPLITS.index(split)
  return np.array([np.random.SeedSequence([seed, split_id, int(i)])
                   .generate_state(1)[0] for i in indices], np.uint32)


class Generator:
  """A trained autoencoder + denoiser that turns contexts into images."""

  def __init__(self, config: ml_collections.ConfigDict, ae_params: Any,
               scaling_factor: float, unet_params: Any,
               null_context_LxD: np.ndarray):
    self.config = config
    self.autoencoder = autoencoder_lib.AutoencoderKL(
        vae_config(config, scaling_factor))
    self.ae_params = ae_params
    self.unet = diffusion_unet.DiffusionUNet(unet_config(config))
    self.unet_params = unet_params
    self.null_context = jnp.asarray(null_context_LxD, jnp.float32)
    self.schedule = noise_schedule(config)
    self._sample = jax.jit(self._sample_fn, static_argnums=(4, 5, 6))

  def with_unet_params(self, unet_params: Any) -> Generator:
    """The same generator with other denoiser parameters (e.g. the encoder
    half swapped for a reverse-trained one)."""
    other = object.__new__(Generator)
    other.__dict__.update(self.__dict__)
    other.unet_params = unet_params
    return other

  def _sample_fn(self, unet_params, ae_params, keys, contexts, num_steps,
                 guidance_scale, eta):
    # x_T as the denoiser saw it in training (with its offset noise; none
    # in the records of loops from before the option).
    offset = self.config.generator.get('noise_offset', 0.0)
    noise = jax.vmap(lambda k: diffusion.training_noise(
        k, (1, *latent_shape(self.config)), offset)[0])(keys)
    denoise = lambda x, t, c: self.unet.apply({'params': unet_params}, x, t,
                                              c)
    latents = diffusion.sample(denoise, noise, contexts.astype(jnp.float32),
                               self.null_context, schedule=self.schedule,
                               num_steps=num_steps,
                               guidance_scale=guidance_scale, clip=False,
                               eta=eta, keys_B=keys)
    images = self.autoencoder.apply({'params': ae_params}, latents,
                                    method='decode')
    return jnp.clip(jnp.round((images + 1.0) * 127.5), 0, 255).astype(
        jnp.uint8)

  def sample(self, contexts_NxLxD: np.ndarray, seeds_N: np.ndarray, *,
             num_steps: int, guidance_scale: float, eta: float = 0.0,
             batch_size: int = 64) -> np.ndarray:
    """uint8 images [N, H, W, 3]; image i is a pure function of
    (parameters, context i, seed i)."""
    diffusion.check_sampler(num_steps, guidance_scale,
                            self.schedule.num_train_timesteps, eta)
    seeds_N = np.asarray(seeds_N, np.uint32)
    if len(seeds_N) != len(contexts_NxLxD):
      raise ValueError(f'{len(seeds_N)} seeds for {len(contexts_NxLxD)} '
                       'contexts')
    out = []
    for start in range(0, len(seeds_N), batch_size):
      seeds = seeds_N[start:start + batch_size]
      contexts = contexts_NxLxD[start:start + batch_size]
      n = len(seeds)
      if n < batch_size:  # One compiled shape: pad the last batch.
        seeds = np.pad(seeds, (0, batch_size - n))
        contexts = np.pad(contexts, ((0, batch_size - n), (0, 0), (0, 0)))
      keys = jax.vmap(jax.random.key)(jnp.asarray(seeds))
      images = self._sample(self.unet_params, self.ae_params, keys,
                            jnp.asarray(contexts), int(num_steps),
                            float(guidance_scale), float(eta))
      out.append(np.asarray(images)[:n])
      logging.debug('sampled %d/%d', start + n, len(seeds_N))
    return np.concatenate(out)
