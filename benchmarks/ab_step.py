r"""A/B of one code change, both versions in one process, steps alternated.

  .venv/bin/python benchmarks/ab_step.py --change=dense       # ~4 min
  .venv/bin/python benchmarks/ab_step.py --change=micro_batch --micro_batch=32 --cases=convnet_small
  .venv/bin/python benchmarks/ab_step.py --quick              # smoke

On a machine whose speed drifts by 10-20% between runs (`RESULTS.md`), two
separate runs cannot resolve a change worth a few per cent. This script
builds the project's train and predict steps of one case twice, (A) as the
code stands and (B) with one change undone, then runs A, B, A, B, ... for
`--rounds` rounds, so that drift hits both alike. Changes:

- `dense`: A = `models.dense.flat_dot_general` (leading axes folded),
  B = `lax.dot_general` on the unfolded input (as `flax.linen.Dense`).
- `bias_grad`: A = `models.dense.add_bias`'s gradient as a product with a
  vector of ones (the CPU default), B = XLA's column reduction.
- `micro_batch`: A = the predict step with `--micro_batch` (default -1:
  auto, at most 256 per device on CPU; run_all.sh passes 32), B = the whole
  inference batch at once (`config.eval.micro_batch=0`). Use it with
  `--cases=convnet_small`.
- `conv_grad`: A = the convolutions of `--conv_grad` (default auto: in a
  one-device process the FFI kernels of `models/cpu_conv.cc`, the forward
  pass with its bias and ReLU and both gradients), B = XLA's own
  convolution, bias add, ReLU and gradients
  (`config.model.conv_grad='xla'`). Use it with `--cases=convnet_small`.
- `conv_grad_matmul`: the same with B = the per-tap matrix products
  (`config.model.conv_grad='matmul'`).
- `attention`: A = the ViT's attention of `--attention` (default auto: the
  fused CPU kernel, `models/cpu_attention.py`), B =
  `jax.nn.dot_product_attention` (`config.model.attention='xla'`).
- `layer_norm`: A = the ViT's LayerNorms of `--layer_norm` (default auto:
  in a one-device process the fused CPU kernel, `models/layer_norm.py`),
  B = `flax.linen.LayerNorm` (`config.model.layer_norm='xla'`).
- `grad_norm`: A = the gradients' global norm of `--grad_norm` (default
  auto: in a one-device process the fused CPU kernel,
  `models/cpu_sum_squares.cc`), B = `optax.tree.norm`
  (`config.optim.grad_norm='xla'`).
- `ynn_dots`: A = the project default (on a one-device CPU with AVX-512
  the train step is compiled with YNNPACK's single dots,
  `xla_cpu.train_step_options`; the predict step without), B = both
  compiled without YNNPACK fusions.
- `ynn`: A = compiled without YNNPACK fusions (the project's XLA:CPU
  default on CPUs without AVX-512), B = XLA's own choice. Run it with
  REVERSE_SD_XLA_CPU_DEFAULTS=0, so that the process keeps XLA's flags:
    REVERSE_SD_XLA_CPU_DEFAULTS=0 .venv/bin/python benchmarks/ab_step.py \
        --change=ynn --cases=convnet_small

Prints a table of median and min step times and writes `--output` (default
benchmarks/results/ab_step_<change>.json).
"""

import argparse
import pathlib
import statistics
import sys
import time
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

# pylint: disable=wrong-import-position
import reverse_sd  # pylint: disable=unused-import  # XLA:CPU defaults first.
import jax
from jax import lax

from benchmarks import common
from benchmarks import train_step
from reverse_sd import xla_cpu
from reverse_sd.models import dense
# pylint: enable=wrong-import-position

CHANGES = {
    # name: (module, attribute, the version B puts there)
    'dense': (dense, 'flat_dot_general', lax.dot_general),
    'bias_grad': (dense, '_bias_grad_as_product', lambda: False),
    # Config changes: (the flag, its value in B).
    'micro_batch': ('micro_batch', 0),
    'conv_grad': ('conv_grad', 'xla'),
    'conv_grad_matmul': ('conv_grad', 'matmul'),
    'attention': ('attention', 'xla'),
    'layer_norm': ('layer_norm', 'xla'),
    'grad_norm': ('grad_norm', 'xla'),
    # XLA compiler options A compiles with; B with the process's flags.
    'ynn': {xla_cpu.YNN_FLAG: ''},
    # XLA compiler options B compiles with; A with the process's flags.
    'ynn_dots': ('compile_b', {xla_cpu.YNN_FLAG: ''}),
}
YNN_NEEDS = (f'--change=ynn compares the project default (no YNNPACK '
             f'fusions) with XLA\'s own: run it with '
             f'{xla_cpu.DEFAULTS_ENV}=0 so that B gets XLA\'s choice.')


