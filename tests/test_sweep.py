"""Tests of reverse_sd/sweep.py: sweep files, override checks, running, report.

Nothing here trains: runs either have their results.json written beforehand
or run a stand-in command.
"""

import csv
import json
import pathlib
import shlex
import subprocess
import sys

import pytest

from reverse_sd import sweep as sweep_lib

REPO = pathlib.Path(__file__).resolve().parent.parent

_PROVENANCE = {'date': '2025-01-01 00:00 UTC',
               'machine': 'test: x86_64, 2 cores',
               'command': 'python -m reverse_sd.sweep --sweep=s.py --workdir=w'}


def _write_sweep(tmp_path, runs, *, config="'configs/synthetic.py:tiny'",
                 report=None, name='sweep.py'):
  """Writes a sweep file whose get_sweep() returns `runs` (a Python literal)."""
  lines = []
  if config is not None:
    lines.append(f'CONFIG = {config}')
  if runs is not None:
    lines.append(f'def get_sweep():\n  return {runs!r}')
  if report is not None:
    lines.append(f'REPORT = {report!r}')
  path = tmp_path / name
  path.write_text('\n'.join(lines) + '\n')
  return path


def _load(tmp_path, runs, **kwargs):
  return sweep_lib.load_sweep(_write_sweep(tmp_path, runs, **kwargs),
                              tmp_path / 'sweep_dir')


def _results(cosine, recall5=None):
  test = {'cosine': cosine}
  if recall5 is not None:
    test['recall@5'] = recall5
  return {'splits': {'test': test}}


# Loading and validation.


def test_unknown_key_names_run_key_and_close_match(tmp_path):
  sweep = _load(tmp_path, [{'name': 'ok', 'seed': 1},
                           {'name': 'typo_run', 'optim.lrr': 3e-4}])
  with pytest.raises(sweep_lib.SweepError,
                     match=r"'typo_run'.*'optim\.lrr'.*'optim\.lr'"):
    sweep_lib.validate_sweep(sweep)


def test_unknown_section_suggests_close_match(tmp_path):
  sweep = _load(tmp_path, [{'name': 'r', 'vocb.loss_weight': 0.1}])
  with pytest.raises(sweep_lib.SweepError, match=r"'vocab\.loss_weight'"):
    sweep_lib.validate_sweep(sweep)


@pytest.mark.parametrize('key,value', [
    ('seed', 'one'),  # str into int.
    ('seed', 1.5),  # float into int.
    ('seed', True),  # bool into int: ConfigDict takes it, the CLI would not.
    ('optim.lr', 'fast'),  # str into float.
    ('data.name', 3),  # int into str.
])
def test_wrong_type_raises(tmp_path, key, value):
  sweep = _load(tmp_path, [{'name': 'bad_type', key: value}])
  with pytest.raises(sweep_lib.SweepError, match=rf"'bad_type'.*'{key}'"):
    sweep_lib.validate_sweep(sweep)


def test_section_override_rejected(tmp_path):
  sweep = _load(tmp_path, [{'name': 'r', 'optim': 1}])
  with pytest.raises(sweep_lib.SweepError, match='config section'):
    sweep_lib.validate_sweep(sweep)


def test_valid_overrides_pass_and_parse_back_on_the_command_line(tmp_path):
  sweep = _load(tmp_path, [{'name': 'r', 'group': 'g', 'seed': 3,
                            'optim.lr': 3e-4, 'optim.weight_decay': 0,
                            'mesh.shape': (8,), 'eval.splits': ['test'],
                            'model.variant': 'tiny',
                            'data.data_dir': '{sweep_dir}/data'}])
  sweep_lib.validate_sweep(sweep)  # Raises on any problem.


def test_sweep_dir_substitution(tmp_path):
  sweep = _load(tmp_path, [{'name': 'r',
                            'data.data_dir': '{sweep_dir}/baseline_seed1',
                            'eval.splits': ('{sweep_dir}', 'test'),
                            'model.variant': 'tiny'}])
  sweep_dir = str((tmp_path / 'sweep_dir').resolve())
  assert sweep.runs[0].overrides == {
      'data.data_dir': f'{sweep_dir}/baseline_seed1',
      'eval.splits': (sweep_dir, 'test'),
      'model.variant': 'tiny'}
  assert sweep.runs[0].group == 'r'  # Defaults to the name.


