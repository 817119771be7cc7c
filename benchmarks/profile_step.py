r"""Where the JAX train (or inference) step spends its time, op by op.

  .venv/bin/python benchmarks/profile_step.py --cases=convnet_small,vit_b16
  .venv/bin/python benchmarks/profile_step.py --cases=vit_b16 --phase=infer

Builds the step exactly as `train_step.py` does (the trainer's own model,
optimizer, sharded state and jitted step), warms it up, then runs `--steps`
steps under `jax.profiler` with XLA:CPU's per-op trace events on
(`--xla_cpu_enable_xprof_traceme`). Every executed HLO op (a fusion, a dot
or convolution lowered to a library call, a copy, ...) is one event on an
XLA:CPU worker thread; the script sums the events per op and per op kind
(the op name without its `.N` suffix), and joins each op with its HLO
opcode, fusion kind and the source line (`op_name` metadata: the JAX
primitive and the Python function) that made it.

Prints per case: the step's wall time, the summed op time (above the wall
time when ops run in parallel on the cores), the share of op time per kind
and the top ops; writes all of it to `--output` (default
benchmarks/results/profile_step.json). The trace itself stays in
`--trace_dir` for TensorBoard's profile plugin or Perfetto.

Times under the profiler run a few percent slower than in `train_step.py`;
use the shares, not the absolute times.
"""

import argparse
import collections
import glob
import json
import os
import pathlib
import re
import sys
import tempfile
import time
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

# The per-op trace events must be switched on before XLA initialises.
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_cpu_enable_xprof_traceme=true').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

# pylint: disable=wrong-import-position
from benchmarks import common
from benchmarks import train_step as train_step_lib
from reverse_sd.ops.cpu import tuning

DEFAULT_OUTPUT = 'benchmarks/results/profile_step.json'
# Executor and thread-pool events that contain or wait for ops; not ops.
_SKIP = re.compile(r'^(ThreadpoolListener::|ThunkExecutor::|SlinkyThreadPool::'
                   r'|end: )')
_SUFFIX = re.compile(r'\.\d+$')
_HLO_LINE = re.compile(
    r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*.*?\s([\w\-]+)\((.*)$')


def hlo_ops(hlo_text: str) -> dict[str, dict[str, str]]:
  """name -> {opcode, kind (fusion kind), source} of the compiled HLO's ops."""
  ops = {}
  for line in hlo_text.splitlines():
    match = _HLO_LINE.match(line)
    if not match:
      continue
    name, opcode, rest = match.groups()
    info = {'opcode': opcode}
    kind = re.search(r'kind=(k\w+)', rest)
    if kind:
      info['fusion_kind'] = kind.group(1)
    op_name = re.search(r'op_name="([^"]*)"', rest)
    if op_name:
      info['source'] = op_name.group(1)[-120:]
      info['where'] = _where(op_name.group(1))
    ops[name] = info
  return ops


def _where(op_name: str) -> str:
  """'fwd|bwd module/path/primitive' of an HLO op_name, layer indices
  folded ('layers_11/fc2/dot_general' -> 'layers_*/fc2/dot_general')."""
  phase = 'bwd' if 'transpose(' in op_name else 'fwd'
  path = op_name.rsplit(')', 1)[-1].lstrip('/')
  for marker in ('backbone/', 'head/'):
    if marker in path:
      path = marker + path.split(marker, 1)[1]
      break
  path = re.sub(r'_\d+(?=/)', '_*', path)
  return f'{phase} {path}'


def trace_events(trace_dir: str) -> list[tuple[str, str, float]]:
  """(thread, event name, duration s) of the XLA:CPU ops in the trace."""
  # pylint: disable=g-import-not-at-top
  from jax.profiler import ProfileData
  paths = sorted(glob.glob(os.path.join(trace_dir, '**', '*.xplane.pb'),
                           recursive=True))
  if not paths:
    raise RuntimeError(f'No .xplane.pb under {trace_dir}: the profiler wrote '
                       'no trace.')
  events = []
  for plane in ProfileData.from_file(paths[-1]).planes:
    if not plane.name.startswith('/host:CPU'):
      continue
    for line in plane.lines:
      if not line.name.startswith('tf_XLA'):
        continue  # Python and runtime lines, not ops.
      for event in line.events:
        if not _SKIP.match(event.name) and event.duration_ns > 0:
          events.append((line.name, event.name, event.duration_ns / 1e9))
  return events


def summarize(events, ops: dict[str, dict[str, str]], steps: int,
              top: int) -> dict[str, Any]:
  """Per-op and per-kind time per step, largest first."""
  by_op = collections.defaultdict(float)
  for _, name, duration in events:
    by_op[name] += duration / steps
  total = sum(by_op.values())
  by_kind = collections.defaultdict(float)
  for name, seconds in by_op.items():
    by_kind[_SUFFIX.sub('', name)] += seconds
  by_where = collections.defaultdict(float)
  for name, seconds in by_op.items():
    by_where[ops.get(name, {}).get('where', 'other ' + _SUFFIX.sub('', name))
             ] += seconds
  top_ops = []
  for name, seconds in sorted(by_op.items(), key=lambda kv: -kv[1])[:top]:
    top_ops.append(dict(ops.get(name, {}), name=name, seconds=seconds,
                        share=seconds / total if total else None))
  return {
      'op_seconds_per_step': total,
      'by_kind': [dict(kind=k, seconds=v, share=v / total if total else None)
                  for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])],
      'by_where': [dict(where=k, seconds=v, share=v / total if total else None)
                   for k, v in sorted(by_where.items(), key=lambda kv: -kv[1])],
      'top_ops': top_ops,
      'threads': sorted({thread for thread, _, _ in events}),
  }


