"""Helpers shared by the benchmark scripts: timing, memory, JSON, tables.

Imports only the standard library, so it runs in both environments: the
main `.venv` (JAX) and the reference `.venv-ref` (PyTorch); `worker_env`,
which only the drivers in `.venv` call, reads `reverse_sd.ops.cpu.tuning`.
Benchmarks import it as `from benchmarks import common` after putting the
repository root on `sys.path`.

A measurement is a list of per-step wall times after warm-up; its summary
(`summarize`) keeps the raw times with the median, so the JSON written by
`write_json` holds every number a table was made from.
"""

from collections.abc import Callable, Sequence
import datetime
import json
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / 'benchmarks' / 'results'

# Host-device-count flag of XLA's CPU backend; stripped from workers that
# must see the real device count, set explicitly by those that must not.
FAKE_DEVICES_FLAG = '--xla_force_host_platform_device_count'

# The model cases of the speed tables: the project's model config fields,
# image size, and batch sizes (train, inference) sized for 2 CPU cores.
# `--quick` shrinks images and batches, and swaps each ViT for the 'tiny'
# variant (QUICK_* below): a smoke run of every code path in seconds.
CASES: dict[str, dict[str, Any]] = {
    # configs/synthetic.py as it is: ConvNet 'small', 64 px, batch 64.
    'convnet_small': dict(backbone='convnet', variant='small', image_size=64,
                          train_batch=64, infer_batch=256),
    # CLIP ViT-B/16 at 224 px (DiffusionDB with CLIP preprocessing).
    'vit_b16': dict(backbone='vit', variant='B/16', image_size=224,
                    train_batch=8, infer_batch=8),
    # CLIP ViT-L/14 at 224 px: accelerators only (benchmarks/gpu.sh).
    'vit_l14': dict(backbone='vit', variant='L/14', image_size=224,
                    train_batch=128, infer_batch=256),
    # The white-box SD 2.1 U-Net encoder (down blocks + mid block, 1024-d
    # context) fine-tuned on cached VAE latents of 512-px images (64x64x4),
    # as configs/diffusiondb_unet.py:sd=2.1,size=512 trains it; JAX only.
    'sd21_unet': dict(backbone='sd_unet', variant='sd2.1', image_size=512,
                      train_batch=1, infer_batch=2),
}
QUICK_IMAGE_SIZE = 32
QUICK_BATCH = 4
QUICK_WARMUP = 2
QUICK_STEPS = 3
QUICK_VARIANTS = {'vit': 'tiny', 'sd_unet': 'from_weights'}
# --quick runs the white-box case on the tiny SD test folder.
QUICK_SD_WEIGHTS = 'tests/golden/tiny_sd'
# The white-box backbone trains on latents; torch rows are not implemented.
JAX_ONLY_BACKBONES = ('sd_unet',)


def parse_cases(text: str, quick: bool = False) -> list[dict[str, Any]]:
  """Cases from 'name[:train_batch[:infer_batch]],...' (names in CASES).

  With `quick`, every case runs at QUICK_IMAGE_SIZE px and QUICK_BATCH,
  with the QUICK_VARIANTS.
  """
  cases = []
  for item in (s.strip() for s in text.split(',') if s.strip()):
    name, *batches = item.split(':')
    if name not in CASES or len(batches) > 2:
      raise SystemExit(f'--cases: {item!r} is not name[:train_batch'
                       f'[:infer_batch]] with a name in {sorted(CASES)}.')
    try:
      sizes = [int(b) for b in batches]
    except ValueError as e:
      raise SystemExit(f'--cases: {item!r} has a batch size that is not an '
                       'integer.') from e
    case = dict(CASES[name], name=name)
    if sizes:
      case['train_batch'] = sizes[0]
      case['infer_batch'] = sizes[1] if len(sizes) > 1 else 2 * sizes[0]
    if quick:
      case.update(image_size=QUICK_IMAGE_SIZE, train_batch=QUICK_BATCH,
                  infer_batch=QUICK_BATCH, quick=True,
                  variant=QUICK_VARIANTS.get(case['backbone'],
                                             case['variant']))
      if case['backbone'] == 'sd_unet':
        case['init_from'] = QUICK_SD_WEIGHTS
    cases.append(case)
  if not cases:
    raise SystemExit('--cases is empty.')
  return cases


def cores() -> list[int]:
  """The CPU cores this process may run on."""
  return sorted(os.sched_getaffinity(0))


def peak_rss_mb() -> float:
  """This process's peak resident memory (VmHWM), in MiB."""
  try:
    with open('/proc/self/status', encoding='ascii') as f:
      for line in f:
        if line.startswith('VmHWM:'):
          return int(line.split()[1]) / 1024  # kB.
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB.


def summarize(times_s: Sequence[float]) -> dict[str, Any]:
  """Median, min, max and spread of per-step times, with the raw times."""
  times = [float(t) for t in times_s]
  median = statistics.median(times)
  return {'median_s': median, 'min_s': min(times), 'max_s': max(times),
          # Relative spread: interquartile range over the median.
          'iqr_rel': (_quantile(times, 0.75) - _quantile(times, 0.25)) /
                     median if median else 0.0,
          'steps': len(times), 'times_s': times}


