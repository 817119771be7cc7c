"""The Python API (reverse_sd.load_run): the README's snippet runs, and
predictions equal the predict command's on the same images."""

import os
import pathlib
import re

import numpy as np
import pytest
from PIL import Image

import reverse_sd
from reverse_sd import train
from reverse_sd.data import datasets
from reverse_sd.data import preprocess

import tiny_run

REPO = pathlib.Path(__file__).resolve().parents[1]
README_SECTION = '## Restore and analyse a run from Python'


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  data_dir = tmp_path_factory.getbasetemp() / 'trained_run_data'
  workdir = tmp_path_factory.mktemp('run')
  train.train_and_evaluate(tiny_run.config(data_dir), workdir)
  split = datasets.load_splits(tiny_run.config(data_dir),
                               ['train'])['train']
  return {'workdir': workdir, 'images': split.load_images(np.arange(3)),
          'prompts': list(split.table.prompts)}


def _readme_snippet() -> str:
  text = (REPO / 'README.md').read_text()
  assert README_SECTION in text, f'README.md lost its {README_SECTION!r}'
  section = text.split(README_SECTION, 1)[1]
  match = re.search(r'```python\n(.*?)```', section, re.S)
  assert match, f'no python block under {README_SECTION!r} in README.md'
  return match.group(1)


def test_the_readme_snippet_runs(trained, tmp_path, monkeypatch):
  """The snippet as written, run in a folder with its run and image."""
  monkeypatch.chdir(tmp_path)
  os.makedirs('runs')
  os.symlink(trained['workdir'], 'runs/synthetic')
  Image.fromarray(trained['images'][0]).save('image.png')
  namespace = {}
  exec(compile(_readme_snippet(), 'README.md', 'exec'), namespace)  # pylint: disable=exec-used
  out = namespace['out']
  assert out.embeddings.shape == (2, 384)
  np.testing.assert_allclose(np.linalg.norm(out.embeddings, axis=1), 1.0,
                             atol=1e-3)


def test_predictions_match_across_input_kinds(trained, tmp_path):
  run = reverse_sd.load_run(trained['workdir'])
  image = trained['images'][1]
  path = tmp_path / 'one.png'
  path.write_bytes(preprocess.encode_image(image))
  out = run.predict([image, Image.fromarray(image), path], top_k=3,
                    num_prompts=2)
  np.testing.assert_allclose(out.embeddings[0], out.embeddings[1], atol=1e-6)
  np.testing.assert_allclose(out.embeddings[0], out.embeddings[2], atol=1e-6)
  assert len(out.top_words[0]) == 3 and isinstance(out.top_words[0][0][0], str)
  assert len(out.nearest_prompts[0]) == 2
  assert out.nearest_prompts[0][0][0] in trained['prompts']
  assert run.step == 4 and run.steps == (2, 4)
  assert run.at_step(2).step == 2
  assert run.metrics()['meta']['step'] == 4
  assert 'test' in run.metrics()['splits']
  assert any(tag.startswith('train') for tag in run.curves())


def test_own_prompts_and_bad_images(trained):
  run = reverse_sd.load_run(trained['workdir'])
  prompts = ['a red circle', 'a blue square on a white background']
  out = run.predict(trained['images'][0], num_prompts=2, prompts=prompts)
  assert {p for p, _ in out.nearest_prompts[0]} == set(prompts)
  with pytest.raises(ValueError, match='uint8'):
    run.predict(np.zeros((8, 8, 3), np.float32))
  with pytest.raises(ValueError, match=r'\[H, W, 3\]'):
    run.predict(np.zeros((8, 8, 5), np.uint8))
  with pytest.raises(FileNotFoundError, match='no such file'):
    run.predict('/no/such/image.png')
