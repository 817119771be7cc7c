r"""Runs a hyperparameter sweep one run after another, then writes a report.

  .venv/bin/python -m reverse_sd.sweep \
      --sweep=configs/sweeps/ablation_synthetic.py \
      --workdir=runs/ablation_synthetic \
      [--report=results/ablation_synthetic.md] \
      [--dry_run] [--only=NAME_REGEX] [--keep_going] \
      [--print_commands=local|tpu_pod|slurm]

A sweep file is plain Python:

  CONFIG = 'configs/synthetic.py:ablation'  # --config of reverse_sd.main.

  def get_sweep():
    return [
        {'name': 'baseline_seed0', 'group': 'baseline', 'seed': 0},
        {'name': 'vocab_seed0', 'group': 'vocab', 'seed': 0,
         'vocab.loss_weight': 0.1},
        {'name': 'curriculum_seed0', 'group': 'curriculum', 'seed': 0,
         'curriculum.scorer_workdir': '{sweep_dir}/baseline_seed0'},
    ]

  REPORT = {  # Optional.
      'title': 'Ablations on the synthetic corpus',
      'metrics': [('test cosine', 'splits.test.cosine', '.4f'),
                  ('test R@5', 'splits.test.recall@5', '.3f')],
      'notes': 'Markdown placed under the tables.',
  }

`name` (required, unique, a safe directory name) is the run's sub-workdir;
`group` (default: the name) gathers the seeds of one setting in the report.
Every other key is a dotted config override; `{sweep_dir}` in a string value
becomes the absolute sweep workdir. CONFIG is relative to the repo root (or
absolute); everything after its first ':' goes to `get_config`.

Every override of every run is checked against the locked config before
anything runs, so a typo in the last run fails at once. Runs execute in list
order (a later run may read an earlier run's checkpoints) as
`python -m reverse_sd.main` subprocesses, logged to `<workdir>/<name>/log.txt`.
A run whose `results.json` exists is skipped, and runs resume from their
checkpoints, so rerunning the same command after a kill or a failure continues
where it stopped. `<workdir>/sweep.json` records every run's status, wall time
and results; `--report=PATH` writes a markdown table (mean ± std per group),
the JSON behind it (PATH with suffix .json) and one CSV row per run (PATH
with suffix .csv: name, group, status, then each REPORT metric).

`--print_commands=LAUNCHER` validates the sweep, then prints one command per
run for `launch/local.sh`, `launch/tpu_pod.sh` (TPU_NAME and ZONE from the
environment) or `launch/gpu_slurm.sh` (via sbatch), to run elsewhere; it
runs and writes nothing.
"""

from collections.abc import Callable, Mapping, Sequence
import copy
import csv
import dataclasses
import datetime
import difflib
import importlib.util
import io
import json
import os
import pathlib
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from typing import Any

from absl import app
from absl import flags
import ml_collections
from ml_collections import config_flags

from reverse_sd import cli

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent

FLAGS = flags.FLAGS

MISSING = '—'  # Shown for a metric that no run of a group has.
SWEEP_DIR_PLACEHOLDER = '{sweep_dir}'
_RESERVED_KEYS = ('name', 'group')
_REPORT_KEYS = ('title', 'metrics', 'notes')
_SAFE_NAME = re.compile(r'[A-Za-z0-9][A-Za-z0-9._-]*')
_DOTTED_KEY = re.compile(r'[A-Za-z_]\w*(\.[A-Za-z_]\w*)*')
_DEFAULT_METRICS = (('test cosine', 'splits.test.cosine', '.4f'),)
# reverse_sd.main.PREEMPTED_EXIT_CODE: stopped by SIGTERM after a checkpoint.
PREEMPTED_EXIT_CODE = 75


class SweepError(Exception):
  """A sweep file, an override or a run is wrong; the message says which."""


@dataclasses.dataclass(frozen=True)
class Run:
  """One run of a sweep: its name, report group and config overrides."""
  name: str
  group: str
  overrides: dict[str, Any]  # Dotted key -> value, `{sweep_dir}` replaced.


@dataclasses.dataclass(frozen=True)
class Sweep:
  """A loaded sweep file."""
  path: pathlib.Path
  config: str  # CONFIG as written: 'configs/x.py[:arg]'.
  runs: list[Run]
  report: dict[str, Any]  # REPORT with defaults filled in.


# ---------------------------------------------------------------------------
# Loading and validating a sweep file.
# ---------------------------------------------------------------------------


def substitute_sweep_dir(value: Any, sweep_dir: str | os.PathLike) -> Any:
  """Replaces `{sweep_dir}` in strings (also inside tuples and lists)."""
  if isinstance(value, str):
    return value.replace(SWEEP_DIR_PLACEHOLDER, str(sweep_dir))
  if isinstance(value, (tuple, list)):
    return type(value)(substitute_sweep_dir(v, sweep_dir) for v in value)
  return value


