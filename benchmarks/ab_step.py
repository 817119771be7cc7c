r"""A/B of one code change, both versions in one process, steps alternated.

  .venv/bin/python benchmarks/ab_step.py --change=conv --cases=convnet_small --rounds=10
  .venv/bin/python benchmarks/ab_step.py --change=micro_batch --micro_batch=32 --cases=convnet_small
  .venv/bin/python benchmarks/ab_step.py --quick              # smoke

On a machine whose speed drifts by 10-20% between runs (`RESULTS.md`), two
separate runs cannot resolve a change worth a few per cent. This script
builds the project's train and predict steps of one case twice, (A) as the
code stands and (B) with one change undone, then runs A, B, A, B, ... for
`--rounds` rounds, so that drift hits both alike. Changes (config flags):

- `conv`: A = the convolutions of `--conv` (default auto: on CPU the FFI
  kernel of `reverse_sd/ops/cpu/conv.cc`, the forward pass with its bias
  and ReLU and both gradients), B = XLA's own convolution, bias add, ReLU
  and gradients (`config.model.conv='xla'`). Use it with
  `--cases=convnet_small`.
- `micro_batch`: A = the predict step with `--micro_batch` (default -1:
  auto, at most 256 per device on CPU; run_all.sh passes 32), B = the whole
  inference batch at once (`config.eval.micro_batch=0`). Use it with
  `--cases=convnet_small`.

A process-wide setting is compared by running this script in alternating
processes, e.g. `REVERSE_SD_MALLOC_DEFAULTS=0` and `=1` for the malloc
settings of `reverse_sd/ops/cpu/tuning.py` (then only A's times count).

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
import jax

from benchmarks import common
from benchmarks import train_step
from reverse_sd.ops.cpu import tuning
# pylint: enable=wrong-import-position

CHANGES = {
    # name: (the flag train_step.make_spec reads, its value in B).
    'conv': ('conv', 'xla'),
    'micro_batch': ('micro_batch', 0),
}


def _build(case: dict[str, Any], args, devices) -> dict[str, Any]:
  built = train_step.build_jax(train_step.make_spec(case, args), devices)
  return dict(
      built, state=built['state'],
      train=built['step'].lower(built['state'], built['batch']).compile(),
      infer=built['predict'].lower(built['state'].params,
                                   built['infer_batch']).compile())


def run(args, devices=None) -> dict[str, Any]:
  """Builds A and B on `devices` (default: all), alternates them, returns
  the timings."""
  case = common.parse_cases(args.cases, quick=args.quick)[0]
  flag, value_b = CHANGES[args.change]
  variants = {'A': _build(case, args, devices),
              'B': _build(case, argparse.Namespace(**dict(
                  vars(args), **{flag: value_b})), devices)}
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
  return dict(change=args.change, case=case, times_s=times,
              summary=summary)


def _parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--change', choices=sorted(CHANGES), default='conv')
  parser.add_argument('--cases', default='convnet_small',
                      help='one case of benchmarks/common.py CASES')
  parser.add_argument('--rounds', type=int, default=6)
  parser.add_argument('--quick', action='store_true',
                      help='tiny shapes, 2 rounds: a smoke run')
  parser.add_argument('--output', default=None)
  # What train_step.make_spec reads.
  for flag, default in (('dtype', 'float32'), ('warmup', 0), ('steps', 0),
                        ('infer_warmup', 0), ('infer_steps', 0),
                        ('threads', len(common.cores())), ('micro_batch', -1),
                        ('conv', 'auto'), ('attention', 'auto')):
    parser.add_argument(f'--{flag}', type=type(default), default=default)
  args = parser.parse_args(argv)
  if args.quick:
    args.rounds = 2
  return args


def main(argv=None) -> None:
  args = _parse_args(argv)
  tuning.tune_process()
  started = time.time()
  busy = common.warn_if_busy()
  result = run(args)
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
