r"""The domain-adaptation table: one model, an ensemble and DA-KL, over seeds.

  .venv/bin/python -m reverse_sd.domain_adaptation \
      --sweep_dir=runs/ablation_synthetic \
      --output=results/domain_adaptation_synthetic.md \
      [--seeds=0,1,2] [--single=baseline] [--ensemble=baseline,vocab] \
      [--num_centroids=2000] [--gamma=10] [--alpha=1] \
      [--select_on_validation [--gammas=1,3,10,30,100] \
       [--alphas=0.01,0.1,1,10,100]]

The runs are those of a sweep (`python -m reverse_sd.sweep`): SWEEP_DIR/<group>_seed<s>.
For each seed s, with the predictions of `--single` (default baseline) and of
the `--ensemble` groups (default baseline and vocab), on each of the splits
`test` and `test_shifted` (the other domain), the rows are

  1. single model: the single run's predictions, as they are;
  2. ensemble: the renormalised weighted mean of the ensemble runs'
     predictions (`reverse_sd.ensemble.combine`), with weights fitted on the
     validation split (`ensemble.fit_weights`);
  3. ensemble + DA-KL: `reverse_sd.dakl.fit_predict` on the ensemble's
     predictions; source points: the k spherical k-means centroids of the
     ensemble's TRAIN predictions (k-means++ from seed s), each labelled with
     the true embedding of the training example whose ensemble prediction is
     nearest (`dakl.make_source_points`); target points: the ensemble's
     predictions of the split being evaluated (its labels are never read);
  4. ensemble + DA-KL, source only: as 3, with samples represented against
     the source points only (no target points);
  5. single model + DA-KL: as 3 on the single run's predictions (k-means of
     its own TRAIN predictions).

Metrics: `cosine` and `recall@5` of `reverse_sd.prediction_cache.
embedding_metrics` (the JSON keeps recall@1 and @10 too); each table cell is
the mean ± sample std (ddof=1) over the seeds.

gamma and alpha: --gamma and --alpha for every DA-KL row and seed or, with
--select_on_validation, chosen per seed and per DA-KL row from --gammas x
--alphas by the validation mean cosine, with the VALIDATION predictions as
the target points (`dakl.select_on_validation`): the transductive choice is
made on validation, never on test or test_shifted, and the chosen values
then serve both splits. The chosen values are recorded per seed.

Predictions come from each run's cache (`prediction_cache.load_or_predict_many`,
through `prediction_cache.load_aligned`): missing ones are computed from the
run's latest checkpoint and saved, so a rerun only repeats the DA-KL part.
It writes the markdown at --output (a .md path) and the JSON behind it at
the same path with suffix .json: provenance (date UTC, machine, command),
settings, per-seed records (runs, checkpoint steps, ensemble weights, source
points, gamma and alpha, all metrics, timings) and the summary, plus the
wall time and the peak resident memory of the process. Numbers are written
as they come out; the text only defines what they are.
"""

from collections.abc import Mapping, Sequence
import dataclasses
import logging
import pathlib
import resource
import statistics
import sys
import time
from typing import Any

from absl import app
from absl import flags
import numpy as np

from reverse_sd import cli
from reverse_sd import dakl
from reverse_sd import ensemble
from reverse_sd import prediction_cache
from reverse_sd import sweep as sweep_lib
from reverse_sd.ops.cpu import tuning

FLAGS = flags.FLAGS

DEFAULT_TITLE = ('Domain adaptation on the synthetic corpus: ensemble and '
                 'DA-KL')
DEFAULT_NUM_CENTROIDS = 2000
EVAL_SPLITS = ('test', 'test_shifted')
# Every split a seed needs: train (source points), validation (weights,
# selection) and the evaluated ones.
NEEDED_SPLITS = ('train', 'validation', *EVAL_SPLITS)
# (metric of `embedding_metrics`, format in the markdown table).
TABLE_METRICS = (('cosine', '.4f'), ('recall@5', '.3f'))


@dataclasses.dataclass(frozen=True)
class Row:
  """One row of the table: which predictions, and which adaptation."""
  key: str  # Key in the JSON.
  label: str  # Shown in the table.
  features: str  # 'single' or 'ensemble'.
  use_target: bool | None  # None: no DA-KL; else `dakl.fit_predict`'s.