def test_duplicate_names_rejected(tmp_path):
  with pytest.raises(sweep_lib.SweepError, match="'a'.*more than once"):
    _load(tmp_path, [{'name': 'a'}, {'name': 'b'}, {'name': 'a', 'seed': 1}])


@pytest.mark.parametrize('runs,match', [
    ([{'seed': 1}], "no 'name'"),
    ([{'name': '../escape'}], 'not a safe directory name'),
    ([{'name': 'a b'}], 'not a safe directory name'),
    ([{'name': 'a', 'group': 3}], 'group'),
    ([{'name': 'a', 'seed': None}], 'NoneType'),
    ([{'name': 'a', 'bad key': 1}], 'dotted config key'),
    ([], 'non-empty list'),
])
def test_bad_runs_rejected(tmp_path, runs, match):
  with pytest.raises(sweep_lib.SweepError, match=match):
    _load(tmp_path, runs)


def test_missing_config_get_sweep_and_file(tmp_path):
  with pytest.raises(sweep_lib.SweepError, match='CONFIG'):
    _load(tmp_path, [{'name': 'a'}], config=None)
  with pytest.raises(sweep_lib.SweepError, match='get_sweep'):
    _load(tmp_path, None)
  with pytest.raises(sweep_lib.SweepError, match='not found'):
    sweep_lib.load_sweep(tmp_path / 'nope.py', tmp_path)
  sweep = _load(tmp_path, [{'name': 'a'}], config="'configs/nope.py:tiny'")
  with pytest.raises(sweep_lib.SweepError, match='configs/nope.py not found'):
    sweep_lib.validate_sweep(sweep)


def test_bad_report_rejected(tmp_path):
  with pytest.raises(sweep_lib.SweepError, match="'metric'.*'metrics'"):
    _load(tmp_path, [{'name': 'a'}], report={'metric': []})
  with pytest.raises(sweep_lib.SweepError, match='format'):
    _load(tmp_path, [{'name': 'a'}],
          report={'metrics': [('cos', 'splits.test.cosine', '.4q')]})


# Command lines.


@pytest.mark.parametrize('value,text', [
    ((1, 2), '(1, 2)'),
    ((8,), '(8,)'),
    ([3, 4], '(3, 4)'),
    (('test', 'validation'), "('test', 'validation')"),
    ((), '()'),
    (True, 'True'),
    (False, 'False'),
    (3, '3'),
    (0.001, '0.001'),
    (1e-5, '1e-05'),
    ('a path/with spaces', 'a path/with spaces'),
])
def test_format_override_value(value, text):
  assert sweep_lib.format_override_value(value) == text


def test_build_command():
  command = sweep_lib.build_command(
      'configs/synthetic.py:tiny', pathlib.Path('/w/run'),
      {'seed': 1, 'vocab.loss_weight': 0.1, 'mesh.shape': (2, 4)})
  assert command == [sys.executable, '-m', 'reverse_sd.main',
                     '--config=configs/synthetic.py:tiny', '--workdir=/w/run',
                     '--config.seed=1', '--config.vocab.loss_weight=0.1',
                     '--config.mesh.shape=(2, 4)']


# The report.


def _hand_made_runs():
  def run(name, group, results, status='ran'):
    return {'name': name, 'group': group, 'status': status,
            'results': results}
  return [
      run('base_s0', 'base', _results(0.80, 0.40)),
      run('base_s1', 'base', _results(0.82, 0.50)),
      run('base_s2', 'base', _results(0.84, 0.60)),
      run('vocab_s0', 'vocab', _results(0.90)),
      run('vocab_s1', 'vocab', None, status='failed'),
      run('half_s0', 'half', _results(0.70, 0.2)),
      run('half_s1', 'half', _results(0.74)),
      run('half_s2', 'half', _results(0.78, 0.4)),
  ]