def _check_value(path: pathlib.Path, name: str, key: str, value: Any) -> None:
  """Rejects values that a command-line override cannot carry."""
  if isinstance(value, (bool, int, float, str)):
    return
  if isinstance(value, (tuple, list)):
    for item in value:
      if isinstance(item, (tuple, list)):
        _check_value(path, name, key, item)
      elif not isinstance(item, (bool, int, float, str)):
        raise SweepError(
            f'{path}: run {name!r}, key {key!r}: element {item!r} of '
            f'{value!r} is a {type(item).__name__}; expected bool, int, float '
            'or str.')
    return
  raise SweepError(
      f'{path}: run {name!r}, key {key!r}: value {value!r} is a '
      f'{type(value).__name__}; expected bool, int, float, str, tuple or '
      'list.')


def _parse_run(path: pathlib.Path, index: int, spec: Any,
               sweep_dir: pathlib.Path) -> Run:
  """Checks one entry of get_sweep() and turns it into a Run."""
  if not isinstance(spec, Mapping):
    raise SweepError(f'{path}: get_sweep()[{index}] is a '
                     f'{type(spec).__name__}; expected a dict.')
  name = spec.get('name')
  if name is None:
    raise SweepError(f'{path}: get_sweep()[{index}] has no \'name\' '
                     f'(keys: {sorted(map(str, spec))}).')
  if (not isinstance(name, str) or not _SAFE_NAME.fullmatch(name) or
      name in ('.', '..')):
    raise SweepError(
        f'{path}: get_sweep()[{index}] has name {name!r}, which is not a safe '
        'directory name; use letters, digits, \'.\', \'_\' and \'-\', '
        'starting with a letter or digit.')
  group = spec.get('group', name)
  if not isinstance(group, str) or not group:
    raise SweepError(f'{path}: run {name!r} has group {group!r}; expected a '
                     'non-empty str.')
  overrides = {}
  for key, value in spec.items():
    if key in _RESERVED_KEYS:
      continue
    if not isinstance(key, str) or not _DOTTED_KEY.fullmatch(key):
      raise SweepError(f'{path}: run {name!r} has key {key!r}; expected a '
                       'dotted config key such as \'optim.lr\'.')
    _check_value(path, name, key, value)
    overrides[key] = substitute_sweep_dir(value, sweep_dir)
  return Run(name=name, group=group, overrides=overrides)


def _check_report(path: pathlib.Path, report: Any) -> dict[str, Any]:
  """Checks REPORT and fills in its defaults."""
  if report is None:
    report = {}
  if not isinstance(report, Mapping):
    raise SweepError(f'{path}: REPORT is a {type(report).__name__}; expected '
                     f'a dict with keys {_REPORT_KEYS}.')
  for key in report:
    if key not in _REPORT_KEYS:
      close = difflib.get_close_matches(str(key), _REPORT_KEYS, n=1)
      hint = f' Did you mean {close[0]!r}?' if close else ''
      raise SweepError(f'{path}: REPORT has unknown key {key!r}; expected '
                       f'some of {_REPORT_KEYS}.{hint}')
  metrics = report.get('metrics', _DEFAULT_METRICS)
  labels = set()
  for metric in metrics:
    if (not isinstance(metric, (tuple, list)) or len(metric) != 3 or
        not all(isinstance(m, str) for m in metric)):
      raise SweepError(f'{path}: REPORT metric {metric!r} should be a '
                       '(label, dotted path, format) tuple of str, e.g. '
                       "('test cosine', 'splits.test.cosine', '.4f').")
    label, _, fmt = metric
    if label in labels:
      raise SweepError(f'{path}: REPORT metric label {label!r} appears twice.')
    labels.add(label)
    try:
      format(0.5, fmt)
    except ValueError as e:
      raise SweepError(f'{path}: REPORT metric {label!r} has format {fmt!r}, '
                       f'which does not format a float: {e}') from None
  return {'title': str(report.get('title', f'Sweep {path.stem}')),
          'metrics': [tuple(m) for m in metrics],
          'notes': str(report.get('notes', ''))}


def _module_name(path: pathlib.Path) -> str:
  return re.sub(r'\W', '_', path.stem)