ROWS = (
    Row('single', 'single model', 'single', None),
    Row('ensemble', 'ensemble', 'ensemble', None),
    Row('ensemble_dakl', 'ensemble + DA-KL', 'ensemble', True),
    Row('ensemble_dakl_source_only', 'ensemble + DA-KL, source only',
        'ensemble', False),
    Row('single_dakl', 'single model + DA-KL', 'single', True),
)


@dataclasses.dataclass(frozen=True)
class Settings:
  """Everything that decides the table's numbers (recorded in the JSON)."""
  seeds: tuple[int, ...] = (0, 1, 2)
  single: str = 'baseline'  # Sweep group of the single model.
  ensemble: tuple[str, ...] = ('baseline', 'vocab')  # Groups ensembled.
  num_centroids: int = DEFAULT_NUM_CENTROIDS
  gamma: float = dakl.DEFAULT_GAMMA
  alpha: float = dakl.DEFAULT_ALPHA
  select_on_validation: bool = False
  gammas: tuple[float, ...] = dakl.DEFAULT_GAMMAS
  alphas: tuple[float, ...] = dakl.DEFAULT_ALPHAS
  kmeans_iterations: int = dakl.DEFAULT_KMEANS_ITERATIONS
  chunk_size: int = dakl.DEFAULT_CHUNK_SIZE

  def check(self) -> None:
    """Raises ValueError naming the first unusable setting."""
    if not self.seeds:
      raise ValueError('--seeds: expected at least one seed.')
    if len(set(self.seeds)) != len(self.seeds):
      raise ValueError(f'--seeds={list(self.seeds)} repeats a seed.')
    if len(set(self.ensemble)) < 2 or len(set(self.ensemble)) != len(
        self.ensemble):
      raise ValueError(f'--ensemble={",".join(self.ensemble)}: expected at '
                       'least two different sweep groups.')
    if self.num_centroids < 1:
      raise ValueError(f'--num_centroids={self.num_centroids}; expected >= 1.')
    if self.kmeans_iterations < 0:
      raise ValueError(f'--kmeans_iterations={self.kmeans_iterations}; '
                       'expected >= 0.')
    numbers = {'gamma': [self.gamma], 'alpha': [self.alpha],
               'gammas': self.gammas, 'alphas': self.alphas,
               'chunk_size': [self.chunk_size]}
    for name, values in numbers.items():
      if not values or not all(v > 0 for v in values):
        raise ValueError(f'--{name}={",".join(map(str, values))}: expected '
                         'positive numbers.')

  def groups(self) -> list[str]:
    """The sweep groups each seed needs, single first, without repeats."""
    return list(dict.fromkeys([self.single, *self.ensemble]))


# ---------------------------------------------------------------------------
# The computation.
# ---------------------------------------------------------------------------


def run_workdirs(sweep_dir: str | pathlib.Path,
                 settings: Settings) -> dict[int, dict[str, pathlib.Path]]:
  """seed -> group -> SWEEP_DIR/<group>_seed<seed>, all of them checked.

  Raises:
    FileNotFoundError: the sweep dir, or any run dir, is missing; the message
      names every missing one.
  """
  sweep_dir = pathlib.Path(sweep_dir)
  if not sweep_dir.is_dir():
    raise FileNotFoundError(f'--sweep_dir={sweep_dir}: no such directory.')
  workdirs = {seed: {group: sweep_dir / f'{group}_seed{seed}'
                     for group in settings.groups()}
              for seed in settings.seeds}
  missing = [str(path) for runs in workdirs.values() for path in runs.values()
             if not path.is_dir()]
  if missing:
    raise FileNotFoundError(
        f'Run director{"y" if len(missing) == 1 else "ies"} not found: '
        f'{", ".join(missing)}. Expected <group>_seed<s> under '
        f'--sweep_dir={sweep_dir} for groups {settings.groups()} (--single, '
        f'--ensemble) and seeds {list(settings.seeds)} (--seeds); train them '
        'with python -m reverse_sd.sweep or choose other groups or seeds.')
  return workdirs


