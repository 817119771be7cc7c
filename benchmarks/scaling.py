r"""8 fake CPU devices against 1: the same training, and the cost of sharding.

  .venv/bin/python benchmarks/scaling.py            # ~2 min on 2 cores
  .venv/bin/python benchmarks/scaling.py --quick    # smoke

Runs the project's train step (`train.make_train_step` on the mesh of
`sharding.make_mesh`, as in `tests/test_train_step.py`) for `--steps` steps
on the same seeded random batches, once with 1 device and once with 8 fake
CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=N), each in
its own subprocess, alternating 1, 8, 1, 8 for `--rounds` rounds.

Reports:
- the largest relative difference of the per-step losses and of the final
  parameter norm between 1 and 8 devices (same results: below `--rtol`);
- the median step time (after `--skip` steps) on 1 and 8 devices, and their
  ratio: on one CPU the 8 fake devices share the same cores, so the ratio
  is the overhead of the sharded program (collectives, per-device
  dispatch), not a speed-up.

Writes `--output` (default benchmarks/results/scaling.json).
"""

import argparse
import json
import pathlib
import statistics
import sys
import time
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

# pylint: disable-next=wrong-import-position
from benchmarks import common

DEFAULT_OUTPUT = 'benchmarks/results/scaling.json'


def run_steps(config_arg: str, steps: int, skip: int) -> dict[str, Any]:
  """Trains `steps` steps on all (fake) devices; losses and times."""
  # pylint: disable=g-import-not-at-top
  import jax
  import numpy as np
  import optax
  from configs import synthetic
  from reverse_sd import optim
  from reverse_sd import sharding
  from reverse_sd import state as state_lib
  from reverse_sd import train
  from reverse_sd.models import reverse_model

  config = synthetic.get_config(config_arg)
  mesh = sharding.make_mesh(config.mesh.axes, config.mesh.shape)
  batch_size = config.train.batch_size
  sharding.check_batch_divisible(batch_size, mesh)
  size = config.data.image_size
  model = reverse_model.create_model(config.model, mesh=mesh)
  tx, schedule = optim.create_optimizer(config.optim, total_steps=steps)
  state, shardings = state_lib.create_train_state(
      model, tx, (size, size, 3), jax.random.key(config.seed), mesh)
  step = train.make_train_step(model, config.loss, schedule, mesh, shardings)
  rng = np.random.default_rng(0)
  losses, step_times, transfer_times = [], [], []
  compile_s = None
  for index in range(steps):
    targets = rng.normal(size=(batch_size, 384)).astype(np.float32)
    host_batch = {
        'image': rng.integers(0, 256, (batch_size, size, size, 3),
                              dtype=np.uint8),
        'embedding': targets / np.linalg.norm(targets, axis=1, keepdims=True)}
    start = time.perf_counter()
    batch = sharding.host_to_global(host_batch, mesh)
    jax.block_until_ready(batch)
    transfer_times.append(time.perf_counter() - start)
    if index == 0:
      start = time.perf_counter()
      step = step.lower(state, batch).compile()
      compile_s = time.perf_counter() - start
    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    step_times.append(time.perf_counter() - start)
    losses.append(float(metrics.compute()['loss']))
  timed = step_times[skip:] or step_times
  return {'num_devices': jax.device_count(), 'batch': batch_size,
          'image_size': size, 'variant': config.model.variant,
          'losses': losses,
          'param_norm': float(optax.tree.norm(state.params)),
          'compile_s': compile_s, 'step': common.summarize(timed),
          'transfer_median_s': statistics.median(transfer_times),
          'skipped_steps': skip, 'peak_rss_mb': common.peak_rss_mb()}