def load_sweep(path: str | os.PathLike,
               sweep_dir: str | os.PathLike) -> Sweep:
  """Loads and checks a sweep file (its runs, not yet their overrides).

  Args:
    path: the sweep .py file; relative to the current directory or, failing
      that, to the repo root.
    sweep_dir: the sweep workdir; made absolute and put in for `{sweep_dir}`.

  Returns:
    The Sweep, with `{sweep_dir}` replaced in every override.

  Raises:
    SweepError: the file is missing, lacks CONFIG or get_sweep, or has runs
      with missing, unsafe or duplicate names or bad keys.
  """
  path = pathlib.Path(path)
  if not path.is_file() and not path.is_absolute() and (REPO_ROOT /
                                                         path).is_file():
    path = REPO_ROOT / path
  if not path.is_file():
    raise SweepError(f'Sweep file {path} not found.')
  path = path.resolve()
  sweep_dir = pathlib.Path(sweep_dir).resolve()
  module_spec = importlib.util.spec_from_file_location(
      f'_sweep_{_module_name(path)}', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)

  config = getattr(module, 'CONFIG', None)
  if not isinstance(config, str) or not config:
    raise SweepError(f'{path}: needs CONFIG = \'configs/x.py[:arg]\' (a str); '
                     f'got {config!r}.')
  get_sweep = getattr(module, 'get_sweep', None)
  if not callable(get_sweep):
    raise SweepError(f'{path}: needs a function get_sweep() -> list[dict].')
  specs = get_sweep()
  if not isinstance(specs, Sequence) or isinstance(specs, str) or not specs:
    raise SweepError(f'{path}: get_sweep() returned {specs!r}; expected a '
                     'non-empty list of dicts.')
  runs = [_parse_run(path, i, s, sweep_dir) for i, s in enumerate(specs)]
  seen = set()
  for run in runs:
    if run.name in seen:
      raise SweepError(f'{path}: run name {run.name!r} appears more than once; '
                       'names must be unique (they are the run workdirs).')
    seen.add(run.name)
  report = _check_report(path, getattr(module, 'REPORT', None))
  return Sweep(path=path, config=config, runs=runs, report=report)


def _config_file(config: str) -> tuple[pathlib.Path, str | None]:
  """Splits CONFIG into an absolute file path and the get_config argument."""
  file_part, sep, arg = config.partition(':')
  path = pathlib.Path(file_part)
  if not path.is_absolute():
    path = REPO_ROOT / path
  if not path.is_file():
    raise SweepError(f'CONFIG file {file_part} not found (looked at {path}).')
  return path, (arg if sep else None)


def load_config(config: str) -> ml_collections.ConfigDict:
  """Loads CONFIG ('file.py[:arg]', relative to the repo root) and locks it."""
  path, arg = _config_file(config)
  module_spec = importlib.util.spec_from_file_location(
      f'_sweep_config_{_module_name(path)}', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, 'get_config'):
    raise SweepError(f'CONFIG file {path} has no get_config().')
  result = module.get_config() if arg is None else module.get_config(arg)
  if not isinstance(result, ml_collections.ConfigDict):
    raise SweepError(f'{path}: get_config({arg or ""}) returned a '
                     f'{type(result).__name__}; expected a ConfigDict.')
  result.lock()
  return result


def _leaf_keys(config: ml_collections.ConfigDict,
               prefix: str = '') -> list[str]:
  keys = []
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      keys.extend(_leaf_keys(value, f'{prefix}{key}.'))
    else:
      keys.append(f'{prefix}{key}')
  return keys


def _unknown_key_error(config, run_name: str, key: str) -> SweepError:
  close = difflib.get_close_matches(key, _leaf_keys(config), n=3, cutoff=0.6)
  hint = (f' Did you mean {" or ".join(repr(c) for c in close)}?' if close else
          ' Sections: ' + ', '.join(
              k for k, v in config.items()
              if isinstance(v, ml_collections.ConfigDict)) + '.')
  return SweepError(f'Run {run_name!r}: unknown config key {key!r}.{hint}')


def apply_overrides(config: ml_collections.ConfigDict, run: Run
                    ) -> ml_collections.ConfigDict:
  """Returns a copy of the locked `config` with the run's overrides set.

  Raises:
    SweepError: a key is not in the config (the message names the run, the
      key and close matches) or a value has the wrong type for its field.
  """
  config = copy.deepcopy(config)
  for key, value in run.overrides.items():
    *parents, leaf = key.split('.')
    node = config
    for part in parents:
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        raise _unknown_key_error(config, run.name, key)
      node = node[part]
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
      raise _unknown_key_error(config, run.name, key)
    current = node[leaf]
    if isinstance(current, ml_collections.ConfigDict):
      raise SweepError(f'Run {run.name!r}: {key!r} is a config section; '
                       f'override its fields ({key}.<field>) instead.')
    # ConfigDict lets a bool into an int field; the command line would not.
    if current is not None and isinstance(value, bool) != isinstance(
        current, bool):
      raise SweepError(
          f'Run {run.name!r}: key {key!r} takes a {type(current).__name__} '
          f'(config value {current!r}); got {value!r} of type '
          f'{type(value).__name__}.')
    try:
      node[leaf] = value
    except (TypeError, ValueError) as e:
      raise SweepError(
          f'Run {run.name!r}: key {key!r} takes a {type(current).__name__} '
          f'(config value {current!r}); got {value!r} of type '
          f'{type(value).__name__}: {e}') from None
  return config


