"""The benchmark scripts' JAX side and reporting, on a tiny model (seconds).

No timing is asserted: these check that the scripts produce their numbers
(FLOPs from XLA's cost analysis, the summary and table), not what they are.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import common
from benchmarks import scaling
from benchmarks import train_step

TINY = dict(name='tiny', backbone='convnet', variant='tiny', image_size=16,
            train_batch=8, infer_batch=8)


def test_parse_cases_batches_and_quick():
  big, = common.parse_cases('vit_b16:256')
  assert (big['variant'], big['train_batch'], big['infer_batch']) == (
      'B/16', 256, 512)
  convnet, vit = common.parse_cases('convnet_small,vit_b16', quick=True)
  assert convnet['variant'] == 'small' and vit['variant'] == 'tiny'
  assert vit['image_size'] == common.QUICK_IMAGE_SIZE
  for bad in ('resnet', 'vit_b16:x', 'vit_b16:1:2:3', ''):
    try:
      common.parse_cases(bad)
    except SystemExit as e:
      assert '--cases' in str(e), str(e)
    else:
      raise AssertionError(f'{bad!r}: expected SystemExit')


def test_jax_measurement_counts_flops_on_a_tiny_model():
  args = train_step._parse_args(['--quick'])  # pylint: disable=protected-access
  spec = dict(train_step.make_spec(TINY, args), warmup=0, steps=1,
              infer_warmup=0, infer_steps=1)
  result = train_step.measure_jax(spec, devices=jax.devices()[:1])
  train = result['train']
  # Forward + backward of a model with 2 convs and a Dense: > 2 * MACs.
  assert train['flops_per_image'] > 2 * 16 * 16 * 3 * 8 / 4, train
  assert 0 < result['infer']['flops_per_image'] < train['flops_per_image']
  assert train['compile_s'] > 0 and len(train['times_s']) == 1
  assert result['peak_rss_mb'] > 0 and result['param_count'] > 0

  summary = train_step.summarize_case(
      {'jax': [result], 'torch_eager': [{'error': 'exit 1'}]},
      peak_flops=1e12)
  assert summary['jax']['train_mfu'] > 0
  assert summary['torch_eager']['errors'] == ['exit 1']
  table = train_step.format_report(
      {'tiny': {'summary': summary, 'ratios': train_step.ratios(summary)}})
  assert 'torch_eager (failed)' in table and 'GFLOP/img' in table
  assert 'train_jax_over_torch_eager = -' in table


def test_format_table_aligns_and_marks_missing():
  table = common.format_table(['name', 'value'],
                              [['a', 1234.5], ['long name', None],
                               ['c', 0.012345]])
  lines = table.splitlines()
  assert len({len(line) for line in lines}) == 1, table
  assert lines[2].endswith('1234') and lines[3].endswith('-')
  assert lines[4].endswith('0.0123')


def test_scaling_compare():
  one = {'losses': [1.0, 0.5], 'param_norm': 2.0}
  eight = {'losses': [1.0, 0.5001], 'param_norm': 2.0}
  diffs = scaling.compare(one, eight)
  assert abs(diffs['max_rel_diff_loss'] - 2e-4) < 1e-9
  assert diffs['rel_diff_param_norm'] == 0


def test_whitebox_case_trains_on_latents():
  # The measurement itself runs in `run_all.sh --quick` (compiling even the
  # tiny U-Net takes minutes on 2 shared cores); here: the case's inputs.
  case, = common.parse_cases('sd21_unet', quick=True)
  assert case['init_from'] == common.QUICK_SD_WEIGHTS
  args = train_step._parse_args(['--quick'])  # pylint: disable=protected-access
  spec = train_step.make_spec(case, args)
  assert spec['shape']['cross_attention_dim'] > 0
  inputs, targets = train_step._model_inputs(  # pylint: disable=protected-access
      spec, np.random.default_rng(0), 2)
  latents = inputs['features']
  assert latents.ndim == 4 and latents.shape[0] == 2 and 'image' not in inputs
  assert latents.shape[1] < spec['image_size'] and targets.shape == (2, 384)
  full, = common.parse_cases('sd21_unet')
  assert full['variant'] == 'sd2.1' and 'init_from' not in full


def test_profile_attributes_op_time_to_the_model_code(tmp_path):
  # pylint: disable-next=g-import-not-at-top
  from benchmarks import profile_step
  args = train_step._parse_args(['--quick'])  # pylint: disable=protected-access
  spec = dict(train_step.make_spec(TINY, args), warmup=1)
  result = profile_step.profile_case(spec, 'train', 1, str(tmp_path), top=5)
  assert result['op_seconds_per_step'] > 0, result
  wheres = [w['where'] for w in result['by_where']]
  # The convolutions' backward pass shows up under the module that made it.
  assert any(w.startswith('bwd backbone/conv') for w in wheres), wheres
  assert abs(sum(k['share'] for k in result['by_kind']) - 1) < 1e-6
  assert 'ms/step' in profile_step.format_case(result)


def test_ab_step_builds_both_versions_and_times_them():
  # One change of each kind (a config flag, a swapped function, compiler
  # options); the other config flags are checked without building.
  from benchmarks import ab_step  # pylint: disable=g-import-not-at-top
  from reverse_sd.models import dense  # pylint: disable=g-import-not-at-top
  before = dense._bias_grad_as_product  # pylint: disable=protected-access
  for change in ('micro_batch', 'bias_grad', 'ynn', 'ynn_dots'):
    args = ab_step._parse_args(  # pylint: disable=protected-access
        ['--quick', f'--change={change}', '--cases=convnet_small'])
    result = ab_step.run(args, devices=jax.devices()[:1])
    for key in ('A', 'B'):
      assert len(result['times_s'][key]['train']) == args.rounds
      assert result['summary'][key]['infer']['median_s'] > 0
    if change in ('ynn', 'ynn_dots'):
      # One version compiles without YNNPACK; this process (reverse_sd's
      # default for 8 CPU devices) too, so the other does as well: the
      # script itself asks for REVERSE_SD_XLA_CPU_DEFAULTS=0 (ynn) or one
      # device on an AVX-512 CPU (ynn_dots) to compare.
      assert result['uses_ynn'] == {'A': False, 'B': False}
  # The swapped function is put back.
  assert dense._bias_grad_as_product is before  # pylint: disable=protected-access
  # Every config-flag change names a flag that make_spec passes on, with a
  # value the model accepts.
  args = ab_step._parse_args(['--quick'])  # pylint: disable=protected-access
  case, = common.parse_cases('vit_b16', quick=True)
  for change in ab_step.CHANGES.values():
    if (isinstance(change, tuple) and isinstance(change[0], str)
        and change[0] != 'compile_b'):
      flag, value = change
      spec = train_step.make_spec(case, argparse.Namespace(
          **dict(vars(args), **{flag: value})))
      assert spec[flag] == value, (flag, spec)


def test_kernels_jax_worker_times_every_kernel_and_reports():
  from benchmarks import kernels  # pylint: disable=g-import-not-at-top
  args = kernels._parse_args(['--quick'])  # pylint: disable=protected-access
  # One kernel of each kind (compiling all of them takes a minute).
  specs = {}
  for name, spec in kernels.QUICK_KERNELS.items():
    if spec['kind'] not in {s['kind'] for s in specs.values()}:
      specs[name] = spec
  for name in ('attention_grad', 'quick_gelu_grad'):  # jax.vjp paths.
    specs[name] = kernels.QUICK_KERNELS[name]
  result = kernels.measure('jax', specs, threads=1, warmup=0, steps=1)
  assert set(result['kernels']) == set(specs)
  for name, timing in result['kernels'].items():
    assert timing['median_s'] > 0, name
    assert (timing['flops_per_s'] is None) == (
        kernels.flops(kernels.QUICK_KERNELS[name]) is None), name
  assert set(kernels.QUICK_KERNELS) == set(kernels.KERNELS)
  table = kernels.summarize({'jax_1t': [result], 'torch_1t': [{}]}, specs)
  report = kernels.format_report(table, ['jax_1t', 'torch_1t'])
  assert 'attn_softmax' in report and 'ms' in report
  assert 'jax/torch 1t' in report
  # Full-size FLOP counts: the ViT-B/16 MLP product, the attention's two.
  assert kernels.flops(kernels.KERNELS['vit_fc1']) == 2 * 1576 * 768 * 3072
  assert kernels.flops(kernels.KERNELS['attention']) == (
      2 * 2 * 8 * 12 * 197**2 * 64)
  for bad in (['--kernels=nope'], ['--threads=0'], ['--frameworks=tf']):
    try:
      kernels._parse_args(bad)  # pylint: disable=protected-access
    except SystemExit:
      pass
    else:
      raise AssertionError(f'{bad}: expected an error')


def test_mkl_dots_without_its_library_says_how_to_build_it(tmp_path):
  from benchmarks import mkl_dots  # pylint: disable=g-import-not-at-top
  with pytest.raises(SystemExit, match='bash benchmarks/mkl_dots.sh'):
    mkl_dots.register(str(tmp_path / 'libmkl_dots.so'))
  (tmp_path / 'not_a_library.so').write_text('text')
  with pytest.raises(SystemExit, match='cannot load'):
    mkl_dots.register(str(tmp_path / 'not_a_library.so'))


def test_mkl_dots_sends_only_float32_dense_products_to_mkl(monkeypatch):
  # MKL itself is not in this environment: a stand-in records the calls.
  from benchmarks import mkl_dots  # pylint: disable=g-import-not-at-top
  calls = []
  monkeypatch.setattr(mkl_dots, 'dot',
                      lambda x, w: calls.append(x.shape) or x @ w)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 3, 4), np.float32)
  w = rng.standard_normal((4, 5), np.float32)
  dense_dims = (((2,), (0,)), ((), ()))
  out = mkl_dots.mkl_flat_dot_general(x, w, dense_dims)
  assert calls == [(6, 4)] and out.shape == (2, 3, 5)
  np.testing.assert_allclose(out, np.einsum('btk,kn->btn', x, w), rtol=1e-5)
  calls.clear()
  mkl_dots.mkl_flat_dot_general(x.astype(jnp.bfloat16),
                                w.astype(jnp.bfloat16), dense_dims)
  batched = rng.standard_normal((2, 4, 5), np.float32)
  mkl_dots.mkl_flat_dot_general(x, batched, (((2,), (1,)), ((0,), (0,))))
  assert not calls


def test_mkl_dots_against_torch_runs_train_step_with_mkl_workers(
    monkeypatch):
  from benchmarks import mkl_dots  # pylint: disable=g-import-not-at-top
  # Restored after the test: _against_torch replaces it.
  monkeypatch.setattr(train_step, '_jax_command', train_step._jax_command)  # pylint: disable=protected-access
  calls = []
  monkeypatch.setattr(train_step, 'main', calls.append)
  mkl_dots.main(['--library=/lib/mkl.so', '--against_torch', '--quick',
                 '--rounds=1'])
  assert calls == [['--cases=vit_b16',
                    '--output=benchmarks/results/train_step_mkl_quick.json',
                    '--rounds=1', '--quick']]
  calls.clear()
  mkl_dots.main(['--library=/lib/mkl.so', '--against_torch',
                 '--output=/tmp/out.json'])
  assert calls == [['--cases=vit_b16', '--output=/tmp/out.json']]
  command = train_step._jax_command('jax', spec='{}')  # pylint: disable=protected-access
  assert command[1].endswith('benchmarks/mkl_dots.py')
  assert command[2:] == ['--library=/lib/mkl.so', '--train_step_worker',
                         '--worker=jax', '--spec={}']
