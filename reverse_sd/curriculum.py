r"""Curriculum learning: per-example difficulty scores and a staged schedule.

Difficulty (the paper's): a trained baseline run's cosine between its
prediction and the true prompt embedding of each training example, averaged
over the run's kept checkpoints with weights that favour later ones. A high
cosine is an easy example. The scores go to a file keyed by example id:

  python -m reverse_sd.curriculum score --workdir=BASELINE_DIR \
      [--output=BASELINE_DIR/curriculum_scores.npz] [--weights=linear]

On the synthetic corpus the known prompt-image alignment (the share of prompt
words that are drawn) can serve as the difficulty too:

  python -m reverse_sd.curriculum score --workdir=BASELINE_DIR \
      --source=alignment

and `score` reports the rank correlation of the model-based score with it.

Schedule: stage s trains on the easiest `fractions[s]` of the training set
for `stage_lengths[s]` of the run's steps (e.g. 1/3, 1/2, all). Within a stage
the pool is reshuffled every pass. A batch's examples are a pure function of
(shuffle seed, step), so a resumed run continues mid-stage exactly
(`pipeline.TrainStream`).
"""

from collections.abc import Sequence
import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import sys

import jax
import ml_collections
import numpy as np

from reverse_sd import evaluate
from reverse_sd import saved_run
from reverse_sd.data import datasets
from reverse_sd.ops.cpu import tuning

SCORES_FORMAT_VERSION = 1
SCORES_FILE_NAME = 'curriculum_scores.npz'
CHECKPOINT_WEIGHTINGS = ('linear', 'uniform', 'last')
DIFFICULTIES = ('', 'model', 'alignment')