def format_override_value(value: Any) -> str:
  """The command-line text that ml_collections config_flags parses to value."""
  if isinstance(value, bool):
    return 'True' if value else 'False'
  if isinstance(value, str):
    return value
  if isinstance(value, (int, float)):
    return repr(value)
  if isinstance(value, (tuple, list)):
    return repr(tuple(value))
  raise SweepError(f'Cannot put {value!r} ({type(value).__name__}) on the '
                   'command line; expected bool, int, float, str, tuple or '
                   'list.')


def override_flags(overrides: Mapping[str, Any]) -> list[str]:
  """`--config.key=value` arguments for reverse_sd.main."""
  return [f'--config.{key}={format_override_value(value)}'
          for key, value in overrides.items()]


def build_command(config: str, workdir: str | os.PathLike,
                  overrides: Mapping[str, Any]) -> list[str]:
  """The reverse_sd.main command of one run (run with cwd = repo root)."""
  return [sys.executable, '-m', 'reverse_sd.main', f'--config={config}',
          f'--workdir={workdir}', *override_flags(overrides)]


# Launcher scripts (relative to the repo root) for --print_commands.
LAUNCHERS = ('local', 'tpu_pod', 'slurm')


def launcher_command(launcher: str, config: str, workdir: str | os.PathLike,
                     overrides: Mapping[str, Any],
                     run_name: str) -> list[str]:
  """The command that runs one run through a launch/ script (cwd: repo root).

  Args:
    launcher: 'local' (bash launch/local.sh), 'tpu_pod' (bash
      launch/tpu_pod.sh; TPU_NAME and ZONE come from the environment) or
      'slurm' (sbatch launch/gpu_slurm.sh, job named after the run).
    config: CONFIG of the sweep.
    workdir: the run's workdir.
    overrides: the run's config overrides.
    run_name: the run's name.

  Returns:
    The argv.
  """
  main_args = [f'--config={config}', f'--workdir={workdir}',
               *override_flags(overrides)]
  if launcher == 'local':
    return ['bash', 'launch/local.sh', *main_args]
  if launcher == 'tpu_pod':
    return ['bash', 'launch/tpu_pod.sh', *main_args]
  if launcher == 'slurm':
    return ['sbatch', f'--job-name={run_name}', 'launch/gpu_slurm.sh',
            *main_args]
  raise SweepError(f'--print_commands={launcher!r}; expected one of '
                   f'{LAUNCHERS}.')


def _check_command_line(config: str, run: Run,
                        expected: ml_collections.ConfigDict) -> None:
  """Parses the run's flags as reverse_sd.main will, and compares values."""
  path, arg = _config_file(config)
  argv = ['reverse_sd.main',
          f'--config={path}' + ('' if arg is None else f':{arg}'),
          *override_flags(run.overrides)]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'Config.',
                                  flag_values=flag_values, lock_config=True,
                                  sys_argv=argv)
  try:
    flag_values(argv)
  except Exception as e:  # pylint: disable=broad-except
    raise SweepError(f'Run {run.name!r}: its command line does not parse: '
                     f'{e}') from None
  for key in run.overrides:
    got = flag_values['config'].value
    want = expected
    for part in key.split('.'):
      got, want = got[part], want[part]
    if got != want:
      raise SweepError(
          f'Run {run.name!r}: --config.{key} parses to {got!r}, not the '
          f'sweep value {want!r}; write the value in the sweep as the '
          'field\'s type.')


def validate_sweep(sweep: Sweep) -> None:
  """Checks every override of every run against the locked config.

  Each run's overrides are set on a copy of the config (unknown keys and
  wrong types fail here), then the run's command-line flags are parsed the
  way reverse_sd.main parses them and must give the same values.

  Raises:
    SweepError: naming the run and the key.
  """
  config = load_config(sweep.config)
  for run in sweep.runs:
    expected = apply_overrides(config, run)
    _check_command_line(sweep.config, run, expected)


# ---------------------------------------------------------------------------
# Running.
# ---------------------------------------------------------------------------


def _format_duration(seconds: float) -> str:
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  return f'{hours}h{minutes:02d}m{secs:02d}s' if hours else (
      f'{minutes}m{secs:02d}s')


def _echo(chunk: bytes) -> None:
  """Writes a child's output bytes to our stdout as they come."""
  sys.stdout.flush()
  buffer = getattr(sys.stdout, 'buffer', None)
  if buffer is not None:
    buffer.write(chunk)
    buffer.flush()
  else:
    sys.stdout.write(chunk.decode('utf-8', errors='replace'))
    sys.stdout.flush()


