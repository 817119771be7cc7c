r"""A run's predicted embeddings per split, cached beside the run.

DA-KL (`reverse_sd.dakl`) and ensembles (`reverse_sd.ensemble`) work on the
predictions of trained runs, not on images. They are computed once per run,
checkpoint step and split and kept as

  WORKDIR/predictions/<split>_step<N>.npz

with 'ids' [N] str, 'predicted_embedding' [N, D] float32 (unit norm),
'true_embedding' [N, D] float32 (the MiniLM prompt embeddings), 'step' and
'split'. Files are written atomically (a crash leaves no half file).

  preds = prediction_cache.load_predictions(workdir, 'test')     # files only
  preds = prediction_cache.load_or_predict(workdir, 'test')      # or computes

The command computes (or refreshes) them:

  python -m reverse_sd.prediction_cache --workdir=RUN [--step=N] \
      [--splits=train,validation,test,test_shifted] [--overwrite]
"""

from collections.abc import Callable, Sequence
import dataclasses
import json
import logging
import os
import pathlib
import re
import sys

import numpy as np

from reverse_sd import vocab_metrics

PREDICTIONS_DIR = 'predictions'
ALL_SPLITS = ('train', 'validation', 'test', 'test_shifted')
RECALL_KS = (1, 5, 10)
_FILE_PATTERN = re.compile(r'^(?P<split>.+)_step(?P<step>\d+)\.npz$')


@dataclasses.dataclass(frozen=True)
class Predictions:
  """One run's predictions of one split at one checkpoint step."""
  split: str
  step: int
  ids: np.ndarray  # [N] str, the data set's example ids, in split order.
  predicted: np.ndarray  # [N, D] float32.
  targets: np.ndarray  # [N, D] float32, the true prompt embeddings.
  path: pathlib.Path | None = None  # Where it was loaded from or saved to.

  def __post_init__(self):
    where = f' ({self.path})' if self.path else ''
    check_embeddings(self.predicted, f'predictions of split {self.split!r}'
                     f'{where}')
    if self.targets.shape != self.predicted.shape:
      raise ValueError(
          f'Split {self.split!r}{where}: true embeddings have shape '
          f'{self.targets.shape}, predictions {self.predicted.shape}.')
    if self.ids.shape != (len(self.predicted),):
      raise ValueError(f'Split {self.split!r}{where}: {self.ids.shape} ids '
                       f'for {len(self.predicted)} predictions.')

  def __len__(self) -> int:
    return len(self.ids)


def check_embeddings(x_NxD: np.ndarray, what: str) -> None:
  """Raises ValueError unless `x_NxD` is a non-empty, finite [N, D] array."""
  x_NxD = np.asarray(x_NxD)
  if x_NxD.ndim != 2:
    raise ValueError(f'{what}: expected an [N, D] array, got shape '
                     f'{x_NxD.shape}.')
  if not x_NxD.shape[0]:
    raise ValueError(f'{what}: empty (0 rows); expected at least one.')
  if not x_NxD.shape[1]:
    raise ValueError(f'{what}: embeddings of size 0.')
  if not np.all(np.isfinite(x_NxD)):
    row = int(np.argwhere(~np.isfinite(x_NxD))[0, 0])
    raise ValueError(f'{what}: row {row} is not finite.')


def predictions_path(workdir: str | os.PathLike[str], split: str,
                     step: int) -> pathlib.Path:
  return pathlib.Path(workdir) / PREDICTIONS_DIR / f'{split}_step{step}.npz'


def cached_steps(workdir: str | os.PathLike[str], split: str) -> list[int]:
  """Steps with saved predictions of `split`, oldest first."""
  folder = pathlib.Path(workdir) / PREDICTIONS_DIR
  if not folder.is_dir():
    return []
  steps = []
  for path in folder.iterdir():
    match = _FILE_PATTERN.match(path.name)
    if match and match['split'] == split:
      steps.append(int(match['step']))
  return sorted(steps)


def predict_command(workdir: str | os.PathLike[str], splits: Sequence[str],
                    step: int | None = None) -> str:
  """The shell command that writes the predictions files."""
  step_flag = '' if step is None else f' --step={step}'
  return (f'python -m reverse_sd.prediction_cache --workdir={workdir}'
          f'{step_flag} --splits={",".join(splits)}')