_REPORT = {'title': 'Ablation', 'notes': 'Run `make sweep`.',
           'metrics': [('test cosine', 'splits.test.cosine', '.4f'),
                       ('test R@5', 'splits.test.recall@5', '.3f'),
                       ('vocab F1', 'splits.test.vocab_f1@5', '.3f')]}


def test_make_report_mean_std_and_missing():
  markdown, data = sweep_lib.make_report(_REPORT, _hand_made_runs(),
                                         provenance=_PROVENANCE)
  # base: cosine mean 0.82, sample std 0.02; R@5 mean 0.5, std 0.1.
  assert '| base | 3 | 0.8200 ± 0.0200 | 0.500 ± 0.100 | — |' in markdown
  # vocab: one of two runs has results; a single value, not a std.
  assert '| vocab | 1 | 0.9000 (n=1) | — | — |' in markdown
  # half: R@5 in two of the three runs: mean 0.3, std sqrt(0.02) = 0.1414.
  assert ('| half | 3 | 0.7400 ± 0.0400 | 0.300 ± 0.141 (n=2) | — |'
          in markdown)
  assert '| vocab_s1 | — | — | — |' in markdown
  assert '| base_s2 | 0.8400 | 0.600 | — |' in markdown
  assert markdown.startswith('# Ablation\n')
  assert _PROVENANCE['command'] in markdown
  assert _PROVENANCE['machine'] in markdown
  assert markdown.rstrip().endswith('Run `make sweep`.')
  # Groups in first-appearance order.
  assert markdown.index('| base |') < markdown.index('| vocab |') < (
      markdown.index('| half |'))

  groups = {g['group']: g for g in data['groups']}
  assert list(groups) == ['base', 'vocab', 'half']
  base_cosine = groups['base']['metrics']['test cosine']
  assert base_cosine['n'] == 3
  assert base_cosine['mean'] == pytest.approx(0.82)
  assert base_cosine['std'] == pytest.approx(0.02)
  assert base_cosine['values'] == [0.80, 0.82, 0.84]
  assert groups['vocab']['n'] == 1
  assert groups['vocab']['runs'] == ['vocab_s0']
  assert groups['vocab']['metrics']['test cosine']['std'] is None
  assert groups['vocab']['metrics']['vocab F1'] == {
      'n': 0, 'mean': None, 'std': None, 'values': []}
  assert groups['half']['metrics']['test R@5']['std'] == pytest.approx(
      0.02 ** 0.5)
  per_run = {r['name']: r for r in data['runs']}
  assert per_run['half_s1']['metrics'] == {
      'test cosine': 0.74, 'test R@5': None, 'vocab F1': None}
  json.dumps(data)  # The data is JSON-serialisable.


def test_make_report_rejects_non_number_metric():
  report = {'metrics': [('split', 'splits.test', '.4f')]}
  with pytest.raises(sweep_lib.SweepError, match="'base_s0'.*'splits.test'"):
    sweep_lib.make_report(report, _hand_made_runs(), provenance=_PROVENANCE)


# Running.


def _never_called(*args):
  raise AssertionError(f'No run should start; got {args}.')