def run_logged(command: Sequence[str], log_path: pathlib.Path,
               cwd: pathlib.Path = REPO_ROOT) -> int:
  """Runs `command`, teeing stdout+stderr to the console and `log_path`.

  The log is appended to, so a resumed run keeps the log of earlier attempts.

  Returns:
    The command's exit status.
  """
  log_path.parent.mkdir(parents=True, exist_ok=True)
  env = dict(os.environ, PYTHONUNBUFFERED='1')
  with open(log_path, 'ab') as log:
    started = datetime.datetime.now(datetime.timezone.utc)
    log.write(f'=== {started:%Y-%m-%d %H:%M:%S} UTC: {shlex.join(command)}\n'
              .encode())
    log.flush()
    process = subprocess.Popen(command, cwd=cwd, env=env,
                               stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)
    try:
      for chunk in iter(lambda: process.stdout.read1(65536), b''):
        log.write(chunk)
        log.flush()
        _echo(chunk)
    except BaseException:
      # Ctrl-C reaches the child too; give it time to finish a checkpoint.
      try:
        process.wait(timeout=30)
      except subprocess.TimeoutExpired:
        process.terminate()
        try:
          process.wait(timeout=10)
        except subprocess.TimeoutExpired:
          process.kill()
          process.wait()
      raise
    finally:
      process.stdout.close()
    status = process.wait()
    log.write(f'=== exit status {status}\n'.encode())
  return status


def _read_results(workdir: pathlib.Path) -> dict | None:
  path = workdir / 'results.json'
  if not path.exists():
    return None
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise SweepError(f'{path} is not valid JSON ({e}); delete it to rerun '
                     'that run.') from None


def _write_json_atomic(path: pathlib.Path, data: Any) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + '.tmp')
  tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + '\n')
  os.replace(tmp, path)


def _write_text_atomic(path: pathlib.Path, text: str) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + '.tmp')
  tmp.write_text(text)
  os.replace(tmp, path)


def _select(runs: Sequence[Run], only: str | None) -> set[str]:
  """Names of the runs whose name matches the `only` regex (re.search)."""
  if not only:
    return {run.name for run in runs}
  try:
    pattern = re.compile(only)
  except re.error as e:
    raise SweepError(f'--only={only!r} is not a valid regex: {e}') from None
  selected = {run.name for run in runs if pattern.search(run.name)}
  if not selected:
    raise SweepError(f'--only={only!r} matches none of the runs: '
                     f'{", ".join(run.name for run in runs)}.')
  return selected


def run_sweep(
    sweep: Sweep, sweep_dir: str | os.PathLike, *, only: str | None = None,
    keep_going: bool = False, dry_run: bool = False,
    command_builder: Callable[[str, pathlib.Path, Mapping[str, Any]],
                              list[str]] = build_command,
) -> list[dict[str, Any]]:
  """Validates the sweep, then runs its runs in order; writes sweep.json.

  Args:
    sweep: from load_sweep (with the same sweep_dir).
    sweep_dir: the sweep workdir; run `name` works in `sweep_dir/name`.
    only: a regex; only runs whose name it matches (re.search) run.
    keep_going: after a failed run, go on with the next instead of stopping.
    dry_run: validate and print the commands; run and write nothing.
    command_builder: (config, run workdir, overrides) -> argv; tests swap it.

  Returns:
    One entry per run (all runs of the sweep, in order): name, group,
    overrides, workdir, status ('done': results.json was there, 'ran',
    'failed', 'not_run'), wall_s (this invocation, else None) and results.

  Raises:
    SweepError: a bad override (before anything runs), or a failed run
      unless keep_going (sweep.json is written first).
  """
  sweep_dir = pathlib.Path(sweep_dir).resolve()
  validate_sweep(sweep)
  selected = _select(sweep.runs, only)
  entries = []
  for run in sweep.runs:
    workdir = sweep_dir / run.name
    results = _read_results(workdir)
    entries.append({'name': run.name, 'group': run.group,
                    'overrides': run.overrides, 'workdir': str(workdir),
                    'status': 'done' if results is not None else 'not_run',
                    'wall_s': None, 'results': results})
  total = len(sweep.runs)
  print(f'Sweep {sweep.path}: {total} runs, {len(selected)} selected, in '
        f'{sweep_dir}; commands run in {REPO_ROOT}.', flush=True)
  sweep_json = sweep_dir / 'sweep.json'
  try:
    for index, (run, entry) in enumerate(zip(sweep.runs, entries), start=1):
      prefix = f'[{index}/{total}] {run.name}'
      if run.name not in selected:
        continue
      if entry['status'] == 'done':
        print(f'{prefix}: done', flush=True)
        continue
      workdir = pathlib.Path(entry['workdir'])
      command = command_builder(sweep.config, workdir, run.overrides)
      if dry_run:
        print(f'{prefix}: would run\n  {shlex.join(command)}', flush=True)
        continue
      log_path = workdir / 'log.txt'
      print(f'{prefix}: running (log: {log_path})\n  {shlex.join(command)}',
            flush=True)
      start = time.time()
      entry['status'] = 'failed'  # Until it exits 0, also if interrupted.
      status = run_logged(command, log_path)
      entry['wall_s'] = time.time() - start
      entry['results'] = _read_results(workdir)
      if status == 0 and entry['results'] is not None:
        entry['status'] = 'ran'
        print(f'{prefix}: ran in {_format_duration(entry["wall_s"])}',
              flush=True)
      else:
        if status == PREEMPTED_EXIT_CODE:
          reason = (f'was preempted (status {status}) after saving a '
                    'checkpoint; rerunning resumes it')
        elif status:
          reason = f'exited with status {status}'
        else:
          reason = f'exited 0 but wrote no {workdir / "results.json"}'
        message = (f'Run {run.name!r} failed: it {reason}; see its log '
                   f'{log_path}.')
        print(f'{prefix}: FAILED: {message}', flush=True)
        if not keep_going:
          raise SweepError(
              f'{message} Stopping the sweep; fix it and rerun the same '
              'command to continue (finished runs are skipped, started '
              'ones resume from their checkpoints), or pass --keep_going.')
      _write_json_atomic(sweep_json, entries)
  finally:
    if not dry_run:
      _write_json_atomic(sweep_json, entries)
  return entries