def save_predictions(predictions: Predictions,
                     path: str | os.PathLike[str]) -> pathlib.Path:
  """Writes `predictions` to `path` (.npz), atomically."""
  path = pathlib.Path(path)
  arrays = dict(ids=np.asarray(predictions.ids, dtype=str),
                predicted_embedding=predictions.predicted.astype(np.float32),
                true_embedding=predictions.targets.astype(np.float32),
                step=np.int64(predictions.step),
                split=np.asarray(predictions.split))
  atomic_write(path, lambda f: np.savez(f, **arrays))
  return path


def load_predictions(workdir: str | os.PathLike[str], split: str,
                     step: int | None = None) -> Predictions:
  """Reads saved predictions of `split`; never runs the model.

  Args:
    workdir: the run's folder.
    split: e.g. 'test_shifted'.
    step: the checkpoint step; None takes the newest saved predictions of
      `split` (which may predate the run's latest checkpoint; use
      `load_or_predict` to follow the checkpoints).

  Raises:
    FileNotFoundError: nothing saved; the message gives the path looked for
      and the command that writes it.
    ValueError: a file without the expected keys or with inconsistent shapes.
  """
  if step is None:
    steps = cached_steps(workdir, split)
    if not steps:
      folder = pathlib.Path(workdir) / PREDICTIONS_DIR
      raise FileNotFoundError(
          f'No saved predictions of split {split!r} for run {workdir}: no '
          f'{folder}/{split}_step<N>.npz. Write them with: '
          f'{predict_command(workdir, [split])}')
    step = steps[-1]
  path = predictions_path(workdir, split, step)
  if not path.is_file():
    raise FileNotFoundError(
        f'No saved predictions of split {split!r} at step {step} for run '
        f'{workdir}: {path} does not exist (saved steps: '
        f'{cached_steps(workdir, split)}). Write them with: '
        f'{predict_command(workdir, [split], step)}')
  with np.load(path, allow_pickle=False) as data:
    missing = [k for k in ('ids', 'predicted_embedding', 'true_embedding')
               if k not in data.files]
    if missing:
      raise ValueError(f'{path} lacks key(s) {missing}; it has {data.files}. '
                       'Delete it and rerun: '
                       f'{predict_command(workdir, [split], step)}')
    return Predictions(split=split, step=int(step), ids=data['ids'],
                       predicted=data['predicted_embedding'],
                       targets=data['true_embedding'], path=path)


