"""The loop's stages, each resumable and recorded in `<workdir>/stages/`.

  corpus       the rendered corpus (synthetic grammar, `config.corpus`) and
               the generated data set's prompts (`config.generated`, another
               seed): TFDS builds under `<workdir>/data`.
  contexts     MiniLM token states of the corpus's training prompts and of
               the empty prompt (`contexts/*.npy`).
  autoencoder  the KL autoencoder on the rendered training images.
  generator    the denoiser on their latents and contexts.
  referee      the attribute classifier on the rendered training images,
               scored on the rendered test split.
  quality      generated images for the held-out test prompts, scored by the
               referee against chance, against the rendered images and
               against their autoencoder round trip (the latent space's
               ceiling).
  generated    the generated data set (`reverse_sd.data.generated`): the
               generator's images for the second build's prompts, with the
               referee's per-example alignment.

A stage that finished wrote `stages/<name>.json` (its results and wall
time) and is skipped on a rerun; one that was killed resumes from its own
checkpoints or shards. `Loop` holds what the stages share and loads each
piece once, on first use.
"""

from __future__ import annotations

from collections.abc import Callable
import functools
import hashlib
import json
import logging
import pathlib
import time
from typing import Any

import ml_collections
import numpy as np

from reverse_sd.data import generated as generated_data
from reverse_sd.data import synthetic
from reverse_sd.data import synthetic_render
from reverse_sd.loop import generator as generator_lib
from reverse_sd.loop import referee as referee_lib
from reverse_sd.loop import report
from reverse_sd.loop import reuse
from reverse_sd.loop import reverse_runs
from reverse_sd.text import minilm

STAGES_DIR = 'stages'