def run_dependencies(run: Run, runs: Sequence[Run],
                     sweep_dir: str | os.PathLike) -> list[str]:
  """Names of the earlier runs whose workdir a run's overrides name (e.g. a
  curriculum run's `{sweep_dir}/baseline_seed0`): they must finish first."""
  sweep_dir = pathlib.Path(sweep_dir).resolve()
  texts = []
  for value in run.overrides.values():
    texts.extend(v for v in (value if isinstance(value, (tuple, list))
                             else (value,)) if isinstance(v, str))
  names = []
  for other in runs:
    if other.name == run.name:
      break
    workdir = re.escape(str(sweep_dir / other.name))
    if any(re.search(workdir + r'(/|$)', text) for text in texts):
      names.append(other.name)
  return names


def _job_variable(run_name: str) -> str:
  return 'job_' + re.sub(r'\W', '_', run_name)


def print_commands(sweep: Sweep, sweep_dir: str | os.PathLike,
                   launcher: str, *, only: str | None = None) -> list[str]:
  """Validates the sweep and prints each selected run's launcher command.

  Runs and writes nothing. The printed lines form a shell script to run
  from the repo root, in sweep order: for 'local' and 'tpu_pod' each
  command returns when its run ends; for 'slurm' each run is a job, held
  (--dependency=afterok) until the jobs of the runs it reads have ended.
  Runs whose results.json exists are printed too, marked done.

  Returns:
    The printed command lines, one per selected run.
  """
  if launcher not in LAUNCHERS:
    raise SweepError(f'--print_commands={launcher!r}; expected one of '
                     f'{LAUNCHERS}.')
  sweep_dir = pathlib.Path(sweep_dir).resolve()
  validate_sweep(sweep)
  selected = _select(sweep.runs, only)
  total = len(sweep.runs)
  print(f'# Sweep {sweep.path}: {len(selected)} of {total} runs for '
        f'launcher {launcher!r}; run from {REPO_ROOT}.', flush=True)
  lines = []
  submitted = set()
  for index, run in enumerate(sweep.runs, start=1):
    if run.name not in selected:
      continue
    workdir = sweep_dir / run.name
    done = ' (done: results.json exists)' if (
        workdir / 'results.json').exists() else ''
    command = launcher_command(launcher, sweep.config, workdir,
                               run.overrides, run.name)
    line = shlex.join(command)
    if launcher == 'slurm':
      after = [name for name in run_dependencies(run, sweep.runs, sweep_dir)
               if name in submitted]
      # sbatch --parsable prints the job id, for later runs' dependencies.
      options = ['--parsable']
      if after:
        options.append('--dependency=afterok:' + ':'.join(
            f'${{{_job_variable(name)}}}' for name in after))
      line = (f'{_job_variable(run.name)}=$({shlex.join(command[:1])} '
              f'{" ".join(options)} {shlex.join(command[1:])})')
      submitted.add(run.name)
    print(f'# [{index}/{total}] {run.name} (group {run.group}){done}\n{line}',
          flush=True)
    lines.append(line)
  return lines


# ---------------------------------------------------------------------------
# The report.
# ---------------------------------------------------------------------------