def compute_predictions(run, splits: Sequence[str], *,
                        batch_size: int = 0) -> dict[str, Predictions]:
  """Runs the restored `run` (a `saved_run.Run`) over `splits`.

  The batch size defaults to the run's eval batch size, rounded up to a
  multiple of the data-parallel devices. Images are read and fed as in
  evaluation (also for frozen-feature runs: the backbone runs again).
  """
  # Imported here: the file-only path must not need the model stack.
  from reverse_sd import evaluate  # pylint: disable=g-import-not-at-top
  from reverse_sd import saved_run  # pylint: disable=g-import-not-at-top
  from reverse_sd.data import datasets  # pylint: disable=g-import-not-at-top
  data = datasets.load_splits(run.config, list(splits))
  multiple = saved_run.data_batch_multiple(run)
  batch_size = batch_size or int(run.config.eval.batch_size)
  batch_size = -(-batch_size // multiple) * multiple
  out = {}
  for name in splits:
    outputs = evaluate.predict_split(run.predict_step, run.params, data[name],
                                     mesh=run.mesh,
                                     global_batch_size=batch_size)
    table = data[name].table
    out[name] = Predictions(split=name, step=run.step, ids=table.ids,
                            predicted=outputs['embedding'],
                            targets=table.embeddings.astype(np.float32))
    logging.info('Predicted split %s of %s at step %d (%d examples).', name,
                 run.workdir, run.step, len(table))
  return out


def latest_checkpoint_step(workdir: str | os.PathLike[str]) -> int | None:
  """The step `saved_run.restore_run` would restore (None: no checkpoints)."""
  # Imported here: the file-only path must not need jax, orbax or the model.
  from reverse_sd import checkpointing  # pylint: disable=g-import-not-at-top
  from reverse_sd import saved_run  # pylint: disable=g-import-not-at-top
  if not checkpointing.checkpoint_dir(workdir).is_dir():
    return None
  steps = saved_run.checkpoint_steps(workdir)
  return steps[-1] if steps else None


def load_or_predict_many(workdir: str | os.PathLike[str],
                         splits: Sequence[str], step: int | None = None, *,
                         batch_size: int = 0, overwrite: bool = False,
                         load_run: Callable | None = None
                         ) -> dict[str, Predictions]:
  """Saved predictions of `splits`, computing and saving those missing.

  Args:
    workdir: the run's folder.
    splits: split names.
    step: the checkpoint; None takes the latest checkpoint of the run (or,
      for a workdir without checkpoints, the newest saved predictions).
    batch_size: prediction batch size; 0 takes the run's eval batch size.
    overwrite: recompute even the splits already saved.
    load_run: (workdir, step) -> saved_run.Run; default `saved_run.restore_run`.
      The run is restored at most once, and only when something is missing.

  Raises:
    FileNotFoundError / ValueError: as `load_predictions` and
      `saved_run.restore_run`.
  """
  splits = list(dict.fromkeys(splits))
  if step is None:
    step = latest_checkpoint_step(workdir)
    if step is None:  # No checkpoints: only saved files can answer.
      return {name: load_predictions(workdir, name) for name in splits}
  out, missing = {}, []
  for name in splits:
    if not overwrite and predictions_path(workdir, name, step).is_file():
      out[name] = load_predictions(workdir, name, step)
    else:
      missing.append(name)
  if missing:
    if load_run is None:
      # Imported here: the file-only path must not need the model stack.
      from reverse_sd import saved_run  # pylint: disable=g-import-not-at-top
      load_run = saved_run.restore_run
    run = load_run(workdir, step)
    for name, preds in compute_predictions(run, missing,
                                           batch_size=batch_size).items():
      path = predictions_path(workdir, name, step)
      if _is_main_process():
        save_predictions(preds, path)
        logging.info('Wrote %s.', path)
      out[name] = dataclasses.replace(preds, path=path)
  return {name: out[name] for name in splits}


def load_or_predict(workdir: str | os.PathLike[str], split: str,
                    step: int | None = None, **kwargs) -> Predictions:
  """`load_or_predict_many` for one split."""
  return load_or_predict_many(workdir, [split], step, **kwargs)[split]


def load_aligned(workdirs: Sequence[str | os.PathLike[str]],
                 splits: Sequence[str], *, compute_missing: bool = True,
                 batch_size: int = 0) -> dict[str, list[Predictions]]:
  """Predictions of several runs on the same splits: split -> one per run.

  Each run's latest checkpoint is used. The runs must share a data set: the
  same example ids in the same order and the same true embeddings.

  Raises:
    ValueError: no workdirs, or runs whose splits disagree (names the runs).
    FileNotFoundError: with `compute_missing=False`, a split not saved.
  """
  if not workdirs:
    raise ValueError('No run given: expected at least one workdir.')
  per_run = []
  for workdir in workdirs:
    if compute_missing:
      per_run.append(load_or_predict_many(workdir, splits,
                                          batch_size=batch_size))
    else:
      per_run.append({s: load_predictions(workdir, s) for s in splits})
  out = {}
  for split in splits:
    runs = [preds[split] for preds in per_run]
    first = runs[0]
    for workdir, other in zip(workdirs[1:], runs[1:]):
      if (other.ids.shape != first.ids.shape
          or not np.array_equal(other.ids, first.ids)):
        raise ValueError(
            f'Split {split!r}: runs {workdirs[0]} and {workdir} predict '
            f'different examples ({len(first)} vs {len(other)} ids, or another '
            'order); an ensemble needs runs on the same data set.')
      if other.predicted.shape[1] != first.predicted.shape[1]:
        raise ValueError(
            f'Split {split!r}: run {workdirs[0]} predicts '
            f'{first.predicted.shape[1]}-d embeddings, {workdir} '
            f'{other.predicted.shape[1]}-d.')
      if not np.allclose(other.targets, first.targets, atol=1e-4):
        raise ValueError(
            f'Split {split!r}: runs {workdirs[0]} and {workdir} have '
            'different true embeddings for the same ids (another text '
            'encoder?).')
    out[split] = runs
  return out


def embedding_metrics(predicted_NxD: np.ndarray,
                      targets_NxD: np.ndarray) -> dict[str, float]:
  """`cosine`, prompt retrieval `recall@k` (k in RECALL_KS, the bank being
  the split's own prompts, as in evaluation) and `num_examples`."""
  # Imported here: evaluate pulls in the model stack and the data pipeline.
  from reverse_sd import evaluate  # pylint: disable=g-import-not-at-top
  out = {'cosine': evaluate.mean_cosine(predicted_NxD, targets_NxD),
         'num_examples': int(len(targets_NxD))}
  recall = vocab_metrics.retrieval_recall_at_k(
      predicted_NxD, targets_NxD, np.arange(len(targets_NxD)), ks=RECALL_KS)
  out.update({f'recall@{k}': float(v) for k, v in recall.items()})
  return out


def atomic_write(path: pathlib.Path, write: Callable) -> None:
  """Calls write(binary file) on a temporary file, then renames it to
  `path`, so a crash never leaves a half-written `path`."""
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f'.{path.name}.tmp-{os.getpid()}')
  try:
    with open(tmp, 'wb') as f:
      write(f)
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)