def compare(one: dict[str, Any], eight: dict[str, Any]) -> dict[str, float]:
  """Largest relative differences of 8-device results from 1-device ones."""
  loss_diff = max(abs(a - b) / max(abs(a), 1e-12)
                  for a, b in zip(one['losses'], eight['losses']))
  norm_diff = abs(one['param_norm'] - eight['param_norm']) / abs(
      one['param_norm'])
  return {'max_rel_diff_loss': loss_diff, 'rel_diff_param_norm': norm_diff}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--devices', default='1,8',
                      help='fake CPU device counts; the first is the '
                      'reference')
  parser.add_argument('--steps', type=int, default=20)
  parser.add_argument('--skip', type=int, default=3,
                      help='steps left out of the median step time')
  parser.add_argument('--rounds', type=int, default=2)
  parser.add_argument('--rtol', type=float, default=1e-4)
  parser.add_argument('--quick', action='store_true',
                      help="configs/synthetic.py:tiny, 5 steps, 1 round")
  parser.add_argument('--output', default=DEFAULT_OUTPUT)
  parser.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
  parser.add_argument('--config_arg', default='', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    print(json.dumps(run_steps(args.config_arg, args.steps, args.skip)))
    return
  if args.quick:
    args.config_arg, args.steps, args.skip, args.rounds = 'tiny', 5, 1, 1
    if args.output == DEFAULT_OUTPUT:
      args.output = 'benchmarks/results/scaling_quick.json'
  counts = [int(n) for n in args.devices.split(',')]
  started = time.time()
  busy_cores = common.warn_if_busy()
  runs = {n: [] for n in counts}
  for round_index in range(args.rounds):
    for count in counts:
      command = [sys.executable, str(pathlib.Path(__file__).resolve()),
                 '--worker', f'--config_arg={args.config_arg}',
                 f'--steps={args.steps}', f'--skip={args.skip}']
      common.log(f'{count} device(s), round {round_index + 1}')
      result = common.run_worker(command, common.worker_env(
          fake_devices=count))
      if 'error' in result:
        raise SystemExit(f'{count} device(s) failed ({result["error"]}):\n'
                         f'{result.get("stderr_tail", "")}')
      runs[count].append(result)
  reference = runs[counts[0]][0]
  rows, summary = [], {}
  for count in counts:
    median_step = statistics.median(r['step']['median_s'] for r in runs[count])
    diffs = compare(reference, runs[count][0])
    # A run must also repeat itself exactly across rounds.
    repeat = max(compare(runs[count][0], r)['max_rel_diff_loss']
                 for r in runs[count])
    summary[count] = dict(
        diffs, median_step_s=median_step,
        step_s_rounds=[r['step']['median_s'] for r in runs[count]],
        images_per_s=reference['batch'] / median_step,
        compile_s=statistics.median(r['compile_s'] for r in runs[count]),
        max_rel_diff_loss_across_rounds=repeat,
        same_results=diffs['max_rel_diff_loss'] <= args.rtol and
        diffs['rel_diff_param_norm'] <= args.rtol)
  base = summary[counts[0]]['median_step_s']
  for count in counts:
    s = summary[count]
    s['step_time_over_reference'] = s['median_step_s'] / base
    rows.append([count, s['median_step_s'], s['step_time_over_reference'],
                 s['images_per_s'], s['compile_s'],
                 f'{s["max_rel_diff_loss"]:.1e}',
                 f'{s["rel_diff_param_norm"]:.1e}', str(s['same_results'])])
  payload = {'benchmark': 'scaling', 'date': common.now(),
             'git': common.git_revision(), 'machine': common.machine(),
             'busy_cores_at_start': busy_cores,
             'argv': [sys.executable] + sys.argv, 'settings': vars(args),
             'runs': {str(k): v for k, v in runs.items()},
             'summary': {str(k): v for k, v in summary.items()},
             'total_s': time.time() - started}
  path = common.write_json(args.output, payload)
  print(f'configs/synthetic.py:{args.config_arg} (model '
        f'{reference["variant"]}, {reference["image_size"]} px, global batch '
        f'{reference["batch"]}), {args.steps} steps, median of steps '
        f'{args.skip + 1}..{args.steps}:')
  print(common.format_table(
      ['devices', 'step s', 'x time', 'img/s', 'compile s',
       'loss rel diff', 'norm rel diff', f'same (rtol {args.rtol:g})'], rows))
  print(f'wrote {path}')


if __name__ == '__main__':
  main()