def _timed(timings: dict[str, Any], key: str, fn, *args, **kwargs):
  """Calls fn(*args, **kwargs), adding its wall time to timings[key]."""
  start = time.perf_counter()
  result = fn(*args, **kwargs)
  timings[key] = timings.get(key, 0.0) + time.perf_counter() - start
  return result


def _hyperparameters(row: Row, source_x: np.ndarray, source_y: np.ndarray,
                     validation_x: np.ndarray, validation_y: np.ndarray,
                     settings: Settings, timings: dict[str, Any]) -> dict:
  """gamma and alpha of one DA-KL row: given, or chosen on validation."""
  if not settings.select_on_validation:
    return {'gamma': settings.gamma, 'alpha': settings.alpha,
            'chosen': 'given', 'grid': None}
  gamma, alpha, grid = _timed(
      timings, f'selection/{row.key}', dakl.select_on_validation, source_x,
      source_y, validation_x, validation_y, gammas=settings.gammas,
      alphas=settings.alphas, use_target=row.use_target,
      chunk_size=settings.chunk_size)
  return {'gamma': gamma, 'alpha': alpha,
          'chosen': 'selected on validation', 'grid': grid}


def evaluate_seed(seed: int, workdirs: Mapping[str, pathlib.Path],
                  settings: Settings) -> dict[str, Any]:
  """All rows of one seed: metrics per row and split, and how they were made.

  Args:
    seed: the runs' seed; also the k-means seed.
    workdirs: group -> run dir (`run_workdirs(...)[seed]`).
    settings: the table's settings.

  Returns:
    The seed's JSON record (see the module docstring).
  """
  timings: dict[str, Any] = {}
  groups = list(workdirs)
  runs = _timed(timings, 'predictions', prediction_cache.load_aligned,
                [workdirs[g] for g in groups], NEEDED_SPLITS)
  member = {group: index for index, group in enumerate(groups)}
  targets = {split: runs[split][0].targets for split in NEEDED_SPLITS}

  def predicted(group: str, split: str) -> np.ndarray:
    return runs[split][member[group]].predicted

  weights = _timed(timings, 'ensemble_weights', ensemble.fit_weights,
                   [predicted(g, 'validation') for g in settings.ensemble],
                   targets['validation'])
  features = {
      'single': {split: predicted(settings.single, split)
                 for split in NEEDED_SPLITS},
      'ensemble': {split: ensemble.combine(
          [predicted(g, split) for g in settings.ensemble], weights)
                   for split in NEEDED_SPLITS}}

  record_metrics, hyperparameters, source_points, sources = {}, {}, {}, {}
  for row in ROWS:
    inputs = features[row.features]
    if row.use_target is None:
      record_metrics[row.key] = {
          split: prediction_cache.embedding_metrics(inputs[split],
                                                   targets[split])
          for split in EVAL_SPLITS}
      continue
    if row.features not in sources:
      sources[row.features] = _timed(
          timings, f'source_points/{row.features}', dakl.make_source_points,
          inputs['train'], targets['train'], settings.num_centroids,
          seed=seed, num_iterations=settings.kmeans_iterations,
          chunk_size=settings.chunk_size)
      source_points[row.features] = sources[row.features][2]
    source_x, source_y, _ = sources[row.features]
    chosen = _hyperparameters(row, source_x, source_y, inputs['validation'],
                              targets['validation'], settings, timings)
    hyperparameters[row.key] = chosen
    record_metrics[row.key] = {}
    for split in EVAL_SPLITS:
      adapted = _timed(timings, f'dakl_fit/{row.key}/{split}',
                       dakl.fit_predict, source_x, source_y, inputs[split],
                       gamma=chosen['gamma'], alpha=chosen['alpha'],
                       use_target=row.use_target,
                       chunk_size=settings.chunk_size)
      record_metrics[row.key][split] = prediction_cache.embedding_metrics(
          adapted, targets[split])
    logging.info('Seed %d, %s: cosine %s (gamma %g, alpha %g).', seed,
                 row.label, {s: round(m['cosine'], 4)
                             for s, m in record_metrics[row.key].items()},
                 chosen['gamma'], chosen['alpha'])
  return {
      'seed': seed,
      'runs': {group: str(path) for group, path in workdirs.items()},
      'steps': {group: {split: runs[split][member[group]].step
                        for split in NEEDED_SPLITS} for group in groups},
      'num_examples': {split: len(runs[split][0]) for split in NEEDED_SPLITS},
      'ensemble_weights': dict(zip(settings.ensemble, weights.tolist())),
      'source_points': source_points,
      'hyperparameters': hyperparameters,
      'metrics': record_metrics,
      'seconds': timings,
  }