def _build(case: dict[str, Any], args, devices,
           compiler_options: dict[str, str] | None = None) -> dict[str, Any]:
  built = train_step.build_jax(train_step.make_spec(case, args), devices)
  return dict(
      built, state=built['state'],
      train=built['step'].lower(built['state'], built['batch']).compile(
          compiler_options),
      infer=built['predict'].lower(built['state'].params,
                                   built['infer_batch']).compile(
                                       compiler_options))


def run(args, devices=None) -> dict[str, Any]:
  """Builds A and B on `devices` (default: all), alternates them, returns
  the timings."""
  case = common.parse_cases(args.cases, quick=args.quick)[0]
  change = CHANGES[args.change]
  if isinstance(change, dict):  # XLA compiler options, for A.
    variants = {'A': _build(case, args, devices, change),
                'B': _build(case, args, devices)}
  elif change[0] == 'compile_b':  # XLA compiler options, for B.
    variants = {'A': _build(case, args, devices),
                'B': _build(case, args, devices, change[1])}
  elif isinstance(change[0], str):  # A config flag, `change[1]` in B.
    flag, value_b = change
    variants = {'A': _build(case, args, devices),
                'B': _build(case, argparse.Namespace(**dict(
                    vars(args), **{flag: value_b})), devices)}
  else:
    variants = {'A': _build(case, args, devices)}
    module, name, version_b = change
    version_a = getattr(module, name)
    setattr(module, name, version_b)
    try:
      variants['B'] = _build(case, args, devices)
    finally:
      setattr(module, name, version_a)
  times = {k: {'train': [], 'infer': []} for k in variants}
  for round_index in range(args.rounds + 1):  # Round 0 is warm-up.
    for key, v in variants.items():
      start = time.perf_counter()
      v['state'], _ = v['train'](v['state'], v['batch'])
      jax.block_until_ready(v['state'])
      train_s = time.perf_counter() - start
      start = time.perf_counter()
      jax.block_until_ready(v['infer'](v['state'].params, v['infer_batch']))
      infer_s = time.perf_counter() - start
      if round_index:
        times[key]['train'].append(train_s)
        times[key]['infer'].append(infer_s)
  summary = {
      key: {phase: dict(median_s=statistics.median(t), min_s=min(t))
            for phase, t in phases.items()}
      for key, phases in times.items()}
  result = dict(change=args.change, case=case, times_s=times,
                summary=summary)
  if args.change in ('ynn', 'ynn_dots'):
    result['uses_ynn'] = {key: 'ynn_fusion' in v['train'].as_text()
                          for key, v in variants.items()}
  return result


def _parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--change', choices=sorted(CHANGES), default='dense')
  parser.add_argument('--cases', default='vit_b16',
                      help='one case of benchmarks/common.py CASES')
  parser.add_argument('--rounds', type=int, default=6)
  parser.add_argument('--quick', action='store_true',
                      help='tiny shapes, 2 rounds: a smoke run')
  parser.add_argument('--output', default=None)
  # What train_step.make_spec reads.
  for flag, default in (('dtype', 'float32'), ('warmup', 0), ('steps', 0),
                        ('infer_warmup', 0), ('infer_steps', 0),
                        ('threads', len(common.cores())), ('micro_batch', -1),
                        ('conv_grad', 'auto'), ('attention', 'auto'),
                        ('layer_norm', 'auto'), ('grad_norm', 'auto')):
    parser.add_argument(f'--{flag}', type=type(default), default=default)
  args = parser.parse_args(argv)
  if args.quick:
    args.rounds = 2
  return args


def main(argv=None) -> None:
  args = _parse_args(argv)
  started = time.time()
  busy = common.warn_if_busy()
  result = run(args)
  if args.change == 'ynn' and not result['uses_ynn']['B']:
    raise SystemExit(YNN_NEEDS)
  rows = []
  for key in ('A', 'B'):
    s = result['summary'][key]
    rows.append([key, s['train']['median_s'], s['train']['min_s'],
                 s['infer']['median_s'], s['infer']['min_s']])
  a, b = result['summary']['A'], result['summary']['B']
  print(common.format_table(
      ['version', 'train median s', 'train min s', 'infer median s',
       'infer min s'], rows))
  for phase in ('train', 'infer'):
    print(f'{args.change} {phase}: B/A median = '
          f"{b[phase]['median_s'] / a[phase]['median_s']:.3f}")
  output = args.output or (
      f"benchmarks/results/ab_step_{args.change}"
      f"{'_quick' if args.quick else ''}.json")
  payload = dict(result, benchmark='ab_step', date=common.now(),
                 git=common.git_revision(), machine=common.machine(),
                 busy_cores_at_start=busy, argv=[sys.executable] + sys.argv,
                 settings=vars(args), total_s=time.time() - started)
  print(f'wrote {common.write_json(output, payload)}')


if __name__ == '__main__':
  main()
