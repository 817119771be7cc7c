r"""The ConvNet's convolutions, the CPU kernel against XLA and PyTorch.

  .venv/bin/python benchmarks/kernels.py            # -> results/kernels.json
  .venv/bin/python benchmarks/kernels.py --quick    # smoke run, tiny shapes

`train_step.py` says how fast each framework trains and predicts;
`profile_step.py` says which ops the JAX step spends its time in. This script
times the one op with a CPU kernel of its own, the convolution
(`reverse_sd/ops/conv.py`), alone, at the shapes of the default job's
ConvNet, in both frameworks, on 1 core and on all cores (2 here), so a row
shows whether the kernel beats XLA's and PyTorch's and whether it uses the
second core. Kernels (`KERNELS`):

- `matmul_2048`: the 2048^3 float32 product (`train_step.py`'s peak).
- `conv1`, `conv1_grad`: the ConvNet's second convolution (3x3, stride 2,
  32 -> 64 channels on 32x32, batch 64), forward, and forward + backward
  (input and kernel gradients), through `ops.conv.choose('auto')`: in this
  one-device worker the FFI kernel of `reverse_sd/ops/cpu/conv.cc`.
- `conv0_relu`, `conv1_relu`, `conv3_relu`: the ConvNet's first, second and
  last layers as the model runs them, convolution + bias + ReLU (one FFI
  call of the kernel's forward pass) against `F.relu(F.conv2d(..., bias))`;
  `conv1_relu_grad`: forward + backward (input, kernel and bias gradients).
- `*_xla`: the same with `config.model.conv='xla'` (XLA's convolution, bias
  add, ReLU and gradients).

Each framework's worker is a fresh process pinned to the first N cores (N
in `--threads`, torch.set_num_threads(N)), run in the order JAX, PyTorch,
JAX, PyTorch (`--rounds`); a kernel's number is the median of `--steps`
calls after `--warmup`, and the table the median over rounds. The script
runs in both environments: the driver and JAX workers in `.venv`, the
PyTorch workers with `--torch_python` (`.venv-ref`).
"""

import argparse
import functools
import json
import math
import pathlib
import statistics
import sys
import time
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

# pylint: disable=wrong-import-position
from benchmarks import common
# pylint: enable=wrong-import-position

DEFAULT_OUTPUT = 'benchmarks/results/kernels.json'
FRAMEWORKS = ('jax', 'torch')

# name -> kind and shapes. ViT-B/16 at batch 8: 8 x 197 = 1576 tokens of
# width 768, MLP 3072, 12 heads of 64. The ConvNet's conv1: [64, 32, 32, 32]
# (NHWC) by a 3x3x32x64 kernel, stride 2.
def _conv_rows(batch: int, sizes: tuple[int, int, int],
               channels: tuple[int, int, int, int]) -> dict[str, dict]:
  """The convolution rows at `sizes` (conv0, conv1, conv3 inputs) and
  `channels` (conv0 in, conv1 in, conv3 in, conv3 out), each with its
  'xla' twin."""
  s0, s1, s3 = sizes
  c0, c1, c3, o3 = channels
  conv1 = dict(kind='conv', b=batch, size=s1, c=c1, o=2 * c1)
  rows = {
      'conv1': dict(conv1, grad=False),
      'conv1_grad': dict(conv1, grad=True),
      'conv0_relu': dict(kind='conv', b=batch, size=s0, c=c0, o=c1,
                         grad=False, relu=True),
      'conv1_relu': dict(conv1, grad=False, relu=True),
      'conv1_relu_grad': dict(conv1, grad=True, relu=True),
      'conv3_relu': dict(kind='conv', b=batch, size=s3, c=c3, o=o3,
                         grad=False, relu=True),
  }
  rows.update({f'{name}_xla': dict(spec, impl='xla')
               for name, spec in list(rows.items())})
  return rows


# name -> kind and shapes. The ConvNet 'small' at 64 px, batch 64: conv1 is
# [64, 32, 32, 32] (NHWC) by a 3x3x32x64 kernel, stride 2.
KERNELS: dict[str, dict[str, Any]] = {
    'matmul_2048': dict(kind='matmul', m=2048, k=2048, n=2048),
    **_conv_rows(64, (64, 32, 8), (3, 32, 128, 256)),
}
QUICK_KERNELS: dict[str, dict[str, Any]] = {
    'matmul_2048': dict(kind='matmul', m=64, k=64, n=64),
    **_conv_rows(2, (8, 8, 4), (3, 4, 8, 16)),
}


