"""Stage 7: the reverse-trained U-Net encoder put back into the generator.

The white-box reverse model of stage 5 fine-tuned the generator's own U-Net
encoder (down blocks + mid block, at t = 0) to predict the prompt
embedding. Here that encoder replaces the generator's (`params['encoder']`),
with the decoder half (up blocks, output head) from the original, and both
generators sample the same held-out prompts with the same seeds:

  original     the trained generator;
  reused       the reverse-trained encoder + the original decoder half;
  reused+ft    as reused, after `config.reuse.steps` of the diffusion loss
               on the decoder half only (the encoder frozen), in case the
               swap breaks the decoder.

Measured per generator, over `config.reuse.seeds`:
  alignment    the referee's per-attribute accuracy against the prompt, and
               the cosine between the prompt's embedding and the embedding
               that an independent black-box model, trained on RENDERED
               images (`<workdir>/reverse/rendered_blackbox`), predicts for
               the sample;
  diversity    the mean pairwise distance, in the referee's feature space,
               between samples of one prompt under different seeds.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from configs import synthetic as synthetic_config
from reverse_sd import checkpointing
from reverse_sd import train
from reverse_sd import trained_run
from reverse_sd.loop import generator as generator_lib
from reverse_sd.loop import referee as referee_lib
from reverse_sd.loop import report
from reverse_sd.loop import reverse_runs
from reverse_sd.loop import trainer
from reverse_sd.models import diffusion_unet

REUSE_PICTURE = 'reuse_samples.png'
SOURCE_ROW = 'whitebox_empty'  # The reverse run whose encoder is reused.
JUDGE_DIR = 'rendered_blackbox'


def reverse_trained_encoder(loop, seed: int) -> Any:
  """The U-Net encoder params of the white-box reverse run of `seed`."""
  _, state = checkpointing.load_state_arrays(
      reverse_runs.run_dir(loop, SOURCE_ROW, seed))
  return state['params']['backbone']['unet']


def swapped(loop, encoder_params: Any) -> Any:
  params = dict(loop.denoiser_params)
  trainer.check_fits(
      encoder_params, params[diffusion_unet.ENCODER],
      'the reverse-trained U-Net encoder')
  params[diffusion_unet.ENCODER] = encoder_params
  return params


def judge(loop) -> trained_run.TrainedRun:
  """The independent black-box model: the main job's tower trained on the
  rendered corpus (not on generated images)."""
  workdir = loop.workdir / 'reverse' / JUDGE_DIR
  if not (workdir / 'results.json').exists():
    c = loop.config.corpus
    config = synthetic_config.get_config(loop.config.reverse.base_size)
    config.unlock()
    config.data.data_dir = str(loop.data_dir)
    config.data.update(seed=c.seed, image_size=c.image_size,
                       num_train=c.num_train, num_validation=c.num_validation,
                       num_test=c.num_test, num_test_shifted=c.num_test_shifted,
                       max_objects=c.max_objects)
    config.train.num_epochs = loop.config.reuse.judge_epochs
    config.train.eval_every_steps = 10**9
    config.lock()
    train.train_and_evaluate(config, workdir)
  return trained_run.load_run(workdir)


def _finetuned(loop, params: Any) -> Any:
  """The swapped generator after a short decoder-only fine-tune."""
  _, ema = generator_lib.train_denoiser(
      loop.workdir / 'reuse_finetune', null_context_LxD=loop.null_context,
      config=loop.config, init_params=params, trainable='decoder',
      **loop.denoiser_training_set())
  return ema


def _measure(loop, images_SxPxHxWx3, prompts, labels, prompt_embeddings,
             judge_run) -> dict[str, Any]:
  seeds, num_prompts = images_SxPxHxWx3.shape[:2]
  flat = images_SxPxHxWx3.reshape(-1, *images_SxPxHxWx3.shape[2:])
  predicted = loop.referee.predict(flat)
  tiled = {k: np.tile(v, seeds) for k, v in labels.items()}
  per_seed_accuracy = []
  for s in range(seeds):
    rows = slice(s * num_prompts, (s + 1) * num_prompts)
    per_seed_accuracy.append(referee_lib.accuracy(
        {k: v[rows] for k, v in predicted.items()},
        {k: v[rows] for k, v in tiled.items()}))
  embeddings = judge_run.predict(list(flat), num_prompts=0).embeddings
  cosine = (embeddings.reshape(seeds, num_prompts, -1) *
            prompt_embeddings[None]).sum(-1)
  features = loop.referee.features(flat).reshape(seeds, num_prompts, -1)
  del prompts
  groups = per_seed_accuracy[0].keys()
  return {
      'accuracy': {g: {'mean': float(np.mean([a[g] for a in
                                              per_seed_accuracy])),
                       'std': float(np.std([a[g] for a in per_seed_accuracy]))}
                   for g in groups},
      'judge_cosine': {'mean': float(cosine.mean()),
                       'std': float(cosine.mean(axis=1).std())},
      'diversity': referee_lib.mean_pairwise_distance(
          features.transpose(1, 0, 2)),
  }


def stage_reuse(loop) -> dict[str, Any]:
  """Stage 7; see the module docstring."""
  config = loop.config
  test = loop.split('corpus', 'test')
  n = min(config.reuse.num_prompts, len(test['prompts']))
  prompts = test['prompts'][:n]
  labels = referee_lib.labels_from_attributes(test['attributes'][:n])
  prompt_embeddings = loop.text_encoder.encode(prompts)
  judge_run = judge(loop)
  reused_params = swapped(loop, reverse_trained_encoder(
      loop, config.reverse.seeds[0]))
  generators = {
      'original': loop.generator,
      'reused': loop.generator.with_unet_params(reused_params),
      'reused+ft': loop.generator.with_unet_params(
          _finetuned(loop, reused_params)),
  }
  samples, out = {}, {}
  for name, generator in generators.items():
    samples[name] = np.stack([
        loop.sample(prompts, generator_lib.example_seeds(seed, 'test', np.arange(n)),
                    generator=generator)
        for seed in config.reuse.seeds])
    out[name] = _measure(loop, samples[name], prompts, labels,
                         prompt_embeddings, judge_run)
  shown = min(8, n)
  rows = [test['images'][:shown]]
  for name in generators:
    rows += [samples[name][0, :shown], samples[name][1, :shown]]
  report.save_picture(loop.workdir / report.RESULTS_DIR / REUSE_PICTURE, rows)
  out['encoder_change'] = float(np.sqrt(sum(
      float(np.sum((np.asarray(a) - np.asarray(b))**2)) for a, b in zip(
          jax.tree.leaves(reused_params[diffusion_unet.ENCODER]),
          jax.tree.leaves(loop.denoiser_params[diffusion_unet.ENCODER])))))
  out['num_prompts'] = n
  out['seeds'] = list(config.reuse.seeds)
  out['picture_rows'] = ['rendered'] + [f'{g} seed {s}' for g in generators
                                        for s in config.reuse.seeds[:2]]
  return out
