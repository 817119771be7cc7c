"""Multi-process start-up and preemption notices.

`initialize` joins this process to a multi-process JAX job, or does nothing
for a single process:

* explicit `coordinator_address`, `num_processes`, `process_id` (any
  cluster, and several processes on one machine): used as given;
* SLURM (`srun`, SLURM_NTASKS > 1), Open MPI (OMPI_COMM_WORLD_SIZE > 1),
  TPU_WORKER_HOSTNAMES with several hosts (GKE TPU slices) or
  JAX_COORDINATOR_ADDRESS set: `jax.distributed.initialize()` with no
  arguments, which reads them from the cluster's environment;
* `mode='on'` (what `launch/tpu_pod.sh` passes): the same call wherever the
  environment says nothing, e.g. on Cloud TPU VM pod workers, where JAX reads
  the worker list from the TPU metadata server;
* otherwise (or `mode='off'`): one process, no initialisation.

On CPU the processes exchange data through gloo (TCP); each needs its own
fake devices (XLA_FLAGS=--xla_force_host_platform_device_count=N).

`PreemptionNotice` turns SIGTERM (what TPU maintenance events, SLURM
preemption and `kill` send) into a step at which every process stops: the
train loop saves a checkpoint there and raises `Preempted`.
"""

import dataclasses
import logging
import os
import signal
import threading
import types

import jax
from jax.experimental import multihost_utils
import numpy as np

MODES = ('auto', 'on', 'off')


@dataclasses.dataclass(frozen=True)
class Coordinator:
  """Explicit multi-process settings (`--coordinator_address` etc.)."""
  address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None

  def is_set(self) -> bool:
    return any(v is not None for v in dataclasses.astuple(self))

  def check(self) -> None:
    """Raises a clear error unless all or none of the fields are set."""
    given = {'--coordinator_address': self.address,
             '--num_processes': self.num_processes,
             '--process_id': self.process_id}
    missing = [name for name, value in given.items() if value is None]
    if self.is_set() and missing:
      raise ValueError(
          f'{", ".join(missing)} not set: a multi-process run started by '
          'hand needs --coordinator_address=HOST:PORT (process 0\'s host), '
          '--num_processes=N and --process_id=I (0 <= I < N) on every '
          'process.')
    if not self.is_set():
      return
    host, sep, port = self.address.rpartition(':')
    if not sep or not host or not port.isdigit():
      raise ValueError(f'--coordinator_address={self.address!r}: expected '
                       'HOST:PORT, e.g. localhost:12355 or 10.0.0.1:8476.')
    if self.num_processes < 1:
      raise ValueError(f'--num_processes={self.num_processes}: must be >= 1.')
    if not 0 <= self.process_id < self.num_processes:
      raise ValueError(f'--process_id={self.process_id}: must be in [0, '
                       f'{self.num_processes}).')


def detected_cluster(environ: dict[str, str] | None = None) -> str | None:
  """The multi-process cluster named by the environment, or None.

  Only environments that say there is more than one process count: a
  one-task SLURM job or a single-host TPU VM runs as a single process.
  """
  environ = os.environ if environ is None else environ

  def count(name: str) -> int:
    try:
      return int(environ.get(name, '1'))
    except ValueError:
      return 1

  if environ.get('JAX_COORDINATOR_ADDRESS'):
    return 'JAX_COORDINATOR_ADDRESS'
  # SLURM_STEP_NODELIST: inside an `srun` step, where JAX finds its peers.
  if count('SLURM_NTASKS') > 1 and 'SLURM_STEP_NODELIST' in environ:
    return 'slurm'
  if count('OMPI_COMM_WORLD_SIZE') > 1:
    return 'open_mpi'
  hosts = [h for h in environ.get('TPU_WORKER_HOSTNAMES', '').split(',') if h]
  if len(hosts) > 1:
    return 'tpu'
  return None


