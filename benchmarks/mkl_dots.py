r"""A/B of Intel MKL's sgemm against XLA's dots in the ViT-B/16 step.

  bash benchmarks/mkl_dots.sh            # installs MKL aside, builds, runs
  bash benchmarks/mkl_dots.sh --quick    # smoke run, tiny shapes
  bash benchmarks/mkl_dots.sh --against_torch   # train_step.py, ViT-B/16

On the Xeon with AVX-512, XLA:CPU's float32 products reach 0.80-0.84x of
PyTorch's on 2 threads (RESULTS.md, "Where ViT-B/16 stands"), and PyTorch's
Linear is MKL's sgemm. This script measures what MKL would give reverse_sd:

1. The products alone, at ViT-B/16's shapes (batch 8: 1576 tokens): the
   forward product, its input gradient (dy w^T) and weight gradient
   (x^T dy), MKL's FFI call against XLA's dot, alternated, GFLOP/s.
2. The whole train and predict steps (`ab_step.py`'s A/B in one process),
   with `models/dense.py`'s `flat_dot_general` sending every float32 Dense
   product and both its gradients to MKL (B) or to XLA (A).

With `--against_torch` it runs `train_step.py --cases=vit_b16` instead
(JAX, PyTorch eager and torch.compile interleaved, as in RESULTS.md's main
table) with the JAX workers' Dense products on MKL; further flags go to
train_step.py. Writes benchmarks/results/train_step_mkl.json.

MKL comes from `benchmarks/mkl_dots.sh`, which builds `mkl_dots.cc` against
the `mkl` and `intel-openmp` wheels in a scratch environment; reverse_sd
does not depend on them. Writes benchmarks/results/mkl_dots.json.
"""

import argparse
import ctypes
import os
import pathlib
import statistics
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

# pylint: disable=wrong-import-position
import reverse_sd  # pylint: disable=unused-import  # XLA:CPU defaults first.
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from benchmarks import ab_step
from benchmarks import common
from benchmarks import train_step
from reverse_sd.models import dense
# pylint: enable=wrong-import-position

TARGET = 'rsd_mkl_matmul'
TOKENS = 8 * 197  # ViT-B/16 at batch 8.
PRODUCTS = {'fc1': (768, 3072), 'fc2': (3072, 768), 'qkv': (768, 2304)}
QUICK_TOKENS, QUICK_PRODUCTS = 64, {'fc1': (32, 128)}


def register(library: str) -> None:
  """Loads the FFI library built by mkl_dots.sh and registers its call."""
  if not os.path.isfile(library):
    raise SystemExit(f'mkl_dots: no library at {library!r}; build it with '
                     '`bash benchmarks/mkl_dots.sh`.')
  # Read when Intel OpenMP starts: its threads sleep as soon as a product
  # ends instead of spinning for 200 ms on the cores XLA's threads need.
  os.environ.setdefault('KMP_BLOCKTIME', '0')
  try:
    handler = ctypes.CDLL(library).RsdMklMatmul
  except (OSError, AttributeError) as e:
    raise SystemExit(f'mkl_dots: cannot load {library!r}: {e}') from e
  jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(handler),
                              platform='cpu')


def matmul(a, b, trans_a=False, trans_b=False):
  """op(a) @ op(b) by MKL, float32 2-D operands."""
  m = a.shape[1] if trans_a else a.shape[0]
  n = b.shape[0] if trans_b else b.shape[1]
  return jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((m, n), jnp.float32))(
      a, b, trans_a=trans_a, trans_b=trans_b)


@jax.custom_vjp
def dot(x, w):
  return matmul(x, w)


def _dot_fwd(x, w):
  return matmul(x, w), (x, w)


def _dot_bwd(residuals, dy):
  x, w = residuals
  return matmul(dy, w, trans_b=True), matmul(x, dy, trans_a=True)


dot.defvjp(_dot_fwd, _dot_bwd)


def mkl_flat_dot_general(lhs, rhs, dimension_numbers, precision=None,
                         preferred_element_type=None, **kwargs):
  """`dense.flat_dot_general` with float32 Dense products on MKL."""
  (lhs_contract, rhs_contract), batch = dimension_numbers
  if (any(batch) or rhs.ndim != 2 or tuple(rhs_contract) != (0,)
      or tuple(lhs_contract) != (lhs.ndim - 1,)
      or lhs.dtype != jnp.float32 or rhs.dtype != jnp.float32):
    return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                           preferred_element_type=preferred_element_type,
                           **kwargs)
  out = dot(lhs.reshape(-1, lhs.shape[-1]), rhs)
  return out.reshape(*lhs.shape[:-1], rhs.shape[1])


def _median_s(fn, args, steps: int) -> float:
  _, times = common.time_steps(lambda: jax.block_until_ready(fn(*args)),
                               warmup=3, steps=steps)
  return statistics.median(times)