class Loop:
  """The loop's config, workdir and lazily loaded parts."""

  def __init__(self, config: ml_collections.ConfigDict,
               workdir: str | pathlib.Path):
    self.config = config
    self.workdir = pathlib.Path(workdir)
    self.data_dir = self.workdir / 'data'

  # --- Bookkeeping --------------------------------------------------------------

  def stage_file(self, name: str) -> pathlib.Path:
    return self.workdir / STAGES_DIR / f'{name}.json'

  def run_stage(self, name: str, fn: Callable[[], dict[str, Any]]
                ) -> dict[str, Any]:
    """Runs `fn` unless the stage finished before; returns its record.

    A finished stage records the config it ran with; a rerun whose config
    differs in a section the stage reads (`STAGE_SECTIONS`) fails naming
    the keys that differ, rather than skip the stage with results of the
    old config. Sections it does not read may change: a new generator
    setting reruns the generator and what follows it, not the corpus.
    """
    path = self.stage_file(name)
    config = json.loads(json.dumps(self.config.to_dict(), default=list))
    if path.exists():
      record = json.loads(path.read_text())
      sections = STAGE_SECTIONS.get(name, tuple(config))
      recorded = record.get('config', config)
      changed = _differences({k: recorded.get(k) for k in sections},
                             {k: config.get(k) for k in sections})
      if changed:
        raise ValueError(
            f'Stage {name} finished in {self.workdir} with another config '
            f'({", ".join(changed[:5])}). Use a fresh --workdir, or delete '
            f'{path} (and the records of the stages after it) to redo it.')
      logging.info('Stage %s: done before (%.0f s); skipped.', name,
                   record['time_s'])
      return record
    logging.info('Stage %s: starting.', name)
    began = time.perf_counter()
    record = fn()
    record = {'stage': name,
              'time_s': round(time.perf_counter() - began, 1), **record,
              'config': config}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix('.json.tmp')
    tmp.write_text(json.dumps(record, indent=1, default=_jsonable) + '\n')
    tmp.replace(path)
    logging.info('Stage %s: done in %.0f s.', name, record['time_s'])
    return json.loads(path.read_text())  # The same record a rerun returns.

  # --- Data ---------------------------------------------------------------------

  def _build(self, section) -> synthetic.SyntheticPrompts:
    c = self.config.corpus
    return synthetic.build(
        self.data_dir, seed=section.seed, image_size=c.image_size,
        num_train=section.num_train, num_validation=section.num_validation,
        num_test=section.num_test, num_test_shifted=section.num_test_shifted,
        max_objects=section.max_objects, progress=False)

  @functools.cached_property
  def corpus(self) -> synthetic.SyntheticPrompts:
    return self._build(self.config.corpus)

  @functools.cached_property
  def prompt_corpus(self) -> synthetic.SyntheticPrompts:
    """The synthetic build whose prompts the generated data set draws."""
    return self._build(self.config.generated)

  @functools.lru_cache(maxsize=8)
  def split(self, which: str, split: str) -> dict[str, Any]:
    """A split of 'corpus' or 'prompt_corpus' in memory: images, prompts,
    attributes, ids."""
    source = getattr(self, which).as_data_source(split)
    rows = [source[i] for i in range(len(source))]
    text = lambda v: v.decode() if isinstance(v, bytes) else str(v)
    return {
        'images': np.stack([r['image'] for r in rows]),
        'prompts': [text(r['prompt']) for r in rows],
        'attributes': np.stack([r['attributes'] for r in rows]),
        'ids': [text(r['id']) for r in rows],
    }

  def object_masks(self, which: str, split: str) -> np.ndarray:
    """The renderer's object cover of a split's images, [N, H, W] in
    [0, 1] (`synthetic_render.object_mask` of each example's scene)."""
    section = (self.config.corpus if which == 'corpus'
               else self.config.generated)
    masks = []
    for example_id in self.split(which, split)['ids']:
      name, index = example_id.split('/')
      scene = synthetic.example_scene(section.seed, name, int(index),
                                      section.max_objects)
      masks.append(synthetic_render.object_mask(
          scene, self.config.corpus.image_size))
    return np.stack(masks)

  def denoiser_training_set(self) -> dict[str, np.ndarray]:
    """`train_denoiser`'s arrays: the corpus's training latents (cached
    in `contexts/`), their prompts' contexts and, with an object weight,
    their object masks."""
    ae_params, scaling = self.autoencoder
    model, _ = generator_lib.init_autoencoder(self.config)
    train = self.split('corpus', 'train')
    latents_path = self.workdir / 'contexts' / 'train_latents.npy'
    if latents_path.exists():
      latents = np.load(latents_path)
    else:
      latents = generator_lib.encode_images(model, ae_params, train['images'],
                                            scaling_factor=scaling)
      latents_path.parent.mkdir(parents=True, exist_ok=True)
      tmp = latents_path.with_suffix('.tmp.npy')  # A kill leaves no half file.
      np.save(tmp, latents)
      tmp.replace(latents_path)
    out = {'latents_NxhxwxC': latents,
           'contexts_NxLxD': self.cached_contexts('corpus_train',
                                                  train['prompts'])}
    if self.config.generator.get('object_weight', 0.0):
      out['object_masks_NxHxW'] = self.object_masks('corpus', 'train')
    return out

  # --- Text ---------------------------------------------------------------------

  @functools.cached_property
  def text_encoder(self) -> minilm.SentenceEncoder:
    return minilm.SentenceEncoder(self.config.text.model_dir or None)

  def contexts(self, prompts: list[str]) -> np.ndarray:
    return generator_lib.prompt_contexts(self.text_encoder, prompts,
                                         self.config.text.context_length)

  def cached_contexts(self, name: str, prompts: list[str]) -> np.ndarray:
    path = self.workdir / 'contexts' / f'{name}.npy'
    if path.exists():
      contexts = np.load(path)
      if len(contexts) == len(prompts):
        return contexts
    path.parent.mkdir(parents=True, exist_ok=True)
    contexts = self.contexts(prompts)
    tmp = path.with_suffix('.tmp.npy')
    np.save(tmp, contexts)
    tmp.replace(path)
    return contexts

  @functools.cached_property
  def null_context(self) -> np.ndarray:
    return self.cached_contexts('empty_prompt', [''])[0]

  # --- Models -------------------------------------------------------------------

  @functools.cached_property
  def autoencoder(self) -> tuple[Any, float]:
    """(EMA params, latent scaling factor); trains on first use."""
    return generator_lib.train_autoencoder(
        self.workdir / 'autoencoder', self.split('corpus', 'train')['images'],
        self.config)

  def round_trip(self, images_NxHxWx3: np.ndarray) -> np.ndarray:
    """The autoencoder's reconstruction of uint8 images: the most a
    generator in its latent space can draw."""
    ae_params, _ = self.autoencoder
    model, _ = generator_lib.init_autoencoder(self.config)
    return generator_lib.decode_latents(
        model, ae_params, generator_lib.encode_images(
            model, ae_params, images_NxHxWx3, scaling_factor=1.0),
        scaling_factor=1.0)

  @functools.cached_property
  def denoiser_params(self) -> Any:
    """The denoiser's EMA params; trains on first use."""
    _, ema = generator_lib.train_denoiser(
        self.workdir / 'generator', null_context_LxD=self.null_context,
        config=self.config, **self.denoiser_training_set())
    return ema

  @functools.cached_property
  def generator(self) -> generator_lib.Generator:
    ae_params, scaling = self.autoencoder
    return generator_lib.Generator(self.config, ae_params, scaling,
                                   self.denoiser_params, self.null_context)

  @functools.cached_property
  def generator_id(self) -> str:
    """The generator checkpoint's identity (the generated data set's cache
    key): the config of its parts, its folder, and the record each of its
    trainings wrote when it finished (steps, wall time), so a retrained
    generator gets a new key."""
    _ = self.generator  # Trained (or loaded) before it is named.
    parts = {key: self.config[key].to_dict() for key in
             ('corpus', 'text', 'autoencoder', 'generator')}
    parts['workdir'] = str(self.workdir.resolve())
    for part in ('autoencoder', 'generator'):
      parts[part + '_done'] = (self.workdir / part /
                               'train_done.json').read_text()
    return hashlib.sha256(json.dumps(parts, sort_keys=True,
                                     default=str).encode()).hexdigest()[:16]

  @property
  def generated_name(self) -> str:
    """The generated data set's name (stage 'generated' must have run)."""
    path = self.stage_file('generated')
    if not path.exists():
      raise FileNotFoundError(f'{path} is missing: run the generated stage '
                              'first.')
    return json.loads(path.read_text())['name']

  @functools.cached_property
  def referee(self) -> referee_lib.Referee:
    train = self.split('corpus', 'train')
    return referee_lib.train(
        train['images'], train['attributes'],
        workdir=self.workdir / 'referee', steps=self.config.referee.steps,
        batch_size=self.config.referee.batch_size, lr=self.config.referee.lr,
        base_width=self.config.referee.base_width, seed=self.config.seed)

  def sample(self, prompts: list[str], seeds: np.ndarray,
             generator: generator_lib.Generator | None = None,
             guidance_scale: float | None = None) -> np.ndarray:
    sampler = self.config.sampler
    return (generator or self.generator).sample(
        self.contexts(prompts), seeds, num_steps=sampler.num_steps,
        guidance_scale=(sampler.guidance_scale if guidance_scale is None
                        else guidance_scale),
        eta=sampler.get('eta', 0.0))


