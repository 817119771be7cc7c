"""The analysis command: predictions file, HTML report, curves, bad input,
and the report opened in headless Chromium."""

import html.parser
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from configs import synthetic
from reverse_sd import analyze
from reverse_sd import saved_run
from reverse_sd import train

REPO = pathlib.Path(__file__).resolve().parents[1]
SCREENSHOT = REPO / 'tools' / 'screenshot_report.sh'


def _config(data_dir, **overrides):
  config = synthetic.get_config('tiny')
  with config.unlocked():
    config.data.data_dir = str(data_dir)
    config.train.num_steps = 4
    config.train.checkpoint_every_steps = 2
    config.train.eval_every_steps = 2
    config.train.log_every_steps = 1
    config.vocab.loss_weight = 0.1
    config.eval.splits = ('test',)
    for key, value in overrides.items():
      section, name = key.split('.')
      config[section][name] = value
  return config


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return tmp_path_factory.getbasetemp() / 'analyze_predict_data'


@pytest.fixture(scope='module')
def workdir(data_dir, tmp_path_factory):
  """A tiny run with the vocabulary head."""
  workdir = tmp_path_factory.mktemp('run')
  train.train_and_evaluate(_config(data_dir), workdir)
  return workdir


def _run_analyze(args):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, '-m', 'reverse_sd.analyze', *args],
                        cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=600, check=False)


@pytest.fixture(scope='module')
def analysed(workdir):
  """The command run once on the test split of the latest checkpoint."""
  proc = _run_analyze([f'--workdir={workdir}', '--split=test',
                       '--num_examples=3'])
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout)


class _Tags(html.parser.HTMLParser):
  """Collects tags and attributes, to check the page is self-contained."""

  def __init__(self):
    super().__init__()
    self.tags, self.urls = [], []

  def handle_starttag(self, tag, attrs):
    self.tags.append(tag)
    self.urls += [value for name, value in attrs
                  if name in ('src', 'href') and value]


def test_command_writes_predictions_matching_results(analysed, workdir):
  output = workdir / 'analysis'
  assert analysed['step'] == 4 and analysed['split'] == 'test'
  assert analysed['predictions'] == str(output / 'predictions_test_step4.npz')
  assert analysed['report'] == str(output / 'report_test_step4.html')
  with np.load(analysed['predictions']) as saved:
    assert saved['predicted_embedding'].shape == (64, 384)
    assert saved['true_embedding'].shape == (64, 384)
    assert saved['ids'].shape == saved['prompts'].shape == (64,)
    vocabulary = json.loads((workdir / 'vocab.json').read_text())['words']
    assert saved['word_scores'].shape == (64, len(vocabulary))
    assert saved['vocabulary'].tolist() == vocabulary
    assert ((saved['word_scores'] > 0) & (saved['word_scores'] < 1)).all()
    assert int(saved['step']) == 4
    assert (saved['retrieval_rank'] >= 1).all()
    cosine = float(saved['cosine'].mean())
  # The restored checkpoint scores what the run reported when it ended.
  results = json.loads((workdir / 'results.json').read_text())['splits']['test']
  for key in ('cosine', 'baseline_cosine', 'recall@1', 'recall@10',
              'vocab_f1@10', 'vocab_map'):
    assert analysed['metrics'][key] == pytest.approx(results[key], abs=1e-5)
  assert cosine == pytest.approx(results['cosine'], abs=1e-5)
  # No temporary file is left behind.
  assert sorted(p.name for p in output.iterdir()) == [
      'predictions_test_step4.npz', 'report_test_step4.html']


def test_report_is_self_contained_with_all_sections(analysed):
  page = pathlib.Path(analysed['report']).read_text()
  parser = _Tags()
  parser.feed(page)
  assert 'script' not in parser.tags
  assert parser.urls and all(u.startswith('data:image/png;base64,')
                             for u in parser.urls)
  assert 'http://' not in page and 'https://' not in page
  for heading in ('Metrics', 'Training curves', 'Best 3 examples',
                  'Worst 3 examples', 'Per-word precision and recall',
                  'Word groups'):
    assert f'>{heading}<' in page, heading
  # Curves, histogram and 2 x 3 example thumbnails.
  assert len(parser.urls) == 2 + 6
  assert 'true prompt:' in page and 'nearest prompts of the split' in page
  assert 'No training curves' not in page


def test_other_step_and_output_dir(workdir, tmp_path):
  summary = analyze.analyze(workdir, step=2, split='validation',
                            output_dir=tmp_path, num_examples=1)
  assert summary['report'] == str(tmp_path / 'report_validation_step2.html')
  with np.load(tmp_path / 'predictions_validation_step2.npz') as saved:
    assert int(saved['step']) == 2 and len(saved['ids']) == 64


def test_training_curves_are_read_from_the_event_files(workdir):
  curves = analyze.read_scalar_curves(workdir)
  steps, values = curves['train/loss']
  assert steps.tolist() == [1, 2, 3, 4] and np.isfinite(values).all()
  assert curves['validation/cosine'][0].tolist() == [2]
  png = analyze.plot_curves(curves)
  assert png.startswith(b'\x89PNG')
  assert analyze.read_scalar_curves(workdir / 'checkpoints') == {}
  assert analyze.plot_curves({}) is None