def products(quick: bool, rounds: int, steps: int = 10) -> list[dict]:
  """GFLOP/s of each product by MKL and by XLA, alternated over rounds;
  checks MKL's results against XLA's first."""
  tokens, shapes = (QUICK_TOKENS, QUICK_PRODUCTS) if quick else (
      TOKENS, PRODUCTS)
  rng = np.random.default_rng(0)
  rows = []
  for name, (k, n) in shapes.items():
    x, w, dy = (jnp.asarray(rng.standard_normal(s, np.float32))
                for s in ((tokens, k), (k, n), (tokens, n)))
    cases = {
        'forward': (lambda x, w, dy: matmul(x, w), lambda x, w, dy: x @ w),
        'input_grad': (lambda x, w, dy: matmul(dy, w, trans_b=True),
                       lambda x, w, dy: dy @ w.T),
        'weight_grad': (lambda x, w, dy: matmul(x, dy, trans_a=True),
                        lambda x, w, dy: x.T @ dy)}
    for case, (mkl_fn, xla_fn) in cases.items():
      mkl_fn, xla_fn = jax.jit(mkl_fn), jax.jit(xla_fn)
      np.testing.assert_allclose(mkl_fn(x, w, dy), xla_fn(x, w, dy),
                                 rtol=1e-4, atol=1e-3 * np.sqrt(k))
      gflop = 2 * tokens * k * n / 1e9
      times = {'mkl': [], 'xla': []}
      for _ in range(rounds):
        times['mkl'].append(_median_s(mkl_fn, (x, w, dy), steps))
        times['xla'].append(_median_s(xla_fn, (x, w, dy), steps))
      rows.append(dict(product=name, case=case, gflop=gflop, times_s=times,
                       **{f'{key}_gflops': gflop / statistics.median(t)
                          for key, t in times.items()}))
  return rows


def _against_torch(library: str, train_step_argv: list[str],
                   output: str | None) -> None:
  """train_step.py on ViT-B/16 with its JAX workers running this file's
  `--train_step_worker` (MKL registered and swapped in first)."""
  def jax_command(worker: str, **flags) -> list[str]:
    return [sys.executable, str(pathlib.Path(__file__).resolve()),
            f'--library={library}', '--train_step_worker',
            f'--worker={worker}'] + [f'--{k}={v}' for k, v in flags.items()]
  train_step._jax_command = jax_command  # pylint: disable=protected-access
  quick = '_quick' if '--quick' in train_step_argv else ''
  output = output or f'benchmarks/results/train_step_mkl{quick}.json'
  train_step.main(['--cases=vit_b16', f'--output={output}',
                   *train_step_argv])


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--library', required=True,
                      help='the FFI library mkl_dots.sh builds')
  parser.add_argument('--against_torch', action='store_true',
                      help='run train_step.py on ViT-B/16 with MKL dots')
  parser.add_argument('--train_step_worker', action='store_true',
                      help=argparse.SUPPRESS)
  parser.add_argument('--rounds', type=int, default=None,
                      help="the step A/B's timed rounds (default 10); with "
                      "--against_torch, train_step.py's (default 2)")
  parser.add_argument('--product_rounds', type=int, default=3)
  parser.add_argument('--quick', action='store_true')
  parser.add_argument('--output', default=None)
  args, rest = parser.parse_known_args(argv)
  if args.train_step_worker:  # One of train_step.py's JAX workers.
    register(args.library)
    dense.flat_dot_general = mkl_flat_dot_general
    train_step._worker_main(  # pylint: disable=protected-access
        train_step._parse_args(rest))  # pylint: disable=protected-access
    return
  if args.against_torch:
    _against_torch(args.library, rest
                   + ([f'--rounds={args.rounds}'] if args.rounds else [])
                   + (['--quick'] if args.quick else []), args.output)
    return
  if rest:
    parser.error(f'unrecognized arguments: {" ".join(rest)}')
  started = time.time()
  busy = common.warn_if_busy()
  register(args.library)

  rows = products(args.quick, args.product_rounds)
  print(common.format_table(
      ['product', 'case', 'MKL GFLOP/s', 'XLA GFLOP/s', 'MKL/XLA'],
      [[r['product'], r['case'], r['mkl_gflops'], r['xla_gflops'],
        r['mkl_gflops'] / r['xla_gflops']] for r in rows]))

  ab_step.CHANGES['mkl'] = (dense, 'flat_dot_general', mkl_flat_dot_general)
  ab_args = ab_step._parse_args(  # pylint: disable=protected-access
      ['--change=mkl', f'--rounds={args.rounds or 10}']
      + (['--quick'] if args.quick else []))
  steps = ab_step.run(ab_args)
  for phase in ('train', 'infer'):
    a, b = (steps['summary'][k][phase]['median_s'] for k in 'AB')
    print(f'{phase} step: XLA {a:.3f} s, MKL {b:.3f} s, MKL/XLA time '
          f'{b / a:.3f}')
  output = args.output or (
      f"benchmarks/results/mkl_dots{'_quick' if args.quick else ''}.json")
  payload = dict(benchmark='mkl_dots', products=rows, steps=steps,
                 date=common.now(), git=common.git_revision(),
                 machine=common.machine(), busy_cores_at_start=busy,
                 env={k: os.environ.get(k) for k in ('KMP_BLOCKTIME',
                                                     'OMP_NUM_THREADS')},
                 argv=[sys.executable] + sys.argv, settings=vars(args),
                 total_s=time.time() - started)
  print(f'wrote {common.write_json(output, payload)}')


if __name__ == '__main__':
  main()