def write_json(path: pathlib.Path, value: dict) -> None:
  """Writes `value` as indented JSON, atomically."""
  text = json.dumps(value, indent=2, default=float) + '\n'
  atomic_write(path, lambda f: f.write(text.encode('utf-8')))


def _is_main_process() -> bool:
  # Imported here: the file-only path must not need jax.
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_index() == 0


def parse_list(text: str, flag: str) -> list[str]:
  """'a,b' -> ['a', 'b']; an empty item is an error naming the flag."""
  items = [item.strip() for item in text.split(',')]
  if not text.strip() or any(not item for item in items):
    raise ValueError(f'--{flag}={text!r}: expected a comma-separated list '
                     'without empty items.')
  return items


def parse_floats(text: str, flag: str) -> list[float]:
  """'0.5,1' -> [0.5, 1.0]; a non-number is an error naming the flag."""
  items = parse_list(text, flag)
  try:
    return [float(item) for item in items]
  except ValueError as e:
    raise ValueError(f'--{flag}={text!r}: expected comma-separated numbers '
                     f'({e}).') from e


def _main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise SystemExit(f'predictions: unexpected arguments {argv[1:]}')
  from reverse_sd.ops.cpu import tuning  # pylint: disable=g-import-not-at-top
  tuning.tune_process()
  try:
    splits = parse_list(_FLAGS.splits, 'splits')
    preds = load_or_predict_many(
        _FLAGS.workdir, splits, None if _FLAGS.step < 0 else _FLAGS.step,
        batch_size=_FLAGS.batch_size, overwrite=_FLAGS.overwrite)
  except (FileNotFoundError, ValueError) as e:
    raise SystemExit(f'predictions: error: {e}') from e
  print(json.dumps({name: {'path': str(p.path), 'step': p.step,
                           'num_examples': len(p)}
                    for name, p in preds.items()}, indent=2))
  sys.stdout.flush()


if __name__ == '__main__':
  from reverse_sd import cli as _cli  # pylint: disable=g-import-not-at-top
  from absl import flags as _flags  # pylint: disable=g-import-not-at-top
  _flags.DEFINE_string('workdir', None, 'A trained run.', required=True)
  _flags.DEFINE_integer('step', -1, 'Checkpoint step (-1: the latest).')
  _flags.DEFINE_string('splits', ','.join(ALL_SPLITS),
                       'Comma-separated splits to predict.')
  _flags.DEFINE_integer('batch_size', 0, "0: the run's eval batch size.",
                        lower_bound=0)
  _flags.DEFINE_bool('overwrite', False, 'Recompute saved predictions.')
  _FLAGS = _flags.FLAGS
  _cli.run(_main)