def initialize(mode: str = 'auto',
               coordinator: Coordinator = Coordinator()) -> None:
  """Starts jax.distributed when this is one of several processes.

  Call before anything else touches JAX devices.

  Args:
    mode: 'auto' (explicit settings, else a cluster the environment names,
      else single process), 'on' (always initialise; JAX finds the cluster)
      or 'off' (single process; explicit settings are an error).
    coordinator: explicit settings; all three fields or none.

  Raises:
    ValueError: a bad mode or incomplete or inconsistent settings.
  """
  if mode not in MODES:
    raise ValueError(f'--multihost={mode!r}; expected one of {MODES}.')
  coordinator.check()
  if mode == 'off':
    if coordinator.is_set():
      raise ValueError('--multihost=off with --coordinator_address etc.: '
                       'drop one or the other.')
    return
  cluster = 'explicit flags' if coordinator.is_set() else detected_cluster()
  if mode == 'auto' and cluster is None:
    return
  # Gloo is JAX's default for cross-process collectives on CPU; named here
  # so a CPU run does not depend on that default. It does not affect
  # accelerator backends.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  logging.info('Initialising jax.distributed (%s).',
               cluster or 'auto-detected by JAX')
  if coordinator.is_set():
    jax.distributed.initialize(
        coordinator_address=coordinator.address,
        num_processes=coordinator.num_processes,
        process_id=coordinator.process_id)
    return
  try:
    jax.distributed.initialize()
  except ValueError as e:
    raise ValueError(
        f'jax.distributed.initialize() found no cluster ({e}). On a machine '
        'that is not a TPU pod, SLURM or Open MPI job, pass '
        '--coordinator_address, --num_processes and --process_id, or '
        '--multihost=auto for a single process.') from e


def describe() -> str:
  """Process index and count, local and global devices, for the log."""
  local = jax.local_devices()
  return (f'process {jax.process_index()} of {jax.process_count()}; '
          f'{len(local)} local device(s) {[d.id for d in local]} of '
          f'{jax.device_count()} ({local[0].platform}, '
          f'{getattr(local[0], "device_kind", "?")})')


def barrier(name: str) -> None:
  """Waits until every process gets here (no-op for a single process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


class Preempted(Exception):
  """Training stopped at `step` on a preemption notice; checkpoint saved."""

  def __init__(self, step: int, message: str):
    super().__init__(message)
    self.step = step


class PreemptionNotice:
  """Says, at the same step on every process, that the job must stop.

  Multi-process with the JAX preemption service (on by default after
  `jax.distributed.initialize`): JAX's own SIGTERM handler notifies the
  coordination service, and `multihost_utils.reached_preemption_sync_point`
  (which Orbax's `CheckpointManager.reached_preemption` wraps) returns True
  on every process at the same step, the one after the latest step any
  process had reached. It needs a call at every step and no device sync.

  Otherwise a Python SIGTERM handler sets a flag (between `start` and
  `stop`); a single process stops at the next step; several processes
  (service off) stop at the next step after an all-gather of the flags,
  which every process makes at every step.
  """

  def __init__(self):
    self._received = False
    self._previous_handler = None
    self._installed = False
    self._use_jax_service = False

  def start(self) -> None:
    """Starts listening; call from the main thread before the loop."""
    if (jax.distributed.is_initialized() and jax.process_count() > 1 and
        jax.config.jax_enable_preemption_service):
      self._use_jax_service = True
      return
    if threading.current_thread() is not threading.main_thread():
      logging.warning('Not in the main thread: SIGTERM will not save a '
                      'checkpoint before exiting.')
      return
    self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
    self._installed = True

  def _on_sigterm(self, signum: int, frame: types.FrameType | None) -> None:
    del signum, frame
    self._received = True

  def reached(self, step: int) -> bool:
    """Whether to save and stop after `step`; the same on every process."""
    if self._use_jax_service:
      return bool(multihost_utils.reached_preemption_sync_point(step))
    if jax.process_count() > 1:
      flags = multihost_utils.process_allgather(np.int32(self._received))
      return bool(np.any(flags))
    return self._received

  def stop(self) -> None:
    """Restores the SIGTERM handler that was there before `start`."""
    if self._installed:
      # None: the previous handler was not set from Python; use the default.
      previous = self._previous_handler
      signal.signal(signal.SIGTERM,
                    signal.SIG_DFL if previous is None else previous)
      self._installed = False
