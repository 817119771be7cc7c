r"""Time and peak memory of DA-KL's kernel ridge as S and T grow.

  python benchmarks/dakl_scaling.py \
      [--sizes=1000x2000,2500x5000,5000x10000,10000x20000] [--dim=384] \
      [--chunk_size=1024] [--source_only] \
      [--output=benchmarks/results/dakl_scaling.json]

Each size runs in a fresh subprocess on random unit vectors (S source points
with 384-d labels, T target points), so that its peak RSS (ru_maxrss) is its
own. The phases of `dakl.fit_predict` are timed separately: pass 1 (G),
the Cholesky solve, pass 2 (applying to the targets). The table shows the
growth of time and memory from one size to the next, and the exponent of
time in S (log-log slope; pass 1 alone is O(S^2 (S + T)), so with T = 2S
the slope tends to 3 as S grows). Times include the jit compilation of the
kernel block (about a second, visible only at the smallest size). Run it on
an otherwise idle machine: OpenBLAS's threaded Cholesky slows down by an
order of magnitude when other processes hold the cores.

The full table (a few minutes on 2 cores, peak ~2 GB at 10k x 20k):

  .venv/bin/python benchmarks/dakl_scaling.py
"""

import argparse
import json
import math
import pathlib
import resource
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_SIZES = '1000x2000,2500x5000,5000x10000,10000x20000'


def _parse_sizes(text: str) -> list[tuple[int, int]]:
  sizes = []
  for item in text.split(','):
    try:
      source, target = (int(n) for n in item.lower().split('x'))
    except ValueError as e:
      raise SystemExit(f'--sizes={text!r}: {item!r} is not SxT (e.g. '
                       '1000x2000).') from e
    sizes.append((source, target))
  return sizes


def _peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB.


def _worker(source: int, target: int, dim: int, chunk_size: int,
            use_target: bool) -> dict:
  """One measurement, in this (fresh) process."""
  sys.path.insert(0, str(REPO))
  import numpy as np  # pylint: disable=g-import-not-at-top
  from reverse_sd import dakl  # pylint: disable=g-import-not-at-top
  from reverse_sd.ops.cpu import tuning  # pylint: disable=g-import-not-at-top
  tuning.tune_process()
  rng = np.random.default_rng(0)

  def unit(n):
    x = rng.normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)

  source_x, source_y, target_x = unit(source), unit(source), unit(target)
  rss_inputs = _peak_rss_mb()
  gamma, alpha = dakl.DEFAULT_GAMMA, dakl.DEFAULT_ALPHA
  times = {}
  start = time.perf_counter()
  points = (np.concatenate([source_x, target_x]) if use_target else source_x)
  gram = dakl.source_gram(source_x, points, gamma, chunk_size)
  times['gram'] = time.perf_counter() - start
  start = time.perf_counter()
  coefficients = dakl.ridge_coefficients(gram, source_y, alpha)
  times['solve'] = time.perf_counter() - start
  del gram
  start = time.perf_counter()
  out = dakl.predict_targets(source_x, target_x, points, coefficients, gamma,
                             chunk_size)
  times['apply'] = time.perf_counter() - start
  assert np.all(np.isfinite(out)), 'non-finite predictions'
  return {'source': source, 'target': target, 'dim': dim,
          'chunk_size': chunk_size, 'use_target': use_target,
          'seconds': dict(times, total=sum(times.values())),
          'peak_rss_mb': _peak_rss_mb(), 'inputs_rss_mb': rss_inputs}


def _measure(source: int, target: int, args) -> dict:
  command = [sys.executable, __file__, f'--worker={source}x{target}',
             f'--dim={args.dim}', f'--chunk_size={args.chunk_size}']
  if args.source_only:
    command.append('--source_only')
  result = subprocess.run(command, capture_output=True, text=True,
                          check=False)
  if result.returncode:
    raise SystemExit(f'{source}x{target} failed (exit {result.returncode}):\n'
                     f'{result.stderr[-3000:]}')
  return json.loads(result.stdout.strip().splitlines()[-1])


def _table(rows: list[dict]) -> str:
  lines = [f'{"S":>6} {"T":>6} {"gram s":>8} {"solve s":>8} {"apply s":>8} '
           f'{"total s":>8} {"x time":>7} {"slope":>6} {"peak MB":>8} '
           f'{"x mem":>6}']
  previous = None
  for row in rows:
    seconds = row['seconds']
    growth = slope = memory = ''
    if previous:
      ratio = seconds['total'] / previous['seconds']['total']
      growth = f'{ratio:.2f}'
      scale = row['source'] / previous['source']
      slope = f'{math.log(ratio) / math.log(scale):.2f}'
      memory = f'{row["peak_rss_mb"] / previous["peak_rss_mb"]:.2f}'
    lines.append(
        f'{row["source"]:>6} {row["target"]:>6} {seconds["gram"]:>8.2f} '
        f'{seconds["solve"]:>8.2f} {seconds["apply"]:>8.2f} '
        f'{seconds["total"]:>8.2f} {growth:>7} {slope:>6} '
        f'{row["peak_rss_mb"]:>8.0f} {memory:>6}')
    previous = row
  return '\n'.join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--sizes', default=DEFAULT_SIZES)
  parser.add_argument('--dim', type=int, default=384)
  parser.add_argument('--chunk_size', type=int, default=1024)
  parser.add_argument('--source_only', action='store_true')
  parser.add_argument('--output',
                      default=str(REPO / 'benchmarks' / 'results' /
                                  'dakl_scaling.json'))
  parser.add_argument('--worker', default='', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    (source, target), = _parse_sizes(args.worker)
    print(json.dumps(_worker(source, target, args.dim, args.chunk_size,
                             not args.source_only)))
    return
  rows = []
  for source, target in _parse_sizes(args.sizes):
    rows.append(_measure(source, target, args))
    print(f'measured {source}x{target}: {rows[-1]["seconds"]["total"]:.1f} s',
          file=sys.stderr, flush=True)
  print(_table(rows))
  output = pathlib.Path(args.output)
  output.parent.mkdir(parents=True, exist_ok=True)
  output.write_text(json.dumps({'rows': rows, 'cpu_count': _cpu_count()},
                               indent=2) + '\n')
  print(f'wrote {output}')


def _cpu_count() -> int:
  import os  # pylint: disable=g-import-not-at-top
  return len(os.sched_getaffinity(0))


if __name__ == '__main__':
  main()
