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
               timestep with the prompt's own context, another prompt's
               (shuffled), the empty prompt's, and the prompt with its
               shape (or size) word swapped for another: how much the
               prompt, and each of those words, lowers the loss where.
"""

import argparse
import pathlib
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import common
from reverse_sd.data import synthetic_grammar as grammar
from reverse_sd.loop import diffusion
from reverse_sd.loop import generator as generator_lib
from reverse_sd.loop import referee as referee_lib
from reverse_sd.loop import stages

BATCH = 250


# Word groups whose one word per prompt the 'swapped' columns replace by the
# next word of the group (a one-object prompt names one shape and one size).
SWAPPED_GROUPS = {'shape': grammar.SHAPES, 'size': grammar.SIZES}


def swap_word(prompt: str, words: tuple[str, ...]) -> str | None:
  """`prompt` with its one word of `words` replaced by the next word of
  `words`; None unless exactly one of them occurs (as a whole word)."""
  found = [w for w in words if re.search(rf'\b{re.escape(w)}\b', prompt)]
  if len(found) != 1:
    return None
  other = words[(words.index(found[0]) + 1) % len(words)]
  return re.sub(rf'\b{re.escape(found[0])}\b', other, prompt, count=1)


def conditioning_losses(loop, latents, contexts, timesteps, seed=0):
  """{t: {name: MSE}} over the examples, on the denoiser's target
  (`config.generator.prediction`), for each named context array
  [N, L, D] of `contexts`."""
  model, _ = generator_lib.init_denoiser(loop.config)
  apply = jax.jit(lambda p, x, t, c: model.apply({'params': p}, x, t, c))
  schedule = generator_lib.noise_schedule(loop.config)
  alphas = schedule.alphas_cumprod()
  n = len(latents)
  out = {}
  for t in timesteps:
    sums = dict.fromkeys(contexts, 0.0)
    for start in range(0, n, BATCH):
      x0 = jnp.asarray(latents[start:start + BATCH])
      noise = jax.random.normal(jax.random.fold_in(jax.random.key(seed), t),
                                x0.shape)
      tt = jnp.full((len(x0),), t, jnp.int32)
      xt = diffusion.add_noise(x0, noise, tt, alphas)
      target = diffusion.training_target(x0, noise, tt, alphas,
                                         schedule.prediction)
      for name, c in contexts.items():
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
  prompts = test['prompts'][:n]
  swapped = {group: [swap_word(p, words) for p in prompts]
             for group, words in SWAPPED_GROUPS.items()}
  # The conditioning table's examples: those whose every swap applies.
  keep = np.array([all(s[i] is not None for s in swapped.values())
                   for i in range(n)])
  own = loop.contexts(prompts)
  contexts = {'own': own[keep],
              'shuffled': own[np.random.default_rng(0).permutation(n)][keep],
              'empty': np.broadcast_to(loop.null_context,
                                       own[keep].shape)}
  for group, texts in swapped.items():
    contexts[f'{group} swapped'] = loop.contexts(
        [t for t, k in zip(texts, keep) if k])
  prediction = generator_lib.noise_schedule(loop.config).prediction
  losses = conditioning_losses(
      loop, latents[keep], contexts,
      [int(t) for t in args.timesteps.split(',')])
  names = list(contexts)
  print(f'{prediction} MSE on {int(keep.sum())} of {n} examples, by context '
        "('<group> swapped': the prompt with its one word of that group "
        'replaced by another):')
  print(common.format_table(
      ['timestep', *names],
      [[t, *(v[k] for k in names)] for t, v in losses.items()]))
  common.write_json(args.output, {
      'workdir': args.workdir, 'num_examples': n, 'ceiling': ceiling,
      'prediction': prediction, 'conditioning_examples': int(keep.sum()),
      f'{prediction}_mse': losses, 'machine': common.machine(),
      'git': common.git_revision(), 'date': common.now()})


if __name__ == '__main__':
  main()
