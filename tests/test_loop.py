"""The miniature loop end to end on the tiny config (`configs/loop.py:tiny`):
every stage runs, a rerun skips them, a foreign generator checkpoint names
its keys, and sampling is a pure function of (prompt, seed)."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from configs import loop as loop_config
from reverse_sd.data import datasets
from reverse_sd.loop import generator
from reverse_sd.loop import stages


def _tiny_config():
  config = loop_config.get_config('tiny')
  return config


@pytest.fixture(scope='module')
def tiny_loop(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('loop')
  records = stages.run(_tiny_config(), workdir)
  return workdir, records


def test_every_stage_runs_and_records_itself(tiny_loop):
  workdir, records = tiny_loop
  assert list(records) == [name for name, _ in stages.STAGES]
  for name in records:
    saved = json.loads((workdir / 'stages' / f'{name}.json').read_text())
    assert saved['stage'] == name and saved['time_s'] >= 0
  quality = records['quality']
  assert set(quality['generated_accuracy']) >= {'shape', 'colour'}
  for value in quality['generated_accuracy'].values():
    assert 0.0 <= value <= 1.0
  # The report's stage table lists the stages in the loop's order.
  text = (workdir / 'results' / 'miniature_loop.md').read_text()
  listed = [line.split('|')[1].strip() for line in text.splitlines()
            if line.startswith('| ') and line.split('|')[1].strip() in records]
  assert listed[:len(records)] == list(records)


def test_generated_data_set_opens_for_training(tiny_loop):
  workdir, records = tiny_loop
  data_config = ml_collections.ConfigDict(dict(
      name='generated', data_dir=str(workdir / 'data'),
      generated_name=records['generated']['name']))
  builder = datasets.open_builder(data_config)
  source = builder.as_data_source('test')
  config = _tiny_config()
  assert len(source) == config.generated.num_test
  example = source[0]
  side = config.corpus.image_size
  assert example['image'].shape == (side, side, 3)
  assert 0.0 <= float(example['alignment']) <= 1.0


def test_rerun_skips_finished_stages(tiny_loop):
  workdir, records = tiny_loop
  checkpoints = sorted((workdir / 'generator' / 'checkpoints').rglob('*'))
  mtimes = [p.stat().st_mtime for p in checkpoints]
  again = stages.run(_tiny_config(), workdir)
  assert again == json.loads(json.dumps(records))
  assert [p.stat().st_mtime for p in checkpoints] == mtimes


def test_rerun_with_another_config_names_the_change(tiny_loop):
  workdir, _ = tiny_loop
  config = _tiny_config()
  config.unlock()
  before = config.sampler.guidance_scale
  config.sampler.guidance_scale = before + 1.0
  with pytest.raises(ValueError, match=(
      rf'sampler\.guidance_scale: {before} -> {before + 1.0}.*'
      'fresh --workdir')):
    stages.run(config, workdir, only=('quality',))


def test_a_generator_setting_keeps_the_stages_that_do_not_read_it(
    tiny_loop):
  workdir, records = tiny_loop
  config = _tiny_config()
  config.unlock()
  config.generator.lr *= 2
  kept = stages.run(config, workdir,
                    only=('corpus', 'autoencoder', 'referee'))
  assert kept == {k: json.loads(json.dumps(records[k])) for k in kept}
  with pytest.raises(ValueError, match=r'Stage generator .*generator\.lr'):
    stages.run(config, workdir, only=('generator',))


@pytest.mark.parametrize('section,key,value,match', [
    ('autoencoder', 'mse_weight', -1.0, 'mse_weight=-1.0 must be'),
    ('autoencoder', 'kl_weight', float('nan'), 'kl_weight=nan must be'),
    ('generator', 'noise_offset', -0.1, 'noise offset -0.1 must be'),
    ('generator', 'prediction', 'x0', "prediction 'x0'"),
    ('generator', 'prediction', 'epsilon', "needs prediction='v'"),
    ('generator', 'object_weight', -1.0, 'object weight -1.0 must be'),
])
def test_bad_loss_settings_fail_before_training(section, key, value, match):
  config = _tiny_config()
  config.unlock()
  config[section][key] = value
  null = np.zeros((config.text.context_length, 384), np.float32)
  with pytest.raises(ValueError, match=match):
    if section == 'autoencoder':
      generator.autoencoder_loss_fn(None, config)
    else:
      generator.denoiser_loss_fn(None, config, null)


def test_object_weights_reweight_the_loss_not_the_metric(tmp_path):
  config = _tiny_config()
  config.unlock()
  config.generator.object_weight = 0.0
  model, params = generator.init_denoiser(config)
  null = np.zeros((config.text.context_length, 384), np.float32)
  rng = np.random.default_rng(0)
  side, _, channels = generator.latent_shape(config)
  batch = {'latents': rng.normal(size=(4, side, side, channels)),
           'contexts': rng.normal(size=(4, config.text.context_length, 384))}
  key = jax.random.key(0)
  plain, plain_metrics = generator.denoiser_loss_fn(model, config, null)(
      params, batch, key)
  config.generator.object_weight = 2.0
  weighted = generator.denoiser_loss_fn(model, config, null)
  with pytest.raises(ValueError, match="needs the batch's 'weights'"):
    weighted(params, batch, key)
  # Weights are normalised per example: a constant map is the plain loss.
  same, _ = weighted(params, {**batch, 'weights': np.full((4, side, side),
                                                          3.0)}, key)
  assert float(same) == pytest.approx(float(plain), rel=1e-5)
  corner = np.ones((4, side, side))
  corner[:, :2, :2] = 10.0
  other, metrics = weighted(params, {**batch, 'weights': corner}, key)
  assert float(other) != pytest.approx(float(plain), rel=1e-3)
  assert float(metrics['mse']) == pytest.approx(float(plain_metrics['mse']))
  with pytest.raises(ValueError, match='needs one object mask per training '
                     'latent'):
    generator.train_denoiser(tmp_path, batch['latents'], batch['contexts'],
                             null, config)


def test_denoiser_trains_on_the_renderers_object_masks(tiny_loop):
  workdir, _ = tiny_loop
  config = _tiny_config()
  assert config.generator.object_weight > 0  # The default path.
  loop = stages.Loop(config, workdir)
  arrays = loop.denoiser_training_set()
  images = loop.split('corpus', 'train')['images']
  masks = arrays['object_masks_NxHxW']
  assert masks.shape == images.shape[:3]
  assert len(arrays['latents_NxhxwxC']) == len(arrays['contexts_NxLxD']) == (
      len(images))
  # Every scene has an object, a few percent of its pixels.
  assert np.all((masks.mean(axis=(1, 2)) > 0.005) &
                (masks.mean(axis=(1, 2)) < 0.5))


def test_generator_seed_moves_only_the_denoisers_init_and_order():
  config = _tiny_config()
  assert generator.denoiser_seed(config) == config.seed  # Default: as before.
  _, params = generator.init_denoiser(config)
  config.unlock()
  config.generator.seed = 1
  assert generator.denoiser_seed(config) == config.seed + 1000
  _, other = generator.init_denoiser(config)
  assert not all(np.allclose(a, b) for a, b in zip(jax.tree.leaves(params),
                                                  jax.tree.leaves(other)))


def test_unknown_stage_is_refused(tiny_loop):
  workdir, _ = tiny_loop
  with pytest.raises(ValueError, match="Unknown stage.*'generatr'"):
    stages.run(_tiny_config(), workdir, only=('generatr',))


def test_generator_checkpoint_of_another_config_names_keys(tiny_loop,
                                                             tmp_path):
  workdir, _ = tiny_loop
  for part in ('data', 'contexts', 'autoencoder', 'generator', 'stages'):
    shutil.copytree(workdir / part, tmp_path / part)
  (tmp_path / 'stages' / 'generator.json').unlink()
  config = _tiny_config()
  config.unlock()
  config.generator.block_out_channels = (8, 24)
  with pytest.raises(ValueError, match=r'does not fit.*\n.*(up_blocks|'
                     r'encoder|conv)'):
    stages.run(config, tmp_path, only=('generator',))


def test_sampling_is_a_function_of_prompt_and_seed(tiny_loop):
  workdir, _ = tiny_loop
  loop = stages.Loop(_tiny_config(), workdir)
  prompts = ['a small red circle at the top', 'a large blue star',
             'a medium green ring in the center']
  contexts = loop.contexts(prompts)
  seeds = np.array([5, 6, 7])
  gen = loop.generator
  whole = gen.sample(contexts, seeds, num_steps=2, guidance_scale=2.0,
                           batch_size=3)
  pairs = gen.sample(contexts, seeds, num_steps=2, guidance_scale=2.0,
                           batch_size=2)
  np.testing.assert_array_equal(whole, pairs)
  last = gen.sample(contexts[2:], seeds[2:], num_steps=2,
                          guidance_scale=2.0, batch_size=2)
  np.testing.assert_array_equal(whole[2:], last)
  other_seed = gen.sample(contexts[:1], seeds[1:2], num_steps=2,
                                guidance_scale=2.0, batch_size=2)
  assert not np.array_equal(whole[:1], other_seed)
  assert whole.dtype == np.uint8


@pytest.mark.parametrize('steps,scale', [(0, 3.0), (5000, 3.0), (2, -1.0),
                                         (2, float('inf'))])
def test_sampler_settings_fail_before_sampling(tiny_loop, steps, scale):
  workdir, _ = tiny_loop
  loop = stages.Loop(_tiny_config(), workdir)
  with pytest.raises(ValueError, match='num_steps|guidance_scale'):
    loop.generator.sample(np.zeros((1, 16, 384), np.float16), np.array([0]),
                          num_steps=steps, guidance_scale=scale)


def test_example_seeds_depend_on_split_and_index_only():
  a = generator.example_seeds(1, 'train', np.array([0, 1, 2]))
  b = generator.example_seeds(1, 'train', np.array([2]))
  assert a[2] == b[0]
  assert len(set(a)) == 3
  assert generator.example_seeds(1, 'test', np.array([0]))[0] != a[0]
  assert generator.example_seeds(2, 'train', np.array([0]))[0] != a[0]


def test_reverse_stages_and_reuse_report(tiny_loop):
  workdir, records = tiny_loop
  config = _tiny_config()
  for row in config.reverse.whitebox_rows:
    assert 'cosine' in records['whitebox']['rows'][row]['test']
  ingredients = records['ingredients']
  assert set(ingredients['rows']) == set(config.reverse.ingredient_rows)
  rho = ingredients['spearman_model_difficulty_vs_referee_alignment']
  assert -1.0 <= rho['mean'] <= 1.0
  assert {'single', 'ensemble_dakl'} <= set(ingredients['dakl']['rows'])
  reuse = records['reuse']
  for name in ('original', 'reused', 'reused+ft'):
    assert reuse[name]['diversity'] >= 0.0
    assert -1.0 <= reuse[name]['judge_cosine']['mean'] <= 1.0
  # The white-box row fine-tuned the encoder that the reuse stage swapped.
  assert reuse['encoder_change'] > 0.0
  text = (workdir / 'results' / 'miniature_loop.md').read_text()
  for heading in ('Generator quality', 'White-box against black-box',
                  'ingredients', 'back in the generator'):
    assert heading in text
  assert (workdir / 'results' / 'reuse_samples.png').exists()
  assert (workdir / 'results' / 'quality_samples.png').exists()


def test_the_recorded_config_takes_each_section_from_a_stage_that_read_it(
    tmp_path):
  """A generator rerun keeps the older corpus and referee records, which hold
  the old generator settings; the recorded config is the generator's own."""
  records = tmp_path / stages.STAGES_DIR
  records.mkdir()
  old, new = {'prediction': 'epsilon'}, {'prediction': 'v'}
  for name, generator, mtime in (('corpus', old, 100),
                                 ('referee', old, 300),
                                 ('generator', new, 200)):
    path = records / f'{name}.json'
    path.write_text(json.dumps({'stage': name, 'time_s': 1.0, 'config': {
        'corpus': {'seed': 0}, 'generator': generator,
        'referee': {'steps': mtime}}}))
    os.utime(path, (mtime, mtime))
  recorded = stages.recorded_config(tmp_path)
  assert recorded.generator.prediction == 'v'
  assert recorded.referee.steps == 300
  (records / 'generator.json').write_text('{"stage": "generator"}')
  (records / 'corpus.json').unlink()
  (records / 'referee.json').unlink()
  with pytest.raises(ValueError, match='hold no config'):
    stages.recorded_config(tmp_path)