def _differences(recorded: Any, current: Any, prefix: str = '') -> list[str]:
  """'key: recorded -> current' for every leaf where two configs differ."""
  if isinstance(recorded, dict) and isinstance(current, dict):
    out = []
    for key in sorted(set(recorded) | set(current)):
      out += _differences(recorded.get(key), current.get(key),
                          f'{prefix}{key}.' if prefix or key else key)
    return out
  if recorded != current:
    return [f'{prefix.rstrip(".")}: {recorded!r} -> {current!r}']
  return []


def _jsonable(value):
  if isinstance(value, (np.floating, np.integer)):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  raise TypeError(f'{type(value).__name__} is not JSON serialisable')


# --- The stages ---------------------------------------------------------------


def stage_corpus(loop: Loop) -> dict[str, Any]:
  return {'corpus': loop.corpus.builder_config.name,
          'prompt_corpus': loop.prompt_corpus.builder_config.name}


def stage_autoencoder(loop: Loop) -> dict[str, Any]:
  _, scaling = loop.autoencoder
  test = loop.split('corpus', 'test')['images'][:256]
  recon = loop.round_trip(test)
  return {'scaling_factor': scaling,
          'test_l1_0_255': float(np.abs(recon.astype(np.float32) -
                                        test).mean())}


def stage_generator(loop: Loop) -> dict[str, Any]:
  _ = loop.denoiser_params  # Trains (or resumes) here, not lazily later.
  return {'train': json.loads(
      (loop.workdir / 'generator' / 'train_done.json').read_text())}


