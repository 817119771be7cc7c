"""DDPM training objective and the DDIM sampler with classifier-free guidance.

The generator of the miniature loop is a diffusion model
(`models/diffusion_unet.DiffusionUNet`) over images in [-1, 1] or latents,
predicting the noise (epsilon) or the velocity v (Salimans & Ho 2022). This
module holds what is not the network:

  Schedule            alpha_bar_t of the forward process, t = 0 .. T-1
                      ('linear': DDPM's betas 1e-4 .. 0.02, the pixel-space
                      choice; 'scaled_linear': Stable Diffusion's 0.00085 ..
                      0.012, for latents), optionally rescaled to a zero
                      terminal SNR (Lin et al. 2024), and the model's
                      prediction type ('epsilon' or 'v').
  add_noise           x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps.
  training_noise      eps for training, with an optional per-channel offset
                      ("offset noise").
  training_target     what the model regresses: eps, or
                      v = sqrt(ab_t) eps - sqrt(1 - ab_t) x_0.
  loss_weights        per-timestep weights of that loss ('uniform', or
                      Min-SNR-gamma, Hang et al. 2023).
  object_weights      per-position weights of that loss: more where the
                      object is.
  drop_context        conditioning dropout: a random share of the contexts
                      becomes the empty prompt's, so one network learns the
                      conditional and the unconditional model.
  ddim_timesteps      the sampler's timesteps ("trailing" spacing: the first
                      step starts from t = T-1, whatever the step count).
  guided_output       out_u + scale (out_c - out_u), one batched forward pass
                      (linear in the output, so the same for eps and v).
  ddim_step           one DDIM update (eta = 0: deterministic; eta = 1:
                      DDPM's ancestral step).
  sample              the whole DDIM loop from Gaussian noise.

A DDIM step from t to t' (alpha_bar of t' = 1 past the last step, diffusers'
`set_alpha_to_one`):
  x0_hat = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t)          (epsilon)
         = sqrt(ab_t) x_t - sqrt(1 - ab_t) v                  (v)
  clipped to [-1, 1] in pixel space, then
  x_t'   = sqrt(ab_t') x0_hat + sqrt(1 - ab_t') eps_hat,
where eps_hat = (x_t - sqrt(ab_t) x0_hat) / sqrt(1 - ab_t) is the noise
implied by x0_hat (diffusers' `clip_sample` re-derives it the same way since
0.15; for an unclipped epsilon model eps_hat = eps). With eta > 0 (Song et
al. 2021, eq. 12; diffusers' `DDIMScheduler.step(eta=)`), part of eps_hat is
fresh noise z:
  sigma  = eta sqrt((1 - ab_t') / (1 - ab_t)) sqrt(1 - ab_t / ab_t')
  x_t'   = sqrt(ab_t') x0_hat + sqrt(1 - ab_t' - sigma^2) eps_hat + sigma z.

Why zero terminal SNR: the scaled_linear schedule keeps sqrt(ab) = 0.07 of
the image at t = T-1, enough for a model to read a latent's mean (the
background's colour) and its coarse layout off the starting noise instead of
the prompt. Rescaled, x_{T-1} is pure noise and the first step predicts
x_0 from the prompt alone. Epsilon is undefined there (ab = 0), so a zero
terminal SNR needs the v prediction.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

SCHEDULES = ('linear', 'scaled_linear')
PREDICTIONS = ('epsilon', 'v')
LOSS_WEIGHTINGS = ('uniform', 'min_snr')
MAX_GUIDANCE_SCALE = 50.0
# Step and initial noise of one sample come from its own key, split so.
_STEP_NOISE_STREAM = 1


@dataclasses.dataclass(frozen=True)
class Schedule:
  """The forward process: `num_train_timesteps` steps of a beta schedule,
  optionally rescaled to a zero terminal SNR, and what the model predicts."""
  kind: str = 'linear'
  num_train_timesteps: int = 1000
  beta_start: float = 1e-4
  beta_end: float = 0.02
  zero_terminal_snr: bool = False
  prediction: str = 'epsilon'

  def __post_init__(self):
    if self.kind not in SCHEDULES:
      raise ValueError(f'schedule kind {self.kind!r}; expected one of '
                       f'{SCHEDULES}')
    if self.num_train_timesteps < 2:
      raise ValueError('num_train_timesteps must be at least 2, got '
                       f'{self.num_train_timesteps}')
    if not 0 < self.beta_start < self.beta_end < 1:
      raise ValueError(f'betas must satisfy 0 < beta_start ({self.beta_start})'
                       f' < beta_end ({self.beta_end}) < 1')
    if self.prediction not in PREDICTIONS:
      raise ValueError(f'prediction {self.prediction!r}; expected one of '
                       f'{PREDICTIONS}')
    if self.zero_terminal_snr and self.prediction != 'v':
      raise ValueError('zero_terminal_snr needs prediction=\'v\': at SNR 0 '
                       'the noise is the whole input and x_0 cannot be '
                       'recovered from an epsilon prediction')

  def alphas_cumprod(self) -> np.ndarray:
    """alpha_bar_t, t = 0 .. num_train_timesteps - 1, float64."""
    n = self.num_train_timesteps
    if self.kind == 'linear':
      betas = np.linspace(self.beta_start, self.beta_end, n, dtype=np.float64)
    else:  # 'scaled_linear': linear in sqrt(beta), SD's.
      betas = np.linspace(self.beta_start**0.5, self.beta_end**0.5, n,
                          dtype=np.float64)**2
    alphas_cumprod = np.cumprod(1.0 - betas)
    if self.zero_terminal_snr:
      # Lin et al. 2024, Algorithm 1: shift and scale sqrt(alpha_bar) so the
      # first step is unchanged and the last is 0.
      root = np.sqrt(alphas_cumprod)
      root = (root - root[-1]) * root[0] / (root[0] - root[-1])
      alphas_cumprod = root**2
    return alphas_cumprod


def add_noise(x0_BxHxWxC, noise_BxHxWxC, timesteps_B, alphas_cumprod):
  """The forward process q(x_t | x_0) at integer `timesteps_B`."""
  ab = jnp.asarray(alphas_cumprod, jnp.float32)[timesteps_B]
  ab = ab.reshape(-1, *([1] * (x0_BxHxWxC.ndim - 1)))
  return jnp.sqrt(ab) * x0_BxHxWxC + jnp.sqrt(1.0 - ab) * noise_BxHxWxC


def training_noise(rng, shape: tuple[int, ...], offset: float = 0.0):
  """Training noise: N(0, I) plus `offset` x one N(0, 1) draw per example and
  channel, shared by all positions ("offset noise", Guttenberg 2023).

  At t = T-1 the scaled_linear schedule keeps sqrt(alpha_bar) ~ 0.07 of the
  image, and averaged over a whole latent that is enough to read its mean
  colour off x_t: a model trained on plain noise takes a background's
  colour from the noise it starts from, not from the prompt. The offset
  makes the mean of x_t uninformative, so the prompt must set it.
  """
  if not (np.isfinite(offset) and offset >= 0):
    raise ValueError(f'noise offset {offset!r} must be a finite number >= 0 '
                     '(the std of the per-channel shift; 0: plain noise)')
  if not offset:
    return jax.random.normal(rng, shape)
  rng_pixel, rng_offset = jax.random.split(rng)
  return jax.random.normal(rng_pixel, shape) + offset * jax.random.normal(
      rng_offset, (shape[0],) + (1,) * (len(shape) - 2) + (shape[-1],))


def training_target(x0_BxHxWxC, noise_BxHxWxC, timesteps_B, alphas_cumprod,
                    prediction: str = 'epsilon'):
  """What the model regresses at `timesteps_B`: the noise, or
  v = sqrt(ab_t) eps - sqrt(1 - ab_t) x_0."""
  if prediction not in PREDICTIONS:
    raise ValueError(f'prediction {prediction!r}; expected one of '
                     f'{PREDICTIONS}')
  if prediction == 'epsilon':
    return noise_BxHxWxC
  ab = jnp.asarray(alphas_cumprod, jnp.float32)[timesteps_B]
  ab = ab.reshape(-1, *([1] * (x0_BxHxWxC.ndim - 1)))
  return jnp.sqrt(ab) * noise_BxHxWxC - jnp.sqrt(1.0 - ab) * x0_BxHxWxC


def object_weights(masks_NxHxW: np.ndarray, latent_side: int,
                   weight: float) -> np.ndarray:
  """Per-position weights of the prediction loss, [N, h, w] float32: 1 +
  `weight` x the object's cover of the latent cell or of a neighbour.

  The object is a few percent of a scene's pixels, so under a uniform loss
  the cells where two shapes differ are a small share of the gradient. The
  cover (`masks_NxHxW`, in [0, 1] at image resolution, averaged over each
  latent cell's pixels) is dilated by one cell, so the edge cells that the
  autoencoder's receptive field ties to the object count as object too.
  """
  if not (np.isfinite(weight) and weight >= 0):
    raise ValueError(f'object weight {weight} must be finite and >= 0')
  n, height, width = masks_NxHxW.shape
  if height != width or height % latent_side:
    raise ValueError(f'{height} x {width} masks do not pool to '
                     f'{latent_side} x {latent_side} latents')
  k = height // latent_side
  cover = np.asarray(masks_NxHxW, np.float32).reshape(
      n, latent_side, k, latent_side, k).mean(axis=(2, 4))
  padded = np.pad(cover, ((0, 0), (1, 1), (1, 1)))
  dilated = np.max(np.stack([
      padded[:, i:i + latent_side, j:j + latent_side]
      for i in range(3) for j in range(3)]), axis=0)
  return (1.0 + weight * dilated).astype(np.float32)


def loss_weights(timesteps_B, alphas_cumprod, weighting: str,
                 gamma: float = 5.0, prediction: str = 'epsilon'):
  """Per-example weights of the prediction loss at `timesteps_B`.

  'uniform': 1 (DDPM's simple loss). 'min_snr': Min-SNR-gamma (Hang et al.
  2023). With SNR_t = ab_t / (1 - ab_t), the epsilon loss weighs the x_0
  error by SNR_t, so the nearly clean steps dominate its gradient; the
  weight min(SNR_t, gamma) / SNR_t caps that at gamma and gives the noisy
  steps, where colour and layout are decided, their share. The v loss
  weighs the x_0 error by SNR_t + 1; its weight is min(SNR_t + 1, gamma) /
  (SNR_t + 1), which keeps the pure-noise step of a zero-terminal-SNR
  schedule at x_0 weight 1 (Min-SNR's own v weight, min(SNR_t, gamma) /
  (SNR_t + 1), would drop it to 0).
  """
  if weighting not in LOSS_WEIGHTINGS:
    raise ValueError(f'loss weighting {weighting!r}; expected one of '
                     f'{LOSS_WEIGHTINGS}')
  if weighting == 'uniform':
    return jnp.ones(timesteps_B.shape, jnp.float32)
  if not gamma > 0:
    raise ValueError(f'min_snr gamma must be positive, got {gamma}')
  if prediction not in PREDICTIONS:
    raise ValueError(f'prediction {prediction!r}; expected one of '
                     f'{PREDICTIONS}')
  ab = jnp.asarray(alphas_cumprod, jnp.float32)[timesteps_B]
  snr = ab / (1.0 - ab)
  if prediction == 'v':
    snr = snr + 1.0
  return jnp.minimum(snr, gamma) / snr


def drop_context(rng, context_BxTxD, null_context_TxD, drop_rate: float):
  """Replaces each row's context by `null_context_TxD` with `drop_rate`."""
  drop_B = jax.random.uniform(rng, (context_BxTxD.shape[0],)) < drop_rate
  null = jnp.broadcast_to(null_context_TxD.astype(context_BxTxD.dtype),
                          context_BxTxD.shape)
  return jnp.where(drop_B[:, None, None], null, context_BxTxD)


def check_sampler(num_steps: int, guidance_scale: float,
                  num_train_timesteps: int, eta: float = 0.0) -> None:
  """Raises ValueError for a step count, guidance scale or eta out of
  range, before any sampling work starts."""
  if (not isinstance(num_steps, (int, np.integer)) or
      not 1 <= num_steps <= num_train_timesteps):
    raise ValueError(f'DDIM num_steps={num_steps!r} must be an integer in '
                     f'[1, {num_train_timesteps}] (the training timesteps)')
  if not (np.isfinite(guidance_scale) and
          0.0 <= guidance_scale <= MAX_GUIDANCE_SCALE):
    raise ValueError(f'guidance_scale={guidance_scale!r} must be in [0, '
                     f'{MAX_GUIDANCE_SCALE}] (1: no guidance, 0: '
                     'unconditional)')
  if not (isinstance(eta, (int, float, np.floating, np.integer)) and
          0.0 <= eta <= 1.0):
    raise ValueError(f'DDIM eta={eta!r} must be in [0, 1] (0: '
                     'deterministic, 1: ancestral)')


def ddim_timesteps(num_steps: int, num_train_timesteps: int) -> np.ndarray:
  """Descending int timesteps, 'trailing' spacing (diffusers'
  `timestep_spacing='trailing'`): round(T - k T / n) - 1, k = 0 .. n-1."""
  steps = np.round(np.arange(num_train_timesteps, 0,
                             -num_train_timesteps / num_steps)) - 1
  return steps.astype(np.int32)


def guided_output(denoise: Callable, x_BxHxWxC, t, context_BxTxD,
                  null_context_TxD, guidance_scale: float):
  """out_u + scale (out_c - out_u); one forward pass over [cond; uncond].

  `denoise(x, t, context)` predicts the noise or v (both are linear in the
  model's output at a fixed x_t, so guiding either is the same). Scale 1 is
  the conditional model alone (one pass), 0 the unconditional one.
  """
  batch = x_BxHxWxC.shape[0]
  t = jnp.broadcast_to(jnp.asarray(t), (batch,))
  if guidance_scale == 1.0:
    return denoise(x_BxHxWxC, t, context_BxTxD)
  null = jnp.broadcast_to(null_context_TxD.astype(context_BxTxD.dtype),
                          context_BxTxD.shape)
  eps = denoise(jnp.concatenate([x_BxHxWxC, x_BxHxWxC]),
                jnp.concatenate([t, t]),
                jnp.concatenate([context_BxTxD, null]))
  eps_cond, eps_uncond = eps[:batch], eps[batch:]
  return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


def ddim_step(x_t, output, alpha_bar_t, alpha_bar_prev, clip: bool = True,
              prediction: str = 'epsilon', eta: float = 0.0, noise=None):
  """One DDIM update from alpha_bar_t to alpha_bar_prev, from the model's
  `output` (the noise, or v); with eta > 0, `noise` (like x_t) is the fresh
  Gaussian noise of the step."""
  if prediction == 'v':
    x0 = (jnp.sqrt(alpha_bar_t) * x_t -
          jnp.sqrt(1.0 - alpha_bar_t) * output)
    eps = jnp.sqrt(1.0 - alpha_bar_t) * x_t + jnp.sqrt(alpha_bar_t) * output
  elif prediction == 'epsilon':
    eps = output
    x0 = (x_t - jnp.sqrt(1.0 - alpha_bar_t) * eps) / jnp.sqrt(alpha_bar_t)
  else:
    raise ValueError(f'prediction {prediction!r}; expected one of '
                     f'{PREDICTIONS}')
  if clip:
    x0 = jnp.clip(x0, -1.0, 1.0)
    eps = (x_t - jnp.sqrt(alpha_bar_t) * x0) / jnp.sqrt(1.0 - alpha_bar_t)
  if not eta:
    return jnp.sqrt(alpha_bar_prev) * x0 + jnp.sqrt(1.0 - alpha_bar_prev) * eps
  sigma = eta * jnp.sqrt(
      (1.0 - alpha_bar_prev) / (1.0 - alpha_bar_t) *
      jnp.maximum(1.0 - alpha_bar_t / alpha_bar_prev, 0.0))
  return (jnp.sqrt(alpha_bar_prev) * x0 +
          jnp.sqrt(jnp.maximum(1.0 - alpha_bar_prev - sigma**2, 0.0)) * eps +
          sigma * noise)


def sample(denoise: Callable, noise_BxHxWxC, context_BxTxD, null_context_TxD,
           *, schedule: Schedule, num_steps: int, guidance_scale: float,
           clip: bool = True, eta: float = 0.0, keys_B=None):
  """DDIM from `noise_BxHxWxC` (x_T) to x_0 in [-1, 1] (jit-able).

  Args:
    denoise: (x, timesteps [B], context) -> the model's output (the noise
      or v, as `schedule.prediction` says).
    noise_BxHxWxC: the starting Gaussian noise (its seed fixes the sample).
    context_BxTxD: the prompts' contexts.
    null_context_TxD: the empty prompt's context (guidance's unconditional).
    schedule: the forward process the model was trained with.
    num_steps: DDIM steps.
    guidance_scale: classifier-free guidance scale.
    clip: clip the predicted x_0 to [-1, 1] at every step (pixel space).
    eta: the DDIM noise level (0: deterministic; 1: ancestral sampling).
    keys_B: with eta > 0, one PRNG key per sample: step k's noise for sample
      b is drawn from fold_in(fold_in(keys_B[b], 1), k), so a sample does
      not depend on the others in its batch.
  """
  check_sampler(num_steps, guidance_scale, schedule.num_train_timesteps, eta)
  if eta and keys_B is None:
    raise ValueError('DDIM with eta > 0 needs keys_B (one key per sample).')
  ab = schedule.alphas_cumprod()
  timesteps = ddim_timesteps(num_steps, schedule.num_train_timesteps)
  prev = np.concatenate([ab[timesteps[1:]], [1.0]])
  table = jnp.asarray(np.stack([timesteps.astype(np.float64), ab[timesteps],
                                prev, np.arange(num_steps)], -1), jnp.float32)
  batch = noise_BxHxWxC.shape[0]
  shape = noise_BxHxWxC.shape[1:]

  def body(x, row):
    t = jnp.full((batch,), row[0].astype(jnp.int32))
    out = guided_output(denoise, x, t, context_BxTxD, null_context_TxD,
                        guidance_scale)
    noise = None
    if eta:
      step = row[3].astype(jnp.int32)
      noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(
          jax.random.fold_in(k, _STEP_NOISE_STREAM), step), shape))(keys_B)
    return ddim_step(x, out, row[1], row[2], clip, schedule.prediction, eta,
                     noise), None

  x, _ = jax.lax.scan(body, noise_BxHxWxC.astype(jnp.float32), table)
  return jnp.clip(x, -1.0, 1.0) if clip else x