def metric_value(results: Mapping[str, Any] | None, path: str,
                 run_name: str = '?') -> float | None:
  """The number at a dotted `path` of results.json; None where it is missing.

  Keys may contain '@' or '/' (e.g. 'splits.test.recall@5'); only '.' splits.
  """
  node = results
  for key in path.split('.'):
    if not isinstance(node, Mapping) or key not in node:
      return None
    node = node[key]
  if node is None:
    return None
  if isinstance(node, bool) or not isinstance(node, (int, float)):
    raise SweepError(f'Run {run_name!r}: results.json at {path!r} holds '
                     f'{node!r}, not a number; fix the REPORT metric path.')
  return float(node)


def _summarize(values: list[float]) -> dict[str, Any]:
  return {'n': len(values),
          'mean': statistics.fmean(values) if values else None,
          'std': statistics.stdev(values) if len(values) > 1 else None,
          'values': values}


def _format_summary(summary: Mapping[str, Any], fmt: str, group_n: int) -> str:
  if not summary['n']:
    return MISSING
  if summary['n'] == 1:
    return f'{format(summary["mean"], fmt)} (n=1)'
  text = f'{format(summary["mean"], fmt)} ± {format(summary["std"], fmt)}'
  if summary['n'] != group_n:
    text += f' (n={summary["n"]})'
  return text


def _cell(text: str) -> str:
  return str(text).replace('|', r'\|').replace('\n', ' ')


def _table(header: Sequence[str], rows: Sequence[Sequence[str]],
           right_from: int) -> list[str]:
  align = ['---' if i < right_from else '--:' for i in range(len(header))]
  lines = ['| ' + ' | '.join(_cell(h) for h in header) + ' |',
           '|' + '|'.join(align) + '|']
  lines += ['| ' + ' | '.join(_cell(c) for c in row) + ' |' for row in rows]
  return lines


def current_provenance() -> dict[str, str]:
  """Date (UTC), machine and the command line of this process."""
  executable = pathlib.Path(sys.executable)
  try:
    executable = executable.relative_to(pathlib.Path.cwd())
  except ValueError:
    pass
  arguments = sys.argv
  main_spec = getattr(sys.modules.get('__main__'), '__spec__', None)
  if main_spec is not None and main_spec.name:
    # Run with `python -m`: record the module, not the path of its file.
    arguments = ['-m', main_spec.name, *sys.argv[1:]]
  processor = platform.processor() or platform.machine() or 'unknown CPU'
  return {
      'date': datetime.datetime.now(datetime.timezone.utc).strftime(
          '%Y-%m-%d %H:%M UTC'),
      'machine': f'{platform.node()}: {processor}, {os.cpu_count()} cores',
      'command': shlex.join([str(executable), *arguments]),
  }


def make_report(report: Mapping[str, Any], runs: Sequence[Mapping[str, Any]],
                *, provenance: Mapping[str, str] | None = None
                ) -> tuple[str, dict[str, Any]]:
  """The markdown report and the JSON behind it; reads and writes nothing.

  Args:
    report: the sweep's REPORT: 'title', 'metrics' [(label, dotted path into
      results.json, format spec)], 'notes' (markdown under the tables).
    runs: sweep.json entries (at least 'name', 'group', 'results'; runs
      without results count in no group's n).
    provenance: 'date', 'machine', 'command'; default: this process's.

  Returns:
    (markdown, data): one row per group in first-appearance order with
    `mean ± std` (sample std, ddof=1) of each metric over the group's runs
    that have it ('—' where none has), then one row per run.
  """
  provenance = dict(provenance or current_provenance())
  metrics = [tuple(m) for m in report.get('metrics', _DEFAULT_METRICS)]
  groups: dict[str, list[Mapping[str, Any]]] = {}
  for run in runs:
    groups.setdefault(run.get('group') or run['name'], []).append(run)

  per_run = []
  for run in runs:
    values = {label: metric_value(run.get('results'), path, run['name'])
              for label, path, _ in metrics}
    per_run.append({'name': run['name'],
                    'group': run.get('group') or run['name'],
                    'status': run.get('status'), 'metrics': values})
  per_group = []
  for group, members in groups.items():
    with_results = [r['name'] for r in members if r.get('results') is not None]
    summaries = {}
    for label, _, _ in metrics:
      values = [entry['metrics'][label] for entry in per_run
                if entry['name'] in with_results and
                entry['metrics'][label] is not None]
      summaries[label] = _summarize(values)
    per_group.append({'group': group, 'n': len(with_results),
                      'runs': with_results, 'metrics': summaries})

  data = {'title': report.get('title', 'Sweep'), **provenance,
          'metrics': [{'label': l, 'path': p, 'format': f}
                      for l, p, f in metrics],
          'groups': per_group, 'runs': per_run,
          'notes': report.get('notes', '')}

  lines = [f'# {data["title"]}', '',
           f'Made {provenance["date"]} on {provenance["machine"]} by:', '',
           '```', provenance['command'], '```', '']
  lines += _table(
      ['group', 'n', *(label for label, _, _ in metrics)],
      [[g['group'], str(g['n']),
        *(_format_summary(g['metrics'][label], fmt, g['n'])
          for label, _, fmt in metrics)] for g in per_group],
      right_from=1)
  lines += ['', 'Each cell: mean ± sample std (ddof=1) over the runs of the '
            f'group that have the metric; (n=k) where that is not all n runs, '
            f'a single value where k=1; {MISSING} where no run has it.', '',
            '## Runs', '']
  lines += _table(
      ['run', *(label for label, _, _ in metrics)],
      [[r['name'], *(MISSING if r['metrics'][label] is None else
                     format(r['metrics'][label], fmt)
                     for label, _, fmt in metrics)] for r in per_run],
      right_from=1)
  not_finished = [r['name'] for r in per_run
                  if r['status'] in ('failed', 'not_run')]
  if not_finished:
    lines += ['', f'No results yet (failed or not run): '
              f'{", ".join(not_finished)}.']
  if data['notes']:
    lines += ['', '## Notes', '', data['notes'].strip()]
  return '\n'.join(lines) + '\n', data