def test_per_word_scores_by_hand():
  scores = np.array([[0.9, 0.1, 0.5], [0.2, 0.8, 0.7], [0.6, 0.3, 0.1]])
  labels = np.array([[1, 0, 0], [0, 0, 1], [1, 0, 0]])
  rows = {r['word']: r for r in analyze.per_word_scores(
      scores, labels, ['a', 'b', 'c'], k=1)}
  # Top-1 words: a, b, a.
  assert rows['a'] == {'word': 'a', 'support': 2, 'predicted': 2, 'hits': 2,
                       'precision': 1.0, 'recall': 1.0,
                       'average_precision': 1.0}
  assert rows['b']['precision'] == 0.0 and rows['b']['recall'] is None
  assert rows['c']['predicted'] == 0 and rows['c']['precision'] is None
  assert rows['c']['recall'] == 0.0
  # c's only example (1) has its highest score, 0.7.
  assert rows['c']['average_precision'] == 1.0


def test_retrieval_ranks_by_hand():
  bank = np.array([[1, 0], [0, 1], [1, 1]], np.float32)
  pred = np.array([[1, 0], [1, 0.1], [0, 1]], np.float32)
  # Row 0 is nearest itself; row 1 (0, 1) is beaten by rows 0 and 2; row 2
  # (1, 1) is beaten by row 1.
  assert analyze.retrieval_ranks(pred, bank).tolist() == [1, 3, 2]


# ----------------------------------------------------------------------------
# Bad input.


def test_workdir_without_checkpoints(workdir, tmp_path):
  shutil.copy(workdir / 'config.json', tmp_path / 'config.json')
  proc = _run_analyze([f'--workdir={tmp_path}'])
  assert proc.returncode == 1
  assert 'No checkpoints in' in proc.stderr and str(tmp_path) in proc.stderr


def test_unknown_step_lists_steps(workdir):
  with pytest.raises(ValueError, match=r'step 5 .*\[2, 4\]'):
    analyze.analyze(workdir, step=5)


def test_unknown_split_is_named(workdir, tmp_path):
  with pytest.raises(ValueError, match="'tset'.*test"):
    analyze.analyze(workdir, split='tset', output_dir=tmp_path)


def test_checkpoints_of_another_run_are_refused(data_dir, workdir, tmp_path):
  """A run without the vocabulary head, its checkpoints copied into a copy of
  the run with it: the keys of the missing head are named."""
  other = tmp_path / 'no_vocab'
  train.train_and_evaluate(
      _config(data_dir, **{'vocab.loss_weight': 0.0, 'train.num_steps': 2,
                           'eval.splits': ('test',),
                           'eval.periodic_splits': ()}), other)
  mixed = tmp_path / 'mixed'
  shutil.copytree(workdir, mixed, ignore=shutil.ignore_patterns('checkpoints'))
  shutil.copytree(other / 'checkpoints', mixed / 'checkpoints')
  with pytest.raises(ValueError, match='does not fit this model') as error:
    analyze.analyze(mixed, output_dir=tmp_path / 'out')
  assert 'vocab' in str(error.value)
  assert not (tmp_path / 'out').exists()  # Nothing half-written.
  # The run without the head is analysed without the word sections.
  summary = analyze.analyze(other, output_dir=tmp_path / 'plain',
                            num_examples=1)
  page = pathlib.Path(summary['report']).read_text()
  assert 'Per-word precision' not in page and 'predicted words' not in page
  with np.load(summary['predictions']) as saved:
    assert 'word_scores' not in saved and 'vocabulary' not in saved
  assert saved_run.restore_run(other).vocabulary is None


# ----------------------------------------------------------------------------
# Headless Chromium.


_needs_chromium = pytest.mark.skipif(
    shutil.which('chromium') is None,
    reason='chromium is not installed (launch/setup.sh installs it)')


@_needs_chromium
def test_report_opens_in_headless_chromium(analysed, tmp_path):
  screenshot = tmp_path / 'report.png'
  proc = subprocess.run(['bash', str(SCREENSHOT), analysed['report'],
                         str(screenshot)], capture_output=True, text=True,
                        timeout=180, check=False)
  # The script fails on any console message (script errors, failed loads).
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip() == str(screenshot)
  with Image.open(screenshot) as image:
    assert image.size == (1280, 2000)
    pixels = np.asarray(image.convert('L'), np.float32)
  # Not a blank page: text, tables and plots make a varied image.
  assert pixels.std() > 20 and (pixels < 128).mean() > 0.01


@_needs_chromium
def test_screenshot_script_reports_page_errors(tmp_path):
  page = tmp_path / 'broken.html'
  page.write_text('<html><body>x<script>undefinedFunction()</script>'
                  '</body></html>')
  proc = subprocess.run(['bash', str(SCREENSHOT), str(page),
                         str(tmp_path / 'broken.png')], capture_output=True,
                        text=True, timeout=180, check=False)
  assert proc.returncode == 1
  assert 'Uncaught' in proc.stderr