def test_runs_with_results_are_skipped_and_outputs_written(tmp_path, capsys):
  path = _write_sweep(tmp_path, [
      {'name': 'base_s0', 'group': 'base', 'seed': 0},
      {'name': 'base_s1', 'group': 'base', 'seed': 1},
      {'name': 'vocab_s0', 'group': 'vocab', 'vocab.loss_weight': 0.1,
       'data.data_dir': '{sweep_dir}/base_s0'},
  ], report=_REPORT)
  sweep_dir = tmp_path / 'sweep_dir'
  for name, cosine in [('base_s0', 0.5), ('base_s1', 0.7), ('vocab_s0', 0.9)]:
    (sweep_dir / name).mkdir(parents=True)
    (sweep_dir / name / 'results.json').write_text(
        json.dumps(_results(cosine)))
  sweep = sweep_lib.load_sweep(path, sweep_dir)

  entries = sweep_lib.run_sweep(sweep, sweep_dir,
                                command_builder=_never_called)

  assert capsys.readouterr().out.count(': done') == 3
  written = json.loads((sweep_dir / 'sweep.json').read_text())
  assert written == entries
  assert [e['status'] for e in written] == ['done'] * 3
  assert written[0]['wall_s'] is None
  assert written[0]['workdir'] == str((sweep_dir / 'base_s0').resolve())
  assert written[2]['results'] == _results(0.9)
  assert written[2]['overrides']['data.data_dir'] == (
      f'{sweep_dir.resolve()}/base_s0')

  report_path = tmp_path / 'results' / 'ablation.md'
  json_path = sweep_lib.write_report(report_path, sweep.report, written)
  assert json_path == tmp_path / 'results' / 'ablation.json'
  markdown = report_path.read_text()
  # base: mean 0.6, sample std of (0.5, 0.7) = 0.1414.
  assert '| base | 2 | 0.6000 ± 0.1414 | — | — |' in markdown
  assert json.loads(json_path.read_text())['groups'][1]['group'] == 'vocab'


def _failing_command(config, workdir, overrides):
  del config, workdir, overrides
  return [sys.executable, '-c',
          'import sys; print("boom from the run"); sys.exit(3)']


def test_failed_run_stops_sweep_naming_run_and_log(tmp_path):
  path = _write_sweep(tmp_path, [{'name': 'first', 'seed': 0},
                                 {'name': 'second', 'seed': 1}])
  sweep_dir = tmp_path / 'sweep_dir'
  sweep = sweep_lib.load_sweep(path, sweep_dir)
  log_path = (sweep_dir / 'first' / 'log.txt').resolve()

  with pytest.raises(sweep_lib.SweepError) as error:
    sweep_lib.run_sweep(sweep, sweep_dir, command_builder=_failing_command)

  assert "'first'" in str(error.value)
  assert str(log_path) in str(error.value)
  assert 'status 3' in str(error.value)
  assert 'boom from the run' in log_path.read_text()
  written = json.loads((sweep_dir / 'sweep.json').read_text())
  assert [e['status'] for e in written] == ['failed', 'not_run']
  assert written[0]['wall_s'] > 0
  assert written[1]['wall_s'] is None


def test_keep_going_runs_the_rest(tmp_path):
  path = _write_sweep(tmp_path, [{'name': 'first', 'seed': 0},
                                 {'name': 'second', 'seed': 1}])
  sweep_dir = tmp_path / 'sweep_dir'
  sweep = sweep_lib.load_sweep(path, sweep_dir)
  entries = sweep_lib.run_sweep(sweep, sweep_dir, keep_going=True,
                                command_builder=_failing_command)
  assert [e['status'] for e in entries] == ['failed', 'failed']
  assert (sweep_dir / 'second' / 'log.txt').exists()


def test_successful_run_and_only_filter(tmp_path):
  path = _write_sweep(tmp_path, [{'name': 'skip_me', 'seed': 0},
                                 {'name': 'run_me', 'seed': 1}])
  sweep_dir = tmp_path / 'sweep_dir'
  sweep = sweep_lib.load_sweep(path, sweep_dir)

  def writes_results(config, workdir, overrides):
    del config
    script = ('import json, pathlib, sys; '
              'pathlib.Path(sys.argv[1], "results.json").write_text('
              'json.dumps({"splits": {"test": {"cosine": sys.argv[2]}}}))')
    return [sys.executable, '-c', script, str(workdir),
            str(overrides['seed'])]

  entries = sweep_lib.run_sweep(sweep, sweep_dir, only='^run_',
                                command_builder=writes_results)
  assert [e['status'] for e in entries] == ['not_run', 'ran']
  assert entries[1]['results'] == {'splits': {'test': {'cosine': '1'}}}
  assert not (sweep_dir / 'skip_me').exists()
  with pytest.raises(sweep_lib.SweepError, match='matches none'):
    sweep_lib.run_sweep(sweep, sweep_dir, only='nothing',
                        command_builder=writes_results)