def flops(spec: dict[str, Any]) -> float | None:
  """FLOPs of one call (2 per multiply-add)."""
  kind = spec['kind']
  if kind == 'matmul':
    return 2.0 * spec['m'] * spec['k'] * spec['n']
  if kind == 'conv':
    out = math.ceil(spec['size'] / 2)
    forward = 2.0 * spec['b'] * out * out * 9 * spec['c'] * spec['o']
    return 3 * forward if spec['grad'] else forward
  return None


# ---------------------------------------------------------------------------
# Workers: each returns {name: fn()} of zero-argument calls that block.
# ---------------------------------------------------------------------------


def jax_kernels(kernels: dict[str, dict[str, Any]]):
  """name -> a call that runs the compiled JAX kernel once and blocks."""
  # pylint: disable=g-import-not-at-top
  import jax
  import jax.numpy as jnp
  from reverse_sd.ops import conv as conv_ops
  # pylint: enable=g-import-not-at-top

  def with_grad(forward, *inputs):
    """Forward + backward of `forward` (gradients of all its inputs); the
    cotangent is an input, as in the model."""
    def fn(*args):
      out, vjp = jax.vjp(forward, *args[:-1])
      return out, vjp(args[-1])
    return fn, (*inputs, normal(*jax.eval_shape(forward, *inputs).shape))

  keys = iter(jax.random.split(jax.random.key(0), 256))
  normal = lambda *shape: jax.random.normal(next(keys), shape, jnp.float32)
  calls = {}
  for name, spec in kernels.items():
    kind = spec['kind']
    if kind == 'matmul':
      fn, args = jnp.matmul, (normal(spec['m'], spec['k']),
                              normal(spec['k'], spec['n']))
    elif kind == 'conv':
      op = conv_ops.choose(spec.get('impl', 'auto'))
      relu = spec.get('relu', False)
      fn = functools.partial(op, strides=(2, 2), padding='SAME',
                             activation='relu' if relu else None)
      args = (normal(spec['b'], spec['size'], spec['size'], spec['c']),
              normal(3, 3, spec['c'], spec['o'])) + (
                  (normal(spec['o']),) if relu else ())
    else:
      raise ValueError(f'Unknown kernel kind {kind!r}.')
    if spec.get('grad'):
      fn, args = with_grad(fn, *args)
    compiled = jax.jit(fn).lower(*args).compile()
    calls[name] = (lambda c=compiled, a=args: jax.block_until_ready(c(*a)))
  return calls, {'jax': jax.__version__, 'backend': jax.default_backend()}


def torch_kernels(kernels: dict[str, dict[str, Any]], threads: int):
  """name -> a call that runs the PyTorch kernel once (eager, float32)."""
  # pylint: disable=g-import-not-at-top
  import torch
  import torch.nn.functional as F
  # pylint: enable=g-import-not-at-top

  torch.set_num_threads(threads)
  torch.manual_seed(0)
  calls = {}
  for name, spec in kernels.items():
    kind = spec['kind']
    if kind == 'matmul':
      a, b = torch.randn(spec['m'], spec['k']), torch.randn(spec['k'],
                                                              spec['n'])
      fn = lambda a=a, b=b: a @ b
    elif kind == 'conv':
      # NCHW as the reference ConvNet (`torch_reference.py`); 'SAME' for an
      # even size and stride 2 pads one pixel after.
      x = torch.randn(spec['b'], spec['c'], spec['size'], spec['size'],
                      requires_grad=spec['grad'])
      weight = torch.randn(spec['o'], spec['c'], 3, 3,
                           requires_grad=spec['grad'])
      pad = (0, 1, 0, 1) if spec['size'] % 2 == 0 else (1, 1, 1, 1)
      relu = spec.get('relu', False)
      bias = (torch.randn(spec['o'], requires_grad=spec['grad'])
              if relu else None)

      def forward(x, w, b=bias, pad=pad, relu=relu):
        y = F.conv2d(F.pad(x, pad), w, b, stride=2)
        return F.relu(y) if relu else y

      if spec['grad']:
        out = math.ceil(spec['size'] / 2)
        dy = torch.randn(spec['b'], spec['o'], out, out)
        wrt = (x, weight) + ((bias,) if relu else ())

        def fn(x=x, weight=weight, dy=dy, wrt=wrt, forward=forward):
          return torch.autograd.grad(forward(x, weight), wrt, dy)
      else:
        fn = lambda x=x, w=weight, forward=forward: forward(x, w)
    else:
      raise ValueError(f'Unknown kernel kind {kind!r}.')
    calls[name] = fn
  return calls, {'torch': torch.__version__}