@dataclasses.dataclass(frozen=True)
class Scores:
  """Difficulty per training example: higher is easier."""
  ids: np.ndarray  # [N] str
  scores: np.ndarray  # [N] float32
  source: str  # 'model:<workdir>' or 'alignment'.
  checkpoint_steps: np.ndarray  # [K] int (empty for 'alignment').
  checkpoint_weights: np.ndarray  # [K] float, sum 1.
  per_checkpoint: np.ndarray  # [K, N] float32 cosines.

  def save(self, path: str | os.PathLike[str]) -> None:
    """Writes the scores atomically (a crash leaves no half file)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f'{path.stem}.tmp-{os.getpid()}.npz')
    np.savez(tmp, ids=self.ids, scores=self.scores,
             source=np.asarray(self.source),
             checkpoint_steps=self.checkpoint_steps,
             checkpoint_weights=self.checkpoint_weights,
             per_checkpoint=self.per_checkpoint,
             format_version=np.int32(SCORES_FORMAT_VERSION))
    os.replace(tmp, path)

  @classmethod
  def load(cls, path: str | os.PathLike[str]) -> 'Scores':
    """Reads a file written by `save`, with errors that name the file."""
    path = pathlib.Path(path)
    if not path.is_file():
      raise FileNotFoundError(
          f'Curriculum scores file {path} does not exist. Write it with '
          '`python -m reverse_sd.curriculum score --workdir=BASELINE_DIR`.')
    try:
      with np.load(path, allow_pickle=False) as data:
        version = int(data['format_version'])
        if version != SCORES_FORMAT_VERSION:
          raise ValueError(f'format version {version}, expected '
                           f'{SCORES_FORMAT_VERSION}')
        scores = cls(ids=data['ids'], scores=data['scores'].astype(np.float32),
                     source=str(data['source']),
                     checkpoint_steps=data['checkpoint_steps'],
                     checkpoint_weights=data['checkpoint_weights'],
                     per_checkpoint=data['per_checkpoint'])
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f'{path} is not a readable curriculum scores file '
                       f'({type(e).__name__}: {e}).') from e
    if len(scores.ids) != len(scores.scores):
      raise ValueError(f'{path}: {len(scores.ids)} ids but '
                       f'{len(scores.scores)} scores.')
    if not np.all(np.isfinite(scores.scores)):
      raise ValueError(f'{path}: scores contain NaN or inf.')
    return scores

  def for_ids(self, ids: np.ndarray, where: str = '') -> np.ndarray:
    """Scores in the order of `ids`; every id must be present."""
    position = {key: i for i, key in enumerate(self.ids.tolist())}
    missing = [key for key in ids.tolist() if key not in position]
    if missing:
      raise ValueError(
          f'{len(missing)} of {len(ids)} training examples have no difficulty '
          f'score in {where or "the scores file"} (e.g. {missing[:3]}); it '
          'was written for another data set. Re-run `curriculum score`.')
    return self.scores[[position[key] for key in ids.tolist()]]


def checkpoint_weights(num_checkpoints: int, weighting: str) -> np.ndarray:
  """Weights of a run's checkpoints, oldest first, summing to 1.

  'linear': checkpoint k of K (1-based) weighs k, so later ones count more
  (the paper's choice); 'uniform': all equal; 'last': only the latest.
  """
  if num_checkpoints < 1:
    raise ValueError('Need at least one checkpoint to score difficulty.')
  if weighting == 'linear':
    weights = np.arange(1, num_checkpoints + 1, dtype=np.float64)
  elif weighting == 'uniform':
    weights = np.ones(num_checkpoints)
  elif weighting == 'last':
    weights = np.zeros(num_checkpoints)
    weights[-1] = 1.0
  else:
    raise ValueError(f'Checkpoint weighting {weighting!r}; expected one of '
                     f'{CHECKPOINT_WEIGHTINGS}.')
  return weights / weights.sum()


def per_example_cosine(pred_NxD: np.ndarray,
                       target_NxD: np.ndarray) -> np.ndarray:
  pred = pred_NxD.astype(np.float64)
  target = target_NxD.astype(np.float64)
  norms = np.linalg.norm(pred, axis=1) * np.linalg.norm(target, axis=1)
  return (np.sum(pred * target, axis=1) / np.maximum(norms, 1e-12)).astype(
      np.float32)


def score_run(workdir: str | pathlib.Path, *, weighting: str = 'linear',
              batch_size: int | None = None) -> Scores:
  """Difficulty of every training example from a run's kept checkpoints."""
  workdir = pathlib.Path(workdir).resolve()
  saved_run.load_run_config(workdir)  # Names a folder that is not a run at all.
  steps = saved_run.checkpoint_steps(workdir)
  # Raises a clear error when there is no checkpoint (train the baseline
  # first) or when one does not fit the run's config.
  run = saved_run.restore_run(workdir, steps[0] if steps else None)
  weights = checkpoint_weights(len(steps), weighting)
  train = datasets.load_splits(run.config, ['train'])['train']
  batch_size = batch_size or run.config.eval.batch_size
  per_checkpoint = []
  for step in steps:
    run = run.at_step(step)
    preds = evaluate.predict_split(run.predict_step, run.params, train,
                                   mesh=run.mesh, global_batch_size=batch_size)
    cosine = per_example_cosine(preds['embedding'], train.table.embeddings)
    logging.info('Scored %d training examples with step %d: mean cosine %.4f',
                 len(cosine), step, cosine.mean())
    per_checkpoint.append(cosine)
  per_checkpoint = np.stack(per_checkpoint)
  return Scores(ids=train.table.ids, scores=(weights @ per_checkpoint).astype(
      np.float32), source=f'model:{workdir}',
                checkpoint_steps=np.asarray(steps, np.int64),
                checkpoint_weights=weights, per_checkpoint=per_checkpoint)


def alignment_of_train(config: ml_collections.ConfigDict) -> Scores:
  """The synthetic corpus's known alignment of each training example."""
  # Imported here: tensorflow_datasets pulls in tensorflow, which only this
  # difficulty needs.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  builder = datasets.open_builder(config.data)
  if 'alignment' not in builder.info.features:
    raise ValueError(
        f'Data set {builder.info.full_name} has no alignment feature; '
        "difficulty 'alignment' needs the synthetic corpus. Use "
        "config.curriculum.difficulty='model'.")
  source = builder.as_data_source(
      'train', decoders={'image': tfds.decode.SkipDecoding()})
  ids, alignment = [], []
  for start in range(0, len(source), 1024):
    rows = source.__getitems__(list(range(start, min(start + 1024,
                                                     len(source)))))
    for row in rows:
      value = row['id']
      ids.append(value.decode() if isinstance(value, bytes) else str(value))
      alignment.append(float(row['alignment']))
  return Scores(ids=np.asarray(ids, dtype=str),
                scores=np.asarray(alignment, np.float32), source='alignment',
                checkpoint_steps=np.zeros([0], np.int64),
                checkpoint_weights=np.zeros([0]),
                per_checkpoint=np.zeros([0, len(ids)], np.float32))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
  """Spearman rank correlation (average ranks for ties)."""

  def ranks(x):
    order = np.argsort(x, kind='stable')
    sorted_x = x[order]
    r = np.empty(len(x))
    r[order] = np.arange(len(x), dtype=np.float64)
    # Average the ranks of tied values.
    _, first, counts = np.unique(sorted_x, return_index=True,
                                 return_counts=True)
    for start, count in zip(first, counts):
      if count > 1:
        r[order[start:start + count]] = start + (count - 1) / 2
    return r

  ra, rb = ranks(np.asarray(a)), ranks(np.asarray(b))
  return float(np.corrcoef(ra, rb)[0, 1])


# ----------------------------------------------------------------------------
# The schedule.


@dataclasses.dataclass(frozen=True)
class Stage:
  """Steps [start_step, next stage's start) draw from `pool` (example indices).
  """
  start_step: int
  fraction: float
  pool: np.ndarray


def easiest_first(scores_N: np.ndarray) -> np.ndarray:
  """Example indices from easiest (highest score) to hardest; ties by index."""
  return np.argsort(-np.asarray(scores_N, np.float64), kind='stable')


def make_stages(scores_N: np.ndarray, fractions: Sequence[float],
                stage_lengths: Sequence[float], total_steps: int) -> list[Stage]:
  """The staged schedule over `total_steps` steps.

  Args:
    scores_N: difficulty per training example (higher is easier).
    fractions: share of the easiest examples each stage draws from,
      increasing, in (0, 1]; the last is usually 1.
    stage_lengths: each stage's share of the steps; normalised to sum 1.
    total_steps: the run's length in steps.
  """
  fractions = [float(f) for f in fractions]
  lengths = [float(x) for x in stage_lengths]
  if not fractions or len(fractions) != len(lengths):
    raise ValueError(
        f'config.curriculum.fractions {tuple(fractions)} and stage_lengths '
        f'{tuple(lengths)} must be non-empty and of equal length.')
  if any(not 0 < f <= 1 for f in fractions) or any(
      b < a for a, b in zip(fractions, fractions[1:])):
    raise ValueError(f'config.curriculum.fractions {tuple(fractions)} must '
                     'be non-decreasing and in (0, 1].')
  if any(x <= 0 for x in lengths):
    raise ValueError(f'config.curriculum.stage_lengths {tuple(lengths)} must '
                     'all be > 0.')
  order = easiest_first(scores_N)
  cumulative = np.cumsum(lengths) / np.sum(lengths)
  starts = [0] + [int(round(c * total_steps)) for c in cumulative[:-1]]
  stages = []
  for start, fraction in zip(starts, fractions):
    size = max(1, int(np.ceil(fraction * len(order))))
    stages.append(Stage(start_step=start, fraction=fraction,
                        pool=np.sort(order[:size])))
  return stages


def fingerprint(stages: Sequence[Stage] | None) -> str:
  """A short digest of a schedule, saved with the data position so that a
  resumed run refuses a different curriculum."""
  if not stages:
    return ''
  digest = hashlib.sha1()
  for stage in stages:
    digest.update(np.int64(stage.start_step).tobytes())
    digest.update(np.asarray(stage.pool, np.int64).tobytes())
  return digest.hexdigest()[:16]


def stages_for_run(config: ml_collections.ConfigDict,
                   workdir: pathlib.Path, train_ids: np.ndarray,
                   total_steps: int) -> list[Stage] | None:
  """The run's schedule from config.curriculum, or None when it is off.

  With `difficulty='model'` the scores come from `scores_path`, or are
  computed once from `scorer_workdir`'s checkpoints and kept as
  `workdir/curriculum_scores.npz` (a rerun reuses that file).
  """
  curriculum = config.curriculum
  if curriculum.difficulty not in DIFFICULTIES:
    raise ValueError(f'config.curriculum.difficulty='
                     f'{curriculum.difficulty!r}; expected one of '
                     f'{DIFFICULTIES} ("" turns the curriculum off).')
  if not curriculum.difficulty:
    return None
  if curriculum.difficulty == 'alignment':
    scores = alignment_of_train(config)
    where = 'the alignment feature'
  elif curriculum.scores_path:
    scores = Scores.load(curriculum.scores_path)
    where = curriculum.scores_path
  elif curriculum.scorer_workdir:
    path = workdir / SCORES_FILE_NAME
    scorer = pathlib.Path(curriculum.scorer_workdir).resolve()
    if path.exists():
      scores = Scores.load(path)
      if scores.source != f'model:{scorer}':
        raise ValueError(
            f'{path} holds scores from {scores.source}, but '
            f'config.curriculum.scorer_workdir is {scorer}. Use a fresh '
            '--workdir, or delete that file to rescore.')
    else:
      logging.info('Scoring training examples with the checkpoints of %s ...',
                   scorer)
      scores = score_run(scorer, weighting=curriculum.checkpoint_weighting)
      if jax.process_index() == 0:
        scores.save(path)
    where = str(path)
  else:
    raise ValueError(
        "config.curriculum.difficulty='model' needs "
        'config.curriculum.scores_path (a file from `python -m '
        'reverse_sd.curriculum score`) or config.curriculum.scorer_workdir '
        '(a trained baseline run).')
  stages = make_stages(scores.for_ids(train_ids, where), curriculum.fractions,
                       curriculum.stage_lengths, total_steps)
  for i, stage in enumerate(stages):
    logging.info('Curriculum stage %d/%d from step %d: the easiest %.0f%% '
                 '(%d examples, by %s).', i + 1, len(stages), stage.start_step,
                 100 * stage.fraction, len(stage.pool), scores.source)
  return stages


# ----------------------------------------------------------------------------
# Command line.


_USAGE = ('usage: python -m reverse_sd.curriculum score --workdir=RUN '
          '[--output=PATH] '
          f'[--weights={"|".join(CHECKPOINT_WEIGHTINGS)}] '
          '[--source=model|alignment] [--batch_size=N]\n'
          '       python -m reverse_sd.curriculum compare --workdir=RUN '
          '--scores=PATH')


def _alignment_summary(config, scores: Scores) -> dict:
  """Rank correlation of `scores` with the known alignment (synthetic)."""
  try:
    alignment = alignment_of_train(config)
  except ValueError:
    return {}
  return {'spearman_with_alignment': spearman(
      scores.scores, alignment.for_ids(scores.ids))}


def _main(argv: Sequence[str]) -> None:
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  absl_logging.set_verbosity(absl_logging.INFO)
  if len(argv) != 2 or argv[1] not in ('score', 'compare'):
    raise SystemExit(_USAGE)
  tuning.tune_process()
  workdir = pathlib.Path(_FLAGS.workdir)
  config = saved_run.load_run_config(workdir)
  if argv[1] == 'compare':
    # How close a saved model-based score is to the known alignment.
    if not _FLAGS.scores:
      raise SystemExit('compare needs --scores=PATH.\n' + _USAGE)
    scores = Scores.load(_FLAGS.scores)
    summary = {'scores': _FLAGS.scores, 'source': scores.source,
               **_alignment_summary(config, scores)}
    print(json.dumps(summary, indent=2))
    return
  output = pathlib.Path(_FLAGS.output or workdir / SCORES_FILE_NAME)
  if _FLAGS.source == 'alignment':
    scores = alignment_of_train(config)
  else:
    scores = score_run(workdir, weighting=_FLAGS.weights,
                       batch_size=_FLAGS.batch_size or None)
  summary = {'output': str(output), 'source': scores.source,
             'num_examples': int(len(scores.ids)),
             'checkpoint_steps': scores.checkpoint_steps.tolist(),
             'checkpoint_weights': [round(float(w), 4)
                                    for w in scores.checkpoint_weights],
             'mean_score': float(scores.scores.mean())}
  if scores.source != 'alignment':
    summary.update(_alignment_summary(config, scores))
  if jax.process_index() == 0:
    scores.save(output)
    print(json.dumps(summary, indent=2))
    sys.stdout.flush()


if __name__ == '__main__':
  from reverse_sd import cli as _cli  # pylint: disable=g-import-not-at-top
  from absl import flags as _flags  # pylint: disable=g-import-not-at-top
  _flags.DEFINE_string('workdir', None, 'A trained run (the scorer).',
                       required=True)
  _flags.DEFINE_string('output', '', 'Default: WORKDIR/' + SCORES_FILE_NAME)
  _flags.DEFINE_enum('weights', 'linear', CHECKPOINT_WEIGHTINGS,
                     'How the kept checkpoints are weighted.')
  _flags.DEFINE_enum('source', 'model', ('model', 'alignment'),
                     'Difficulty from the run, or the known alignment.')
  _flags.DEFINE_integer('batch_size', 0, 'Prediction batch (0: eval batch).')
  _flags.DEFINE_string('scores', '', 'compare: a scores file to compare.')
  _FLAGS = _flags.FLAGS
  _cli.run(_main)