def test_dry_run_validates_and_writes_nothing(tmp_path, capsys):
  sweep_dir = tmp_path / 'sweep_dir'
  sweep = sweep_lib.load_sweep(
      _write_sweep(tmp_path, [{'name': 'a', 'optim.lr': 3e-4}]), sweep_dir)
  sweep_lib.run_sweep(sweep, sweep_dir, dry_run=True)
  out = capsys.readouterr().out
  assert '--config.optim.lr=0.0003' in out
  assert not sweep_dir.exists()

  bad = sweep_lib.load_sweep(
      _write_sweep(tmp_path, [{'name': 'a', 'optim.lrr': 3e-4}]), sweep_dir)
  with pytest.raises(sweep_lib.SweepError, match='optim.lrr'):
    sweep_lib.run_sweep(bad, sweep_dir, dry_run=True)


def test_script_runs_from_repo_root(tmp_path):
  path = _write_sweep(tmp_path, [{'name': 'a', 'seed': 2},
                                 {'name': 'b', 'sed': 2}])
  proc = subprocess.run(
      [sys.executable, '-m', 'reverse_sd.sweep', f'--sweep={path}',
       f'--workdir={tmp_path / "w"}', '--dry_run'],
      cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 1, proc.stdout + proc.stderr
  assert "Run 'b': unknown config key 'sed'. Did you mean 'seed'?" in (
      proc.stderr), proc.stderr
  assert not (tmp_path / 'w').exists()


# CSV next to the report.


def test_report_writes_one_csv_row_per_run(tmp_path):
  report_path = tmp_path / 'results' / 'ablation.md'
  sweep_lib.write_report(report_path, _REPORT, _hand_made_runs())
  csv_path = tmp_path / 'results' / 'ablation.csv'
  with open(csv_path, newline='') as f:
    rows = list(csv.DictReader(f))
  assert list(rows[0]) == ['name', 'group', 'status', 'test cosine',
                           'test R@5', 'vocab F1']
  assert [r['name'] for r in rows] == [r['name'] for r in _hand_made_runs()]
  by_name = {r['name']: r for r in rows}
  assert by_name['base_s2'] == {'name': 'base_s2', 'group': 'base',
                                'status': 'ran', 'test cosine': '0.84',
                                'test R@5': '0.6', 'vocab F1': ''}
  assert by_name['vocab_s1']['status'] == 'failed'
  assert by_name['vocab_s1']['test cosine'] == ''
  assert float(by_name['half_s0']['test R@5']) == 0.2


# Commands for the launchers.


def _dependent_sweep(tmp_path):
  path = _write_sweep(tmp_path, [
      {'name': 'base_s0', 'group': 'base', 'seed': 0},
      {'name': 'cur_s0', 'group': 'cur', 'seed': 0,
       'curriculum.difficulty': 'model',
       'curriculum.scorer_workdir': '{sweep_dir}/base_s0'},
      {'name': 'base_s1', 'group': 'base', 'seed': 1,
       'eval.splits': ('test', 'validation')},
  ])
  sweep_dir = tmp_path / 'sweep_dir'
  return sweep_lib.load_sweep(path, sweep_dir), sweep_dir.resolve()


@pytest.mark.parametrize('launcher,prefix', [
    ('local', ['bash', 'launch/local.sh']),
    ('tpu_pod', ['bash', 'launch/tpu_pod.sh']),
])
def test_print_commands_for_launchers_that_wait(tmp_path, capsys, launcher,
                                                prefix):
  sweep, sweep_dir = _dependent_sweep(tmp_path)
  lines = sweep_lib.print_commands(sweep, sweep_dir, launcher)
  out = capsys.readouterr().out
  assert [shlex.split(line) for line in lines] == [
      [*prefix, '--config=configs/synthetic.py:tiny',
       f'--workdir={sweep_dir}/base_s0', '--config.seed=0'],
      [*prefix, '--config=configs/synthetic.py:tiny',
       f'--workdir={sweep_dir}/cur_s0', '--config.seed=0',
       '--config.curriculum.difficulty=model',
       f'--config.curriculum.scorer_workdir={sweep_dir}/base_s0'],
      [*prefix, '--config=configs/synthetic.py:tiny',
       f'--workdir={sweep_dir}/base_s1', '--config.seed=1',
       "--config.eval.splits=('test', 'validation')"],
  ]
  assert '# [2/3] cur_s0 (group cur)\n' + lines[1] + '\n' in out
  assert not sweep_dir.exists()  # Nothing runs, nothing is written.


def test_print_commands_for_slurm_chains_dependent_runs(tmp_path, capsys):
  sweep, sweep_dir = _dependent_sweep(tmp_path)
  (sweep_dir / 'base_s1').mkdir(parents=True)
  (sweep_dir / 'base_s1' / 'results.json').write_text('{}')
  lines = sweep_lib.print_commands(sweep, sweep_dir, 'slurm')
  config = '--config=configs/synthetic.py:tiny'
  assert lines == [
      f'job_base_s0=$(sbatch --parsable --job-name=base_s0 '
      f'launch/gpu_slurm.sh {config} --workdir={sweep_dir}/base_s0 '
      '--config.seed=0)',
      f'job_cur_s0=$(sbatch --parsable --dependency=afterok:${{job_base_s0}} '
      f'--job-name=cur_s0 launch/gpu_slurm.sh {config} '
      f'--workdir={sweep_dir}/cur_s0 --config.seed=0 '
      '--config.curriculum.difficulty=model '
      f'--config.curriculum.scorer_workdir={sweep_dir}/base_s0)',
      f'job_base_s1=$(sbatch --parsable --job-name=base_s1 '
      f'launch/gpu_slurm.sh {config} --workdir={sweep_dir}/base_s1 '
      '--config.seed=1 '
      "'--config.eval.splits=('\"'\"'test'\"'\"', '\"'\"'validation'\"'\"')')",
  ]
  out = capsys.readouterr().out
  assert '# [3/3] base_s1 (group base) (done: results.json exists)' in out
  # --only leaves out the run that others wait for: no dependency on it.
  lines = sweep_lib.print_commands(sweep, sweep_dir, 'slurm', only='cur')
  assert len(lines) == 1 and '--dependency' not in lines[0]


def test_print_commands_validates_first(tmp_path):
  sweep = sweep_lib.load_sweep(
      _write_sweep(tmp_path, [{'name': 'a', 'optim.lrr': 3e-4}]), tmp_path)
  with pytest.raises(sweep_lib.SweepError, match='optim.lrr'):
    sweep_lib.print_commands(sweep, tmp_path, 'local')
  with pytest.raises(sweep_lib.SweepError, match='expected one of'):
    sweep_lib.print_commands(sweep, tmp_path, 'kubernetes')


def test_script_prints_commands(tmp_path):
  path = _write_sweep(tmp_path, [{'name': 'a', 'seed': 2}])
  proc = subprocess.run(
      [sys.executable, '-m', 'reverse_sd.sweep', f'--sweep={path}',
       f'--workdir={tmp_path / "w"}', '--print_commands=tpu_pod'],
      cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr
  assert (f'bash launch/tpu_pod.sh --config=configs/synthetic.py:tiny '
          f'--workdir={(tmp_path / "w").resolve()}/a --config.seed=2\n'
          in proc.stdout), proc.stdout
  assert not (tmp_path / 'w').exists()


def test_preempted_run_is_named_as_such(tmp_path):
  path = _write_sweep(tmp_path, [{'name': 'first', 'seed': 0}])
  sweep_dir = tmp_path / 'sweep_dir'
  sweep = sweep_lib.load_sweep(path, sweep_dir)

  def preempted(config, workdir, overrides):
    del config, workdir, overrides
    return [sys.executable, '-c',
            f'import sys; sys.exit({sweep_lib.PREEMPTED_EXIT_CODE})']

  with pytest.raises(sweep_lib.SweepError, match='was preempted'):
    sweep_lib.run_sweep(sweep, sweep_dir, command_builder=preempted)