def summarize(values: Sequence[float]) -> dict[str, Any]:
  """n, mean, sample std (ddof=1; None for fewer than 2 values), values."""
  values = [float(v) for v in values]
  return {'n': len(values),
          'mean': statistics.fmean(values) if values else None,
          'std': statistics.stdev(values) if len(values) > 1 else None,
          'values': values}


def format_summary(summary: Mapping[str, Any], fmt: str) -> str:
  """'mean ± std'; a single value is marked (n=1)."""
  if summary['n'] == 1:
    return f'{format(summary["mean"], fmt)} (n=1)'
  return f'{format(summary["mean"], fmt)} ± {format(summary["std"], fmt)}'


def _table(header: Sequence[str], rows: Sequence[Sequence[str]],
           right_from: int) -> list[str]:
  """Markdown table lines; columns from `right_from` on are right-aligned."""
  align = ['---' if i < right_from else '--:' for i in range(len(header))]
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join(align) + '|']
  return lines + ['| ' + ' | '.join(row) + ' |' for row in rows]


def peak_rss_mb() -> float:
  """Peak resident memory of this process so far, MB (ru_maxrss is KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def compute_table(sweep_dir: str | pathlib.Path,
                  settings: Settings) -> dict[str, Any]:
  """Every seed's record and the summary over seeds; writes only the
  prediction caches of runs that lack them.

  Raises:
    FileNotFoundError: a missing run dir (named), or a run with neither
      checkpoints nor saved predictions.
    ValueError: bad settings, or runs that disagree on a split's examples.
  """
  settings.check()
  workdirs = run_workdirs(sweep_dir, settings)
  start = time.perf_counter()
  per_seed = []
  for seed in settings.seeds:
    logging.info('Seed %d: runs %s.', seed,
                 {g: str(p) for g, p in workdirs[seed].items()})
    per_seed.append(evaluate_seed(seed, workdirs[seed], settings))
  summary = {
      row.key: {split: {metric: summarize([r['metrics'][row.key][split][metric]
                                           for r in per_seed])
                        for metric, _ in TABLE_METRICS}
                for split in EVAL_SPLITS}
      for row in ROWS}
  return {'sweep_dir': str(sweep_dir),
          'settings': dataclasses.asdict(settings),
          'rows': [dataclasses.asdict(row) for row in ROWS],
          'splits': list(EVAL_SPLITS),
          'table_metrics': [metric for metric, _ in TABLE_METRICS],
          'summary': summary, 'seeds': per_seed,
          'seconds_total': time.perf_counter() - start,
          'peak_rss_mb': peak_rss_mb()}


# ---------------------------------------------------------------------------
# The markdown.
# ---------------------------------------------------------------------------


def row_definitions(settings: Settings) -> dict[str, str]:
  """Row key -> what the row is, in markdown."""
  single = f'`{settings.single}_seed<s>`'
  members = ' and '.join(f'`{g}_seed<s>`' for g in settings.ensemble)
  return {
      'single': f'the predictions of {single}, as they are.',
      'ensemble': (f'the renormalised weighted mean of the predictions of '
                   f'{members}, weights fitted on the validation split '
                   '(`ensemble.fit_weights`: the simplex weights of the '
                   'highest validation mean cosine).'),
      'ensemble_dakl': (
          "DA-KL (`dakl.fit_predict`) on the ensemble's predictions; source "
          'points: the k spherical k-means centroids (k-means++ from seed s) '
          "of the ensemble's TRAIN predictions, each labelled with the true "
          'embedding of the training example whose ensemble prediction is '
          "nearest by cosine; target points: the ensemble's predictions of "
          'the evaluated split (unlabelled); samples represented by their '
          'kernel values against source and target points; kernel ridge '
          'fitted on the source points.'),
      'ensemble_dakl_source_only': (
          'as ensemble + DA-KL, with samples represented against the source '
          'points only (no target points).'),
      'single_dakl': (
          f'as ensemble + DA-KL on the predictions of {single}, with source '
          'points from its own TRAIN predictions (own k-means).'),
  }


def _settings_lines(data: Mapping[str, Any]) -> list[str]:
  settings = data['settings']
  first = data['seeds'][0]
  sizes = ', '.join(f'{split} {n:,}'
                    for split, n in first['num_examples'].items())
  sources = '; '.join(
      f'{features}: {info["num_source"]:,} ({info["source"]})'
      for features, info in first['source_points'].items())
  lines = [
      f'- Runs: `{data["sweep_dir"]}/<group>_seed<s>`, seeds '
      f'{", ".join(map(str, settings["seeds"]))}; each run\'s latest '
      'checkpoint (steps in the per-seed table).',
      f'- Examples (seed {first["seed"]}): {sizes}.',
      f'- k = {settings["num_centroids"]:,} requested; source points (seed '
      f'{first["seed"]}): {sources}. k-means: spherical, k-means++ from '
      f'seed s, {settings["kmeans_iterations"]} Lloyd iterations.',
      '- Kernel: K(a, b) = exp(-gamma (1 - cos(a, b)) / 2); ridge strength '
      f'alpha; kernel blocks of {settings["chunk_size"]} points.']
  if settings['select_on_validation']:
    lines.append(
        '- gamma, alpha: selected per seed and per DA-KL row from gammas '
        f'{list(settings["gammas"])} x alphas {list(settings["alphas"])} '
        'by the mean cosine on the validation split, with the validation '
        'predictions as the target points (`dakl.select_on_validation`). '
        'This transductive choice is made on validation, never on test or '
        'test_shifted; the chosen values serve both splits (per-seed table).')
  else:
    lines.append(f'- gamma = {settings["gamma"]:g}, alpha = '
                 f'{settings["alpha"]:g} (given) for every DA-KL row and '
                 'seed.')
  return lines


def _per_seed_lines(data: Mapping[str, Any]) -> list[str]:
  header = ['seed', 'row', 'gamma', 'alpha',
            *(f'{split} {metric}' for split in EVAL_SPLITS
              for metric, _ in TABLE_METRICS)]
  rows = []
  for record in data['seeds']:
    for row in ROWS:
      chosen = record['hyperparameters'].get(row.key)
      rows.append([
          str(record['seed']), row.label,
          *((f'{chosen["gamma"]:g}', f'{chosen["alpha"]:g}') if chosen
            else (sweep_lib.MISSING, sweep_lib.MISSING)),
          *(format(record['metrics'][row.key][split][metric], fmt)
            for split in EVAL_SPLITS for metric, fmt in TABLE_METRICS)])
  lines = _table(header, rows, right_from=2)
  ensemble_groups = data['settings']['ensemble']
  lines += ['', 'Ensemble weights (fitted on validation) and checkpoint '
            'steps:', '']
  lines += _table(
      ['seed', 'checkpoint steps',
       *(f'weight {g}' for g in ensemble_groups)],
      [[str(record['seed']),
        ', '.join(f'{group} {sorted(set(steps.values()))}'
                  for group, steps in record['steps'].items()),
        *(f'{record["ensemble_weights"][g]:.4f}' for g in ensemble_groups)]
       for record in data['seeds']], right_from=2)
  return lines


def _time_lines(data: Mapping[str, Any]) -> list[str]:
  def total(seconds: Mapping[str, float], prefix: str) -> str:
    values = [v for k, v in seconds.items() if k.startswith(prefix)]
    return f'{sum(values):.2f}' if values else sweep_lib.MISSING

  header = ['seed', 'predictions', 'ensemble weights',
            'k-means + labels (ensemble)', 'k-means + labels (single)',
            'selection', 'DA-KL fits']
  rows = [[str(r['seed']), total(r['seconds'], 'predictions'),
           total(r['seconds'], 'ensemble_weights'),
           total(r['seconds'], 'source_points/ensemble'),
           total(r['seconds'], 'source_points/single'),
           total(r['seconds'], 'selection/'),
           total(r['seconds'], 'dakl_fit/')] for r in data['seeds']]
  fits = [v for r in data['seeds'] for k, v in r['seconds'].items()
          if k.startswith('dakl_fit/')]
  num_dakl_rows = sum(row.use_target is not None for row in ROWS)
  return [*_table(header, rows, right_from=1), '',
          'Seconds of wall time. predictions: loading the cached predictions '
          '(or computing and caching them where missing); k-means + labels: '
          'the source points (jit compilation included); selection: the '
          'validation grid of all DA-KL rows; DA-KL fits: '
          f'{num_dakl_rows * len(EVAL_SPLITS)} per seed ({num_dakl_rows} '
          f'DA-KL rows x {len(EVAL_SPLITS)} splits), '
          f'{statistics.fmean(fits):.2f} s each on average (kernel blocks '
          'included). The JSON has every timing.', '',
          f'Total {data["seconds_total"]:.1f} s; peak resident memory '
          f'{data["peak_rss_mb"]:,.0f} MB (ru_maxrss of the process).']


def make_markdown(data: Mapping[str, Any]) -> str:
  """The markdown report of `compute_table`'s data plus provenance."""
  settings = Settings(**{k: tuple(v) if isinstance(v, list) else v
                         for k, v in data['settings'].items()})
  seeds = ', '.join(map(str, settings.seeds))
  header = ['row', *(f'{split} {metric}' for split in EVAL_SPLITS
                     for metric, _ in TABLE_METRICS)]
  rows = [[f'{i}. {row.label}',
           *(format_summary(data['summary'][row.key][split][metric], fmt)
             for split in EVAL_SPLITS for metric, fmt in TABLE_METRICS)]
          for i, row in enumerate(ROWS, start=1)]
  definitions = row_definitions(settings)
  lines = [f'# {data["title"]}', '',
           f'Made {data["date"]} on {data["machine"]} by:', '',
           '```', data['command'], '```', '',
           *_table(header, rows, right_from=1), '',
           f'Each cell: mean ± sample std (ddof=1) over seeds {seeds} '
           f'(n={len(settings.seeds)}). cosine: mean cosine between the '
           '(adapted) predicted embedding and the true MiniLM prompt '
           'embedding. recall@5: share of examples whose own prompt is among '
           'the 5 prompts of the split nearest to the prediction by cosine. '
           'test_shifted is the other domain; validation and train come from '
           'the training domain.', '', '## Rows', '']
  lines += [f'{i}. **{row.label}**: {definitions[row.key]}'
            for i, row in enumerate(ROWS, start=1)]
  lines += ['', '## Settings', '', *_settings_lines(data), '',
            '## Per seed', '', *_per_seed_lines(data), '',
            '## Time and memory', '', *_time_lines(data)]
  return '\n'.join(lines) + '\n'