def profile_case(spec: dict[str, Any], phase: str, steps: int,
                 trace_dir: str, top: int) -> dict[str, Any]:
  """Warms up `phase` ('train' | 'infer') of the case, then profiles it."""
  # pylint: disable=g-import-not-at-top
  import jax
  built = train_step_lib.build_jax(spec)
  if phase == 'train':
    compiled = built['step'].lower(built['state'], built['batch']).compile()
    holder = {'state': built['state']}

    def run_once():
      holder['state'], metrics = compiled(holder['state'], built['batch'])
      jax.block_until_ready((holder['state'], metrics))
  else:
    compiled = built['predict'].lower(built['state'].params,
                                      built['infer_batch']).compile()

    def run_once():
      jax.block_until_ready(compiled(built['state'].params,
                                     built['infer_batch']))
  for _ in range(max(spec['warmup'], 1)):
    run_once()
  jax.profiler.start_trace(trace_dir)
  start = time.perf_counter()
  for _ in range(steps):
    run_once()
  wall = (time.perf_counter() - start) / steps
  jax.profiler.stop_trace()
  summary = summarize(trace_events(trace_dir), hlo_ops(compiled.as_text()),
                      steps, top)
  batch = spec['train_batch'] if phase == 'train' else spec['infer_batch']
  return dict(summary, case=spec['name'], phase=phase, steps=steps,
              batch=batch, wall_seconds_per_step=wall,
              images_per_s=batch / wall, trace_dir=trace_dir)


def format_case(result: dict[str, Any], kinds: int = 8,
                wheres: int = 25) -> str:
  """Op time per kind and per source (the JSON also has the top ops)."""
  head = (f'{result["case"]} {result["phase"]}: batch {result["batch"]}, '
          f'{result["wall_seconds_per_step"]:.3f} s/step wall, '
          f'{result["op_seconds_per_step"]:.3f} s of ops over '
          f'{len(result["threads"])} threads')
  kind_rows = [[k['kind'], k['seconds'] * 1e3, f'{100 * k["share"]:.1f}%']
               for k in result['by_kind'][:kinds]]
  where_rows = [[w['where'], w['seconds'] * 1e3, f'{100 * w["share"]:.1f}%']
                for w in result['by_where'][:wheres]]
  return '\n'.join([
      head, '',
      common.format_table(['op kind', 'ms/step', 'share'], kind_rows), '',
      common.format_table(['made by (layers folded)', 'ms/step', 'share'],
                          where_rows)])


def _parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--cases', default='convnet_small,vit_b16',
                      help='name[:train_batch[:infer_batch]],... of '
                      f'{sorted(common.CASES)}')
  parser.add_argument('--phase', choices=('train', 'infer'), default='train')
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--top', type=int, default=15)
  parser.add_argument('--dtype', default='float32')
  parser.add_argument('--conv', default='auto',
                      choices=train_step_lib.CONV_CHOICES,
                      help='convolutions (config.model.conv)')
  parser.add_argument('--attention', default='auto',
                      choices=train_step_lib.ATTENTION_CHOICES,
                      help='attention (config.model.attention)')
  parser.add_argument('--trace_dir', default='',
                      help='default: a new temporary folder per case')
  parser.add_argument('--quick', action='store_true',
                      help='tiny shapes, 1 step: a smoke run')
  parser.add_argument('--output', default=DEFAULT_OUTPUT)
  args = parser.parse_args(argv)
  if args.quick:
    args.warmup, args.steps = 1, 1
    if args.output == DEFAULT_OUTPUT:
      args.output = 'benchmarks/results/profile_step_quick.json'
  return args


def main(argv=None) -> None:
  args = _parse_args(argv)
  tuning.tune_process()
  started = time.time()
  busy_cores = common.warn_if_busy()
  payload = {'benchmark': 'profile_step', 'date': common.now(),
             'git': common.git_revision(), 'machine': common.machine(),
             'busy_cores_at_start': busy_cores,
             'argv': [sys.executable] + sys.argv, 'settings': vars(args),
             'cases': {}}
  spec_args = argparse.Namespace(
      dtype=args.dtype, warmup=args.warmup, steps=args.steps,
      infer_warmup=args.warmup, infer_steps=args.steps,
      threads=len(common.cores()), conv=args.conv, attention=args.attention)
  for case in common.parse_cases(args.cases, args.quick):
    spec = train_step_lib.make_spec(case, spec_args)
    trace_dir = (os.path.join(args.trace_dir, spec['name']) if args.trace_dir
                 else tempfile.mkdtemp(prefix=f'profile_{spec["name"]}_'))
    result = profile_case(spec, args.phase, args.steps, trace_dir, args.top)
    payload['cases'][spec['name']] = result
    print(format_case(result), end='\n\n', flush=True)
  payload['total_s'] = time.time() - started
  path = common.write_json(args.output, payload)
  print(f'wrote {path} ({payload["total_s"]:.0f} s)')


if __name__ == '__main__':
  main()