def measure(framework: str, kernels: dict[str, dict[str, Any]], *,
            threads: int, warmup: int, steps: int) -> dict[str, Any]:
  """Times every kernel of `kernels` in this process."""
  if framework == 'jax':
    calls, versions = jax_kernels(kernels)
  elif framework == 'torch':
    calls, versions = torch_kernels(kernels, threads)
  else:
    raise ValueError(f'Unknown framework {framework!r}.')
  results = {}
  for name, call in calls.items():
    _, times = common.time_steps(call, warmup=warmup, steps=steps)
    summary = common.summarize(times)
    count = flops(kernels[name])
    results[name] = dict(summary, flops=count, flops_per_s=(
        count / summary['median_s'] if count else None))
  return {'framework': framework, 'threads': threads, 'versions': versions,
          'cores': common.cores(), 'kernels': results}


# ---------------------------------------------------------------------------
# The driver.
# ---------------------------------------------------------------------------


def _median(values):
  values = [v for v in values if v is not None]
  return statistics.median(values) if values else None


def summarize(runs: dict[str, list[dict[str, Any]]],
              kernels: dict[str, dict[str, Any]]) -> dict[str, Any]:
  """{kernel: {'<framework>_<threads>t': {median_s, gflops}}} over rounds."""
  table = {}
  for name in kernels:
    row = {}
    for key, results in runs.items():
      times = [r['kernels'][name]['median_s'] for r in results
               if 'kernels' in r and name in r['kernels']]
      median = _median(times)
      count = flops(kernels[name])
      row[key] = {'median_s': median, 'rounds': len(times),
                  'gflops': count / median / 1e9 if count and median
                            else None}
    table[name] = row
  return table


def _value(cell: dict[str, Any] | None, by: str) -> float | None:
  if not cell or cell.get('median_s') is None:
    return None
  return cell['gflops'] if by == 'gflops' else cell['median_s'] * 1e3


def format_report(table: dict[str, Any], keys: list[str]) -> str:
  """One row per kernel: GFLOP/s per framework and thread count (ms where
  the kernel has no FLOP count), JAX over PyTorch, and N- over 1-thread."""
  threads = sorted({int(k.rsplit('_', 1)[1][:-1]) for k in keys})
  headers = ['kernel', 'unit'] + keys
  ratio_keys = []
  for n in threads:
    if f'jax_{n}t' in keys and f'torch_{n}t' in keys:
      ratio_keys.append((f'jax/torch {n}t', f'jax_{n}t', f'torch_{n}t'))
  if len(threads) > 1:
    low, high = threads[0], threads[-1]
    for framework in FRAMEWORKS:
      if f'{framework}_{low}t' in keys and f'{framework}_{high}t' in keys:
        ratio_keys.append((f'{framework} {high}t/{low}t',
                           f'{framework}_{high}t', f'{framework}_{low}t'))
  headers += [label for label, _, _ in ratio_keys]
  rows = []
  for name, row in table.items():
    by = 'gflops' if any(c.get('gflops') for c in row.values()) else 'ms'
    values = [_value(row.get(key), by) for key in keys]
    ratios = []
    for _, a, b in ratio_keys:
      ta, tb = (row.get(a) or {}).get('median_s'), (row.get(b) or {}).get(
          'median_s')
      ratios.append(f'{tb / ta:.2f}x' if ta and tb else None)
    rows.append([name, 'GFLOP/s' if by == 'gflops' else 'ms'] + values +
                ratios)
  return common.format_table(headers, rows)