def stage_referee(loop: Loop) -> dict[str, Any]:
  test = loop.split('corpus', 'test')
  labels = referee_lib.labels_from_attributes(test['attributes'])
  predicted = loop.referee.predict(test['images'])
  return {'rendered_test_accuracy': referee_lib.accuracy(predicted, labels),
          'chance': referee_lib.chance(labels),
          'uniform_chance': referee_lib.uniform_chance(),
          'num_test': len(test['images'])}


def stage_quality(loop: Loop) -> dict[str, Any]:
  """The referee's accuracy on generated images of held-out prompts."""
  test = loop.split('corpus', 'test')
  seeds = generator_lib.example_seeds(loop.config.seed, 'test',
                                     np.arange(len(test['prompts'])))
  began = time.perf_counter()
  images = loop.sample(test['prompts'], seeds)
  sample_s = time.perf_counter() - began
  labels = referee_lib.labels_from_attributes(test['attributes'])
  # The autoencoder's round trip of the rendered images: the most a
  # generator in its latent space can score.
  reconstructed = loop.round_trip(test['images'])
  out = {
      'generated_accuracy': referee_lib.accuracy(
          loop.referee.predict(images), labels),
      'reconstructed_accuracy': referee_lib.accuracy(
          loop.referee.predict(reconstructed), labels),
      'rendered_accuracy': referee_lib.accuracy(
          loop.referee.predict(test['images']), labels),
      'chance': referee_lib.chance(labels),
      'num_prompts': len(images),
      'images_per_s': len(images) / sample_s,
  }
  # The picture: 8 prompts, rendered, then generated with 3 seeds.
  shown = slice(0, min(8, len(images)))
  prompts = test['prompts'][shown]
  rows = [test['images'][shown], images[shown]]
  for extra in (1, 2):
    rows.append(loop.sample(prompts, generator_lib.example_seeds(
        loop.config.seed + extra, 'test', np.arange(len(prompts)))))
  report.save_picture(loop.workdir / report.RESULTS_DIR /
                      report.QUALITY_PICTURE, rows)
  return out


def generated_sampler_name(config) -> str:
  s = config.sampler
  eta = s.get('eta', 0.0)
  return f'ddim{s.num_steps}_cfg{s.guidance_scale:g}' + (
      f'_eta{eta:g}' if eta else '')


