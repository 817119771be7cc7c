"""Reverse models trained on the generated data set (stages 5 and 6).

Every run is the project's own training job (`reverse_sd.train`), on the
main job's config (`configs/synthetic.py`) pointed at the generated data set
(`config.data.name='generated'`) with a row's overrides, in
`<workdir>/reverse/<row>/seed<k>`; a finished run (results.json) is read,
not retrained, and a killed one resumes from its checkpoints.

The white-box rows load the generator's own U-Net encoder and autoencoder
through the converters that load SD 1.5/2.1: `export_generator` writes the
generator as a diffusers folder (`convert/sd_export.py`), and the row points
`config.model.init_from` at it (`sd_context='file'`: the empty prompt's
MiniLM states, what the generator's guidance conditions on).
"""

from __future__ import annotations

import json
import logging
import pathlib
from typing import Any

import ml_collections
import numpy as np

from configs import synthetic as synthetic_config
from reverse_sd import train
from reverse_sd import trained_run
from reverse_sd.convert import sd_export
from reverse_sd.data import generated as generated_data
from reverse_sd.loop import generator as generator_lib

EXPORT_DIR = 'generator_sd'
CAPTION_WORDS = 8  # Predicted top words per caption.
CAPTION_BATCH = 256
EMPTY_CONTEXT_FILE = 'empty_context.npy'
RESULTS_FILE = 'results.json'
# What a table reports of each run's test split.
METRICS = ('cosine', 'recall@1', 'recall@5', 'recall@10', 'gap_closed')


def export_generator(loop) -> pathlib.Path:
  """The generator as a diffusers SD folder (unet/, vae/) plus the empty
  prompt's context; written once."""
  out = loop.workdir / EXPORT_DIR
  if (out / EMPTY_CONTEXT_FILE).exists():
    return out
  ae_params, scaling = loop.autoencoder
  sd_export.export_pipeline(
      out, unet_config=generator_lib.unet_config(loop.config),
      unet_params=loop.denoiser_params,
      vae_config=generator_lib.vae_config(loop.config, scaling),
      vae_params=ae_params, image_size=loop.config.corpus.image_size)
  tmp = out / 'empty_context.tmp.npy'
  np.save(tmp, np.asarray(loop.null_context, np.float32))
  tmp.replace(out / EMPTY_CONTEXT_FILE)
  return out


def row_overrides(loop, row: str, seed: int) -> dict[str, Any]:
  """The config overrides of a row (`config.reverse.rows`)."""
  rows = {name: dict(pairs) for name, pairs in loop.config.reverse.rows}
  if row not in rows:
    raise ValueError(f'Unknown reverse row {row!r}; rows are {list(rows)}.')
  overrides = dict(rows[row])
  if overrides.get('model.backbone') == 'sd_unet':
    export = export_generator(loop)
    overrides.setdefault('model.init_from', str(export))
    overrides.setdefault('model.variant', 'from_weights')
    overrides.setdefault('model.sd_context', 'file')
    overrides.setdefault('model.sd_context_path',
                         str(export / EMPTY_CONTEXT_FILE))
    overrides.setdefault('model.frozen_features', True)
  if 'scorer_row' in overrides:  # The curriculum's model-based difficulty.
    scorer = overrides.pop('scorer_row')
    overrides['curriculum.scorer_workdir'] = str(run_dir(loop, scorer, seed))
  if 'caption_row' in overrides:  # Captions from that row's top words.
    overrides['model.sd_caption_contexts'] = str(caption_contexts(
        loop, overrides.pop('caption_row'), seed))
  return overrides


def caption_contexts(loop, source_row: str, seed: int) -> pathlib.Path:
  """Per-split MiniLM contexts of captions made from `source_row`'s
  predicted top words (the miniature of the paper's BLIP captions): one
  float16 [N, L, 384] <split>.npy per split of the generated data set, and
  captions.json with the first captions of each split."""
  out = loop.workdir / 'captions' / f'{source_row}_seed{seed}'
  done = out / 'captions.json'
  if done.exists():
    return out
  source_run = trained_run.load_run(run_dir(loop, source_row, seed))
  builder = generated_data.open_prepared(loop.data_dir, loop.generated_name)
  out.mkdir(parents=True, exist_ok=True)
  examples = {}
  for split in builder.info.splits:
    source = builder.as_data_source(split)
    texts = []
    for start in range(0, len(source), CAPTION_BATCH):
      images = [source[i]['image'] for i in
                range(start, min(start + CAPTION_BATCH, len(source)))]
      words = source_run.predict(images, top_k=CAPTION_WORDS,
                                 num_prompts=0).top_words
      texts += [' '.join(word for word, _ in row) for row in words]
    tmp = out / f'{split}.tmp.npy'
    np.save(tmp, loop.contexts(texts).astype(np.float16))
    tmp.replace(out / f'{split}.npy')
    examples[split] = texts[:10]
  done.write_text(json.dumps({'source': str(run_dir(loop, source_row, seed)),
                              'top_words': CAPTION_WORDS,
                              'first_captions': examples}, indent=1) + '\n')
  return out


def run_dir(loop, row: str, seed: int) -> pathlib.Path:
  return loop.workdir / 'reverse' / row / f'seed{seed}'


