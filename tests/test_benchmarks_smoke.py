"""The benchmark scripts' JAX side and reporting, on a tiny model (seconds).

No timing is asserted: these check that the scripts produce their numbers
(FLOPs from XLA's cost analysis, the summary and table), not what they are.
"""

import argparse

import jax
import numpy as np

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
  # The ConvNet's ops as the model resolved them ('auto' on CPU).
  assert result['attention_implementation'] is None, result
  assert result['conv_implementation'] in ('xla', 'cpu_kernel'), result
  assert result['train_attention_calls'] == {}, result

  summary = train_step.summarize_case(
      {'jax': [result], 'torch_eager': [{'error': 'exit 1'}]},
      peak_flops=1e12)
  assert summary['jax']['train_mfu'] > 0
  assert summary['torch_eager']['errors'] == ['exit 1']
  table = train_step.format_report(
      {'tiny': {'summary': summary, 'ratios': train_step.ratios(summary)}})
  assert 'torch_eager (failed)' in table and 'GFLOP/img' in table
  assert 'train_jax_over_torch_eager = -' in table
  assert 'tiny: jax ops: attention - (fused attention in the compiled train ' \
         'step: none), conv ' in table, table


def test_attention_kernel_report_reads_the_compiled_hlo():
  hlo = '\n'.join([
      '%a = f32[2] custom-call(%x), custom_call_target="__cublas$gemm"',
      '%b = bf16[2] custom-call(%y), custom_call_target="__cudnn$fmhaSoftmax"',
      '%c = bf16[2] custom-call(%y), custom_call_target="__cudnn$fmhaSoftmax"',
      '%d = f32[2] custom-call(%z), custom_call_target="__gpu$xla.gpu.triton"',
  ])
  calls = train_step.custom_calls(hlo)
  assert calls['__cudnn$fmhaSoftmax'] == 2 and len(calls) == 3, calls
  assert train_step.attention_calls(calls) == {
      '__cudnn$fmhaSoftmax': 2, '__gpu$xla.gpu.triton': 1}
  line = train_step.describe_ops(dict(
      attention='cudnn', attention_calls={'__cudnn$fmhaSoftmax': 2},
      conv=None, peak_device_gib=12.25))
  assert line == ('attention cudnn (fused attention in the compiled train '
                  'step: __cudnn$fmhaSoftmax x2), peak device memory 12.2 '
                  'GiB'), line


def test_op_flags_offer_what_the_op_layer_accepts():
  # train_step.py spells the choices out so that its driver imports no JAX.
  from reverse_sd.ops import attention  # pylint: disable=g-import-not-at-top
  from reverse_sd.ops import conv  # pylint: disable=g-import-not-at-top
  assert train_step.CONV_CHOICES == conv.CHOICES
  assert train_step.ATTENTION_CHOICES == attention.CHOICES


def test_gpu_sh_cases_parse_and_its_model_reports_its_attention():
  # The full `bash benchmarks/gpu.sh --quick` compiles a ViT twice (minutes
  # on 2 shared cores); here: its cases, and the attention op of the tiny
  # ViT it runs, without compiling.
  from reverse_sd.models import reverse_model  # pylint: disable=g-import-not-at-top
  text = (common.REPO / 'benchmarks' / 'gpu.sh').read_text()
  cases = text.split("cases='", 1)[1].split("'", 1)[0]
  parsed = common.parse_cases(cases)
  assert [(c['name'], c['train_batch']) for c in parsed] == [
      ('vit_l14', 32), ('sd21_unet', 32)], parsed
  case, = common.parse_cases('vit_l14', quick=True)
  args = train_step._parse_args(['--quick', '--dtype=bfloat16'])  # pylint: disable=protected-access
  config = train_step._config_for(train_step.make_spec(case, args))  # pylint: disable=protected-access
  for platform, expected in (('cpu', 'xla'), ('cuda', 'cudnn')):
    model = reverse_model.create_model(config.model, platform=platform)
    assert model.backbone.attention.implementation == expected, platform


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
  from benchmarks import ab_step  # pylint: disable=g-import-not-at-top
  assert set(ab_step.CHANGES) == {'conv', 'micro_batch'}
  for change in ('micro_batch',):
    args = ab_step._parse_args(  # pylint: disable=protected-access
        ['--quick', f'--change={change}', '--cases=convnet_small'])
    result = ab_step.run(args, devices=jax.devices()[:1])
    for key in ('A', 'B'):
      assert len(result['times_s'][key]['train']) == args.rounds
      assert result['summary'][key]['infer']['median_s'] > 0
  # Every config-flag change names a flag that make_spec passes on, with a
  # value the model accepts.
  args = ab_step._parse_args(['--quick'])  # pylint: disable=protected-access
  case, = common.parse_cases('vit_b16', quick=True)
  for flag, value in ab_step.CHANGES.values():
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
  for name in ('conv1_grad', 'conv1_relu_grad_xla'):  # jax.vjp paths.
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
  assert 'conv1_relu_grad_xla' in report and 'GFLOP/s' in report
  assert 'jax/torch 1t' in report
  # Every kernel row has its XLA twin; full-size FLOP counts.
  for name in kernels.KERNELS:
    if name.startswith('conv') and not name.endswith('_xla'):
      assert f'{name}_xla' in kernels.KERNELS, name
  assert kernels.flops(kernels.KERNELS['matmul_2048']) == 2 * 2048**3
  assert kernels.flops(kernels.KERNELS['conv1']) == (
      2 * 64 * 16 * 16 * 9 * 32 * 64)
  for bad in (['--kernels=nope'], ['--threads=0'], ['--frameworks=tf']):
    try:
      kernels._parse_args(bad)  # pylint: disable=protected-access
    except SystemExit:
      pass
    else:
      raise AssertionError(f'{bad}: expected an error')