def stage_generated(loop: Loop) -> dict[str, Any]:
  """The generated data set; shards survive a kill."""
  config = loop.config

  def make_batch(split, indices, examples):
    prompts = [e['prompt'].decode() if isinstance(e['prompt'], bytes)
               else str(e['prompt']) for e in examples]
    images = loop.sample(prompts, generator_lib.example_seeds(
        config.generated.seed, split, indices))
    labels = referee_lib.labels_from_attributes(
        np.stack([e['attributes'] for e in examples]))
    alignment = referee_lib.alignment(loop.referee.predict(images), labels)
    return images, alignment.astype(np.float32)

  builder = generated_data.build(
      loop.data_dir, synthetic_builder=loop.prompt_corpus,
      generator_id=loop.generator_id,
      sampler=generated_sampler_name(config), make_batch=make_batch,
      shard_size=config.generated.shard_size, progress=True)
  splits = {s: builder.info.splits[s].num_examples
            for s in synthetic.SPLITS}
  return {'name': builder.builder_config.name, 'splits': splits}


STAGES: tuple[tuple[str, Callable[[Loop], dict[str, Any]]], ...] = (
    ('corpus', stage_corpus),
    ('autoencoder', stage_autoencoder),
    ('generator', stage_generator),
    ('referee', stage_referee),
    ('quality', stage_quality),
    ('generated', stage_generated),
    ('whitebox', reverse_runs.stage_whitebox),
    ('ingredients', reverse_runs.stage_ingredients),
    ('reuse', reuse.stage_reuse),
)


# The config sections each stage's results depend on: its own and those of
# the stages it reads. The white-box, ingredients and reuse stages read
# everything.
_CORPUS = ('seed', 'corpus', 'generated')
_GENERATOR = _CORPUS + ('text', 'autoencoder', 'generator')
STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    'corpus': _CORPUS,
    'autoencoder': _CORPUS + ('autoencoder',),
    'generator': _GENERATOR,
    'referee': _CORPUS + ('referee',),
    'quality': _GENERATOR + ('referee', 'sampler'),
    'generated': _GENERATOR + ('referee', 'sampler'),
}


def recorded_config(workdir: str | pathlib.Path) -> ml_collections.ConfigDict:
  """The config a workdir's loop ran with, from its stage records (for tools
  that read a finished loop, whatever `configs/loop.py` now says).

  Stages keep records made under other settings of sections they do not read
  (a generator rerun keeps the corpus record), so each section comes from the
  newest record of a stage that reads it (`STAGE_SECTIONS`; the newest record
  of any stage for a section none of them reads).
  """
  records = []
  for order, (name, _) in enumerate(STAGES):
    path = pathlib.Path(workdir) / STAGES_DIR / f'{name}.json'
    if path.exists():
      records.append((path.stat().st_mtime, order, name,
                      json.loads(path.read_text())))
  if not records:
    raise FileNotFoundError(f'No stage records in {workdir}/{STAGES_DIR}: '
                            'run `python -m reverse_sd.loop` there first.')
  records = sorted((r for r in records if 'config' in r[3]),
                   key=lambda r: r[:2])
  if not records:
    raise ValueError(f'The stage records in {workdir}/{STAGES_DIR} hold no '
                     'config (written before the loop recorded it).')
  config = dict(records[-1][3]['config'])
  for _, _, name, record in records:  # Oldest first: newer ones override.
    for section in STAGE_SECTIONS.get(name, tuple(record['config'])):
      if section in record['config']:
        config[section] = record['config'][section]
  return ml_collections.ConfigDict(config)


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
        only: tuple[str, ...] = (), command: str = ''
        ) -> dict[str, dict[str, Any]]:
  """Runs every stage (or those in `only`) in order; returns their records.

  `command` is the command line the report names (default: the plain
  `python -m reverse_sd.loop --workdir=...`).
  """
  known = [name for name, _ in STAGES]
  unknown = sorted(set(only) - set(known))
  if unknown:
    raise ValueError(f'Unknown stage(s) {unknown}; the stages are {known}.')
  loop = Loop(config, workdir)
  records = {}
  for name, fn in STAGES:
    if only and name not in only:
      continue
    records[name] = loop.run_stage(name, functools.partial(fn, loop))
  command = command or f'python -m reverse_sd.loop --workdir={workdir}'
  path = report.write(workdir, report.load_records(workdir, known), command)
  logging.info('Report: %s', path)
  return records