def domain_adaptation_table(
    sweep_dir: str | pathlib.Path, settings: Settings, *,
    title: str = DEFAULT_TITLE,
    provenance: Mapping[str, str] | None = None
) -> tuple[str, dict[str, Any]]:
  """(markdown, data): the table and the JSON behind it; writes only
  missing prediction caches. `provenance` ('date', 'machine', 'command')
  defaults to this process's."""
  data = compute_table(sweep_dir, settings)
  data = {'title': title,
          **dict(provenance or sweep_lib.current_provenance()), **data}
  return make_markdown(data), data


def check_output(output: str | pathlib.Path) -> pathlib.Path:
  """The markdown path; its JSON goes beside it (suffix .json)."""
  output = pathlib.Path(output)
  if output.suffix != '.md':
    raise ValueError(f'--output={output}: expected a .md path (the JSON is '
                     'written beside it with suffix .json).')
  return output


def write_outputs(output: str | pathlib.Path, markdown: str,
                  data: Mapping[str, Any]) -> pathlib.Path:
  """Writes the markdown at `output` and the JSON beside it, atomically;
  returns the JSON path."""
  output = check_output(output)
  json_path = output.with_suffix('.json')
  prediction_cache.atomic_write(output,
                               lambda f: f.write(markdown.encode('utf-8')))
  prediction_cache.write_json(json_path, dict(data))
  return json_path