def _parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--kernels', default=','.join(KERNELS),
                      help=f'comma-separated, of {list(KERNELS)}')
  parser.add_argument('--frameworks', default=','.join(FRAMEWORKS))
  parser.add_argument('--threads', default=f'1,{len(common.cores())}',
                      help='comma-separated core counts per worker')
  parser.add_argument('--rounds', type=int, default=2)
  parser.add_argument('--warmup', type=int, default=3)
  parser.add_argument('--steps', type=int, default=20)
  parser.add_argument('--torch_python',
                      default=str(REPO / '.venv-ref' / 'bin' / 'python'))
  parser.add_argument('--worker_timeout', type=float, default=1800)
  parser.add_argument('--quick', action='store_true',
                      help='smoke run: tiny shapes, 1 round, 2+3 calls')
  parser.add_argument('--output', default=DEFAULT_OUTPUT)
  # Worker mode (the driver runs this file in subprocesses).
  parser.add_argument('--worker', default='', choices=('',) + FRAMEWORKS,
                      help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.quick:
    args.rounds, args.warmup, args.steps = 1, common.QUICK_WARMUP, \
        common.QUICK_STEPS
    if args.output == DEFAULT_OUTPUT:
      args.output = 'benchmarks/results/kernels_quick.json'
  table = QUICK_KERNELS if args.quick else KERNELS
  names = [k.strip() for k in args.kernels.split(',') if k.strip()]
  unknown = sorted(set(names) - set(table))
  if unknown or not names:
    parser.error(f'--kernels: unknown {unknown}; choose from {list(table)}.')
  args.kernel_specs = {name: table[name] for name in names}
  frameworks = args.frameworks.split(',')
  if set(frameworks) - set(FRAMEWORKS) or not frameworks:
    parser.error(f'--frameworks={args.frameworks}: choose from '
                 f'{FRAMEWORKS}.')
  args.framework_list = [f for f in FRAMEWORKS if f in frameworks]
  try:
    args.thread_list = sorted({int(t) for t in args.threads.split(',')})
  except ValueError:
    parser.error(f'--threads={args.threads}: expected integers, e.g. 1,2.')
  if not all(1 <= t <= len(common.cores()) for t in args.thread_list):
    parser.error(f'--threads={args.threads}: this process may use '
                 f'{len(common.cores())} cores.')
  if args.rounds < 1 or args.steps < 1 or args.warmup < 0:
    parser.error('--rounds and --steps must be >= 1, --warmup >= 0.')
  return args


def _worker_command(args, framework: str, threads: int) -> list[str]:
  python = sys.executable if framework == 'jax' else args.torch_python
  return [python, str(pathlib.Path(__file__).resolve()),
          f'--worker={framework}', f'--threads={threads}',
          f'--kernels={args.kernels}', f'--warmup={args.warmup}',
          f'--steps={args.steps}'] + (['--quick'] if args.quick else [])


def main(argv=None) -> None:
  args = _parse_args(argv)
  if args.worker:
    threads, = args.thread_list
    print(json.dumps(measure(args.worker, args.kernel_specs, threads=threads,
                             warmup=args.warmup, steps=args.steps)))
    return
  if 'torch' in args.framework_list and not pathlib.Path(
      args.torch_python).exists():
    raise SystemExit(f'--torch_python={args.torch_python} does not exist: '
                     'make it with bash tools/reference/setup_env.sh, or pass '
                     '--frameworks=jax.')
  started = time.time()
  busy = common.warn_if_busy()
  runs = {f'{f}_{n}t': [] for n in args.thread_list
          for f in args.framework_list}
  for threads in args.thread_list:
    for round_index in range(args.rounds):
      for framework in args.framework_list:
        label = f'{framework} {threads} thread(s) round {round_index + 1}'
        common.log(f'{label} ...')
        result = common.run_worker(
            _worker_command(args, framework, threads),
            common.worker_env(threads=threads),
            timeout_s=args.worker_timeout,
            cpu_list=common.cores()[:threads])
        if 'error' in result:
          common.log(f'{label} FAILED ({result["error"]}):\n'
                     f'{result.get("stderr_tail", "")[-1500:]}')
        runs[f'{framework}_{threads}t'].append(result)
  table = summarize(runs, args.kernel_specs)
  payload = {'benchmark': 'kernels', 'date': common.now(),
             'git': common.git_revision(), 'machine': common.machine(),
             'busy_cores_at_start': busy,
             'argv': [sys.executable] + sys.argv,
             'settings': {k: v for k, v in vars(args).items()
                          if k != 'kernel_specs'},
             'kernels': args.kernel_specs, 'runs': runs, 'summary': table,
             'total_s': time.time() - started}
  path = common.write_json(args.output, payload)
  print(format_report(table, list(runs)))
  print(f'wrote {path} ({payload["total_s"]:.0f} s)')


if __name__ == '__main__':
  main()