def make_csv(data: Mapping[str, Any]) -> str:
  """One CSV row per run of `make_report`'s data: name, group, status, then
  each metric (by label; full precision, empty where the run lacks it)."""
  labels = [metric['label'] for metric in data['metrics']]
  out = io.StringIO()
  writer = csv.writer(out, lineterminator='\n')
  writer.writerow(['name', 'group', 'status', *labels])
  for run in data['runs']:
    writer.writerow([run['name'], run['group'], run['status'] or '',
                     *('' if run['metrics'][label] is None else
                       repr(run['metrics'][label]) for label in labels)])
  return out.getvalue()


def write_report(path: str | os.PathLike, report: Mapping[str, Any],
                 runs: Sequence[Mapping[str, Any]]) -> pathlib.Path:
  """Writes the markdown report at `path`, its JSON at `path`.json and one
  CSV row per run at `path`.csv; returns the JSON path."""
  path = pathlib.Path(path)
  markdown, data = make_report(report, runs)
  json_path = path.with_suffix('.json')
  csv_path = path.with_suffix('.csv')
  if path in (json_path, csv_path):
    raise SweepError(f'--report={path}: the JSON or CSV would overwrite the '
                     'report; use a .md path.')
  _write_text_atomic(path, markdown)
  _write_json_atomic(json_path, data)
  _write_text_atomic(csv_path, make_csv(data))
  return json_path


# ---------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------


def _define_flags() -> None:
  # Defined only when run as a script, so importing this module (tests)
  # leaves the global absl flags alone.
  flags.DEFINE_string('sweep', None, 'Sweep file, e.g. configs/sweeps/x.py.')
  flags.DEFINE_string('workdir', None, 'Sweep workdir; run NAME works in '
                      'WORKDIR/NAME.')
  flags.DEFINE_string('report', None, 'Write a markdown report here (and its '
                      'JSON next to it, suffix .json) after the runs.')
  flags.DEFINE_bool('dry_run', False, 'Validate and print the commands; run '
                    'and write nothing.')
  flags.DEFINE_string('only', None, 'Regex; run only the runs whose name it '
                      'matches (re.search). The report covers all runs.')
  flags.DEFINE_bool('keep_going', False, 'Go on after a failed run instead of '
                    'stopping the sweep.')
  flags.DEFINE_enum('print_commands', None, LAUNCHERS,
                    'Validate, then print each run\'s command for this '
                    'launcher (launch/local.sh, launch/tpu_pod.sh, '
                    'launch/gpu_slurm.sh) instead of running it.')
  flags.mark_flags_as_required(['sweep', 'workdir'])


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  try:
    sweep = load_sweep(FLAGS.sweep, FLAGS.workdir)
    if FLAGS.print_commands:
      print_commands(sweep, FLAGS.workdir, FLAGS.print_commands,
                     only=FLAGS.only)
      return
    entries = run_sweep(sweep, FLAGS.workdir, only=FLAGS.only,
                        keep_going=FLAGS.keep_going, dry_run=FLAGS.dry_run)
    if FLAGS.dry_run:
      print('Dry run: all overrides are valid; nothing ran.')
      return
    print(f'sweep: {pathlib.Path(FLAGS.workdir).resolve() / "sweep.json"}')
    if FLAGS.report:
      json_path = write_report(FLAGS.report, sweep.report, entries)
      print(f'report: {FLAGS.report} (data: {json_path}, per run: '
            f'{json_path.with_suffix(".csv")})')
    failed = [e for e in entries if e['status'] == 'failed']
    if failed:
      raise SweepError('Failed runs: ' + ', '.join(
          f'{e["name"]} (log {e["workdir"]}/log.txt)' for e in failed) + '.')
  except SweepError as e:
    sys.exit(f'sweep: {e}')


if __name__ == '__main__':
  _define_flags()
  cli.run(main)