def _quantile(values: Sequence[float], q: float) -> float:
  ordered = sorted(values)
  position = q * (len(ordered) - 1)
  low = int(position)
  high = min(low + 1, len(ordered) - 1)
  return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def time_steps(step: Callable[[], Any], *, warmup: int, steps: int,
               counters: dict[str, float] | None = None
               ) -> tuple[list[float], list[float]]:
  """Runs `step` warmup + steps times; `step` must block until done.

  Args:
    step: the step.
    warmup: untimed steps first.
    steps: timed steps.
    counters: if given, gets this process's page faults
      (`minor_faults_per_step`: memory the kernel mapped in and zeroed) and
      system CPU time (`system_s_per_step`) per timed step.

  Returns:
    (warm-up times, timed times), in seconds.
  """
  if steps < 1:
    raise ValueError(f'steps must be >= 1, got {steps}.')
  warmup_times, times = [], []
  for i in range(warmup + steps):
    if i == warmup:
      usage = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    step()
    (warmup_times if i < warmup else times).append(time.perf_counter() -
                                                   start)
  if counters is not None:
    end = resource.getrusage(resource.RUSAGE_SELF)
    counters['minor_faults_per_step'] = (end.ru_minflt -
                                         usage.ru_minflt) / steps
    counters['system_s_per_step'] = (end.ru_stime - usage.ru_stime) / steps
  return warmup_times, times


def machine() -> dict[str, Any]:
  """What the numbers were measured on: CPU, cores, memory, load."""
  info = {'hostname': platform.node(), 'platform': platform.platform(),
          'python': sys.version.split()[0], 'cpu_count': os.cpu_count(),
          'cores_available': len(cores())}
  cpuinfo = _read('/proc/cpuinfo')
  for line in cpuinfo.splitlines():
    if line.startswith('model name'):
      info['cpu_model'] = line.split(':', 1)[1].strip()
      break
  flags = next((line.split(':', 1)[1].split() for line in
                cpuinfo.splitlines() if line.startswith('flags')), [])
  info['cpu_vector_flags'] = sorted(f for f in flags if f.startswith(
      ('avx', 'fma', 'amx')))
  for line in _read('/proc/meminfo').splitlines():
    if line.startswith('MemTotal:'):
      info['memory_gib'] = round(int(line.split()[1]) / 2**20, 1)
  load = _read('/proc/loadavg').split()
  if load:
    # Load before the run: a busy machine makes every number here slower.
    info['loadavg_1_5_15'] = [float(x) for x in load[:3]]
  info['gpu'] = _gpu_names()
  return info


def _read(path: str) -> str:
  try:
    with open(path, encoding='utf-8', errors='replace') as f:
      return f.read()
  except OSError:
    return ''


def _gpu_names() -> list[str]:
  try:
    out = subprocess.run(
        ['nvidia-smi', '--query-gpu=name,memory.total,driver_version',
         '--format=csv,noheader'], capture_output=True, text=True,
        timeout=20, check=False)
  except (OSError, subprocess.SubprocessError):
    return []
  return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(
      timespec='seconds')


def git_revision() -> str:
  """HEAD plus '+dirty' when the working tree has changes ('' without git)."""
  try:
    head = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=REPO,
                          capture_output=True, text=True, timeout=10,
                          check=False).stdout.strip()
    dirty = subprocess.run(['git', 'status', '--porcelain'], cwd=REPO,
                           capture_output=True, text=True, timeout=10,
                           check=False).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return ''
  return head + ('+dirty' if head and dirty else '')


def write_json(output: str | os.PathLike[str], payload: dict) -> pathlib.Path:
  """Writes `payload` to `output` atomically; relative paths are taken
  from the repository root."""
  path = pathlib.Path(output)
  if not path.is_absolute():
    path = REPO / path
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(path.suffix + '.tmp')
  tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + '\n')
  tmp.replace(path)
  return path