def reverse_config(loop, row: str, seed: int,
                   generated_name: str) -> ml_collections.ConfigDict:
  """The main job's config on the generated data set, with the row's
  overrides and the loop's schedule (`config.reverse`)."""
  rev = loop.config.reverse
  config = synthetic_config.get_config(rev.base_size)
  config.unlock()
  config.seed = seed
  config.data.name = 'generated'
  config.data.data_dir = str(loop.data_dir)
  config.data.generated_name = generated_name
  config.data.image_size = loop.config.corpus.image_size
  config.data.shuffle_seed = seed
  config.train.num_epochs = rev.num_epochs
  config.train.batch_size = rev.batch_size
  config.train.checkpoint_every_steps = rev.checkpoint_every_steps
  config.train.eval_every_steps = 10**9  # Only the final evaluation.
  config.vocab.loss_weight = rev.vocab_loss_weight
  for key, value in row_overrides(loop, row, seed).items():
    section, name = key.rsplit('.', 1)
    target = config
    for part in section.split('.'):
      target = target[part]
    if name not in target:
      raise ValueError(f'config.reverse.rows[{row!r}]: unknown config key '
                       f'{key!r}.')
    target[name] = value
  config.lock()
  return config


def run(loop, row: str, seed: int, generated_name: str) -> dict[str, Any]:
  """Trains (or reads) one run; returns its results.json."""
  workdir = run_dir(loop, row, seed)
  done = workdir / RESULTS_FILE
  if done.exists():
    return json.loads(done.read_text())
  logging.info('Reverse run %s seed %d in %s.', row, seed, workdir)
  return train.train_and_evaluate(
      reverse_config(loop, row, seed, generated_name), workdir)


def summarise(results: list[dict[str, Any]], split: str = 'test'
              ) -> dict[str, dict[str, float]]:
  """Mean and standard deviation over seeds of each metric of `split`,
  the vocabulary F1 and each word group's recall where the runs have
  them."""
  values: dict[str, list[float]] = {}
  for result in results:
    scores = result['splits'][split]
    for key in METRICS:
      if key in scores:
        values.setdefault(key, []).append(float(scores[key]))
    for key, value in scores.items():
      if key.startswith('vocab_f1@') and isinstance(value, (int, float)):
        values.setdefault(key, []).append(float(value))
    for group, recall in scores.get('word_groups', {}).items():
      if isinstance(recall, dict):
        recall = recall.get('recall')
      if isinstance(recall, (int, float)):
        values.setdefault(f'recall/{group}', []).append(float(recall))
  return {key: {'mean': float(np.mean(v)), 'std': float(np.std(v)),
                'n': len(v)} for key, v in values.items()}


def _rows(loop, rows: tuple[str, ...], generated_name: str
          ) -> dict[str, dict[str, Any]]:
  out = {}
  for row in rows:
    results = [run(loop, row, seed, generated_name)
               for seed in loop.config.reverse.seeds]
    out[row] = {split: summarise(results, split)
                for split in ('test', 'test_shifted')}
  return out


def stage_whitebox(loop) -> dict[str, Any]:
  """Stage 5: black-box towers against the generator's own U-Net encoder."""
  name = loop.generated_name
  return {'rows': _rows(loop, tuple(loop.config.reverse.whitebox_rows), name),
          'seeds': list(loop.config.reverse.seeds)}


def stage_ingredients(loop) -> dict[str, Any]:
  """Stage 6: vocabulary head, curricula and DA-KL on the generated data;
  the Spearman correlation of the model-based difficulty with the referee's
  alignment."""
  # Imported here: DA-KL and the curriculum scorer are only this stage's.
  # pylint: disable=g-import-not-at-top
  from reverse_sd import curriculum
  from reverse_sd import domain_adaptation
  # pylint: enable=g-import-not-at-top
  name = loop.generated_name
  rev = loop.config.reverse
  out = {'rows': _rows(loop, tuple(rev.ingredient_rows), name),
         'seeds': list(rev.seeds)}
  # The model-based difficulty (the 'plain' run of each seed, as the
  # curriculum row scores it) against the referee's alignment.
  correlations = []
  for seed in rev.seeds:
    scores = curriculum.score_run(run_dir(loop, 'plain', seed))
    alignment = curriculum.alignment_of_train(
        reverse_config(loop, 'plain', seed, name))
    correlations.append(curriculum.spearman(
        scores.scores, alignment.for_ids(scores.ids)))
  out['spearman_model_difficulty_vs_referee_alignment'] = {
      'per_seed': correlations, 'mean': float(np.mean(correlations)),
      'std': float(np.std(correlations))}
  # DA-KL on the joint-loss model ('blackbox') and its ensemble with
  # 'plain', as the domain-adaptation table computes them.
  settings = domain_adaptation.Settings(
      seeds=tuple(rev.seeds), single='blackbox',
      ensemble=('plain', 'blackbox'),
      num_centroids=min(rev.dakl_centroids, loop.config.generated.num_train))
  per_seed = [domain_adaptation.evaluate_seed(
      seed, {row: run_dir(loop, row, seed) for row in ('plain', 'blackbox')},
      settings) for seed in rev.seeds]
  dakl_rows = {}
  for row in domain_adaptation.ROWS:
    dakl_rows[row.key] = {
        split: {metric: domain_adaptation.summarize(
            [r['metrics'][row.key][split][metric] for r in per_seed])
                for metric, _ in domain_adaptation.TABLE_METRICS}
        for split in domain_adaptation.EVAL_SPLITS}
  out['dakl'] = {'settings': {'num_centroids': settings.num_centroids,
                              'gamma': settings.gamma,
                              'alpha': settings.alpha},
                 'rows': dakl_rows}
  return out