def test_diagnosis_tools_read_the_recorded_config(tiny_loop, tmp_path):
  """The benchmarks that read a loop workdir take its recorded config (not
  whatever configs/loop.py now says) and write their numbers."""
  workdir, _ = tiny_loop
  recorded = stages.recorded_config(workdir)
  assert recorded.autoencoder.to_dict() == json.loads(json.dumps(
      _tiny_config().autoencoder.to_dict()))
  with pytest.raises(FileNotFoundError, match='No stage records'):
    stages.recorded_config(tmp_path)
  repo = pathlib.Path(__file__).resolve().parents[1]
  for script, extra in (('loop_diagnose.py', ['--num_examples=8',
                                              '--timesteps=10,900']),
                        ('loop_guidance.py', ['--num_prompts=4',
                                              '--scales=1,3',
                                              '--etas=0,1']),
                        ('loop_shape.py', ['--num_prompts=4'])):
    output = tmp_path / script.replace('.py', '.json')
    subprocess.run([sys.executable, str(repo / 'benchmarks' / script),
                    f'--workdir={workdir}', f'--output={output}', *extra],
                   check=True, cwd=repo, capture_output=True, timeout=600)
    assert json.loads(output.read_text())['workdir'] == str(workdir)
  # The shape breakdown pools to the referee's own shape accuracy, and its
  # sizes weigh their examples (one object per tiny scene).
  shape = json.loads((tmp_path / 'loop_shape.json').read_text())['results']
  for kind in ('rendered', 'autoencoded', 'generated'):
    assert shape[kind]['shape']['all'] == pytest.approx(
        shape[kind]['accuracy']['shape'])
    assert set(shape[kind]['shape']['by_size']) <= {'small', 'medium',
                                                     'large'}