# ---------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------


def _define_flags() -> None:
  # Defined only when run as a script, so importing this module (tests)
  # leaves the global absl flags alone.
  defaults = Settings()
  join = lambda values: ','.join(map(str, values))
  flags.DEFINE_string('sweep_dir', None, 'The sweep workdir; run <group> of '
                      'seed s is SWEEP_DIR/<group>_seed<s>.')
  flags.DEFINE_string('output', None, 'The markdown report (.md); its JSON '
                      'is written beside it (.json).')
  flags.DEFINE_string('seeds', join(defaults.seeds), 'Comma-separated seeds.')
  flags.DEFINE_string('single', defaults.single,
                      'Sweep group of the single model.')
  flags.DEFINE_string('ensemble', join(defaults.ensemble),
                      'Comma-separated sweep groups of the ensemble.')
  flags.DEFINE_integer('num_centroids', defaults.num_centroids,
                       'k: k-means centroids of the training predictions '
                       '(the DA-KL source points).', lower_bound=1)
  flags.DEFINE_float('gamma', defaults.gamma, 'DA-KL kernel width (without '
                     '--select_on_validation).')
  flags.DEFINE_float('alpha', defaults.alpha, 'DA-KL ridge strength (without '
                     '--select_on_validation).')
  flags.DEFINE_bool('select_on_validation', False,
                    'Choose gamma and alpha per seed and DA-KL row from '
                    '--gammas x --alphas by validation cosine, with the '
                    'validation predictions as the target points.')
  flags.DEFINE_string('gammas', join(defaults.gammas),
                      'Gamma grid for --select_on_validation.')
  flags.DEFINE_string('alphas', join(defaults.alphas),
                      'Alpha grid for --select_on_validation.')
  flags.DEFINE_integer('kmeans_iterations', defaults.kmeans_iterations,
                       'Lloyd iterations.', lower_bound=0)
  flags.DEFINE_integer('chunk_size', defaults.chunk_size,
                       'Points per DA-KL kernel block.', lower_bound=1)
  flags.DEFINE_string('title', DEFAULT_TITLE, 'Title of the report.')
  flags.mark_flags_as_required(['sweep_dir', 'output'])


