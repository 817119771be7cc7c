r"""Where a loop generator loses the prompt: its autoencoder or its denoiser.

  python benchmarks/loop_diagnose.py --workdir=/tmp/loop \
      [--num_examples=1000] [--timesteps=50,200,400,600,800,950] \
      [--output=benchmarks/results/loop_diagnose.json]

Reads a loop workdir whose autoencoder, generator and referee have trained
(`python -m reverse_sd.loop`; the config is the one its stages recorded) and
prints two tables over the first `num_examples` held-out (test) examples:

  ceiling      the referee's per-attribute accuracy on the rendered images
               and on their autoencoder round trip: what no denoiser in that
               latent space can beat.
  conditioning the denoiser's MSE on its target (the noise, or v) at each
               timestep with the prompt's own context, another prompt's (shuffled) and the empty
               prompt's: how much the prompt lowers the loss where.
"""

import argparse
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import common
from reverse_sd.loop import diffusion
from reverse_sd.loop import generator as generator_lib
from reverse_sd.loop import referee as referee_lib
from reverse_sd.loop import stages

BATCH = 250


def conditioning_losses(loop, latents, contexts, timesteps, seed=0):
  """{t: {'own', 'shuffled', 'empty': MSE}} over the examples, on the
  denoiser's target (`config.generator.prediction`)."""
  model, _ = generator_lib.init_denoiser(loop.config)
  apply = jax.jit(lambda p, x, t, c: model.apply({'params': p}, x, t, c))
  schedule = generator_lib.noise_schedule(loop.config)
  alphas = schedule.alphas_cumprod()
  n = len(latents)
  shuffled = contexts[np.random.default_rng(seed).permutation(n)]
  empty = np.broadcast_to(loop.null_context, contexts.shape)
  out = {}
  for t in timesteps:
    sums = {'own': 0.0, 'shuffled': 0.0, 'empty': 0.0}
    for start in range(0, n, BATCH):
      x0 = jnp.asarray(latents[start:start + BATCH])
      noise = jax.random.normal(jax.random.fold_in(jax.random.key(seed), t),
                                x0.shape)
      tt = jnp.full((len(x0),), t, jnp.int32)
      xt = diffusion.add_noise(x0, noise, tt, alphas)
      target = diffusion.training_target(x0, noise, tt, alphas,
                                         schedule.prediction)
      for name, c in (('own', contexts), ('shuffled', shuffled),
                      ('empty', empty)):
        pred = apply(loop.denoiser_params, xt, tt,
                     jnp.asarray(c[start:start + BATCH], jnp.float32))
        sums[name] += float(jnp.sum(jnp.mean((pred - target)**2,
                                             axis=(1, 2, 3))))
    out[int(t)] = {k: v / n for k, v in sums.items()}
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--num_examples', type=int, default=1000)
  parser.add_argument('--timesteps', default='50,200,400,600,800,950')
  parser.add_argument('--output',
                      default='benchmarks/results/loop_diagnose.json')
  args = parser.parse_args()
  loop = stages.Loop(stages.recorded_config(args.workdir), args.workdir)
  test = loop.split('corpus', 'test')
  n = min(args.num_examples, len(test['prompts']))
  images = test['images'][:n]
  labels = referee_lib.labels_from_attributes(test['attributes'][:n])
  ae_params, scaling = loop.autoencoder
  model, _ = generator_lib.init_autoencoder(loop.config)
  latents = generator_lib.encode_images(model, ae_params, images,
                                        scaling_factor=scaling)
  reconstructed = generator_lib.decode_latents(model, ae_params, latents,
                                               scaling_factor=scaling)
  ceiling = {
      'rendered': referee_lib.accuracy(loop.referee.predict(images), labels),
      'autoencoded': referee_lib.accuracy(loop.referee.predict(reconstructed),
                                          labels)}
  print(common.format_table(
      ['images', *referee_lib.GROUPS],
      [[name, *(acc[g] for g in referee_lib.GROUPS)]
       for name, acc in ceiling.items()]))
  contexts = loop.contexts(test['prompts'][:n])
  prediction = generator_lib.noise_schedule(loop.config).prediction
  losses = conditioning_losses(
      loop, latents, contexts, [int(t) for t in args.timesteps.split(',')])
  print(common.format_table(
      ['timestep', 'own prompt', 'shuffled prompt', 'empty prompt'],
      [[t, v['own'], v['shuffled'], v['empty']] for t, v in losses.items()]))
  common.write_json(args.output, {
      'workdir': args.workdir, 'num_examples': n, 'ceiling': ceiling,
      'prediction': prediction, f'{prediction}_mse': losses, 'machine': common.machine(),
      'git': common.git_revision(), 'date': common.now()})


if __name__ == '__main__':
  main()
