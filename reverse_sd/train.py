"""Training and evaluation loop: `train_and_evaluate(config, workdir)`."""

import dataclasses
import json
import logging
import math
import pathlib
import time
from collections.abc import Callable
from typing import Any

from clu import metric_writers
from clu import periodic_actions
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from reverse_sd import checkpointing
from reverse_sd import curriculum as curriculum_lib
from reverse_sd import distributed
from reverse_sd import evaluate
from reverse_sd import feature_cache
from reverse_sd import losses
from reverse_sd import metrics as metrics_lib
from reverse_sd import optim
from reverse_sd import pretrained
from reverse_sd import sharding
from reverse_sd import state as state_lib
from reverse_sd.data import datasets
from reverse_sd.data import pipeline
from reverse_sd.data import synthetic_grammar
from reverse_sd.models import reverse_model
from reverse_sd.text import vocab as vocab_lib


def make_train_step(model, loss_config: ml_collections.ConfigDict,
                    schedule: optax.Schedule, mesh, state_shardings, *,
                    vocab_loss_weight: float = 0.0,
                    noise_seed: int = 0) -> Callable:
  """One jitted, state-donating step: (state, batch) -> (state, metrics).

  The loss is cosine + Huber on the embedding, plus `vocab_loss_weight` x the
  vocabulary head's BCE when the batch carries `labels`. A model that draws
  noise (the white-box backbone with `sd_noise` > 0) gets a 'noise' rng from
  `noise_seed` and the step number. The `grad_norm` metric is
  `optax.tree.norm(grads)`, the norm that clipping computes, so XLA computes
  it once.
  """

  def train_step(state, batch):
    rngs = {'noise': jax.random.fold_in(jax.random.key(noise_seed),
                                        state.step)}

    def loss_fn(params):
      out = model.apply({'params': params}, **evaluate.model_inputs(batch),
                        rngs=rngs)
      terms = losses.embedding_losses(out['embedding'], batch['embedding'],
                                      loss_config)
      if 'labels' in batch:
        terms['vocab_bce'] = losses.vocab_bce(out['word_logits'],
                                              batch['labels'])
        terms['loss'] = terms['loss'] + vocab_loss_weight * terms['vocab_bce']
      else:
        terms['vocab_bce'] = jnp.zeros_like(terms['loss'])
      return terms['loss'].mean(), terms

    (_, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    metrics = metrics_lib.TrainMetrics.single_from_model_output(
        **terms, learning_rate=schedule(state.step),
        grad_norm=optax.tree.norm(grads))
    return state.apply_gradients(grads=grads), metrics

  return jax.jit(train_step,
                 in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(state_shardings, sharding.replicated(mesh)),
                 donate_argnums=0)


def total_train_steps(config: ml_collections.ConfigDict,
                      num_train_examples: int) -> int:
  """config.train.num_steps if > 0, else num_epochs over the train split."""
  if config.train.num_steps > 0:
    return int(config.train.num_steps)
  if config.train.num_epochs <= 0:
    raise ValueError('Set config.train.num_steps > 0 or '
                     'config.train.num_epochs > 0.')
  return max(1, math.ceil(config.train.num_epochs * num_train_examples /
                          config.train.batch_size))


@dataclasses.dataclass
class _Run:
  """What the loop needs, built once by `_setup`."""
  model: Any
  mesh: Any
  state: Any
  state_shardings: Any
  train_step: Callable
  predict_step: Callable
  manager: Any
  stream: pipeline.TrainStream
  examples_seen: int
  total_steps: int
  stages: list[curriculum_lib.Stage] | None


def _data_position(config, examples_seen: int, num_train: int,
                   stages) -> dict:
  return {'examples_seen': int(examples_seen),
          'shuffle_seed': int(config.data.shuffle_seed),
          'num_train_examples': int(num_train),
          'curriculum': curriculum_lib.fingerprint(stages)}


def _check_data_position(position: dict, expected: dict, where: str) -> None:
  position = {'curriculum': '', **position}  # Older checkpoints lack it.
  for key in ('shuffle_seed', 'num_train_examples', 'curriculum'):
    if position.get(key) != expected[key]:
      raise ValueError(
          f'The checkpoint in {where} was written with {key}='
          f'{position.get(key)}, but this run has {key}={expected[key]}; '
          'it would not continue the same data stream. Use a fresh --workdir.')


def _make_stream(config, train: pipeline.SplitData,
                 stages) -> pipeline.TrainStream:
  return pipeline.TrainStream(
      train, global_batch_size=config.train.batch_size,
      shuffle_seed=config.data.shuffle_seed,
      process_index=jax.process_index(), process_count=jax.process_count(),
      num_threads=config.data.num_read_threads,
      prefetch=config.data.prefetch_batches, stages=stages)


def _attach_features(config, run: _Run, splits: dict[str, pipeline.SplitData]
                     ) -> dict[str, pipeline.SplitData]:
  """With `config.model.frozen_features`: the frozen stage's outputs (a
  frozen tower's features; the white-box VAE's latents) of every split,
  computed once and cached beside the data; the train stream then reads
  them, not images.
  """
  if not config.model.frozen_features:
    return splits
  image_shape = tuple(splits['train'].load_images(np.array([0])).shape[1:])
  key = feature_cache.cache_key(
      config.model, json.dumps(config.data.to_dict(), sort_keys=True),
      image_shape, feature_cache.weights_identity(
          reverse_model.frozen_stage_weights(config.model)))
  cache_dir = (datasets.resolve_data_dir(config.data) /
               feature_cache.CACHE_DIR_NAME / key)
  step = feature_cache.make_feature_step(run.model, run.mesh,
                                         run.state_shardings.params)
  out = {}
  for name, split in splits.items():
    compute = lambda split=split: feature_cache.compute_features(
        step, run.state.params, split, mesh=run.mesh,
        global_batch_size=config.eval.batch_size)
    out[name] = dataclasses.replace(
        split, features=feature_cache.load_or_compute(cache_dir, split,
                                                      compute))
  run.stream = _make_stream(config, out['train'], run.stages)
  return out


def _setup(config, workdir: pathlib.Path, splits) -> _Run:
  """Mesh, model, optimiser, state (restored if a checkpoint exists)."""
  mesh = sharding.make_mesh(config.mesh.axes, config.mesh.shape)
  sharding.check_batch_divisible(config.train.batch_size, mesh)
  train = splits['train']
  total_steps = total_train_steps(config, len(train))
  vocab_size = (0 if train.labels is None else train.labels.shape[1])
  model = pretrained.create_model(config.model, vocab_size=vocab_size,
                                  vocab_head_input=config.vocab.head_input,
                                  mesh=mesh)
  stages = curriculum_lib.stages_for_run(config, workdir, train.table.ids,
                                         total_steps)
  # A frozen stage is never updated (or decayed).
  tx, schedule = optim.create_optimizer(
      config.optim, total_steps,
      extra_groups=reverse_model.frozen_param_groups(config.model))
  image_shape = tuple(train.load_images(np.array([0])).shape[1:])
  rng = jax.random.key(config.seed)
  abstract = state_lib.abstract_train_state(model, tx, image_shape, rng)
  state_shardings = state_lib.state_shardings(
      mesh, abstract, state_lib.param_layout(config.mesh))
  manager = checkpointing.create_manager(
      workdir, max_to_keep=config.train.keep_checkpoints)
  expected_position = _data_position(config, 0, len(train), stages)
  latest = manager.latest_step()
  if latest is not None:
    state, position = checkpointing.restore(manager, latest, abstract,
                                            state_shardings)
    _check_data_position(position, expected_position, str(workdir))
    examples_seen = position['examples_seen']
  else:
    state, _ = state_lib.create_train_state(model, tx, image_shape, rng, mesh,
                                            shardings=state_shardings)
    if config.model.init_from:
      logging.info('Initialising the backbone from %s', config.model.init_from)
      state = state.replace(params=pretrained.replace_backbone(
          state.params,
          pretrained.load_backbone_params(config.model, image_shape),
          state_shardings.params))
    examples_seen = 0
  stream = _make_stream(config, train, stages)
  return _Run(
      model=model, mesh=mesh, state=state, state_shardings=state_shardings,
      train_step=make_train_step(
          model, config.loss, schedule, mesh, state_shardings,
          vocab_loss_weight=config.vocab.loss_weight,
          noise_seed=config.seed),
      predict_step=evaluate.make_predict_step(
          model, mesh, state_shardings.params,
          micro_batch=config.eval.get('micro_batch', -1)),
      manager=manager, stream=stream, examples_seen=examples_seen,
      total_steps=total_steps, stages=stages)


def _log_stage_start(run: _Run, step: int) -> None:
  if not run.stages:
    return
  stage = run.stream.stage_of_step(step)
  if step == run.stages[stage].start_step:
    logging.info('Step %d: curriculum stage %d of %d, the easiest %.0f%% '
                 '(%d examples).', step, stage + 1, len(run.stages),
                 100 * run.stages[stage].fraction, len(run.stages[stage].pool))


def _train_loop(config, run: _Run, splits, writer) -> None:
  """Runs steps up to run.total_steps, with logging, eval and checkpoints."""
  step = checkpointing.step_of(run.state)
  if step >= run.total_steps:
    logging.info('Already trained: step %d of %d.', step, run.total_steps)
    return
  logging.info('Training from step %d to %d (global batch %d, %d devices).',
               step, run.total_steps, config.train.batch_size,
               jax.device_count())
  report = periodic_actions.ReportProgress(num_train_steps=run.total_steps,
                                           writer=writer, every_secs=30.0)
  batches = run.stream.iterate(run.examples_seen)
  accumulated = None
  num_train = len(splits['train'])
  preemption = distributed.PreemptionNotice()  # SIGTERM: save, then stop.
  preemption.start()
  try:
    while step < run.total_steps:
      batch = next(batches)
      global_batch = sharding.host_to_global(
          {k: batch[k] for k in ('image', 'features', 'context', 'embedding',
                                 'labels') if k in batch},
          run.mesh)
      _log_stage_start(run, step)
      run.state, step_metrics = run.train_step(run.state, global_batch)
      step += 1
      run.examples_seen += config.train.batch_size
      accumulated = (step_metrics if accumulated is None
                     else accumulated.merge(step_metrics))
      report(step)
      if step % config.train.log_every_steps == 0 or step == run.total_steps:
        summary = {f'train/{k}': v for k, v in accumulated.compute().items()}
        if run.stages:
          summary['train/curriculum_fraction'] = run.stages[
              run.stream.stage_of_step(step - 1)].fraction
        writer.write_scalars(step, summary)
        accumulated = None
      if step % config.train.eval_every_steps == 0 and step < run.total_steps:
        scores = evaluate.evaluate_model(
            run.predict_step, run.state.params, splits,
            config.eval.periodic_splits, mesh=run.mesh,
            global_batch_size=config.eval.batch_size)
        writer.write_scalars(step, {f'{s}/cosine': v['cosine']
                                    for s, v in scores.items()})
      if (step % config.train.checkpoint_every_steps == 0 or
          step == run.total_steps):
        checkpointing.save(run.manager, step, run.state,
                           _data_position(config, run.examples_seen, num_train,
                                          run.stages))
      # Preemption: every process gets the same answer at the same step.
      if step < run.total_steps and preemption.reached(step):
        if step % config.train.checkpoint_every_steps:
          checkpointing.save(run.manager, step, run.state,
                             _data_position(config, run.examples_seen,
                                            num_train, run.stages),
                             force=True)
        run.manager.wait_until_finished()
        writer.flush()
        raise distributed.Preempted(
            step, f'Preempted at step {step} of {run.total_steps}: saved '
            f'checkpoint {run.manager.directory}/{step}. Rerun the same '
            f'command to resume from step {step}.')
  finally:
    preemption.stop()
    # An error in a step still lets an in-flight async save finish, so the
    # rerun resumes from it.
    run.manager.wait_until_finished()


def _attach_vocabulary(config, workdir: pathlib.Path,
                       splits: dict[str, pipeline.SplitData]):
  """Adds vocabulary multi-hot labels to every split when the head is on.

  The vocabulary comes from the training prompts only and is saved as
  `workdir/vocab.json`; a resumed run must build the same one.

  Returns:
    (splits, vocabulary); vocabulary is None when the head is off.
  """
  if config.vocab.loss_weight < 0:
    raise ValueError('config.vocab.loss_weight must be >= 0; got '
                     f'{config.vocab.loss_weight}.')
  if config.vocab.loss_weight == 0:
    return splits, None
  path = workdir / 'vocab.json'
  vocabulary = vocab_lib.Vocabulary.build(
      splits['train'].table.prompts.tolist(), size=config.vocab.size)
  if path.exists():
    # A resumed run must predict the same words its checkpoint learned.
    if vocab_lib.Vocabulary.load(path) != vocabulary:
      raise ValueError(
          f'{path} differs from the vocabulary this config builds '
          f'(config.vocab.size={config.vocab.size}, train split of '
          f'{len(splits["train"])} prompts); the workdir was made with '
          'another config. Use a fresh --workdir.')
  elif jax.process_index() == 0:
    vocabulary.save(path)
  logging.info('Vocabulary head over %d words (%s ...).', len(vocabulary),
               ', '.join(vocabulary.words[:8]))
  return {name: dataclasses.replace(
      split, labels=vocabulary.multi_hot(split.table.prompts.tolist()))
          for name, split in splits.items()}, vocabulary


def _word_group_columns(config, vocabulary) -> dict[str, list[int]] | None:
  """Vocabulary columns of each word group the data set defines (synthetic:
  shape, colour, ...), for the per-group recall."""
  # The generated data set draws the synthetic corpus's prompts.
  if vocabulary is None or config.data.name not in ('synthetic', 'generated'):
    return None
  return {group: [vocabulary.index[w] for w in words if w in vocabulary.index]
          for group, words in synthetic_grammar.word_groups().items()}


def _scalars(prefix: str, scores: dict) -> dict[str, float]:
  """Flattens nested float scores to TensorBoard scalar names."""
  out = {}
  for key, value in scores.items():
    if isinstance(value, dict):
      out.update(_scalars(f'{prefix}/{key}', value))
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
      out[f'{prefix}/{key}'] = float(value)
  return out


def _write_results(workdir: pathlib.Path, results: dict) -> None:
  """Writes results.json atomically (process 0 only)."""
  if jax.process_index() != 0:
    return
  tmp = workdir / 'results.json.tmp'
  tmp.write_text(json.dumps(results, indent=2, sort_keys=True) + '\n')
  tmp.replace(workdir / 'results.json')


def format_results_table(results: dict) -> str:
  """A plain-text table of the per-split scores."""
  header = (f'{"split":<14}{"n":>7}{"cosine":>9}{"baseline":>10}'
            f'{"oracle":>9}{"gap closed":>12}')
  lines = [header, '-' * len(header)]
  for name, s in results['splits'].items():
    oracle = s.get('oracle_cosine')
    gap = s.get('gap_closed')
    lines.append(
        f'{name:<14}{s["num_examples"]:>7}{s["cosine"]:>9.4f}'
        f'{s["baseline_cosine"]:>10.4f}'
        f'{(f"{oracle:.4f}" if oracle is not None else "-"):>9}'
        f'{(f"{100 * gap:.1f}%" if gap is not None else "-"):>12}')
  return '\n'.join(lines)


def _curriculum_meta(config, stages) -> dict | None:
  if not stages:
    return None
  return {'difficulty': config.curriculum.difficulty,
          'stages': [{'start_step': s.start_step, 'fraction': s.fraction,
                      'num_examples': len(s.pool)} for s in stages]}


def _save_config(config: ml_collections.ConfigDict,
                 workdir: pathlib.Path) -> None:
  if jax.process_index() == 0:
    (workdir / 'config.json').write_text(config.to_json_best_effort(
        indent=2, sort_keys=True) + '\n')


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str | pathlib.Path) -> dict:
  """Trains the configured model in `workdir` and writes results.json.

  Reruns in the same workdir resume from the latest checkpoint.

  Returns:
    The results dict that was written to `workdir/results.json`.
  """
  workdir = pathlib.Path(workdir).resolve()  # Orbax needs absolute paths.
  workdir.mkdir(parents=True, exist_ok=True)
  _save_config(config, workdir)
  writer = metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0)
  timings = {}

  start = time.time()
  eval_splits = tuple(config.eval.splits)
  needed = dict.fromkeys(('train', 'validation', *eval_splits))
  splits = datasets.load_splits(config, list(needed))
  splits, vocabulary = _attach_vocabulary(config, workdir, splits)
  # sd_context='caption': each example's SD text context, cached once.
  splits = feature_cache.attach_caption_contexts(config, splits)
  timings['data_s'] = time.time() - start

  start = time.time()
  run = _setup(config, workdir, splits)
  splits = _attach_features(config, run, splits)
  _train_loop(config, run, splits, writer)
  timings['train_s'] = time.time() - start

  start = time.time()
  scores = evaluate.evaluate_model(
      run.predict_step, run.state.params, splits, eval_splits, mesh=run.mesh,
      global_batch_size=config.eval.batch_size,
      word_groups=_word_group_columns(config, vocabulary))
  references = evaluate.reference_scores(splits, eval_splits,
                                         config.eval.oracle_alphas)
  for name in eval_splits:
    scores[name].update(references[name])
    scores[name]['gap_closed'] = evaluate.gap_closed(scores[name])
  timings['eval_s'] = time.time() - start

  results = {'splits': scores,
             'meta': {'step': checkpointing.step_of(run.state),
                      'total_steps': run.total_steps,
                      'global_batch_size': config.train.batch_size,
                      'num_devices': jax.device_count(),
                      'num_processes': jax.process_count(),
                      'curriculum': _curriculum_meta(config, run.stages),
                      'timings_s': timings}}
  writer.write_scalars(results['meta']['step'], _scalars('final', scores))
  writer.flush()
  _write_results(workdir, results)
  run.manager.close()
  return results