def _parse_seeds(text: str) -> tuple[int, ...]:
  items = prediction_cache.parse_list(text, 'seeds')
  try:
    return tuple(int(item) for item in items)
  except ValueError as e:
    raise ValueError(f'--seeds={text!r}: expected comma-separated integers '
                     f'({e}).') from e


def settings_from_flags() -> Settings:
  """Settings from the command-line flags; ValueError names a bad flag."""
  parse_floats = prediction_cache.parse_floats
  return Settings(
      seeds=_parse_seeds(FLAGS.seeds), single=FLAGS.single,
      ensemble=tuple(prediction_cache.parse_list(FLAGS.ensemble, 'ensemble')),
      num_centroids=FLAGS.num_centroids, gamma=FLAGS.gamma,
      alpha=FLAGS.alpha, select_on_validation=FLAGS.select_on_validation,
      gammas=tuple(parse_floats(FLAGS.gammas, 'gammas')),
      alphas=tuple(parse_floats(FLAGS.alphas, 'alphas')),
      kmeans_iterations=FLAGS.kmeans_iterations, chunk_size=FLAGS.chunk_size)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  tuning.tune_process()
  try:
    output = check_output(FLAGS.output)
    settings = settings_from_flags()
    settings.check()
    markdown, data = domain_adaptation_table(FLAGS.sweep_dir, settings,
                                             title=FLAGS.title)
    json_path = write_outputs(output, markdown, data)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f'domain_adaptation: error: {e}')
  print(f'report: {output} (data: {json_path})')


if __name__ == '__main__':
  _define_flags()
  cli.run(main)