def read_json(path: str | os.PathLike[str]) -> dict | None:
  """The JSON at `path` (relative: from the repository root), or None."""
  path = pathlib.Path(path)
  if not path.is_absolute():
    path = REPO / path
  try:
    return json.loads(path.read_text())
  except (OSError, json.JSONDecodeError):
    return None


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A plain-text table: first column left-aligned, the rest right-aligned.

  Floats get 3 significant digits (small ones) or none after the point
  (large ones); None prints as '-'.
  """
  cells = [[_cell(value) for value in row] for row in rows]
  widths = [max([len(h)] + [len(row[i]) for row in cells])
            for i, h in enumerate(headers)]

  def line(values):
    return '  '.join(v.ljust(w) if i == 0 else v.rjust(w)
                     for i, (v, w) in enumerate(zip(values, widths)))

  return '\n'.join([line(headers), line(['-' * w for w in widths])] +
                   [line(row) for row in cells])


def _cell(value: Any) -> str:
  if value is None:
    return '-'
  if isinstance(value, float):
    if value != value:  # NaN.
      return 'nan'
    if abs(value) >= 100:
      return f'{value:.0f}'
    if abs(value) >= 10:
      return f'{value:.1f}'
    return f'{value:.3g}'
  return str(value)


def worker_env(*, fake_devices: int | None = None,
               threads: int | None = None) -> dict[str, str]:
  """The environment of a measurement subprocess.

  XLA's fake-device flag is removed (or set to `fake_devices`), and the BLAS
  and OpenMP pools get `threads` threads (default: the available cores), the
  count given to torch.set_num_threads too. glibc gets the settings of
  `reverse_sd.ops.cpu.tuning` (the same for every framework).
  """
  env = dict(os.environ)
  flags = [f for f in env.get('XLA_FLAGS', '').split()
           if not f.startswith(FAKE_DEVICES_FLAG)]
  if fake_devices is not None:
    flags.append(f'{FAKE_DEVICES_FLAG}={fake_devices}')
  env['XLA_FLAGS'] = ' '.join(flags)
  threads = threads or len(cores())
  for name in ('OMP_NUM_THREADS', 'MKL_NUM_THREADS', 'OPENBLAS_NUM_THREADS'):
    env[name] = str(threads)
  env.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  env.setdefault('HF_HUB_OFFLINE', '1')
  # Every framework's worker gets the host allocator settings that
  # reverse_sd's entry points make (reverse_sd/ops/cpu/tuning.py: freed blocks
  # stay mapped), so no framework pays page faults the other does not.
  # REVERSE_SD_MALLOC_DEFAULTS=0 gives every worker glibc's defaults.
  env.update(host_memory_env(env))
  env['PYTHONPATH'] = os.pathsep.join(
      [str(REPO)] + [p for p in env.get('PYTHONPATH', '').split(os.pathsep)
                     if p])
  return env


def host_memory_env(environ: dict[str, str]) -> dict[str, str]:
  """The glibc variables of `reverse_sd.ops.cpu.tuning.subprocess_env`."""
  # pylint: disable=g-import-not-at-top
  from reverse_sd.ops.cpu import tuning
  return tuning.subprocess_env(environ)


def run_worker(command: Sequence[str], env: dict[str, str], *,
               timeout_s: float | None = None,
               cpu_list: Sequence[int] | None = None) -> dict[str, Any]:
  """Runs a worker that prints one JSON object as its last stdout line.

  The child is pinned to `cpu_list` (default: this process's cores), so
  every framework runs on the same cores. A failure is returned as
  {'error': ...} with the end of stderr, not raised: one broken
  configuration (e.g. torch.compile) must not lose the others' numbers.
  """
  cpu_list = list(cpu_list or cores())
  start = time.perf_counter()
  try:
    proc = subprocess.run(
        list(command), env=env, cwd=REPO, capture_output=True, text=True,
        timeout=timeout_s, check=False,
        preexec_fn=lambda: os.sched_setaffinity(0, cpu_list))
  except subprocess.TimeoutExpired as e:
    return {'error': f'timed out after {timeout_s} s',
            'stderr_tail': _tail(e.stderr), 'command': list(command),
            'wall_s': time.perf_counter() - start}
  wall = time.perf_counter() - start
  lines = proc.stdout.strip().splitlines()
  result = None
  if lines:
    try:
      result = json.loads(lines[-1])
    except json.JSONDecodeError:
      result = None
  if proc.returncode or not isinstance(result, dict):
    return {'error': f'exit {proc.returncode}', 'command': list(command),
            'stdout_tail': _tail(proc.stdout), 'stderr_tail': _tail(
                proc.stderr), 'wall_s': wall}
  result.setdefault('wall_s', wall)
  result['command'] = list(command)
  return result


def _tail(text: str | bytes | None, chars: int = 3000) -> str:
  if text is None:
    return ''
  if isinstance(text, bytes):
    text = text.decode(errors='replace')
  return text[-chars:]


def busy_cores(seconds: float = 1.0) -> float | None:
  """How many cores other processes kept busy over `seconds` (/proc/stat)."""

  def sample():
    fields = _read('/proc/stat').splitlines()[0].split()[1:]
    values = [int(x) for x in fields]
    return sum(values), values[3] + values[4]  # total, idle + iowait.

  try:
    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
  except (IndexError, ValueError):
    return None
  if total1 == total0:
    return 0.0
  busy = 1 - (idle1 - idle0) / (total1 - total0)
  return busy * (os.cpu_count() or 1)


def warn_if_busy() -> float | None:
  """Warns when other processes hold the cores: every number comes out
  slower, PyTorch's spinning OpenMP threads much more than XLA's.

  Returns:
    The busy cores measured (None where /proc/stat is unreadable).
  """
  busy = busy_cores()
  if busy is not None and busy > 0.25 * len(cores()):
    log(f'WARNING: other processes keep {busy:.1f} of {len(cores())} cores '
        'busy: these numbers are not fit to quote.')
  return busy


def log(message: str) -> None:
  """Progress on stderr (stdout carries tables and worker JSON)."""
  print(f'[{time.strftime("%H:%M:%S")}] {message}', file=sys.stderr,
        flush=True)
